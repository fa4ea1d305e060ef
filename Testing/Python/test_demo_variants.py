"""benchmarks/demo_variants.py trains what each configuration names, from the demo's own start.

A branch that silently trained another method (no unlabeled data, the engine's default CRL instead
of the variant asked for) would put a wrong row in the table that decides what the demo shows.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest

from benchmarks import demo_variants


@pytest.fixture(scope="module")
def variants():
    return demo_variants


def _args(tmp_path: Path, **extra) -> argparse.Namespace:
    extra.setdefault("amp", False)
    return argparse.Namespace(threads=1, device="cpu", work=tmp_path / "work", out=tmp_path / "out", **extra)


def _folders(tmp_path: Path) -> dict[str, Path]:
    return {name: tmp_path / name for name in ("labeled", "unlabeled", "validation", "test")}


def test_each_branch_trains_its_own_method_from_the_shared_start(variants, tmp_path):
    plan, folders, start = variants.demo.FULL, _folders(tmp_path), tmp_path / "start.pt"
    args = _args(tmp_path)
    configs = {
        key: variants.branch_config(key, folders, tmp_path, plan, 0, args, init_weights=start)
        for key in variants.CONFIGURATIONS
        if key != variants.SHARED_START
    }
    assert len({c.out_dir for c in configs.values()}) == len(configs)
    for key, config in configs.items():
        method, url, crl, _ = variants.METHODS[key]
        defaults = variants.TrainConfig()
        url = defaults.url.enabled if url is None else url
        crl = defaults.crl.enabled if crl is None else crl
        assert config.method.name == method
        assert (config.url.enabled, config.crl.enabled) == (url, crl)
        assert config.init_weights == str(start)
        assert config.optim.iterations == plan.iterations
        assert (config.data.unlabeled is None) == (method == "supervised"), key
    assert configs["ours-crl-foreground"].crl.weighting == "foreground"
    assert configs["ours-crl-foreground-constant"].crl.shrink_iterations == 0
    assert configs["ours-url-random"].url.selection == "random"
    assert configs["ours-crl-after-cleanup"].crl.uncertainty_after_cleanup is True
    shared = variants.branch_config(variants.SHARED_START, folders, tmp_path, plan, 0, args)
    assert shared.optim.iterations == plan.shared_iterations and shared.init_weights is None
    # float32 as the demo, unless --amp asks for the engine's mixed precision.
    assert not any(c.optim.amp for c in [shared, *configs.values()])
    mixed = variants.branch_config("bcp", folders, tmp_path, plan, 0, _args(tmp_path, amp=True), start)
    assert mixed.optim.amp


def test_quick_run_writes_paired_tables_and_reuses_finished_branches(variants, tmp_path, monkeypatch):
    methods = ["shared-start", "supervised", "ours-url-only"]
    argv = ["--plan", "quick", "--seeds", "0", "--threads", "1", "--methods", *methods]
    argv += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    assert variants.main(argv) == 0
    with open(tmp_path / "out" / "demo_variants.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == methods
    assert all(math.isfinite(float(r["last_dice"])) for r in rows)
    assert all(math.isfinite(float(r["shipped_dice"])) for r in rows)
    table = (tmp_path / "out" / "demo_variants.md").read_text()
    assert "| ours-url-only | 1 |" in table and "too few seeds" in table

    def no_training(*_args, **_kwargs):
        raise AssertionError("a finished branch was trained again")

    monkeypatch.setattr(variants, "train", no_training)
    assert variants.main(argv) == 0

    # The shared start trained again (other weights, same path): its branches are stale. They start from
    # its model.pt (best on the validation volumes), as the demo's branches do.
    shared_dir = tmp_path / "work" / "quick" / "seed0" / "runs" / "shared-supervised"
    assert json.loads((shared_dir.parent / "supervised" / "config.json").read_text())["init_weights"] == str(
        shared_dir / "model.pt"
    )
    shared_best = shared_dir / "model.pt"
    shared_best.write_bytes(shared_best.read_bytes() + b"other weights")
    with pytest.raises(AssertionError, match="trained again"):
        variants.main(argv)
