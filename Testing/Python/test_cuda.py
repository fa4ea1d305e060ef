"""The CUDA path on a real GPU: device choice, mixed precision, checkpoints across devices, OOM retry,
MC-dropout and 3D sliding windows.

Every test here is marked ``cuda`` and skipped where torch sees no CUDA GPU; on a GPU machine
``benchmarks/gpu_check.py`` runs them first (``pytest -m cuda``), and ``make test`` runs them too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import inference_speed
from buseg.config import PredictConfig, TrainConfig
from buseg.device import resolve_device
from buseg.errors import ConfigError
from buseg.events import ListSink
from buseg.files.images import Volume, read_image
from buseg.model.checkpoint import load_model, read_checkpoint, save_checkpoint
from buseg.prediction.case import predict_case
from buseg.training.loop import train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU = torch.device("cuda")
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _config(data: dict[str, Path], out: Path, *, method: str = "buarl", iterations: int = 40) -> TrainConfig:
    config = TrainConfig()
    config.method.name = method
    config.data.labeled = str(data["labeled"])
    config.data.unlabeled = str(data["unlabeled"])
    config.model.patch_size = [48, 48]
    config.optim.iterations = iterations
    config.optim.pretrain_iterations = 10
    config.optim.batch_size = 8
    config.validation_interval = 0
    config.log_interval = 1
    config.checkpoint_interval = 1000
    config.device = "auto"
    config.out_dir = str(out)
    return config


@pytest.fixture(scope="module")
def gpu_run(tiny_dataset, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A short ours-method training with --device auto (so: on the GPU): its folder and events."""
    out = tmp_path_factory.mktemp("cuda") / "run"
    sink = ListSink()
    train(_config(tiny_dataset, out, iterations=60), events=sink)
    return out, sink.events


def _test_volume(tiny_dataset: dict[str, Path]) -> Volume:
    return read_image(sorted((tiny_dataset["test"] / "images").iterdir())[0])


def _untrained_vnet(tmp_path: Path, patch_xyz: list[int]) -> Path:
    return inference_speed.model_file(tmp_path / "vnet.pt", "3d", 2, patch_xyz, "zscore")


def test_auto_chooses_the_gpu_and_training_runs_there(gpu_run):
    device, reason = resolve_device("auto")
    assert device.type == "cuda" and "CUDA GPU found" in reason
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    _, events = gpu_run
    started = next(e for e in events if e["event"] == "started")
    assert started["device"].startswith("cuda"), started["device_reason"]
    assert started["amp"] in ("bfloat16", "float16")  # autocast is on by default on a GPU
    assert events[-1]["event"] == "finished" and events[-1]["status"] == "completed"


def test_training_with_and_without_autocast_starts_from_the_same_loss(tiny_dataset, tmp_path):
    first_losses = {}
    for amp in (True, False):
        config = _config(tiny_dataset, tmp_path / f"amp_{amp}", method="supervised", iterations=3)
        config.optim.pretrain_iterations = 0
        config.optim.amp = amp
        sink = ListSink()
        train(config, events=sink)
        first = next(e for e in sink.events if e["event"] == "progress")
        first_losses[amp] = first["losses"]["supervised"]
    # Same seed, same batch, same initial weights: only the arithmetic differs.
    assert first_losses[True] == pytest.approx(first_losses[False], rel=0.03)


def test_prediction_with_autocast_matches_float32(gpu_run, tiny_dataset):
    out, _ = gpu_run
    model = load_model(out / "model.pt", device=GPU)
    volume = _test_volume(tiny_dataset)
    mixed = predict_case(model, volume, PredictConfig(amp=True), keep_probabilities=True)
    full = predict_case(model, volume, PredictConfig(amp=False), keep_probabilities=True)
    assert np.abs(mixed.probabilities - full.probabilities).mean() < 0.01
    assert (mixed.labels == full.labels).mean() > 0.99
    assert np.abs(mixed.uncertainty_map - full.uncertainty_map).mean() < 0.02


def test_checkpoint_written_on_the_gpu_loads_on_the_cpu_and_back(gpu_run, tiny_dataset, tmp_path):
    out, _ = gpu_run
    state = read_checkpoint(out / "last.pt")
    assert all(t.device.type == "cpu" for t in state["weights"].values())  # files never hold GPU tensors
    on_cpu = load_model(out / "model.pt", device="cpu")
    assert next(on_cpu.network.parameters()).device.type == "cpu"
    # Back to the GPU through a file written from the CPU copy.
    save_checkpoint(tmp_path / "copy.pt", weights=on_cpu.network.state_dict(), metadata=on_cpu.metadata)
    back = load_model(tmp_path / "copy.pt", device=GPU)
    assert next(back.network.parameters()).device.type == "cuda"
    for name, tensor in load_model(out / "model.pt", device=GPU).network.state_dict().items():
        assert torch.equal(tensor, back.network.state_dict()[name]), name
    volume = _test_volume(tiny_dataset)
    config = PredictConfig(amp=False)
    cpu = predict_case(on_cpu, volume, config, keep_probabilities=True)
    gpu = predict_case(back, volume, config, keep_probabilities=True)
    # float32 on both (TF32 convolutions on the GPU round to about 1e-3).
    assert np.abs(cpu.probabilities - gpu.probabilities).max() < 0.02
    assert (cpu.labels == gpu.labels).mean() > 0.995


def test_out_of_memory_on_the_card_halves_the_window_batch_and_gives_the_same_result(tmp_path):
    model = load_model(_untrained_vnet(tmp_path, [64, 64, 48]), device=GPU)
    image = np.random.default_rng(0).normal(0, 1, (96, 128, 128)).astype(np.float32)
    volume = Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)  # 3 x 3 x 3 = 27 windows
    one_window = PredictConfig(sw_batch_size=1, amp=False)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(GPU)
    torch.cuda.reset_peak_memory_stats(GPU)
    expected = predict_case(model, volume, one_window)
    per_window = torch.cuda.max_memory_allocated(GPU) - baseline
    warnings: list[str] = []
    total = torch.cuda.get_device_properties(GPU).total_memory
    torch.cuda.empty_cache()
    # Room for about 4 windows at a time: 27 in one pass cannot fit, a few can.
    torch.cuda.set_per_process_memory_fraction(min(1.0, (baseline + 4 * per_window) / total), GPU)
    try:
        lowered = predict_case(
            model, volume, PredictConfig(sw_batch_size=27, amp=False), warn=warnings.append
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, GPU)
        torch.cuda.empty_cache()
    assert any("out of memory" in w and "retrying with" in w for w in warnings), warnings
    # Other batch sizes may take other convolution algorithms: equal up to float rounding.
    assert (lowered.labels == expected.labels).mean() > 0.995
    assert np.abs(lowered.uncertainty_map - expected.uncertainty_map).max() < 0.01


def test_mc_dropout_on_the_gpu_is_seeded_and_differs_from_one_pass(gpu_run, tiny_dataset):
    out, _ = gpu_run
    model = load_model(out / "model.pt", device=GPU)
    volume = _test_volume(tiny_dataset)

    def uncertainty(method: str, seed: int) -> np.ndarray:
        config = PredictConfig(uncertainty=method, samples=8, seed=seed)
        return predict_case(model, volume, config).uncertainty_map

    first, again, other = (
        uncertainty("mc-dropout", 0),
        uncertainty("mc-dropout", 0),
        uncertainty("mc-dropout", 1),
    )
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert np.allclose(first, again, atol=1e-4)  # same seed, same dropout masks
    assert np.abs(first - other).max() > 1e-3  # another seed, other masks
    assert np.abs(first - uncertainty("entropy", 0)).max() > 1e-3  # dropout really sampled on the GPU


def test_3d_sliding_window_on_the_gpu_matches_the_cpu(tmp_path):
    path = _untrained_vnet(tmp_path, [48, 48, 32])
    image = np.random.default_rng(2).normal(0, 1, (70, 90, 100)).astype(np.float32)
    volume = Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    results = {}
    for device in ("cpu", "cuda"):
        config = PredictConfig(
            amp=False, stride=[20, 20, 12]
        )  # windows overlap unevenly, image edges included
        results[device] = predict_case(
            load_model(path, device=device), volume, config, keep_probabilities=True
        )
    # Several windows per GPU pass against one per CPU pass: the blending must not depend on it.
    assert np.abs(results["cpu"].probabilities - results["cuda"].probabilities).max() < 0.02
    mixed = predict_case(load_model(path, device=GPU), volume, PredictConfig(stride=[20, 20, 12]))
    assert mixed.uncertainty_map.shape == image.shape and np.isfinite(mixed.uncertainty_map).all()


def test_float16_training_uses_the_grad_scaler(tiny_dataset, tmp_path, monkeypatch):
    """Cards without bfloat16 train in float16 with a GradScaler; force that path on this card."""
    import buseg.device
    import buseg.training.loop

    def float16(device: torch.device) -> torch.dtype | None:
        return torch.float16 if device.type == "cuda" else None

    monkeypatch.setattr(buseg.device, "autocast_dtype", float16)
    monkeypatch.setattr(buseg.training.loop, "autocast_dtype", float16, raising=False)
    steps = []
    original_step = torch.amp.GradScaler.step

    def counting_step(self, optimizer, *args, **kwargs):
        steps.append(self.get_scale())
        return original_step(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", counting_step)
    sink = ListSink()
    train(_config(tiny_dataset, tmp_path / "fp16", iterations=10), events=sink)
    started = next(e for e in sink.events if e["event"] == "started")
    assert started["amp"] == "float16"
    assert len(steps) == 20  # every iteration (10 pre-training + 10 self-training) went through the scaler
    losses = [e["losses"]["supervised"] for e in sink.events if e["event"] == "progress"]
    assert all(np.isfinite(losses))
