"""The speed work changes how things are computed, never what: each fast path against the straightforward one.

* pseudo-label clean-up: the batched labelling == one labelling per image and class (the
  public code's loop, ``benchmarks/reference_bcp.py``);
* URL selection: one batched ``nanquantile`` == one ``torch.quantile`` per image;
* loss: our BCP loss == the public ``mix_loss`` on the same logits, targets and box;
* channels-last: a training step's loss and gradients == the channels-first step (float tolerance);
* the training loop's teacher keeps the dropout that MC-dropout switches on;
* the reference step and the speed benchmark themselves run.
"""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch

from benchmarks import reference_bcp
from buseg.config import TrainConfig
from buseg.model.networks import build_network, to_channels_last
from buseg.training.copy_paste import box_mask, largest_component_per_class, mix
from buseg.training.methods import Batch, BidirectionalCopyPaste, StepContext
from buseg.training.methods.bcp import MixedBatch
from buseg.training.methods.buarl import _url_selection_per_image, url_selection


def _blobby_labels(rng: np.random.Generator, shape: tuple[int, ...], classes: int) -> torch.Tensor:
    """Random label maps with many components of every class (noisy early pseudo-labels)."""
    return torch.from_numpy(rng.integers(0, classes, size=shape) * (rng.random(shape) < 0.3))


# --------------------------------------------------------------------------------------
# Pseudo-label clean-up


@pytest.mark.parametrize("seed", range(4))
def test_batched_largest_component_equals_the_per_image_loop_2d(seed):
    rng = np.random.default_rng(seed)
    labels = _blobby_labels(rng, (5, 24, 20), 4)
    labels[1] = 0  # an empty image
    labels[2, :, :] = 2  # one class everywhere
    expected = reference_bcp.largest_component_2d(labels, 4).long()
    assert torch.equal(largest_component_per_class(labels, 4), expected)


@pytest.mark.parametrize("seed", range(3))
def test_batched_largest_component_equals_the_per_image_loop_3d(seed):
    rng = np.random.default_rng(seed)
    labels = _blobby_labels(rng, (3, 10, 12, 14), 2)
    expected = reference_bcp.largest_component_3d(labels).long()
    assert torch.equal(largest_component_per_class(labels, 2), expected)


# --------------------------------------------------------------------------------------
# URL selection


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(6, 16, 16), (2, 6, 8, 10)])
def test_batched_url_selection_equals_one_quantile_per_image(seed, shape):
    generator = torch.Generator().manual_seed(seed)
    uncertainty = torch.rand(shape, generator=generator)
    uncertainty[0] = torch.round(uncertainty[0] * 4) / 4  # ties
    truth = (torch.rand(shape, generator=generator) > 0.5).float()
    truth[1] = 0  # an image without truth pixels selects nothing
    for quantile, min_uncertainty in ((0.8, 0.05), (0.5, 0.3), (0.2, 0.0)):
        fast = url_selection(uncertainty, truth, quantile=quantile, min_uncertainty=min_uncertainty)
        slow = _url_selection_per_image(
            uncertainty, truth, quantile=quantile, min_uncertainty=min_uncertainty
        )
        assert torch.equal(fast, slow)
        assert fast[1].sum() == 0


# --------------------------------------------------------------------------------------
# The loss


def test_bcp_loss_equals_the_public_mix_loss():
    torch.manual_seed(0)
    half, classes, size = 3, 4, (20, 24)
    logits = torch.randn(2 * half, classes, *size, dtype=torch.float64)
    pa, pb, ya, yb = (torch.randint(0, classes, (half, *size)) for _ in range(4))
    mask = box_mask(size, 2 / 3, torch.Generator().manual_seed(1))
    # Ours: x_in = unlabeled outside the box, truth inside; x_out = truth outside, unlabeled inside.
    inside, outside = (1 - mask).expand(half, *size), mask.expand(half, *size)
    mixed = MixedBatch(
        images=torch.zeros(2 * half, 1, *size),
        targets=torch.cat([mix(pa, ya, mask), mix(yb, pb, mask)]),
        truth_mask=torch.cat([inside, outside]).double(),
    )
    method = BidirectionalCopyPaste(TrainConfig(), classes)
    ours = method.mixed_loss(
        logits, mixed, pseudo_weight=torch.ones_like(mixed.truth_mask), url_selected=None
    ).loss
    # The public code, on the same logits.
    dice = reference_bcp.MaskedDiceLoss2d(classes)
    loss_mask = mask.long().expand(half, *size)
    unl_dice, unl_ce = reference_bcp.mix_loss_2d(dice, logits[:half], pa, ya, loss_mask, image_is_pseudo=True)
    l_dice, l_ce = reference_bcp.mix_loss_2d(dice, logits[half:], yb, pb, loss_mask)
    public = (unl_dice + l_dice + unl_ce + l_ce) / 2
    # Equal up to the Dice smoothing constant (1e-5 ours, 1e-10 public).
    assert float(ours) == pytest.approx(float(public), rel=1e-6)


# --------------------------------------------------------------------------------------
# Channels-last


def _bcp_step_gradients(network: torch.nn.Module, channels_last: bool, dimension: str):
    """Loss and student gradients of one BCP self-training step with a fixed batch and box."""
    student = copy.deepcopy(network)
    layout = to_channels_last if channels_last else (lambda x: x)
    if channels_last:
        student = student.to(
            memory_format=torch.channels_last if dimension == "2d" else torch.channels_last_3d
        )
    teacher = copy.deepcopy(student).eval()
    config = TrainConfig()
    config.model.dimension = dimension
    method = BidirectionalCopyPaste(config, network.num_classes)
    shape = (16, 16) if dimension == "2d" else (16, 16, 16)
    generator = torch.Generator().manual_seed(3)
    batch = Batch(
        torch.rand(4, 1, *shape, generator=generator),
        torch.randint(0, network.num_classes, (4, *shape), generator=generator),
        torch.rand(4, 1, *shape, generator=generator),
    )

    def teacher_forward(x):
        with torch.no_grad():
            return teacher(layout(x))

    ctx = StepContext(
        student=lambda x: student(layout(x)),
        teacher=teacher,
        teacher_forward=teacher_forward,
        iteration=0,
        stage="train",
        stage_iteration=0,
        generator=torch.Generator().manual_seed(5),
        device=torch.device("cpu"),
    )
    output = method.step(ctx, batch)
    output.loss.backward()
    return float(output.loss.detach()), {n: p.grad.contiguous() for n, p in student.named_parameters()}


def test_channels_last_step_gives_the_same_loss_and_gradients():
    """2D only: the loop keeps 3D networks channels-first (see docs/speed.md)."""
    torch.manual_seed(0)
    # Without dropout: dropout masks are drawn in memory order, so a channels-last run draws
    # other (equally distributed) masks; everything else must agree.
    network = build_network("unet2d", in_channels=1, num_classes=3, base_channels=4, dropout=False)
    loss_first, grads_first = _bcp_step_gradients(network, False, "2d")
    loss_last, grads_last = _bcp_step_gradients(network, True, "2d")
    assert loss_last == pytest.approx(loss_first, rel=1e-5)
    # Compared on the scale of the whole gradient: the bias of a convolution followed by
    # BatchNorm has an exactly zero gradient, so its float noise has no relative precision.
    # Channels-last BatchNorm on the CPU is less precise than channels-first (about 5e-4 of
    # the gradient scale against float64 at 64x64, 3e-6 channels-first): a few 1e-4 is float
    # rounding; a wrong layout or a lost term would be of order 1.
    scale = max(float(g.abs().max()) for g in grads_first.values())
    for key, grad in grads_first.items():
        difference = float((grads_last[key] - grad).abs().max())
        assert difference <= 2e-3 * scale, f"{key}: gradients differ by {difference} (scale {scale})"


def test_training_with_and_without_channels_last_agrees(tmp_path):
    from buseg.data.synthetic import write_dataset
    from buseg.training.loop import train

    folders = write_dataset(tmp_path / "data", labeled=2, unlabeled=2, test=0, shape_zyx=(6, 32, 32))
    losses = {}
    for channels_last in (False, True):
        config = TrainConfig()
        config.method.name = "bcp"
        config.model.dropout = False  # see test_channels_last_step_gives_the_same_loss_and_gradients
        config.data.labeled, config.data.unlabeled = str(folders["labeled"]), str(folders["unlabeled"])
        config.model.patch_size = [32, 32]
        config.optim.iterations, config.optim.pretrain_iterations, config.optim.batch_size = 3, 2, 4
        config.optim.channels_last = channels_last
        config.validation_interval, config.log_interval = 0, 1
        config.out_dir = str(tmp_path / f"run{channels_last}")
        result = train(config)
        losses[channels_last] = [entry["total"] for entry in result.history["losses"]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


# --------------------------------------------------------------------------------------
# MC-dropout in the training loop


def test_training_loop_teacher_keeps_mc_dropout_on(tmp_path, monkeypatch):
    """Each MC-dropout pass of the teacher must differ (the loop's teacher_forward once switched dropout off)."""
    from buseg.data.synthetic import write_dataset
    from buseg.model import uncertainty
    from buseg.training.loop import train

    passes_differ = []
    real = uncertainty.mc_dropout_probabilities

    def spy(model, inputs, samples, forward=None):
        from buseg.model.networks import set_dropout

        model.eval()
        set_dropout(model, True)
        first, second = forward(inputs), forward(inputs)
        passes_differ.append(not torch.equal(first, second))
        return real(model, inputs, samples, forward=forward)

    monkeypatch.setattr(uncertainty, "mc_dropout_probabilities", spy)
    folders = write_dataset(tmp_path / "data", labeled=2, unlabeled=2, test=0, shape_zyx=(6, 32, 32))
    config = TrainConfig()
    config.method.name = "buarl"
    config.uncertainty.method = "mc-dropout"
    config.uncertainty.samples = 2
    config.data.labeled, config.data.unlabeled = str(folders["labeled"]), str(folders["unlabeled"])
    config.model.patch_size = [32, 32]
    config.optim.iterations, config.optim.pretrain_iterations, config.optim.batch_size = 2, 0, 4
    config.validation_interval = 0
    config.out_dir = str(tmp_path / "run")
    train(config)
    assert passes_differ and all(passes_differ)


# --------------------------------------------------------------------------------------
# The benchmark's own pieces


@pytest.mark.parametrize("dimension", ["2d", "3d"])
@pytest.mark.parametrize("semantics", ["public", "ours"])
def test_reference_step_runs_and_learns(dimension, semantics):
    torch.manual_seed(0)
    name, classes = ("unet2d", 4) if dimension == "2d" else ("vnet", 2)
    student = build_network(name, in_channels=1, num_classes=classes, base_channels=4)
    teacher = copy.deepcopy(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    step = reference_bcp.ReferenceBCP(student, teacher, optimizer, num_classes=classes, semantics=semantics)
    shape = (32, 32) if dimension == "2d" else (16, 16, 16)
    images = torch.rand(4, 1, *shape)
    targets = (images[:, 0] > 0.5).long()
    before = [p.clone() for p in teacher.parameters()]
    losses = [step.step(images, targets, images.flip(0)).loss for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))  # EMA moved


def test_speed_benchmark_runs_side_by_side(tmp_path):
    from benchmarks import speed

    code = speed.main(
        [
            "--settings",
            "smoke-2d",
            "--configs",
            "bcp",
            "reference",
            "reference same-semantics",
            "--warmup",
            "1",
            "--timed",
            "1",
            "--memory",
            "--data-root",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    rows = {r["configuration"]: r for r in csv.DictReader((tmp_path / "speed_cpu.csv").open())}
    assert set(rows) == {"bcp", "reference", "reference same-semantics"}
    assert not any(r["error"] for r in rows.values())
    assert float(rows["bcp"]["median_s"]) > 0 and float(rows["bcp"]["speedup_vs_reference"]) > 0
    assert "speed-up" in (tmp_path / "speed_cpu.md").read_text()


def test_in_place_activations_give_the_same_loss_and_gradients():
    """The U-Net's LeakyReLU runs in place (less memory); a copy with out-of-place ones must agree exactly."""
    torch.manual_seed(0)
    in_place = build_network("unet2d", in_channels=1, num_classes=4, base_channels=4)
    assert any(isinstance(m, torch.nn.LeakyReLU) and m.inplace for m in in_place.modules())
    plain = copy.deepcopy(in_place)
    for module in plain.modules():
        if isinstance(module, torch.nn.LeakyReLU):
            module.inplace = False
    images, targets = torch.rand(4, 1, 32, 32), torch.randint(0, 4, (4, 32, 32))
    losses = []
    for network in (in_place, plain):
        torch.manual_seed(1)  # the same dropout masks
        loss = torch.nn.functional.cross_entropy(network(images), targets)
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(in_place.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
