"""Mixed precision in training: bfloat16 autocast on CPUs that run it natively, float32 otherwise.

The suite pins float32 (conftest sets BUSEG_CPU_BF16=0); these tests opt in with
BUSEG_CPU_BF16=1. bfloat16 autocast also runs (emulated, slower) on CPUs without native
support, so these tests pass on any CPU.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from buseg.config import TrainConfig
from buseg.device import (
    autocast_dtype,
    cpu_native_bf16,
    native_bf16_from_flags,
    parse_cpuinfo_flags,
    precision_description,
)
from buseg.events import ListSink
from buseg.model.checkpoint import read_checkpoint
from buseg.model.networks import Conv3dBf16Safe, build_network
from buseg.training.loop import train

CPU = torch.device("cpu")


def test_cpu_flags_decide_bf16():
    x86 = parse_cpuinfo_flags("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert native_bf16_from_flags(x86) == (True, "CPU has AVX512-BF16")
    plain_avx512 = parse_cpuinfo_flags("flags\t\t: fpu sse avx512f avx512bw\n")
    assert native_bf16_from_flags(plain_avx512)[0] is False  # emulated bf16 is slower than fp32
    arm = parse_cpuinfo_flags("Features\t: fp asimd bf16 i8mm\n")
    assert native_bf16_from_flags(arm) == (True, "CPU has ARM BF16")
    assert native_bf16_from_flags(None)[0] is False


def test_environment_overrides_detection(monkeypatch):
    monkeypatch.setenv("BUSEG_CPU_BF16", "1")
    assert cpu_native_bf16() == (True, "BUSEG_CPU_BF16=1")
    assert autocast_dtype(CPU) is torch.bfloat16
    assert precision_description(CPU, True) == "bfloat16 autocast (BUSEG_CPU_BF16=1)"
    assert precision_description(CPU, False) == "float32 (--no-amp)"
    monkeypatch.setenv("BUSEG_CPU_BF16", "0")
    assert autocast_dtype(CPU) is None
    assert precision_description(CPU, True) == "float32 (BUSEG_CPU_BF16=0)"


def _config(data, out, *, amp: bool = True, iterations: int = 40) -> TrainConfig:
    c = TrainConfig()
    c.method.name = "buarl"
    c.data.labeled = str(data["labeled"])
    c.data.unlabeled = str(data["unlabeled"])
    c.model.patch_size = [48, 48]
    c.optim.iterations = iterations
    c.optim.pretrain_iterations = 8
    c.optim.batch_size = 4
    c.optim.amp = amp
    c.out_dir = str(out)
    c.validation_interval = 0
    c.log_interval = 4
    c.checkpoint_interval = 1000
    return c


def _weights_digest(path) -> str:
    weights = read_checkpoint(path)["weights"]
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(weights[name].numpy().tobytes())
    return digest.hexdigest()


def _train_losses(config: TrainConfig) -> tuple[list[float], list[dict]]:
    sink = ListSink()
    train(config, events=sink)
    progress = [e for e in sink.events if e["event"] == "progress" and e["stage"] == "train"]
    return [e["losses"]["supervised"] for e in progress], sink.events


def test_no_amp_on_a_bf16_cpu_is_exactly_float32(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("BUSEG_CPU_BF16", "0")
    train(_config(tiny_dataset, tmp_path / "fp32", iterations=12))
    monkeypatch.setenv("BUSEG_CPU_BF16", "1")
    train(_config(tiny_dataset, tmp_path / "no_amp", amp=False, iterations=12))
    assert _weights_digest(tmp_path / "no_amp" / "final.pt") == _weights_digest(
        tmp_path / "fp32" / "final.pt"
    )


@pytest.mark.slow
def test_bf16_training_reaches_the_fp32_loss_and_keeps_fp32_model_files(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("BUSEG_CPU_BF16", "0")
    fp32_losses, _ = _train_losses(_config(tiny_dataset, tmp_path / "fp32"))
    monkeypatch.setenv("BUSEG_CPU_BF16", "1")
    bf16_losses, events = _train_losses(_config(tiny_dataset, tmp_path / "bf16"))
    started = next(e for e in events if e["event"] == "started")
    assert started["amp"] == "bfloat16"
    assert started["precision"] == "bfloat16 autocast (BUSEG_CPU_BF16=1)"
    # It is a different computation (not equal weights) that learns as well: the supervised loss
    # falls, and its mean over the last windows is within 15% of float32's.
    assert _weights_digest(tmp_path / "bf16" / "final.pt") != _weights_digest(tmp_path / "fp32" / "final.pt")
    assert bf16_losses[-1] < bf16_losses[0]
    fp32_end, bf16_end = sum(fp32_losses[-3:]) / 3, sum(bf16_losses[-3:]) / 3
    assert abs(bf16_end - fp32_end) <= 0.15 * fp32_end, (fp32_losses, bf16_losses)
    for name in ("final.pt", "model.pt", "last.pt"):
        payload = read_checkpoint(tmp_path / "bf16" / name)
        assert {w.dtype for w in payload["weights"].values() if w.is_floating_point()} == {torch.float32}
    state = read_checkpoint(tmp_path / "bf16" / "last.pt")["training_state"]
    assert {t.dtype for t in state["teacher"].values() if t.is_floating_point()} == {torch.float32}


def _gradients(module: torch.nn.Module, x: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = module(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def test_3d_convolution_of_a_two_voxel_deep_input_has_the_float32_weight_gradient():
    # torch 2.13's oneDNN bfloat16 weight gradient of this shape is off by orders of magnitude.
    torch.manual_seed(0)
    conv = Conv3dBf16Safe(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 2, 6, 6)
    bf16, fp32 = _gradients(conv, x, True)["weight"], _gradients(conv, x, False)["weight"]
    assert torch.isfinite(bf16).all()
    assert float((bf16 - fp32).abs().max() / fp32.abs().max()) < 0.02


def test_vnet_bf16_gradients_follow_float32_at_a_patch_depth_of_16():
    torch.manual_seed(0)
    vnet = build_network("vnet", in_channels=1, num_classes=3, base_channels=8, dropout=False)
    x = torch.randn(2, 1, 16, 32, 32)  # depth 2 at the fourth level
    bf16, fp32 = _gradients(vnet, x, True), _gradients(vnet, x, False)
    # Element-wise, bfloat16 gradients of a random network differ a lot (cancellation); their size
    # does not: every weight gradient's norm is within 1.5x of float32's (the wrong kernel gave 5x
    # and inf).
    for name, grad in fp32.items():
        assert torch.isfinite(bf16[name]).all(), name
        if grad.dim() > 1:
            ratio = float(bf16[name].norm() / grad.norm())
            assert 1 / 1.5 < ratio < 1.5, (name, ratio)
