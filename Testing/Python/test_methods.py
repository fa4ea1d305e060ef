"""The methods' building blocks: URL, CRL, copy-paste mixing, EMA, pseudo-label clean-up."""

from __future__ import annotations

import math

import pytest
import torch

from buseg.config import TrainConfig
from buseg.model.uncertainty import normalized_entropy
from buseg.training.copy_paste import box_mask, largest_component_per_class, mix
from buseg.training.loop import ema_update
from buseg.training.losses import region_loss, segmentation_loss
from buseg.training.methods import BUARL, Batch, BidirectionalCopyPaste, StepContext
from buseg.training.methods.bcp import MixedBatch
from buseg.training.methods.buarl import certainty_weights, crl_threshold, url_selection


def _probs(confident: float, shape=(1, 8, 8), classes: int = 2) -> torch.Tensor:
    p = torch.full((shape[0], classes, *shape[1:]), (1 - confident) / (classes - 1))
    p[:, 0] = confident
    return p


def test_normalized_entropy_bounds():
    certain = torch.zeros(1, 4, 2, 2)
    certain[:, 1] = 1
    uniform = torch.full((1, 4, 2, 2), 0.25)
    assert torch.allclose(normalized_entropy(certain), torch.zeros(1, 2, 2), atol=1e-5)
    assert torch.allclose(normalized_entropy(uniform), torch.ones(1, 2, 2), atol=1e-5)


def test_url_selects_exactly_the_high_uncertainty_truth_pixels():
    # 1 image, 8x8: truth pixels are the left half; uncertainty rises with the column index.
    uncertainty = torch.arange(8.0).repeat(8, 1)[None] / 10.0
    truth = torch.zeros(1, 8, 8)
    truth[:, :, :4] = 1
    selected = url_selection(uncertainty, truth, quantile=0.5, min_uncertainty=0.05)
    # Among truth pixels (columns 0..3, u = 0.0..0.3) the upper half is columns 2 and 3.
    expected = torch.zeros(1, 8, 8)
    expected[:, :, 2:4] = 1
    assert torch.equal(selected, expected)
    # Pseudo-labeled pixels are never selected, however uncertain.
    assert selected[:, :, 4:].sum() == 0
    # A confident image selects nothing (min_uncertainty).
    assert url_selection(uncertainty * 0.01, truth, quantile=0.5, min_uncertainty=0.05).sum() == 0


def test_url_raises_the_loss_weight_of_selected_pixels_only():
    config = TrainConfig()
    config.method.name = "buarl"
    config.crl.enabled = False
    config.url.source = "teacher"
    config.url.quantile = 0.5
    config.url.weight = 2.0
    method = BUARL(config, num_classes=2)
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    targets = torch.randint(0, 2, (2, 8, 8))
    truth = torch.ones(2, 8, 8)
    teacher = _probs(0.99, (2, 8, 8))
    teacher[:, :, :, 6:] = 0.5  # columns 6, 7 uncertain
    mixed = MixedBatch(
        images=torch.zeros(2, 1, 8, 8), targets=targets, truth_mask=truth, teacher_probabilities=teacher
    )
    ctx = StepContext(
        student=None,
        teacher=None,
        teacher_forward=None,
        iteration=0,
        stage="train",
        stage_iteration=0,
        generator=torch.Generator(),
        device=torch.device("cpu"),
    )
    out = method.weighted_loss(ctx, logits, mixed)
    out.loss.backward()
    with_url = logits.grad.abs().sum(1).clone()
    assert out.logs["url_selected_fraction"] == pytest.approx(0.25)
    logits.grad = None
    config.url.enabled = False
    BUARL(config, num_classes=2).weighted_loss(ctx, logits, mixed).loss.backward()
    without_url = logits.grad.abs().sum(1)
    # The extra term weighs the uncertain columns far more than the others.
    ratio_uncertain = (with_url[:, :, 6:] / without_url[:, :, 6:].clamp_min(1e-12)).mean()
    ratio_certain = (with_url[:, :, :6] / without_url[:, :, :6].clamp_min(1e-12)).mean()
    assert ratio_uncertain > 1.5 * ratio_certain


def test_crl_uncertain_pseudo_label_pixels_get_no_gradient():
    config = TrainConfig()
    config.method.name = "buarl"
    config.url.enabled, config.crl.enabled, config.crl.weighting = False, True, "discard"
    config.crl.threshold_mode = "fixed"
    config.crl.threshold = 0.5
    method = BUARL(config, num_classes=2)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    targets = torch.randint(0, 2, (2, 8, 8))
    truth = torch.zeros(2, 8, 8)
    truth[:, :4] = 1  # top rows ground truth, bottom rows pseudo-labels
    teacher = _probs(0.99, (2, 8, 8))
    teacher[:, :, 6:, :] = 0.5  # rows 6, 7 (pseudo-labeled) uncertain: normalised entropy 1
    mixed = MixedBatch(
        images=torch.zeros(2, 1, 8, 8), targets=targets, truth_mask=truth, teacher_probabilities=teacher
    )
    ctx = StepContext(
        student=None,
        teacher=None,
        teacher_forward=None,
        iteration=0,
        stage="train",
        stage_iteration=0,
        generator=torch.Generator(),
        device=torch.device("cpu"),
    )
    out = method.weighted_loss(ctx, logits, mixed)
    out.loss.backward()
    grad = logits.grad.abs().sum(1)
    assert torch.all(grad[:, 6:, :] == 0)
    assert torch.all(grad[:, 4:6, :] > 0)
    assert torch.all(grad[:, :4, :] > 0)
    assert out.logs["crl_kept_fraction"] == pytest.approx(0.5)
    # Without CRL the same pixels do get gradient.
    logits.grad = None
    config.crl.enabled = False
    BUARL(config, num_classes=2).weighted_loss(ctx, logits, mixed).loss.backward()
    assert torch.all(logits.grad.abs().sum(1)[:, 6:, :] > 0)


def test_crl_loss_ce_keeps_the_pseudo_label_dice_over_all_pseudo_pixels():
    """--crl-loss ce: uncertain pseudo-labeled pixels leave the CE but stay in the Dice, so they
    get gradient (through the Dice alone); certain ones get more (CE as well)."""
    config = TrainConfig()
    config.method.name = "buarl"
    config.url.enabled, config.crl.enabled, config.crl.weighting = False, True, "discard"
    config.crl.threshold_mode, config.crl.threshold, config.crl.loss = "fixed", 0.5, "ce"
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    targets = torch.randint(0, 2, (2, 8, 8))
    truth = torch.zeros(2, 8, 8)
    truth[:, :4] = 1
    teacher = _probs(0.99, (2, 8, 8))
    teacher[:, :, 6:, :] = 0.5
    mixed = MixedBatch(
        images=torch.zeros(2, 1, 8, 8), targets=targets, truth_mask=truth, teacher_probabilities=teacher
    )
    ctx = StepContext(
        student=None,
        teacher=None,
        teacher_forward=None,
        iteration=0,
        stage="train",
        stage_iteration=0,
        generator=torch.Generator(),
        device=torch.device("cpu"),
    )
    grads = {}
    for loss in ("ce", "ce+dice"):
        config.crl.loss = loss
        logits.grad = None
        BUARL(config, num_classes=2).weighted_loss(ctx, logits, mixed).loss.backward()
        grads[loss] = logits.grad.abs().sum(1).clone()
    assert torch.all(grads["ce+dice"][:, 6:, :] == 0)
    assert torch.all(grads["ce"][:, 6:, :] > 0)
    # The uncertain rows' gradient under 'ce' is the Dice's alone: the same pixels without CRL get more.
    config.crl.enabled = False
    logits.grad = None
    BUARL(config, num_classes=2).weighted_loss(ctx, logits, mixed).loss.backward()
    assert torch.all(logits.grad.abs().sum(1)[:, 6:, :] > grads["ce"][:, 6:, :])


def test_crl_threshold_ramp_and_soft_weights():
    config = TrainConfig()
    config.crl.threshold_mode, config.crl.threshold_start, config.crl.threshold = "ramp", 0.2, 0.6
    config.crl.ramp_iterations = 100
    assert crl_threshold(config, 0) == pytest.approx(0.2)
    assert crl_threshold(config, 50) == pytest.approx(0.4)
    assert crl_threshold(config, 500) == pytest.approx(0.6)
    u = torch.tensor([[0.0, 0.25, 0.5, 1.0]])
    region = torch.ones_like(u)
    soft, _ = certainty_weights(u, region, mode="soft", threshold_mode="fixed", threshold=0.5, quantile=0.8)
    assert torch.allclose(soft, torch.tensor([[1.0, 0.5, 0.0, 0.0]]))
    hard, tau = certainty_weights(
        u, region, mode="hard", threshold_mode="quantile", threshold=0.5, quantile=0.5
    )
    assert 0.25 <= tau <= 0.5 and hard.sum() == 2


def test_crl_class_quantile_keeps_the_most_certain_pixels_of_every_class():
    # Background pseudo-labels certain (0.0..0.09), foreground ones all more uncertain (0.5..0.95):
    # one cut for the batch drops the foreground class entirely, a cut per class keeps 80% of each.
    labels = torch.tensor([[0] * 10 + [1] * 10])
    u = torch.cat([torch.arange(10) / 100, 0.5 + torch.arange(10) / 20]).unsqueeze(0)
    region = torch.ones_like(u)
    region[0, 0] = 0  # a truth pixel: weight 0 whatever its uncertainty
    pooled, _ = certainty_weights(
        u, region, mode="hard", threshold_mode="quantile", threshold=0.5, quantile=0.45
    )
    assert pooled[labels == 1].sum() == 0
    balanced, tau = certainty_weights(
        u,
        region,
        mode="hard",
        threshold_mode="class-quantile",
        threshold=0.5,
        quantile=0.8,
        pseudo_labels=labels,
    )
    assert balanced[0, 0] == 0
    assert balanced[0, 1:8].sum() == 7 and balanced[0, 8:10].sum() == 0  # 9 background pixels in the region
    assert balanced[0, 10:].sum() == 8 and balanced[0, 18:].sum() == 0  # the 2 most uncertain dropped
    assert 0.08 / 2 < tau < 1
    with pytest.raises(ValueError, match="pseudo-labels"):
        certainty_weights(
            u, region, mode="hard", threshold_mode="class-quantile", threshold=0.5, quantile=0.8
        )


def test_box_mask_and_mix():
    g = torch.Generator().manual_seed(3)
    mask = box_mask((12, 9), 2 / 3, g)
    assert mask.shape == (12, 9)
    assert int((mask == 0).sum()) == 8 * 6  # one box, side int(size * 2/3)
    zeros = torch.nonzero(mask == 0)
    assert (zeros.max(0).values - zeros.min(0).values + 1).tolist() == [8, 6]
    a, b = torch.zeros(2, 1, 12, 9), torch.ones(2, 1, 12, 9)
    mixed = mix(a, b, mask)
    assert torch.equal(mixed[0, 0], 1 - mask)  # b pasted inside the box
    la, lb = torch.full((2, 12, 9), 1), torch.full((2, 12, 9), 2)
    assert torch.equal(mix(la, lb, mask)[0], torch.where(mask.bool(), 1, 2))


def test_bcp_mixing_knows_truth_and_pseudo_label_pixels():
    config = TrainConfig()
    config.method.name = "bcp"
    config.method.pseudo_label_lcc = False
    method = BidirectionalCopyPaste(config, num_classes=3)
    labeled = torch.stack([torch.full((1, 16, 16), v) for v in (1.0, 2.0)])
    targets = torch.stack([torch.full((16, 16), v) for v in (1, 2)])
    unlabeled = torch.stack([torch.full((1, 16, 16), v) for v in (10.0, 20.0)])

    class ConstantTeacher(torch.nn.Module):
        def forward(self, x):
            # class 0 for image 10, class 2 for 20 (and anything else), as logits
            logits = torch.zeros(x.shape[0], 3, *x.shape[2:])
            logits[:, 0] = (x[:, 0] == 10.0).float() * 10
            logits[:, 2] = (x[:, 0] != 10.0).float() * 10
            return logits

    teacher = ConstantTeacher()
    ctx = StepContext(
        student=None,
        teacher=teacher,
        teacher_forward=teacher,
        iteration=0,
        stage="train",
        stage_iteration=0,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )
    mixed = method.mix_batch(ctx, Batch(labeled, targets, unlabeled))
    inside = mixed.truth_mask[0] == 1  # x_in: labeled patch inside the box
    # x_in = ua outside, la inside; targets pseudo(ua)=0 outside, truth(la)=1 inside
    assert torch.all(mixed.images[0, 0][inside] == 1.0) and torch.all(mixed.images[0, 0][~inside] == 10.0)
    assert torch.all(mixed.targets[0][inside] == 1) and torch.all(mixed.targets[0][~inside] == 0)
    # x_out = lb outside (truth 2), ub inside (pseudo 2 from the teacher); truth mask is the outside
    assert torch.equal(mixed.truth_mask[1], (~inside).float())
    assert torch.all(mixed.images[1, 0][inside] == 20.0) and torch.all(mixed.images[1, 0][~inside] == 2.0)
    assert 0 < inside.float().mean() < 1


def test_ema_update_is_the_weighted_average():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    s0 = [p.detach().clone() for p in student.parameters()]
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, decay=0.9, step=1000)
    for t, a, b in zip(teacher.parameters(), t0, s0, strict=True):
        assert torch.allclose(t, 0.9 * a + 0.1 * b)
    # Warm-up: at step 0 the teacher becomes the student.
    ema_update(teacher, student, decay=0.99, step=0)
    for t, b in zip(teacher.parameters(), s0, strict=True):
        assert torch.allclose(t, b)


def test_largest_component_per_class_per_image():
    labels = torch.zeros(2, 10, 10, dtype=torch.long)
    labels[0, 1:4, 1:4] = 1  # 9 pixels
    labels[0, 7:9, 7:9] = 1  # 4 pixels: removed
    labels[0, 5, 5] = 2  # single class-2 pixel: kept (largest of its class)
    labels[1, 0:2, 0:2] = 1  # image 2: the small component is the largest of image 2
    cleaned = largest_component_per_class(labels, num_classes=3)
    assert int((cleaned[0] == 1).sum()) == 9 and cleaned[0, 8, 8] == 0
    assert cleaned[0, 5, 5] == 2
    assert int((cleaned[1] == 1).sum()) == 4
    volume = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    volume[0, 0:2, 0:2, 0:2] = 1
    volume[0, 2, 2, 2] = 1  # touches the first block diagonally: 26-connected in 3D
    volume[0, 5, 5, 5] = 1
    cleaned3d = largest_component_per_class(volume, num_classes=2)
    assert int(cleaned3d.sum()) == 9


def test_region_loss_weighting():
    # Uniform logits (p = 0.5 for both classes), target all class 0: CE = ln 2 per pixel;
    # Dice: class 0 = 2*sum(w*0.5) / (sum(w*0.25) + sum(w)) = 0.8 -> loss 0.2, class 1 -> loss 1.
    logits = torch.zeros(1, 2, 4, 4)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    ones = torch.ones(1, 4, 4)
    assert float(region_loss(logits, target, ones, ones)) == pytest.approx((math.log(2) + 0.6) / 2, rel=1e-4)
    assert float(segmentation_loss(logits, target)) == pytest.approx((math.log(2) + 0.6) / 2, rel=1e-4)
    # Half the pixels weigh 0: CE is normalised by the region size, so it halves; Dice ratios stay.
    half = ones.clone()
    half[:, :2] = 0
    assert float(region_loss(logits, target, half, ones)) == pytest.approx(
        (math.log(2) / 2 + 0.6) / 2, rel=1e-4
    )
    # Extra weight adds loss (URL): weight 2 doubles the CE term.
    assert float(region_loss(logits, target, 2 * ones, ones)) == pytest.approx(
        (2 * math.log(2) + 0.6) / 2, rel=1e-4
    )
    # Weight zero everywhere: nothing to learn.
    assert float(region_loss(logits, target, torch.zeros_like(ones), ones)) == pytest.approx(0.0, abs=1e-6)
    # The CE half alone (URL's 'ce' term): the weighted pixels' share of CE / 2, no Dice.
    assert float(region_loss(logits, target, half, ones, dice=False)) == pytest.approx(
        math.log(2) / 4, rel=1e-4
    )


def test_url_ce_term_moves_only_the_selected_pixels():
    """With --url-loss ce the extra term is a CE over the selected pixels: pixels outside the
    selection get exactly the gradient they get without URL (no Dice couples them)."""
    config = TrainConfig()
    config.method.name = "buarl"
    config.crl.enabled = False
    config.url.source, config.url.quantile, config.url.weight, config.url.loss = "teacher", 0.5, 1.0, "ce"
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    targets = torch.randint(0, 3, (2, 8, 8))
    teacher = torch.full((2, 3, 8, 8), 0.01)
    teacher[:, 0] = 0.98
    teacher[:, :, :, 6:] = 1 / 3  # columns 6, 7 uncertain
    mixed = MixedBatch(
        images=torch.zeros(2, 1, 8, 8),
        targets=targets,
        truth_mask=torch.ones(2, 8, 8),
        teacher_probabilities=teacher,
    )
    ctx = StepContext(
        student=None,
        teacher=None,
        teacher_forward=None,
        iteration=0,
        stage="train",
        stage_iteration=0,
        generator=torch.Generator(),
        device=torch.device("cpu"),
    )
    grads = {}
    for enabled in (True, False):
        config.url.enabled = enabled
        logits.grad = None
        out = BUARL(config, num_classes=3).weighted_loss(ctx, logits, mixed)
        out.loss.backward()
        grads[enabled] = logits.grad.clone()
    assert torch.allclose(grads[True][..., :6], grads[False][..., :6], atol=1e-7)
    assert not torch.allclose(grads[True][..., 6:], grads[False][..., 6:], atol=1e-5)


def test_class_quantiles_equal_one_torch_quantile_per_class():
    from buseg.training.methods.buarl import class_quantiles

    generator = torch.Generator().manual_seed(3)
    for size, classes, q in ((1, 1, 0.8), (7, 3, 0.5), (5000, 4, 0.8), (999, 6, 0.93)):
        values = torch.rand(size, generator=generator)
        labels = torch.randint(0, classes, (size,), generator=generator)
        labels[labels == 1] = 2 if classes > 2 else 0  # a class absent in between
        cuts = class_quantiles(values, labels, q)
        for label in range(int(labels.max()) + 1):
            inside = values[labels == label]
            if inside.numel():
                assert float(cuts[label]) == pytest.approx(float(torch.quantile(inside, q)), abs=1e-6)
            else:
                assert torch.isnan(cuts[label])


# --------------------------------------------------------------------------------------
# The method catalog: one entry, and every list of methods has it


@pytest.fixture()
def throwaway_method():
    """A method registered in the catalog for one test (its class: the supervised one), then removed."""
    from buseg.catalogs import methods as catalog

    entry = catalog.register(
        catalog.MethodEntry(
            "throwaway",
            "supervised",
            "Supervised",
            "Throw-away (a test's method)",
            "a test's method",
            uses_unlabeled=False,
            has_pretraining_stage=True,
        )
    )
    yield entry
    catalog.unregister(entry.name)


def _method_action(parser):
    for action in parser._actions:
        if "--method" in action.option_strings:
            return action
        if hasattr(action, "choices") and isinstance(action.choices, dict):  # sub-commands
            for sub in action.choices.values():
                found = _method_action(sub)
                if found is not None:
                    return found
    return None


def _panel_parameters():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "BidirUncertaintySeg"))
    from BidirUncertaintySegLib import parameters

    return parameters


def test_a_method_registered_in_the_catalog_is_offered_everywhere(throwaway_method):
    from buseg.cli import build_parser
    from buseg.config import from_dict
    from buseg.training.methods import Supervised, build_method

    action = _method_action(build_parser())
    assert "throwaway" in action.choices and "throwaway (a test's method)" in action.help
    config = from_dict(TrainConfig, {"method": {"name": "throwaway"}, "data": {"labeled": "x"}}).validate()
    assert type(build_method(config, 2)) is Supervised
    method = _panel_parameters().parameter("method")
    assert "throwaway" in method.choices and throwaway_method.label in method.choiceLabels
    assert method.choiceLabels[method.choices.index("throwaway")] == throwaway_method.label


def test_whether_a_method_needs_unlabeled_data_follows_its_catalog_entry(throwaway_method, tiny_dataset):
    import dataclasses

    from buseg.catalogs import methods as catalog
    from buseg.data.training_data import load_training_data
    from buseg.errors import ConfigError, InputError

    config = TrainConfig()
    config.method.name, config.optim.batch_size = "throwaway", 2
    config.data.labeled = str(tiny_dataset["labeled"])  # no unlabeled images
    config.validate()
    assert load_training_data(config, log=lambda message: None).unlabeled_images == []
    # The fixture removes whatever entry the name has then.
    catalog.CATALOG["throwaway"] = dataclasses.replace(throwaway_method, uses_unlabeled=True)
    with pytest.raises(ConfigError, match="semi-supervised methods need a multiple of 4"):
        config.validate()
    with pytest.raises(InputError, match="method throwaway is semi-supervised but no unlabeled images"):
        load_training_data(config, log=lambda message: None)


def test_a_method_not_in_the_catalog_is_refused_by_the_config_and_the_panel():
    from buseg.config import from_dict
    from buseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"method\.name: 'throwaway' is not one of buarl, bcp"):
        from_dict(TrainConfig, {"method": {"name": "throwaway"}})
    config = TrainConfig()
    config.method.name = "throwaway"
    config.data.labeled = "x"
    with pytest.raises(ConfigError, match="--method must be one of"):
        config.validate()
    assert "throwaway" not in _panel_parameters().parameter("method").choices


def test_the_self_training_learning_rate_follows_the_catalog_entry(monkeypatch, throwaway_method):
    import dataclasses

    from buseg.catalogs import methods as catalog
    from buseg.training.loop import learning_rate

    config = TrainConfig()
    config.optim.lr, config.optim.self_training_lr, config.optim.pretrain_iterations = 0.01, 0.001, 5
    rates = {}
    for name in catalog.method_names():
        config.method.name = name
        rates[name] = (learning_rate(config, "pretrain", 0, 5), learning_rate(config, "train", 0, 5))
    assert rates == {
        "buarl": (0.01, 0.001),
        "bcp": (0.01, 0.001),
        "mean-teacher": (0.01, 0.01),
        "supervised": (0.01, 0.01),
        "throwaway": (0.01, 0.001),  # the entry says it has a pre-training stage; nothing else does
    }
    bcp = catalog.CATALOG["bcp"]
    monkeypatch.setitem(catalog.CATALOG, "bcp", dataclasses.replace(bcp, has_pretraining_stage=False))
    config.method.name = "bcp"
    assert learning_rate(config, "train", 0, 5) == 0.01


def test_the_catalog_agrees_with_the_method_classes_and_loads_without_torch():
    import subprocess
    import sys

    from buseg.catalogs import methods as catalog
    from buseg.training.methods import METHOD_CLASSES

    config = TrainConfig()
    config.optim.pretrain_iterations = 7
    for name, cls in METHOD_CLASSES.items():
        entry = catalog.method_entry(name)
        method = cls(config, 2)
        assert (method.name, method.uses_unlabeled) == (name, entry.uses_unlabeled)
        assert (method.pretrain_iterations == 7) is entry.has_pretraining_stage
    code = (
        "import sys, buseg.config, buseg.catalogs.methods, buseg.training.methods; "
        "print(buseg.catalogs.methods.method_names(), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('buarl', 'bcp', 'mean-teacher', 'supervised') False"


def test_the_teacher_probabilities_follow_the_measures_catalog_not_a_name(monkeypatch):
    # A new training measure of several passes is used by URL/CRL with no change to the method.
    from buseg.catalogs import measures

    calls = []

    def factory(network, forward, samples):
        def probabilities(x):
            calls.append(samples)
            return torch.full((x.shape[0], 2, *x.shape[2:]), 0.5)

        return probabilities

    measures.register(
        measures.UncertaintyMeasure(
            "three-looks", "Three looks", "test", factory, passes=lambda s, d: 3, in_training=True
        )
    )
    try:
        config = TrainConfig()
        config.uncertainty.method, config.uncertainty.samples = "three-looks", 3
        teacher = torch.nn.Conv2d(1, 2, 1)
        ctx = StepContext(
            student=teacher,
            teacher=teacher,
            teacher_forward=lambda x: teacher(x),
            iteration=0,
            stage="train",
            stage_iteration=0,
            generator=torch.Generator(),
            device=torch.device("cpu"),
        )
        images = torch.zeros(2, 1, 4, 4)
        assert torch.equal(
            BUARL(config, num_classes=2).teacher_probabilities(ctx, images), torch.full((2, 2, 4, 4), 0.5)
        )
        assert calls == [3]
        config.uncertainty.method = "entropy"  # one deterministic pass: the teacher's own softmax
        one_pass = BUARL(config, num_classes=2).teacher_probabilities(ctx, images)
        assert calls == [3] and torch.allclose(one_pass, torch.softmax(teacher(images), dim=1))
    finally:
        measures.unregister("three-looks")
