"""The quality benchmark reuses a finished run only when it computed what is asked now.

A wrong "same" silently mixes results of different settings into one table; a wrong
"different" retrains a run (hours on a CPU) into the folder that holds it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import quality as quality_benchmark


@pytest.fixture(scope="module")
def quality():
    return quality_benchmark


def _config(quality, method_key: str, out: Path, **sets):
    args = argparse.Namespace(
        data_root=Path("/data/ACDC"),
        threads=1,
        device="cpu",
        set=[f"{k}={json.dumps(v)}" for k, v in sets.items()],
    )
    return quality.base_config(quality.PRESETS[("acdc", "cpu")], args, method_key, 1337, out)


def _store(quality, config, folder: Path, *, drop: tuple[tuple[str, str], ...] = ()) -> None:
    stored = quality.to_dict(config)
    for section, name in drop:
        del stored[section][name]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(stored))


def test_a_run_reached_through_another_work_folder_is_the_same_run(quality, tmp_path):
    (tmp_path / "a" / "pretrain").mkdir(parents=True)
    (tmp_path / "a" / "pretrain" / "model.pt").write_bytes(b"weights")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pretrain").symlink_to(tmp_path / "a" / "pretrain")
    made = _config(quality, "ours", tmp_path / "a" / "ours")
    made.init_weights = str(tmp_path / "a" / "pretrain" / "model.pt")
    _store(quality, made, tmp_path / "a" / "ours")
    asked = _config(quality, "ours", tmp_path / "b" / "ours")
    asked.init_weights = str(tmp_path / "b" / "pretrain" / "model.pt")
    assert quality._same_config(tmp_path / "a" / "ours", asked)


def test_a_different_setting_is_a_different_run(quality, tmp_path):
    _store(quality, _config(quality, "ours", tmp_path / "run"), tmp_path / "run")
    assert not quality._same_config(
        tmp_path / "run", _config(quality, "ours", tmp_path / "run", **{"optim.lr": 0.02})
    )
    # Our method with CRL reads the CRL settings: another threshold rule is another run.
    with_crl = tmp_path / "with-crl"
    _store(quality, _config(quality, "ours-crl-concentration", with_crl), with_crl)
    assert not quality._same_config(
        with_crl, _config(quality, "ours-crl-concentration", with_crl, **{"crl.threshold_mode": "ramp"})
    )
    assert not (tmp_path / "missing").exists() and not quality._same_config(
        tmp_path / "missing", _config(quality, "ours", tmp_path / "missing")
    )


def test_settings_a_method_does_not_read_do_not_distinguish_its_runs(quality, tmp_path):
    _store(
        quality, _config(quality, "bcp", tmp_path / "run", **{"crl.threshold_mode": "ramp"}), tmp_path / "run"
    )
    assert quality._same_config(tmp_path / "run", _config(quality, "bcp", tmp_path / "run"))


def test_runs_made_before_an_option_existed_match_only_its_reproducing_value(quality, tmp_path):
    made = _config(quality, "ours", tmp_path / "run", **{"url.loss": "ce+dice"})
    _store(quality, made, tmp_path / "run", drop=(("url", "loss"), ("crl", "loss")))
    assert quality._same_config(
        tmp_path / "run", _config(quality, "ours", tmp_path / "run", **{"url.loss": "ce+dice"})
    )
    assert not quality._same_config(
        tmp_path / "run", _config(quality, "ours", tmp_path / "run", **{"url.loss": "ce"})
    )


def test_a_first_stage_is_shared_across_self_training_learning_rates(quality, tmp_path):
    """The copy-paste pre-training never reads the self-training rate: a --set of it must not retrain it
    (a run in which both stages happen does read it)."""

    def first_stage(**sets):
        config = _config(quality, "bcp", tmp_path / "pretrain", **sets)
        config.optim.pretrain_iterations, config.optim.iterations = 2000, 0
        return config

    _store(quality, first_stage(), tmp_path / "pretrain")
    assert quality._same_config(tmp_path / "pretrain", first_stage(**{"optim.self_training_lr": 0.001}))
    assert not quality._same_config(tmp_path / "pretrain", first_stage(**{"optim.lr": 0.001}))
    both = _config(quality, "bcp", tmp_path / "both")
    _store(quality, both, tmp_path / "both")
    assert not quality._same_config(
        tmp_path / "both", _config(quality, "bcp", tmp_path / "both", **{"optim.self_training_lr": 0.001})
    )
