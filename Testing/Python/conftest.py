"""Shared pytest fixtures: small generated datasets (never the benchmark data)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from buseg.data.synthetic import write_dataset

# The benchmarks are a package at the repository root, run from there as `python -m benchmarks.<name>`
# and not installed: the tests import them as `benchmarks.<name>` from whichever folder pytest started in.
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

# Two cores: one intra-op thread per test process keeps timings stable and avoids
# oversubscription when a test launches worker subprocesses.
torch.set_num_threads(1)

# The suite's numbers must not depend on which CPU runs it: float32 unless a test asks for
# bfloat16 itself (buseg.device.cpu_native_bf16 reads this, as do worker subprocesses).
os.environ.setdefault("BUSEG_CPU_BF16", "0")
# Likewise the engine must not depend on whether onnxruntime is installed: 'auto' stays torch
# unless a test opts in (buseg.prediction.onnx_backend.choose_backend reads this).
os.environ.setdefault("BUSEG_ONNX", "0")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> dict[str, Path]:
    """2 labeled, 3 unlabeled, 1 test volume of 16x48x48 with 3 classes (read-only: copy to modify)."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    return write_dataset(root, labeled=2, unlabeled=3, test=1, shape_zyx=(16, 48, 48), seed=7)


@pytest.fixture()
def dataset_copy(tiny_dataset, tmp_path) -> dict[str, Path]:
    """A private, writable copy of ``tiny_dataset``."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset["labeled"].parent, root)
    return {k: root / v.name for k, v in tiny_dataset.items()}


@pytest.fixture()
def crl_default(monkeypatch):
    """``crl_default(module, enabled)``: ``module.TrainConfig()`` then builds the engine's defaults
    with CRL switched as given - for tests that a caller follows the defaults, whatever they are."""

    def switch(module, enabled: bool) -> None:
        engine_config = module.TrainConfig

        def defaults():
            config = engine_config()
            config.crl.enabled = enabled
            return config

        monkeypatch.setattr(module, "TrainConfig", defaults)

    return switch
