"""CRL variants, the URL random control and the fair baselines: each test fails when its rule is
not applied (a variant falling back to the default discard, a control selecting by uncertainty)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from buseg.config import TrainConfig, add_dataclass_arguments, apply_arguments
from buseg.model.uncertainty import entropy_without_argmax, normalized_entropy
from buseg.training.losses import negative_loss
from buseg.training.methods import BUARL, Batch, BidirectionalCopyPaste, StepContext, build_method
from buseg.training.methods.bcp import MixedBatch
from buseg.training.methods.buarl import crl_pseudo_weights, crl_shrink, random_selection_like, url_selection

# One image of 1 x 10 pseudo-labeled pixels: 5 background, 5 foreground (class 1); uncertainty
# rises along each half, the foreground more uncertain than the background.
LABELS = torch.tensor([[[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]])
UNCERTAINTY = torch.tensor([[[0.0, 0.1, 0.2, 0.6, 0.9, 0.1, 0.3, 0.5, 0.7, 0.9]]])
REGION = torch.ones(1, 1, 10)


def _teacher(probability_of_label: float = 0.9) -> torch.Tensor:
    """3-class teacher probabilities: the label's class gets ``probability_of_label``, class 2 a tiny 0.01."""
    p = torch.zeros(1, 3, 1, 10)
    p[:, 2] = 0.01
    p[0, 0][LABELS[0] == 0] = probability_of_label
    p[0, 1][LABELS[0] == 0] = 0.99 - probability_of_label
    p[0, 1][LABELS[0] == 1] = probability_of_label
    p[0, 0][LABELS[0] == 1] = 0.99 - probability_of_label
    return p


def _config(weighting: str, **crl) -> TrainConfig:
    config = TrainConfig()
    config.method.name = "buarl"
    config.url.enabled, config.crl.enabled = False, True
    config.crl.weighting = weighting
    config.crl.threshold_mode, config.crl.threshold = "fixed", 0.5
    for key, value in crl.items():
        setattr(config.crl, key, value)
    return config


def _weights(config: TrainConfig, stage_iteration: int = 0):
    return crl_pseudo_weights(config, UNCERTAINTY, REGION, LABELS, _teacher(), stage_iteration)[0]


CERTAIN = (UNCERTAINTY <= 0.5).float()


def test_discard_removes_the_uncertain_pixels():
    w = _weights(_config("discard"))
    assert torch.equal(w.base, CERTAIN) and w.extra is None and w.negative is None


def test_concentration_keeps_every_pixel_and_adds_weight_to_the_certain_ones():
    w = _weights(_config("concentration"))
    assert torch.equal(w.base, REGION)  # BCP's loss on every pseudo-labeled pixel
    assert torch.equal(w.extra, CERTAIN)


def test_foreground_never_drops_background_and_its_dropped_share_shrinks():
    config = _config("foreground", threshold_mode="class-quantile", quantile=0.6)
    config.optim.iterations = 100  # the default shrink length is the run's length
    kept = [float(_weights(config, t).base[LABELS == 1].sum()) for t in (0, 50, 100)]
    assert torch.equal(_weights(config, 0).base[LABELS == 0], torch.ones(5))  # even u = 0.9
    # 5 foreground pixels, q = 0.6: the cut is the 0.6 quantile (0.5), 3 kept; halfway the kept
    # fraction is 0.8 (cut 0.7, 4 kept); at the end everything is kept.
    assert kept == [3.0, 4.0, 5.0]
    assert crl_shrink(config, 50) == pytest.approx(0.5)
    config.crl.shrink_iterations = 0  # no shrinking
    assert float(_weights(config, 100).base[LABELS == 1].sum()) == 3.0
    # discard with the same cut drops background too
    config.crl.weighting = "discard"
    assert float(_weights(config, 0).base[LABELS == 0].sum()) < 5


def test_negative_learning_acts_on_the_uncertain_pixels_with_the_unlikely_classes():
    w = _weights(_config("negative", negative_threshold=0.05))
    assert torch.equal(w.base, CERTAIN)
    assert torch.equal(w.negative, 1 - CERTAIN)
    # class 2 (teacher 0.01) is a negative class everywhere; the label's class and the runner-up never
    assert bool(w.negative_classes[:, 2].all())
    assert not bool(w.negative_classes[:, :2].any())


def test_negative_loss_value_and_direction():
    probabilities = torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1)
    negatives = torch.tensor([False, True, True]).view(1, 3, 1, 1)
    ones = torch.ones(1, 1, 1)
    expected = -(math.log(0.7) + math.log(0.8)) / 2
    assert float(negative_loss(probabilities, ones, negatives, ones)) == pytest.approx(expected)
    assert float(negative_loss(probabilities, 0 * ones, negatives, ones)) == 0.0
    logits = torch.zeros(1, 3, 1, 1, requires_grad=True)
    negative_loss(torch.softmax(logits, 1), ones, negatives, ones).backward()
    assert logits.grad[0, 1] > 0 and logits.grad[0, 2] > 0 and logits.grad[0, 0] < 0  # away from 1, 2


def _ctx(generator: torch.Generator | None = None) -> StepContext:
    return StepContext(
        student=None,
        teacher=None,
        teacher_forward=None,
        iteration=0,
        stage="train",
        stage_iteration=0,
        generator=generator or torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )


def _pseudo_gradients(config: TrainConfig, mixed: MixedBatch, logits: torch.Tensor) -> torch.Tensor:
    logits.grad = None
    BUARL(config, num_classes=3).weighted_loss(_ctx(), logits, mixed).loss.backward()
    return logits.grad.abs().sum(1).clone()


def _mixed() -> MixedBatch:
    # Two images of 4 x 10: rows 0-1 ground truth, rows 2-3 pseudo-labels with UNCERTAINTY's pattern.
    targets = LABELS.expand(2, 4, 10).clone()
    truth = torch.zeros(2, 4, 10)
    truth[:, :2] = 1
    probabilities = _teacher().expand(2, 3, 4, 10).clone()
    uncertain = (UNCERTAINTY > 0.5).expand(2, 4, 10)
    probabilities[:, 0][uncertain] = 0.49
    probabilities[:, 1][uncertain] = 0.50
    return MixedBatch(torch.zeros(2, 1, 4, 10), targets, truth, probabilities)


@pytest.mark.parametrize("weighting", ["concentration", "negative"])
def test_variants_reach_the_loss_where_discard_gives_nothing(weighting):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 10, requires_grad=True)
    mixed = _mixed()
    uncertain = (UNCERTAINTY > 0.5).expand(2, 4, 10).clone()
    uncertain[:, :2] = False
    discard = _pseudo_gradients(_config("discard"), mixed, logits)
    variant = _pseudo_gradients(_config(weighting), mixed, logits)
    assert torch.all(discard[uncertain] == 0)
    assert torch.all(variant[uncertain] > 0)
    if weighting == "concentration":  # the certain pseudo-labeled pixels weigh more than in BCP
        config = _config("discard")
        config.crl.enabled = False
        bcp = _pseudo_gradients(config, mixed, logits)
        certain = ~uncertain
        certain[:, :2] = False
        assert (variant[certain] / bcp[certain]).mean() > 1.2


def test_uncertainty_after_cleanup_is_taken_among_the_classes_left():
    # The teacher said class 1 (0.65) at a pixel the clean-up set to background.
    p = torch.tensor([0.30, 0.65, 0.05]).view(1, 3, 1, 1)
    assert float(normalized_entropy(p)) > 0.5
    left = torch.tensor([0.30, 0.05]) / 0.35
    expected = float(-(left * left.log()).sum() / math.log(3))
    assert float(entropy_without_argmax(p)) == pytest.approx(expected, rel=1e-4)
    mixed = MixedBatch(
        images=torch.zeros(2, 1, 1, 2),
        targets=torch.zeros(2, 1, 2, dtype=torch.long),
        truth_mask=torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]]),
        teacher_probabilities=p.expand(2, 3, 1, 2).clone(),
        cleanup_changed=torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]]),
    )
    kept = {}
    for after in (False, True):
        config = _config("discard", uncertainty_after_cleanup=after)
        logs = {}
        weights = BUARL(config, 3).pseudo_weights(
            _ctx(), mixed, normalized_entropy(mixed.teacher_probabilities), logs
        )
        kept[after] = weights.base[:, 0, 1].tolist()
    assert kept[False] == [0.0, 0.0]
    assert kept[True] == [1.0, 0.0]  # only the changed pixel is re-scored


def test_copy_paste_mixing_marks_the_pixels_the_cleanup_changed():
    config = TrainConfig()
    config.method.name = "bcp"
    method = BidirectionalCopyPaste(config, num_classes=2)

    class TwoPieces(torch.nn.Module):
        def forward(self, x):  # class 1 on a big block and on one far pixel (removed by the clean-up)
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
            logits[:, 1, 2:8, 2:8] = 5
            logits[:, 1, 14, 14] = 5
            return logits

    ctx = StepContext(None, TwoPieces(), TwoPieces(), 0, "train", 0, torch.Generator().manual_seed(0), "cpu")
    batch = Batch(
        torch.zeros(2, 1, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long), torch.ones(2, 1, 16, 16)
    )
    mixed = method.mix_batch(ctx, batch)
    pseudo = mixed.truth_mask == 0
    changed = mixed.cleanup_changed > 0
    assert not bool(changed[~pseudo].any())
    assert torch.equal(changed, pseudo & (torch.arange(16).view(16, 1) == 14) & (torch.arange(16) == 14))


def test_url_random_control_selects_as_many_truth_pixels_at_random():
    generator = torch.Generator().manual_seed(1)
    uncertainty = torch.rand(3, 12, 12, generator=generator)
    truth = (torch.rand(3, 12, 12, generator=generator) > 0.4).float()
    selected = url_selection(uncertainty, truth, quantile=0.8, min_uncertainty=0.05)
    random = random_selection_like(selected, truth, torch.Generator().manual_seed(2))
    assert torch.equal(random.sum((1, 2)), selected.sum((1, 2)))  # the same number per image
    assert bool((random <= truth).all())  # truth pixels only
    assert not torch.equal(random, selected)
    # Through the method: the same fraction is logged, other pixels are chosen.
    config = TrainConfig()
    config.method.name, config.crl.enabled, config.url.source = "buarl", False, "teacher"
    mixed = MixedBatch(torch.zeros(3, 1, 12, 12), torch.zeros(3, 12, 12, dtype=torch.long), truth)
    chosen, logs = {}, {}
    for rule in ("uncertainty", "random"):
        config.url.selection = rule
        chosen[rule] = BUARL(config, 2).url_selected(_ctx(), None, mixed, uncertainty, logs := {})
        chosen[rule + "_fraction"] = logs["url_selected_fraction"]
    assert chosen["uncertainty_fraction"] == pytest.approx(chosen["random_fraction"])
    assert not torch.equal(chosen["uncertainty"], chosen["random"])


@pytest.mark.parametrize(
    ("flags", "section", "name", "value"),
    [
        (["--crl-weighting", "discard"], "crl", "weighting", "discard"),
        (
            ["--crl-weighting", "foreground", "--crl-shrink-iterations", "300"],
            "crl",
            "shrink_iterations",
            300,
        ),
        (
            ["--crl-weighting", "negative", "--crl-negative-threshold", "0.02"],
            "crl",
            "negative_threshold",
            0.02,
        ),
        (["--crl-uncertainty-after-cleanup"], "crl", "uncertainty_after_cleanup", True),
        (["--crl-extra-weight", "2"], "crl", "extra_weight", 2.0),
        (["--url-selection", "random"], "url", "selection", "random"),
        (["--consistency-rampup-iterations", "50"], "method", "consistency_rampup_iterations", 50),
    ],
)
def test_every_variant_is_a_command_line_flag(flags, section, name, value):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    config = apply_arguments(TrainConfig(), parser.parse_args(flags))
    assert getattr(getattr(config, section), name) == value
    assert getattr(getattr(TrainConfig(), section), name) != value  # the default is not the variant


def test_defaults_are_url_only_and_concentration_when_crl_is_turned_on():
    # The pre-registered rule's pick on ACDC (docs/benchmarks.md): URL alone; `--crl` turns on the
    # best CRL weighting by the same rule.
    config = TrainConfig()
    assert config.url.enabled and not config.crl.enabled
    assert config.crl.weighting == "concentration" and not config.crl.uncertainty_after_cleanup
    assert config.url.selection == "uncertainty"


def test_mean_teacher_ramps_over_the_run_by_default():
    config = TrainConfig()
    config.method.name = "mean-teacher"
    config.optim.iterations = 400
    method = build_method(config, 2)
    assert method.rampup_iterations == 400
    student = torch.nn.Conv2d(1, 2, 1)
    batch = Batch(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 1, 4, 4))
    ctx = StepContext(student, student, student, 399, "train", 399, torch.Generator(), torch.device("cpu"))
    assert method.step(ctx, batch).logs["consistency_weight"] == pytest.approx(0.1, rel=1e-3)
    config.method.consistency_rampup_iterations = 12000  # the recipe's: ends near 0 in a short run
    assert build_method(config, 2).step(ctx, batch).logs["consistency_weight"] < 0.01


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_supervised_is_scored_with_an_ema_teacher_like_every_method(tiny_dataset, tmp_path, which):
    from buseg.model.checkpoint import read_checkpoint
    from buseg.training.loop import train

    config = TrainConfig()
    config.method.name = "supervised"
    config.method.model_weights = which
    config.method.batchnorm_statistics = "running"  # the network exactly as trained
    config.data.labeled = str(tiny_dataset["labeled"])
    config.model.patch_size = [48, 48]
    config.optim.iterations, config.optim.batch_size = 3, 2
    config.validation_interval, config.checkpoint_interval = 0, 1000
    config.out_dir = str(tmp_path / "run")
    result = train(config)
    state = read_checkpoint(result.last_path)["training_state"]
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert model["metadata"]["weights"] == which
    if which == "student":
        assert state["teacher"] is None
        return
    for key, value in model["weights"].items():
        assert torch.equal(value, state["teacher"][key]), key
    assert any(not torch.equal(v, state["student"][k]) for k, v in model["weights"].items())


@pytest.mark.parametrize(
    "settings",
    [
        {"crl.weighting": "concentration"},
        {"crl.weighting": "foreground"},
        {"crl.weighting": "negative", "crl.uncertainty_after_cleanup": True},
        {"url.selection": "random"},
    ],
)
def test_each_variant_runs_in_the_training_loop(tiny_dataset, tmp_path, settings):
    from buseg.events import ListSink
    from buseg.training.loop import train

    config = TrainConfig()
    config.method.name, config.crl.enabled = "buarl", True
    config.data.labeled, config.data.unlabeled = str(tiny_dataset["labeled"]), str(tiny_dataset["unlabeled"])
    config.model.patch_size = [48, 48]
    config.optim.pretrain_iterations, config.optim.iterations, config.optim.batch_size = 2, 4, 4
    config.validation_interval, config.checkpoint_interval, config.log_interval = 0, 1000, 2
    config.out_dir = str(tmp_path / "run")
    for key, value in settings.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    sink = ListSink()
    assert train(config, events=sink).status == "completed"
    stats = [e["stats"] for e in sink.events if e["event"] == "progress" and e["stage"] == "train"][-1]
    assert 0 < stats["crl_kept_fraction"] <= 1 and 0 <= stats["url_selected_fraction"] < 1
    assert ("crl_cleanup_changed_fraction" in stats) == ("crl.uncertainty_after_cleanup" in settings)
