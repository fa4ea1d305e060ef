"""The training loop: every method learns, outputs are complete and protected, the CLI trains."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from buseg.cli import main
from buseg.config import TrainConfig
from buseg.data.synthetic import write_dataset
from buseg.errors import ConfigError, OutputError
from buseg.events import ListSink
from buseg.model.checkpoint import load_model, read_checkpoint
from buseg.training.loop import train, with_clean_batchnorm


def _config(data, out, method, *, dimension="2d", iterations=30, pretrain=10) -> TrainConfig:
    c = TrainConfig()
    c.method.name = method
    c.crl.enabled = method == "buarl"  # both of our method's parts (CRL is off by default)
    c.data.labeled = str(data["labeled"])
    c.data.unlabeled = str(data["unlabeled"])
    c.model.dimension = dimension
    c.model.patch_size = [48, 48] if dimension == "2d" else [32, 32, 16]
    c.optim.iterations = iterations
    c.optim.pretrain_iterations = pretrain
    c.optim.batch_size = 4
    c.out_dir = str(out)
    c.validation_interval = 0
    c.log_interval = 5
    c.checkpoint_interval = 1000
    return c


def _mean(values):
    return float(np.mean(values))


@pytest.mark.parametrize("dimension", ["2d", "3d"])
@pytest.mark.parametrize("method", ["supervised", "mean-teacher", "bcp", "buarl"])
def test_each_method_trains_and_its_loss_falls(tiny_dataset, tmp_path, method, dimension):
    iterations = 40 if dimension == "2d" else 16
    config = _config(
        tiny_dataset,
        tmp_path / "run",
        method,
        dimension=dimension,
        iterations=iterations,
        pretrain=0 if method in ("supervised", "mean-teacher") else 8,
    )
    config.log_interval = 4
    sink = ListSink()
    result = train(config, events=sink)
    assert result.status == "completed"
    losses = [e for e in sink.events if e["event"] == "progress" and e["stage"] == "train"]
    assert len(losses) >= 3
    # The supervised part of the loss is comparable across iterations for every method.
    first = _mean([e["losses"]["supervised"] for e in losses[:2]])
    last = _mean([e["losses"]["supervised"] for e in losses[-2:]])
    assert last < first, f"{method} {dimension}: supervised loss did not fall ({first:.3f} -> {last:.3f})"
    for name in ("model.pt", "final.pt", "last.pt", "history.json", "config.json"):
        assert (tmp_path / "run" / name).is_file()
    assert not (tmp_path / "run" / "train.lock").exists()
    if method == "buarl":
        assert {"url", "crl"} <= set(losses[-1]["losses"])
        assert {"url_selected_fraction", "crl_kept_fraction"} <= set(losses[-1]["stats"])


def test_supervised_overfits_a_tiny_dataset(tmp_path):
    data = write_dataset(tmp_path / "d", labeled=1, unlabeled=0, test=0, shape_zyx=(12, 48, 48), seed=1)
    shutil.copytree(data["labeled"], tmp_path / "val")  # the same volume, to measure the fit
    config = _config(data, tmp_path / "run", "supervised", iterations=250)
    config.data.unlabeled = None
    config.data.validation = str(tmp_path / "val")
    config.data.augment = False
    config.validation_interval = 50
    # The fit of the network being trained: its EMA teacher (what the supervised baseline is scored
    # with by default) averages the last ~100 of these 250 iterations and lags far behind here.
    config.method.model_weights = "student"
    result = train(config)
    assert result.best_metric > 0.9
    model = load_model(result.model_path)
    assert model.metadata["validation"]["dice"] == pytest.approx(result.best_metric)


def test_model_file_round_trip_and_metadata(tiny_dataset, tmp_path):
    config = _config(tiny_dataset, tmp_path / "run", "buarl", iterations=4, pretrain=2)
    result = train(config)
    payload = read_checkpoint(result.last_path)
    assert payload["training_state"]["iteration"] == 6
    model = load_model(result.model_path)
    meta = model.metadata
    assert meta["method"] == "buarl" and meta["dimension"] == "2d"
    assert [c["name"] for c in model.classes] == ["background", "shell", "core", "satellite"]
    assert [c["label_value"] for c in model.classes] == [0, 1, 2, 3]
    assert meta["normalization"] == "minmax"
    assert meta["spacing_mm"] == pytest.approx([1.2, 1.2, 2.5])
    assert meta["config"]["method"]["name"] == "buarl"
    # The loaded network reproduces the saved weights exactly.
    saved = torch.load(result.model_path, weights_only=True)["weights"]
    for key, value in model.network.state_dict().items():
        assert torch.equal(value, saved[key])


def test_output_folder_is_never_silently_overwritten(tiny_dataset, tmp_path):
    config = _config(tiny_dataset, tmp_path / "run", "supervised", iterations=2)
    train(config)
    before = (tmp_path / "run" / "model.pt").read_bytes()
    with pytest.raises(OutputError, match="previous training"):
        train(config)
    assert (tmp_path / "run" / "model.pt").read_bytes() == before
    train(config, overwrite=True)


def test_invalid_config_is_refused_with_the_option_named(tiny_dataset, tmp_path):
    config = _config(tiny_dataset, tmp_path / "run", "bcp")
    config.optim.batch_size = 6
    with pytest.raises(ConfigError, match="batch-size"):
        train(config)
    config = _config(tiny_dataset, tmp_path / "run", "supervised")
    config.model.patch_size = [50, 48]
    with pytest.raises(ConfigError, match="patch-size"):
        train(config)
    config = _config(tiny_dataset, tmp_path / "run", "supervised")
    config.log_interval = 0
    with pytest.raises(ConfigError, match="log-interval"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_checkpoint_interval_zero_saves_only_at_the_end(tiny_dataset, tmp_path):
    """0 means no periodic checkpoint (it used to divide by zero at the first iteration)."""
    config = _config(tiny_dataset, tmp_path / "run", "supervised", iterations=6, pretrain=0)
    config.checkpoint_interval = 0
    sink = ListSink()
    assert train(config, events=sink).status == "completed"
    assert (tmp_path / "run" / "model.pt").exists()
    assert not [e for e in sink.events if e["event"] == "checkpoint" and e.get("iteration", 0) < 6]


def test_buseg_train_command_end_to_end(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "cli_run"
    code = main(
        [
            "train",
            "--method",
            "buarl",
            "--labeled",
            str(tiny_dataset["labeled"]),
            "--unlabeled",
            str(tiny_dataset["unlabeled"]),
            "--validation",
            str(tiny_dataset["test"]),
            "--patch-size",
            "48",
            "48",
            "--iterations",
            "6",
            "--pretrain-iterations",
            "4",
            "--batch-size",
            "4",
            "--validation-interval",
            "5",
            "--log-interval",
            "2",
            "--out",
            str(out),
            "--progress",
            "jsonl",
            "--crl-threshold",
            "0.4",
            "--no-url",
        ]
    )
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0]["event"] == "started" and events[-1]["event"] == "finished"
    assert events[-1]["status"] == "completed"
    config = json.loads((out / "config.json").read_text())
    assert config["crl"]["threshold"] == 0.4 and config["url"]["enabled"] is False
    assert load_model(out / "model.pt").metadata["method"] == "buarl"
    assert (out / "best.pt").is_file()


def test_buseg_train_reports_bad_input_and_exits_non_zero(tmp_path, capsys):
    code = main(
        [
            "train",
            "--labeled",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "run"),
            "--progress",
            "jsonl",
            "--method",
            "supervised",
        ]
    )
    assert code != 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    error = next(e for e in events if e["event"] == "error")
    assert str(tmp_path / "missing") in error["message"]
    assert events[-1]["status"] == "failed"


def test_self_training_starts_from_the_best_pretraining_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    import buseg.training.loop as train_module

    scores = iter([0.9, 0.1, 0.2, 0.3])  # validation at iterations 3, 6 (pre-training), 9, 12
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: {"dice": next(scores)})
    saved: dict[int, dict] = {}
    real_save = train_module.save_checkpoint

    def save_spy(path, **kwargs):
        if path.name == "best.pt":
            saved[kwargs["metadata"]["iteration"]] = {k: v.clone() for k, v in kwargs["weights"].items()}
        return real_save(path, **kwargs)

    teacher_at_switch = {}
    real_ema = train_module.ema_update

    def ema_spy(teacher, student, decay, step):
        if not teacher_at_switch:
            teacher_at_switch.update({k: v.clone() for k, v in teacher.state_dict().items()})
        return real_ema(teacher, student, decay, step)

    monkeypatch.setattr(train_module, "save_checkpoint", save_spy)
    monkeypatch.setattr(train_module, "ema_update", ema_spy)
    config = _config(tiny_dataset, tmp_path / "run", "bcp", iterations=6, pretrain=6)
    config.data.validation = str(tiny_dataset["test"])
    config.validation_interval = 3
    result = train(config)
    assert result.best_iteration == 3
    # The teacher (= the student at the switch) holds the weights of iteration 3, not 6.
    for key, value in saved[3].items():
        assert torch.equal(teacher_at_switch[key], value), key


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"PK\x03\x04garbage" * 10])
def test_garbage_model_file_gets_a_readable_error(tmp_path, content):
    from buseg.errors import ModelFileError

    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=r"model\.pt: not a readable model file"):
        load_model(path)


class _RunsCode:
    """Unpickling this object would create a marker file (what a malicious model file does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_model_file_crafted_to_run_code_is_rejected_without_running_it(tiny_dataset, tmp_path):
    from buseg.errors import ModelFileError

    config = _config(tiny_dataset, tmp_path / "run", "supervised", iterations=1)
    result = train(config)
    payload = torch.load(result.model_path, weights_only=True)
    marker = tmp_path / "code_ran"
    payload["metadata"]["payload"] = _RunsCode(marker)
    evil = tmp_path / "evil.pt"
    torch.save(payload, evil)
    with pytest.raises(ModelFileError, match=r"refused: the file asks to run or import \S+ when loaded"):
        load_model(evil)
    assert not marker.exists()


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_model_files_hold_the_chosen_network(tiny_dataset, tmp_path, which):
    config = _config(tiny_dataset, tmp_path / "run", "bcp", iterations=3, pretrain=2)
    config.method.model_weights = which
    config.method.batchnorm_statistics = "running"  # the network exactly as trained
    result = train(config)
    state = read_checkpoint(result.last_path)["training_state"]
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert model["metadata"]["weights"] == which
    for key, value in model["weights"].items():
        assert torch.equal(value, state[which][key]), key
    other = "student" if which == "teacher" else "teacher"
    assert any(not torch.equal(v, state[other][k]) for k, v in model["weights"].items())


def test_resume_refuses_a_last_pt_of_another_run_before_replacing_anything(tiny_dataset, tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    train(_config(tiny_dataset, run, "supervised", iterations=2))
    train(_config(tiny_dataset, other, "supervised", dimension="3d", iterations=2))
    model_before = (run / "model.pt").read_bytes()
    resume = ["train", "--resume", "--out", str(run), "--progress", "jsonl"]

    def refused(*flags: str) -> str:
        assert main([*resume, *flags]) == 2
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        error = next(e for e in events if e["event"] == "error")
        assert error["path"] == str(run / "last.pt") and (run / "model.pt").read_bytes() == model_before
        return error["message"]

    # Flags naming other data or another network than last.pt's.
    message = refused("--labeled", str(tmp_path / "elsewhere"), "--patch-size", "32", "32")
    assert "--labeled" in message and "--patch-size" in message and "--dimension" not in message
    # The same through the API, where every field that is not its default counts as asked for.
    config = _config(tiny_dataset, run, "supervised", iterations=2)
    config.model.base_channels = 8
    with pytest.raises(ConfigError, match="--base-channels"):
        train(config, resume=True)
    # The flags of the run itself (paths written another way included), or none: resumed.
    same = ["--labeled", str(tiny_dataset["labeled"]) + "/", "--patch-size", "48", "48"]
    assert main([*resume, *same]) == 0
    capsys.readouterr()
    # A last.pt of another run (3D) in this run's folder: refused, the folder's model files kept.
    model_before = (run / "model.pt").read_bytes()
    shutil.copy(other / "last.pt", run / "last.pt")
    assert "--dimension" in refused() and "config.json" in refused()


def test_clean_batchnorm_statistics_are_plain_averages_over_the_batches_on_a_copy():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1, bias=False), torch.nn.BatchNorm2d(3))
    network.eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    batches = [torch.randn(4, 1, 5, 5) * scale + shift for scale, shift in ((1, 0), (2, 5), (0.5, -3))]
    clean = with_clean_batchnorm(network, iter(batches))
    features = [network[0](b).detach() for b in batches]
    expected_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    expected_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features]).mean(0)
    assert torch.allclose(clean[1].running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(clean[1].running_var, expected_var, atol=1e-4)
    assert not clean.training and clean[1].momentum == network[1].momentum
    for key, value in network.state_dict().items():  # the trained network is left as it was
        assert torch.equal(value, before[key]), key


def test_model_files_and_validation_use_clean_batchnorm_statistics(tiny_dataset, tmp_path):
    # Copy-paste training: the teacher's running statistics are those of mixed images; the model
    # files hold its weights with statistics re-estimated on un-mixed training images.
    config = _config(tiny_dataset, tmp_path / "run", "bcp", iterations=4, pretrain=2)
    config.validation_interval = 2
    config.data.validation = str(tiny_dataset["test"])
    assert config.method.batchnorm_statistics == "clean"  # the default
    result = train(config)
    teacher = read_checkpoint(result.last_path)["training_state"]["teacher"]
    weights = torch.load(tmp_path / "run" / "final.pt", weights_only=True)["weights"]
    statistics = [k for k in weights if k.endswith(("running_mean", "running_var"))]
    assert statistics
    for key, value in weights.items():
        if key in statistics:
            assert not torch.equal(value, teacher[key]), key
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(value, teacher[key]), key
    # What validation scored is what the model file holds.
    from buseg.data.training_data import load_training_data
    from buseg.training.loop import evaluate

    model = load_model(result.best_path)
    data = load_training_data(config)
    scored = evaluate(model.network, data, config, torch.device("cpu"), model.network)
    recorded = next(v for v in result.history["validation"] if v["iteration"] == result.best_iteration)
    assert scored["dice"] == pytest.approx(recorded["dice"], abs=1e-6)


def test_last_pt_keeps_what_a_model_file_written_then_would_hold(tiny_dataset, tmp_path):
    config = _config(tiny_dataset, tmp_path / "run", "bcp", iterations=3, pretrain=2)
    result = train(config)
    state = read_checkpoint(result.last_path)["training_state"]
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=True)["weights"]
    assert all(torch.equal(final[k], v) for k, v in state["shipped"].items())
    config.method.batchnorm_statistics = "running"
    result = train(config, overwrite=True)
    assert read_checkpoint(result.last_path)["training_state"]["shipped"] is None
