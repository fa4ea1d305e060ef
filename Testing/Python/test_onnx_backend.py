"""The ONNX Runtime engine: same results as torch, which engine 'auto' picks and why, the export cache
(beside the model, checked against the weights, never someone else's file), clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_files import model_metadata, untrained_network

from buseg.config import PredictConfig
from buseg.errors import ConfigError, ModelFileError, OutputError
from buseg.files.images import Volume, write_image
from buseg.model.checkpoint import LoadedModel, load_model, save_checkpoint
from buseg.prediction import onnx_backend
from buseg.prediction.case import predict_case
from buseg.prediction.onnx_backend import choose_backend, onnx_measure_names
from buseg.prediction.predict_files import predict_files

CPU = torch.device("cpu")
needs_onnxruntime = pytest.mark.skipif(
    onnx_backend.onnxruntime_version() is None, reason="onnxruntime is not installed (the 'onnx' extra)"
)


@pytest.fixture(autouse=True)
def _fresh_sessions(tmp_path, monkeypatch):
    """No session carried over from another test; the user cache folder inside the test's folder."""
    onnx_backend._SESSIONS.clear()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    yield
    onnx_backend._SESSIONS.clear()


def _model(folder, dimension="2d", seed=0) -> LoadedModel:
    metadata = model_metadata([f"c{i}" for i in range(4)], dimension=dimension, colors=[[0.5] * 3] * 4)
    network = untrained_network(metadata, seed=seed)
    for module in network.modules():  # running statistics as after training (folded into the convolutions)
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    save_checkpoint(path, weights=network.state_dict(), metadata=metadata)
    return load_model(path)


def _image(shape=(9, 40, 36)) -> Volume:
    array = np.random.default_rng(0).normal(100.0, 20.0, shape).astype(np.float32)
    array[2:7, 10:30, 8:28] += 80.0
    return Volume(array, (0.9, 1.1, 3.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))


def _count_exports(monkeypatch) -> list[int]:
    calls = []
    original = onnx_backend.export_onnx

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(onnx_backend, "export_onnx", counting)
    return calls


# --------------------------------------------------------------------------------------
# Which engine


def test_auto_picks_onnx_only_on_a_cpu_without_bf16_with_amp_and_a_supported_method(monkeypatch):
    monkeypatch.setattr(onnx_backend, "onnxruntime_version", lambda: "1.0")
    monkeypatch.setenv("BUSEG_ONNX", "1")
    monkeypatch.setenv("BUSEG_CPU_BF16", "0")
    for method in onnx_measure_names():
        assert choose_backend("auto", CPU, method, True, "3d")[0] == "onnx"
    engine, reason = choose_backend("auto", CPU, "mc-dropout", True, "3d")
    assert engine == "torch" and "dropout" in reason
    assert choose_backend("auto", CPU, "entropy", False, "3d") == (
        "torch",
        "auto: --no-amp runs the float32 torch reference",
    )
    assert choose_backend("auto", torch.device("cuda"), "entropy", True, "3d")[0] == "torch"
    monkeypatch.setenv("BUSEG_ONNX", "0")
    assert choose_backend("auto", CPU, "entropy", True, "3d")[0] == "torch"
    monkeypatch.setenv("BUSEG_ONNX", "1")
    monkeypatch.setenv("BUSEG_CPU_BF16", "1")
    engine, reason = choose_backend("auto", CPU, "entropy", True, "3d")
    assert engine == "torch" and "BUSEG_CPU_BF16=1" in reason
    monkeypatch.setenv("BUSEG_CPU_BF16", "0")
    monkeypatch.setattr(onnx_backend, "onnxruntime_version", lambda: None)
    engine, reason = choose_backend("auto", CPU, "entropy", True, "3d")
    assert engine == "torch" and "not installed" in reason
    assert choose_backend("torch", CPU, "entropy", True, "3d")[0] == "torch"


# CPU flag sets: AVX-512 without BF16 (where ONNX Runtime was measured against torch), with AVX512-BF16,
# with AMX-BF16, an ARM CPU with BF16, an older AVX2 laptop, and a system whose flags are unknown.
CPU_FLAGS = {
    "avx512 without bf16": frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}),
    "avx512-bf16": frozenset({"avx2", "avx512f", "avx512_bf16"}),
    "amx-bf16": frozenset({"avx512f", "amx_bf16", "amx_tile"}),
    "arm bf16": frozenset({"asimd", "bf16"}),
    "avx2": frozenset({"avx", "avx2", "fma"}),
    "unknown": None,
}


@pytest.mark.parametrize("cpu", CPU_FLAGS)
@pytest.mark.parametrize("dimension", ["2d", "3d"])
def test_auto_on_the_cpu_runs_onnx_only_for_3d_networks_on_cpus_without_bf16(cpu, dimension):
    """ONNX Runtime float32 was measured faster than torch float32 for the 3D V-Net only (the 2D U-Net:
    0.85-1.01x on AVX-512 without BF16); where the CPU has bfloat16, bfloat16 torch beats both."""
    from buseg.device import native_bf16_from_flags

    native = native_bf16_from_flags(CPU_FLAGS[cpu])
    engine, reason = onnx_backend.auto_cpu_backend(native, dimension, "entropy", "1.31.1")
    has_bf16 = cpu in ("avx512-bf16", "amx-bf16", "arm bf16")
    assert engine == ("onnx" if dimension == "3d" and not has_bf16 else "torch")
    assert reason.startswith(f"auto: {native[1]}")  # why: the CPU's bfloat16, then the network
    if has_bf16:
        assert "bfloat16 torch is the fastest" in reason
    elif dimension == "2d":
        assert "no faster than torch float32 for 2D networks" in reason and "0.85-1.01x" in reason
    else:
        assert "3D V-Net 1.1-2.2x faster" in reason and "ONNX Runtime 1.31.1 runs it" in reason
    # Without onnxruntime, or with a measure it cannot run, torch runs every case, saying why.
    engine, without = onnx_backend.auto_cpu_backend(native, dimension, "entropy", None)
    expected_reason = "not installed" if dimension == "3d" and not has_bf16 else reason
    assert engine == "torch" and expected_reason in without
    assert onnx_backend.auto_cpu_backend(native, dimension, "mc-dropout", "1.31.1")[0] == "torch"


def test_the_run_says_why_auto_kept_torch_for_a_2d_network(tmp_path, monkeypatch):
    from buseg.prediction.case import backend_info

    monkeypatch.setattr(onnx_backend, "onnxruntime_version", lambda: "1.0")
    monkeypatch.setenv("BUSEG_ONNX", "1")
    monkeypatch.setenv("BUSEG_CPU_BF16", "0")
    model = _model(tmp_path / "m", "2d")
    info = backend_info(model, PredictConfig(model_path="m.pt", engine="auto"), CPU)
    assert info["engine"] == "torch" and "no faster than torch float32 for 2D networks" in info["precision"]


def test_engine_onnx_refuses_what_it_cannot_run_in_one_line(monkeypatch):
    monkeypatch.setattr(onnx_backend, "onnxruntime_version", lambda: "1.0")
    assert choose_backend("onnx", CPU, "tta", True, "3d")[0] == "onnx"
    with pytest.raises(ConfigError, match="cannot run --uncertainty mc-dropout"):
        choose_backend("onnx", CPU, "mc-dropout", True, "3d")
    with pytest.raises(ConfigError, match="CPU only"):
        choose_backend("onnx", torch.device("cuda"), "entropy", True, "3d")
    monkeypatch.setattr(onnx_backend, "onnxruntime_version", lambda: None)
    with pytest.raises(ConfigError, match="onnxruntime is not installed") as caught:
        choose_backend("onnx", CPU, "entropy", True, "3d")
    assert "\n" not in caught.value.message
    with pytest.raises(ConfigError, match="--engine must be"):
        PredictConfig(model_path="m.pt", engine="tensorrt").validate()


# --------------------------------------------------------------------------------------
# Same results as torch


@needs_onnxruntime
@pytest.mark.parametrize("dimension", ["2d", "3d"])
@pytest.mark.parametrize("method", onnx_measure_names())
def test_onnx_runtime_equals_torch(tmp_path, dimension, method):
    """Probabilities within 1e-4 (float32 both; measured ~2e-7), labels equal, uncertainty within 1e-4."""
    model = _model(tmp_path / "m", dimension)
    image = _image()
    config = {"uncertainty": method, "samples": 4, "slice_batch_size": 4}
    ours = predict_case(model, image, PredictConfig(engine="onnx", **config), keep_probabilities=True)
    reference = predict_case(model, image, PredictConfig(engine="torch", **config), keep_probabilities=True)
    assert (ours.engine, reference.engine) == ("onnx", "torch")
    assert np.abs(ours.probabilities - reference.probabilities).max() < 1e-4
    assert np.abs(ours.uncertainty_map - reference.uncertainty_map).max() < 1e-4
    assert np.array_equal(ours.labels, reference.labels)


# --------------------------------------------------------------------------------------
# The export cache


@needs_onnxruntime
def test_export_is_cached_beside_the_model_and_redone_when_the_weights_change(tmp_path, monkeypatch):
    exports = _count_exports(monkeypatch)
    model = _model(tmp_path / "m")
    first = predict_case(model, _image(), PredictConfig(engine="onnx"))
    cached, sidecar = tmp_path / "m" / "model.onnx", tmp_path / "m" / "model.onnx.json"
    document = json.loads(sidecar.read_text())
    assert cached.stat().st_size > 0 and document["weights_sha256"] == onnx_backend.weights_sha256(
        model.network
    )
    assert len(exports) == 1
    onnx_backend._SESSIONS.clear()  # as a new process: the file is read, not exported again
    again = predict_case(load_model(tmp_path / "m" / "model.pt"), _image(), PredictConfig(engine="onnx"))
    assert len(exports) == 1 and np.array_equal(again.uncertainty_map, first.uncertainty_map)
    onnx_backend._SESSIONS.clear()
    changed = _model(tmp_path / "m", seed=1)  # same file name, other weights
    result = predict_case(changed, _image(), PredictConfig(engine="onnx"))
    assert len(exports) == 2
    assert json.loads(sidecar.read_text())["weights_sha256"] == onnx_backend.weights_sha256(changed.network)
    reference = predict_case(changed, _image(), PredictConfig(engine="torch"))
    assert np.abs(result.uncertainty_map - reference.uncertainty_map).max() < 1e-4


@needs_onnxruntime
def test_the_weights_are_hashed_once_per_model_not_once_per_case(tmp_path, monkeypatch):
    """Finding a case's session hashed every weight again; the digest is now kept with the network and
    hashed again only when its weights change in place (as load_state_dict does)."""
    hashed = []
    original = onnx_backend.weights_sha256

    def counting(network):
        hashed.append(1)
        return original(network)

    monkeypatch.setattr(onnx_backend, "weights_sha256", counting)
    model = _model(tmp_path / "m")
    config = PredictConfig(engine="onnx")
    for _ in range(3):
        predict_case(model, _image(), config)
    assert len(hashed) == 1
    other = _model(tmp_path / "other", seed=1).network.state_dict()
    model.network.load_state_dict(other)  # the same network object, other weights
    changed = predict_case(model, _image(), config)
    assert len(hashed) == 2
    reference = predict_case(model, _image(), PredictConfig(engine="torch"))
    assert np.abs(changed.uncertainty_map - reference.uncertainty_map).max() < 1e-4


@needs_onnxruntime
def test_a_model_onnx_that_is_not_ours_is_never_replaced(tmp_path, monkeypatch):
    exports = _count_exports(monkeypatch)
    model = _model(tmp_path / "m")
    theirs = tmp_path / "m" / "model.onnx"
    theirs.write_bytes(b"the user's own file")
    predict_case(model, _image(), PredictConfig(engine="onnx"))
    assert theirs.read_bytes() == b"the user's own file"
    assert not (tmp_path / "m" / "model.onnx.json").exists()
    (cached,) = (tmp_path / "user-cache" / "buseg" / "onnx").glob("*.onnx")
    # In the user cache folder every file is ours: one whose sidecar is gone (an interrupted run) is redone.
    (cached.parent / (cached.name + ".json")).unlink()
    onnx_backend._SESSIONS.clear()
    predict_case(model, _image(), PredictConfig(engine="onnx"))
    assert len(exports) == 2 and (cached.parent / (cached.name + ".json")).exists()


@needs_onnxruntime
def test_another_models_export_beside_the_model_is_exported_again_never_run(tmp_path, monkeypatch):
    """model.pt, its sidecar, and another model's model.onnx (copied over it): ran the other network."""
    exports = _count_exports(monkeypatch)
    model, other = _model(tmp_path / "m"), _model(tmp_path / "other", seed=1)
    predict_case(model, _image(), PredictConfig(engine="onnx"))
    predict_case(other, _image(), PredictConfig(engine="onnx"))
    assert len(exports) == 2
    beside = tmp_path / "m" / "model.onnx"
    beside.write_bytes((tmp_path / "other" / "model.onnx").read_bytes())
    onnx_backend._SESSIONS.clear()  # a new process
    origin = onnx_backend.load_session(model.network, lambda: model.network, "2d", model.path)[1]
    assert origin.startswith("exported to") and len(exports) == 3
    onnx_backend._SESSIONS.clear()
    result = predict_case(model, _image(), PredictConfig(engine="onnx"))
    reference = predict_case(model, _image(), PredictConfig(engine="torch"))
    assert np.abs(result.uncertainty_map - reference.uncertainty_map).max() < 1e-4
    document = json.loads((tmp_path / "m" / "model.onnx.json").read_text())
    assert document["onnx_sha256"] == hashlib.sha256(beside.read_bytes()).hexdigest()


@needs_onnxruntime
def test_an_export_and_a_sidecar_of_two_models_are_never_paired(tmp_path, monkeypatch):
    """What two predictions racing while model.pt is replaced can leave: the export of one model and the
    sidecar of the other, in either order; and a file replaced between reading the sidecar and the export."""
    model, other = _model(tmp_path / "m"), _model(tmp_path / "other", seed=1)
    for loaded in (model, other):
        predict_case(loaded, _image(), PredictConfig(engine="onnx"))
    place, digest = tmp_path / "m" / "model.onnx", onnx_backend.weights_sha256(model.network)
    ours, theirs = place.read_bytes(), (tmp_path / "other" / "model.onnx").read_bytes()
    ours_sidecar = (tmp_path / "m" / "model.onnx.json").read_text()
    theirs_sidecar = (tmp_path / "other" / "model.onnx.json").read_text()
    assert onnx_backend._cached_export(place, digest) == ours
    place.write_bytes(theirs)  # the other's export under this model's sidecar
    assert onnx_backend._cached_export(place, digest) is None
    (tmp_path / "m" / "model.onnx.json").write_text(theirs_sidecar)  # this export under the other's sidecar
    place.write_bytes(ours)
    assert onnx_backend._cached_export(place, onnx_backend.weights_sha256(other.network)) is None
    (tmp_path / "m" / "model.onnx.json").write_text(ours_sidecar)
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: theirs if self == place else real_read(self))
    assert onnx_backend._cached_export(place, digest) is None  # replaced after the sidecar was read


@needs_onnxruntime
def test_out_of_memory_in_onnx_runtime_is_the_documented_error_not_bad_alloc(tmp_path):
    """A 4096x4096 patch: ONNX Runtime failed with std::bad_alloc (an exception of its own type, not
    RuntimeError), which ended as 'this is a bug'. Run in a child process whose address space is
    limited once the session is loaded, so that ORT's allocation really fails."""
    model = _model(tmp_path / "m")
    huge = tmp_path / "huge.pt"
    metadata = {**model.metadata, "patch_size": [4096, 4096]}
    save_checkpoint(huge, weights=model.network.state_dict(), metadata=metadata)
    script = f"""
import resource, sys
import numpy as np, psutil
from buseg.model.checkpoint import load_model
from buseg.config import PredictConfig
from buseg.errors import ResourceError
from buseg.prediction.case import predict_case
from buseg.files.images import Volume

image = Volume(np.random.default_rng(0).random((2, 40, 36), dtype=np.float32), (1, 1, 1), (0, 0, 0),
               (1, 0, 0, 0, 1, 0, 0, 0, 1))
config = PredictConfig(engine="onnx", slice_batch_size=1)
predict_case(load_model({str(model.path)!r}), image, config)  # exported and loaded while memory is free
vms = psutil.Process().memory_info().vms
resource.setrlimit(resource.RLIMIT_AS, (vms + 400 * 2**20, resource.RLIM_INFINITY))
try:
    predict_case(load_model({str(huge)!r}), image, config)
except ResourceError as exc:
    print("REFUSED", exc.message)
"""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "user-cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert "REFUSED out of memory on cpu even with one slice per forward pass" in done.stdout, done.stderr[
        -2000:
    ]
    assert "bad_alloc" not in done.stderr


@needs_onnxruntime
def test_no_writable_cache_still_predicts(tmp_path, monkeypatch):
    import buseg.files.safe_files

    def refuse(path, data, *, overwrite=True):
        raise OutputError("cannot write here: read-only file system", path=path)

    monkeypatch.setattr(buseg.files.safe_files, "write_bytes_atomic", refuse)
    model = _model(tmp_path / "m")
    prediction = predict_case(model, _image(), PredictConfig(engine="onnx"))
    assert prediction.engine == "onnx"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.pt"]
    assert not (tmp_path / "user-cache").exists()


@needs_onnxruntime
def test_export_failure_is_a_one_line_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo\nlong traceback text")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ModelFileError, match="exporting the network to ONNX failed: Unsupported") as caught:
        predict_case(_model(tmp_path / "m"), _image(), PredictConfig(engine="onnx"))
    assert "\n" not in caught.value.message


# --------------------------------------------------------------------------------------
# What a run reports


@needs_onnxruntime
def test_predict_summary_names_the_engine_and_precision(tmp_path):
    model = _model(tmp_path / "m")
    image_path = tmp_path / "case.nii.gz"
    write_image(_image(), image_path)
    config = PredictConfig(model_path=model.path, out_dir=str(tmp_path / "out"), engine="onnx")
    result = predict_files([image_path], config)
    summary = json.loads(result.summary_path.read_text())
    assert summary["engine"] == "onnx" and summary["precision"].startswith("float32 ONNX Runtime")
    assert summary["onnx_export"] == f"exported to {tmp_path / 'm' / 'model.onnx'}"
    torch_config = PredictConfig(model_path=model.path, out_dir=str(tmp_path / "out2"), amp=False)
    summary = json.loads(predict_files([image_path], torch_config).summary_path.read_text())
    assert summary["engine"] == "torch" and summary["precision"].startswith(
        "float32 (--no-amp), torch engine"
    )


def test_cli_engine_flag_for_predict_and_rank(tmp_path, capsys):
    from buseg.cli import main

    model = _model(tmp_path / "m")
    image_path = tmp_path / "case.nii.gz"
    write_image(_image(), image_path)
    common = [str(image_path), "--model", model.path, "--progress", "jsonl"]
    out = tmp_path / "refused"
    assert (
        main(["predict", *common, "--out", str(out), "--engine", "onnx", "--uncertainty", "mc-dropout"]) == 2
    )
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    error = next(e for e in events if e["event"] == "error")
    assert "cannot run --uncertainty mc-dropout" in error["message"] and "\n" not in error["message"]
    assert not out.exists()  # refused before any output
    if onnx_backend.onnxruntime_version() is None:
        return
    assert main(["rank", *common, "--out", str(tmp_path / "rank"), "--engine", "onnx"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    started = next(e for e in events if e["event"] == "started")
    assert started["engine"] == "onnx" and started["precision"].startswith("float32 ONNX Runtime")
    assert (tmp_path / "m" / "model.onnx.json").exists()  # rank ran the ONNX engine


def test_the_device_line_says_which_precision_and_engine_ran(tmp_path, capsys):
    from buseg.cli import main

    model = _model(tmp_path / "m")
    image_path = tmp_path / "case.nii.gz"
    write_image(_image(), image_path)
    argv = [str(image_path), "--model", model.path, "--out", str(tmp_path / "out"), "--progress", "plain"]
    assert main(["predict", *argv, "--no-amp"]) == 0
    captured = capsys.readouterr()
    assert "precision: float32 (--no-amp), torch engine (auto: --no-amp" in captured.out + captured.err
