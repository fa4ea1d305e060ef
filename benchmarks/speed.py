"""Training speed and peak memory of every method, side by side with a plain reference BCP step.

What is measured, per *setting* (ACDC 2D: U-Net, batch 24, 128x128 and 256x256; LA 3D:
V-Net, batch 4, 64x64x48 and the published 112x112x80):

* our engine, unchanged: each method runs through :func:`buseg.training.loop.train` itself (the one
  loop: sampling with augmentation, the method's step, backward, SGD, EMA update, logging),
  self-training stage (no pre-training), no validation or checkpoints while timed;
* ``reference (public)``: :class:`reference_bcp.ReferenceBCP` - the public BCP code's
  self-training step written the straightforward way (two teacher passes in train mode,
  per-image per-class connected components with host round trips, two student passes,
  masked Dice/CE ``mix_loss``, EMA through ``state_dict``), fed by the same sampler;
* ``reference (same semantics)``: the same straightforward code computing what our engine
  computes (teacher in eval mode, one teacher pass, one student pass): the like-for-like
  yardstick. Speed-ups against it come from *how* we compute, not from computing something
  else.

Seconds per iteration cover the whole iteration (batch sampling and augmentation included,
identical on both sides). All configurations of a setting run **interleaved in one
process**, one iteration each in turn (round robin, the order rotated every round), so that
the load of a shared machine hits them alike; the first ``--warmup`` iterations of each are
not timed; the table gives the median of the timed ones and the speed-up as the median of
the per-round ratios ``reference / configuration``. The load average is sampled every
round.

Peak memory: on the CPU, the RSS high-water mark (``VmHWM``; ``resource.getrusage`` where there is no /proc) of a **fresh
process per configuration** running one training iteration (the first iteration allocates
everything a step needs), with the RSS before that iteration (interpreter, torch, data,
models) alongside; on a GPU, ``torch.cuda.max_memory_allocated`` of each configuration's
iterations in the timing process (peak statistics reset at each turn).

Data: real ACDC slices (the 136 labeled slices of the first 7 patients and as many
unlabeled slices) and LA volumes (4 labeled, 4 unlabeled) from ``--data-root`` when
present, else synthetic images of the same shapes. Networks start from random weights
(speed does not depend on them; the teacher's noisy early pseudo-labels make connected
components slower than later in training, for both sides).

Usage::

    .venv/bin/python -m benchmarks.speed --preset cpu     # ~30 min on 2 (shared) CPU cores
    .venv/bin/python -m benchmarks.speed --preset cpu-bf16  # each method bf16 vs float32, ~25 min
    .venv/bin/python -m benchmarks.speed --preset gpu     # CUDA: more iterations, AMP as configured
    .venv/bin/python -m benchmarks.speed --settings acdc-128 --configs bcp buarl reference --timed 5

Writes ``speed_<preset>.csv`` and ``speed_<preset>.md`` to ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# libgomp's default wait policy spins at every barrier; on a machine whose cores are shared with
# other jobs that spinning takes the CPU from the thread being waited for (measured 2-5x slower
# iterations here, docs/speed.md). Every configuration runs under the same, passive, policy
# (``--single`` leaves the environment as it is: it is the tool to compare the policies).
if "--single" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch


def _one_malloc_arena() -> None:
    """glibc: one malloc arena for all threads.

    Each configuration runs in its own thread, and glibc gives every thread its own arena that
    keeps the memory of that configuration's largest iteration: the process would hold the
    sum of all peaks (measured 6.5 GB after the 128x128 setting). With one arena the
    configurations, which never run at the same time, reuse the same memory.
    """
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 1)  # M_ARENA_MAX = -8


_one_malloc_arena()

from benchmarks import reference_bcp  # noqa: E402
from benchmarks.paths import module_command, shown_command, shown_path  # noqa: E402
from benchmarks.reference_bcp import ReferenceBCP  # noqa: E402
from buseg.config import TrainConfig  # noqa: E402
from buseg.data.sampling import PatchSampler, SliceSampler  # noqa: E402
from buseg.data.sources.acdc import acdc_split  # noqa: E402
from buseg.data.sources.hdf5 import read_h5  # noqa: E402
from buseg.data.sources.la import read_la_volume  # noqa: E402
from buseg.data.training_data import TrainingData  # noqa: E402
from buseg.device import precision_description  # noqa: E402
from buseg.events import EventSink  # noqa: E402
from buseg.model.networks import build_network  # noqa: E402
from buseg.training.loop import train  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COMMAND = module_command(__file__)

ACDC_CLASSES = ("right ventricle", "myocardium", "left ventricle")


# --------------------------------------------------------------------------------------
# What runs


@dataclass(frozen=True)
class Setting:
    """A data configuration: dimension, input size (x y [z]) and batch size."""

    name: str
    dimension: str
    patch_size: tuple[int, ...]
    batch_size: int

    @property
    def label(self) -> str:
        size = "x".join(str(s) for s in self.patch_size)
        return f"{'ACDC 2D' if self.dimension == '2d' else 'LA 3D'} {size}, batch {self.batch_size}"


SETTINGS = {
    "acdc-128": Setting("acdc-128", "2d", (128, 128), 24),
    "acdc-256": Setting("acdc-256", "2d", (256, 256), 24),
    "la-64": Setting("la-64", "3d", (64, 64, 48), 4),
    "la-112": Setting("la-112", "3d", (112, 112, 80), 4),
    # Seconds, not minutes: for checking the harness itself (tests).
    "smoke-2d": Setting("smoke-2d", "2d", (32, 32), 8),
    "smoke-3d": Setting("smoke-3d", "3d", (32, 32, 16), 4),
}


@dataclass(frozen=True)
class Configuration:
    """One thing to time: our engine with config overrides, or the reference step."""

    name: str
    kind: str  # "engine" or "reference"
    overrides: tuple[tuple[str, Any], ...] = ()
    semantics: str = "public"  # reference only

    def describe(self) -> str:
        if self.kind == "reference":
            return f"reference BCP step, {self.semantics} semantics"
        return ", ".join(f"{k}={v}" for k, v in self.overrides)


CONFIGURATIONS = {
    c.name: c
    for c in (
        Configuration("supervised", "engine", (("method.name", "supervised"),)),
        Configuration("mean-teacher", "engine", (("method.name", "mean-teacher"),)),
        Configuration("bcp", "engine", (("method.name", "bcp"),)),
        Configuration("buarl", "engine", (("method.name", "buarl"),)),
        Configuration("buarl url-teacher", "engine", (("method.name", "buarl"), ("url.source", "teacher"))),
        Configuration(
            "buarl mc-dropout", "engine", (("method.name", "buarl"), ("uncertainty.method", "mc-dropout"))
        ),
        Configuration("reference", "reference", semantics="public"),
        Configuration("reference same-semantics", "reference", semantics="ours"),
        # Ablations of the speed options (not in the presets; name them with --configs).
        Configuration(
            "bcp channels_last=off", "engine", (("method.name", "bcp"), ("optim.channels_last", False))
        ),
        Configuration(
            "bcp channels_last=on", "engine", (("method.name", "bcp"), ("optim.channels_last", True))
        ),
        Configuration("bcp compile", "engine", (("method.name", "bcp"), ("optim.compile", True))),
        Configuration("buarl compile", "engine", (("method.name", "buarl"), ("optim.compile", True))),
        # The ACDC CPU quality preset (batch 16): the former 96x96 float32 against 128x128 bfloat16.
        *(
            Configuration(
                f"{method} {size}x{size} b16" + (" fp32" if size == 96 else ""),
                "engine",
                (("method.name", method), ("model.patch_size", [size, size]), ("optim.batch_size", 16))
                + ((("optim.amp", False),) if size == 96 else ()),
            )
            for method in ("supervised", "bcp", "buarl")
            for size in (96, 128)
        ),
        # --no-amp twins: float32 where the default runs bfloat16 (CPUs with native bf16, CUDA).
        Configuration("supervised fp32", "engine", (("method.name", "supervised"), ("optim.amp", False))),
        Configuration("bcp fp32", "engine", (("method.name", "bcp"), ("optim.amp", False))),
        Configuration("buarl fp32", "engine", (("method.name", "buarl"), ("optim.amp", False))),
        Configuration(
            "buarl mc-dropout fp32",
            "engine",
            (("method.name", "buarl"), ("uncertainty.method", "mc-dropout"), ("optim.amp", False)),
        ),
    )
}
DEFAULT_CONFIGURATIONS = (
    "supervised",
    "mean-teacher",
    "bcp",
    "buarl",
    "buarl url-teacher",
    "buarl mc-dropout",
    "reference",
    "reference same-semantics",
)
PRECISION_CONFIGURATIONS = (
    "supervised",
    "supervised fp32",
    "bcp",
    "bcp fp32",
    "buarl",
    "buarl fp32",
    "buarl mc-dropout",
    "buarl mc-dropout fp32",
    "reference",
)
REFERENCE = "reference"
SAME_SEMANTICS = "reference same-semantics"

PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores: a 256x256 batch-24 iteration takes tens of seconds, a 112x112x80 one about a minute.
    "cpu": {
        "device": "cpu",
        "settings": ["acdc-128", "acdc-256", "la-64", "la-112"],
        "warmup": {"acdc-128": 1, "acdc-256": 1, "la-64": 1, "la-112": 1},
        "timed": {"acdc-128": 8, "acdc-256": 5, "la-64": 5, "la-112": 2},
        "configs": {},
        "memory": ["acdc-128", "acdc-256", "la-64", "la-112"],
    },
    # Mixed precision on the CPU: each method against its float32 twin, side by side, and against the
    # plain public-code step (float32: the public code has no CPU autocast). ~25 min on 2 cores.
    "cpu-bf16": {
        "device": "cpu",
        "settings": ["acdc-128", "acdc-256", "la-112"],
        "warmup": {"acdc-128": 1, "acdc-256": 1, "la-112": 1},
        "timed": {"acdc-128": 6, "acdc-256": 4, "la-112": 2},
        "configs": {
            "acdc-128": PRECISION_CONFIGURATIONS,
            "acdc-256": PRECISION_CONFIGURATIONS,
            "la-112": ("bcp", "bcp fp32", "buarl", "buarl fp32", "reference"),
        },
        "memory": ["acdc-256"],
    },
    # The ACDC CPU quality preset: 128x128 bfloat16 against the former 96x96 float32 (batch 16).
    "cpu-acdc-preset": {
        "device": "cpu",
        "settings": ["acdc-128"],
        "warmup": {"acdc-128": 2},
        "timed": {"acdc-128": 12},
        "configs": {
            "acdc-128": tuple(
                f"{method} {size}x{size} b16" + (" fp32" if size == 96 else "")
                for method in ("supervised", "bcp", "buarl")
                for size in (96, 128)
            )
        },
        "memory": [],
    },
    "gpu": {
        "device": "cuda",
        "settings": ["acdc-128", "acdc-256", "la-64", "la-112"],
        "warmup": {name: 5 for name in SETTINGS},
        "timed": {name: 30 for name in SETTINGS},
        "configs": {},
        "extra_configs": ["bcp fp32", "buarl fp32"],
        "memory": list(SETTINGS),
    },
}


# --------------------------------------------------------------------------------------
# Data


def load_data(setting: Setting, data_root: Path | None) -> tuple[TrainingData, str]:
    """Real ACDC slices / LA volumes when ``data_root`` has them, else synthetic ones; and a description."""
    if setting.dimension == "2d":
        root = data_root / "ACDC" if data_root else None
        if root is not None and (root / "train_slices.list").is_file():
            labeled_names, unlabeled_names = acdc_split(root, 7)
            unlabeled_names = unlabeled_names[: len(labeled_names)]
            images, labels = [], []
            for name in labeled_names:
                image, label = read_h5(root / "data" / f"{name}.h5", "image", "label")
                images.append(image.astype(np.float32))
                labels.append(label.astype(np.uint8))
            unlabeled = [
                read_h5(root / "data" / f"{n}.h5", "image")[0].astype(np.float32) for n in unlabeled_names
            ]
            what = f"ACDC {shown_path(root)}: {len(images)} labeled slices (7 patients), {len(unlabeled)} unlabeled slices"
        else:
            images, labels, unlabeled = _synthetic_slices(136), None, _synthetic_slices(136)
            labels = [lab for _, lab in images]
            images = [img for img, _ in images]
            unlabeled = [img for img, _ in unlabeled]
            what = "synthetic 2D slices (ACDC not found)"
        classes = [{"index": 0, "name": "background", "label_value": 0, "color": [0, 0, 0]}] + [
            {"index": i, "name": n, "label_value": i, "color": [0.8, 0.3, 0.3]}
            for i, n in enumerate(ACDC_CLASSES, 1)
        ]
        return TrainingData("2d", images, labels, unlabeled, [], classes, "minmax", [1.0, 1.0, 1.0]), what
    root = data_root / "LA" if data_root else None
    if root is not None and (root / "train.list").is_file():
        cases = [c for c in (root / "train.list").read_text().split() if c][:8]
        volumes = [read_la_volume(root, c) for c in cases]
        images, labels = [v[0] for v in volumes[:4]], [v[1] for v in volumes[:4]]
        unlabeled = [v[0] for v in volumes[4:]]
        what = f"LA {shown_path(root)}: 4 labeled and 4 unlabeled volumes"
    else:
        pairs = [_synthetic_volume(seed) for seed in range(8)]
        images, labels = [p[0] for p in pairs[:4]], [p[1] for p in pairs[:4]]
        unlabeled = [p[0] for p in pairs[4:]]
        what = "synthetic 3D volumes (LA not found)"
    classes = [
        {"index": 0, "name": "background", "label_value": 0, "color": [0, 0, 0]},
        {"index": 1, "name": "left atrium", "label_value": 1, "color": [0.8, 0.3, 0.3]},
    ]
    return TrainingData("3d", images, labels, unlabeled, [], classes, "zscore", [0.625] * 3), what


def _synthetic_slices(count: int, size: int = 224) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(count)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(count):
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        r = np.hypot(yy - cy, xx - cx)
        label = np.select([r < 0.08 * size, r < 0.12 * size, r < 0.18 * size], [3, 2, 1], 0).astype(np.uint8)
        image = (label * 0.25 + rng.normal(0, 0.1, (size, size))).astype(np.float32)
        out.append((image, label))
    return out


def _synthetic_volume(
    seed: int, shape_zyx: tuple[int, int, int] = (88, 144, 144)
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.ogrid[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    centre = rng.uniform(0.4, 0.6, 3) * np.array(shape_zyx)
    r = np.sqrt(((zz - centre[0]) / 1.5) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    label = (r < 0.2 * shape_zyx[1]).astype(np.uint8)
    image = (label + rng.normal(0, 0.3, shape_zyx)).astype(np.float32)
    return image, label


# --------------------------------------------------------------------------------------
# Turn taking: configurations run in threads, one at a time, in the order the driver says


class Turns:
    """A baton: a configuration waits for its turn, runs one iteration, hands the turn back to the driver.

    A configuration that ends (normally or by an error) is *finished*: the driver skips it, and
    a turn given to it comes straight back.
    """

    DRIVER = "<driver>"

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._turn: str = self.DRIVER
        self._finished: set[str] = set()
        self.released = threading.Event()  # set by the driver when every configuration is done

    def wait(self, name: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._turn == name)

    def done(self, name: str) -> None:
        with self._condition:
            if self._turn == name:
                self._turn = self.DRIVER
                self._condition.notify_all()

    def finish(self, name: str) -> None:
        with self._condition:
            self._finished.add(name)
            if self._turn == name:
                self._turn = self.DRIVER
            self._condition.notify_all()

    def give(self, name: str, timeout_s: float | None = None) -> bool:
        """Give ``name`` the turn and wait until it is back; False if it did not come back in time."""
        with self._condition:
            if name in self._finished:
                return True
            self._turn = name
            self._condition.notify_all()
            back = self._condition.wait_for(
                lambda: self._turn == self.DRIVER or name in self._finished, timeout=timeout_s
            )
            self._turn = self.DRIVER
            return back


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Record:
    """What one configuration measured."""

    configuration: Configuration
    seconds: list[float] = field(default_factory=list)  # every iteration, warm-up included
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time of every iteration
    sampling_seconds: list[float] = field(default_factory=list)  # reference only: sampling part
    gpu_peak_bytes: int = 0
    error: str | None = None
    finished: bool = False


class Runner:
    """A configuration in its own thread, advancing one iteration per turn."""

    def __init__(
        self,
        configuration: Configuration,
        setting: Setting,
        data: TrainingData,
        iterations: int,
        turns: Turns,
        device: torch.device,
        work: Path,
        seed: int,
    ):
        self.configuration, self.setting, self.data = configuration, setting, data
        self.iterations, self.turns, self.device, self.work, self.seed = iterations, turns, device, work, seed
        self.record = Record(configuration)
        self.thread = threading.Thread(target=self._run, name=configuration.name, daemon=True)
        self._start = self._start_cpu = 0.0

    # -- timing of one turn ------------------------------------------------------------------
    def _begin(self) -> None:
        self.turns.wait(self.configuration.name)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        synchronize(self.device)
        self._start = time.perf_counter()
        self._start_cpu = time.process_time()

    def _end(self) -> None:
        synchronize(self.device)
        self.record.seconds.append(time.perf_counter() - self._start)
        self.record.cpu_seconds.append(time.process_time() - self._start_cpu)
        if self.device.type == "cuda":
            self.record.gpu_peak_bytes = max(
                self.record.gpu_peak_bytes, torch.cuda.max_memory_allocated(self.device)
            )

    def _run(self) -> None:
        try:
            if self.configuration.kind == "engine":
                self._run_engine()
            else:
                self._run_reference()
        except Exception:  # reported in the results, the other configurations go on
            self.record.error = traceback.format_exc(limit=6)
        finally:
            self.record.finished = True
            self.turns.finish(self.configuration.name)
            # A thread that ends tears down its OpenMP thread team, which stalls whichever
            # configuration runs then by seconds: threads end together, after the timing.
            self.turns.released.wait()

    # -- our engine, through train() itself ---------------------------------------------------
    def _run_engine(self) -> None:
        runner = self

        class Sink(EventSink):
            def handle(self, event: dict[str, Any]) -> None:
                kind = event["event"]
                if kind == "started":
                    runner._begin()
                elif kind == "progress":
                    runner._end()
                    if event["iteration"] < event["total"]:
                        runner.turns.done(runner.configuration.name)
                        runner._begin()
                    # after the last iteration, train() writes its files within this turn (not timed)

        config = engine_config(
            self.configuration, self.setting, self.iterations, self.device, self.work, self.seed
        )
        train(config, events=Sink(), data=self.data, overwrite=True)

    # -- the reference step --------------------------------------------------------------------
    def _run_reference(self) -> None:
        torch.manual_seed(self.seed)
        num_classes = self.data.num_classes
        name = "unet2d" if self.setting.dimension == "2d" else "vnet"
        student = build_network(name, in_channels=1, num_classes=num_classes).to(self.device)
        teacher = copy.deepcopy(student)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        step = ReferenceBCP(
            student,
            teacher,
            optimizer,
            num_classes=num_classes,
            semantics=self.configuration.semantics,
            seed=self.seed,
        )
        labeled, unlabeled = samplers(self.setting, self.data)
        generator = torch.Generator().manual_seed(self.seed)
        half = self.setting.batch_size // 2
        for _ in range(self.iterations):
            self._begin()
            images, targets = labeled.sample(half, generator)
            unlabeled_images = unlabeled.sample(half, generator)[0]
            images, targets = images.to(self.device), targets.to(self.device)
            unlabeled_images = unlabeled_images.to(self.device)
            self.record.sampling_seconds.append(time.perf_counter() - self._start)
            step.step(images, targets, unlabeled_images)
            self._end()
            self.turns.done(self.configuration.name)


def samplers(setting: Setting, data: TrainingData) -> tuple[Any, Any]:
    """The samplers train() builds for this setting (same data, same augmentation)."""
    if setting.dimension == "2d":
        size_hw = setting.patch_size[::-1]
        return (
            SliceSampler(data.labeled_images, data.labeled_labels, size_hw),
            SliceSampler(data.unlabeled_images, None, size_hw),
        )
    patch_zyx = setting.patch_size[::-1]
    return (
        PatchSampler(data.labeled_images, data.labeled_labels, patch_zyx),
        PatchSampler(data.unlabeled_images, None, patch_zyx),
    )


def engine_config(
    configuration: Configuration,
    setting: Setting,
    iterations: int,
    device: torch.device,
    work: Path,
    seed: int,
) -> TrainConfig:
    config = TrainConfig()
    config.data.source = "acdc" if setting.dimension == "2d" else "la"
    config.data.data_root = "(in memory)"
    config.model.dimension = setting.dimension
    config.model.patch_size = list(setting.patch_size)
    config.optim.batch_size = setting.batch_size
    config.optim.iterations = iterations
    config.optim.pretrain_iterations = 0  # time the self-training step
    config.validation_interval = 0
    config.checkpoint_interval = 10**9
    config.log_interval = 1
    config.seed = seed
    config.device = str(device)
    config.out_dir = str(work / configuration.name.replace(" ", "_"))
    for path, value in configuration.overrides:
        target = config
        *parents, last = path.split(".")
        for part in parents:
            target = getattr(target, part)
        if not hasattr(target, last):
            raise ValueError(f"configuration {configuration.name}: no option {path} in TrainConfig")
        setattr(target, last, value)
    return config


# --------------------------------------------------------------------------------------
# One setting: interleaved timing


@dataclass
class SettingResult:
    setting: Setting
    data_description: str
    warmup: int
    timed: int
    records: dict[str, Record]
    order_per_round: list[list[str]]
    load_average: list[tuple[float, float, float]]
    wall_seconds: float
    clean_up: dict[str, float] = field(default_factory=dict)


def time_setting(
    setting: Setting,
    names: list[str],
    data: TrainingData,
    data_description: str,
    *,
    warmup: int,
    timed: int,
    device: torch.device,
    seed: int,
    turn_timeout_s: float,
) -> SettingResult:
    iterations = warmup + timed
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="buseg-speed-") as work_dir:
        turns = Turns()
        runners = {
            name: Runner(CONFIGURATIONS[name], setting, data, iterations, turns, device, Path(work_dir), seed)
            for name in names
        }
        # Set-up (data resizing, networks) runs before each one's first turn, not timed.
        for runner in runners.values():
            runner.thread.start()
        orders, loads = [], []
        for round_index in range(iterations):
            shift = round_index % len(names)
            order = names[shift:] + names[:shift]
            orders.append(order)
            loads.append(os.getloadavg())
            for name in order:
                runner = runners[name]
                if runner.record.finished:
                    if runner.record.error and round_index == 0:
                        print(f"  [{setting.name}] {name}: ERROR {runner.record.error}", flush=True)
                    continue
                if not turns.give(name, timeout_s=turn_timeout_s):
                    raise RuntimeError(f"{name}: no iteration finished within {turn_timeout_s} s")
                label = "warm-up" if round_index < warmup else "timed"
                seconds = runner.record.seconds[-1] if runner.record.seconds else float("nan")
                cpu = runner.record.cpu_seconds[-1] if runner.record.cpu_seconds else float("nan")
                status = (
                    f"ERROR {runner.record.error.splitlines()[-1]}"
                    if runner.record.error
                    else f"{seconds:.2f} s (CPU {cpu:.2f} s)"
                )
                print(
                    f"  [{setting.name} round {round_index + 1}/{iterations} {label}] {name}: {status}",
                    flush=True,
                )
        for name in runners:  # let each finish (engine: writes its files; not timed)
            turns.give(name, timeout_s=turn_timeout_s)
        turns.released.set()
        for runner in runners.values():
            runner.thread.join(timeout=turn_timeout_s)
    return SettingResult(
        setting,
        data_description,
        warmup,
        timed,
        {n: r.record for n, r in runners.items()},
        orders,
        loads,
        time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------
# Peak memory on the CPU: one fresh process per configuration


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: set up one configuration, run one iteration, report RSS before and the peak."""
    import psutil

    setting = SETTINGS[spec["setting"]]
    configuration = CONFIGURATIONS[spec["configuration"]]
    torch.set_num_threads(spec["threads"])
    data, _ = load_data(setting, Path(spec["data_root"]) if spec["data_root"] else None)
    device = torch.device("cpu")
    before: dict[str, float] = {}
    turns = Turns()
    with tempfile.TemporaryDirectory(prefix="buseg-speed-mem-") as work_dir:
        runner = Runner(configuration, setting, data, 1, turns, device, Path(work_dir), spec["seed"])
        original_begin = runner._begin

        def begin() -> None:
            before.setdefault("rss", psutil.Process().memory_info().rss)
            original_begin()

        runner._begin = begin  # type: ignore[method-assign]
        runner.thread.start()
        turns.give(configuration.name)  # the iteration
        turns.give(configuration.name)  # the end (engine: writing its files)
        turns.released.set()
        runner.thread.join()
    return {
        "rss_before_mb": before.get("rss", 0) / 2**20,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "seconds": runner.record.seconds[0] if runner.record.seconds else None,
        "error": runner.record.error,
    }


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark.

    Linux: ``VmHWM`` of /proc/self/status, the peak of this program's own address space.
    (``ru_maxrss`` would not do: after fork + exec it starts from the parent's RSS, so a
    child of a big benchmark process reports the parent's size.) Elsewhere ``ru_maxrss``.
    """
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def measure_memory(
    setting: Setting, name: str, data_root: Path | None, threads: int, seed: int
) -> dict[str, Any]:
    spec = {
        "setting": setting.name,
        "configuration": name,
        "data_root": str(Path(data_root).resolve()) if data_root else "",  # the child runs in ROOT
        "threads": threads,
        "seed": seed,
    }
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--memory-child", json.dumps(spec)],
        cwd=ROOT,  # where `-m` finds the benchmarks package
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"exit code {completed.returncode}: {completed.stderr[-400:]}"}


# --------------------------------------------------------------------------------------
# One configuration alone in the main thread (as `buseg train` runs): the OpenMP check


def single_run(setting: Setting, name: str, data: TrainingData, iterations: int, seed: int) -> list[float]:
    """Seconds of each iteration of one engine configuration, in the main thread, nothing interleaved."""
    seconds: list[float] = []

    class Sink(EventSink):
        start = 0.0

        def handle(self, event: dict[str, Any]) -> None:
            if event["event"] in ("started", "progress"):
                now = time.perf_counter()
                if event["event"] == "progress":
                    seconds.append(now - self.start)
                    print(
                        f"  [{setting.name} {name}] iteration {event['iteration']}: {seconds[-1]:.2f} s",
                        flush=True,
                    )
                self.start = now

    with tempfile.TemporaryDirectory(prefix="buseg-speed-single-") as work_dir:
        config = engine_config(
            CONFIGURATIONS[name], setting, iterations, torch.device("cpu"), Path(work_dir), seed
        )
        train(config, events=Sink(), data=data, overwrite=True)
    return seconds


# --------------------------------------------------------------------------------------
# Components measured alone: pseudo-label clean-up on realistic label maps


def clean_up_timings(setting: Setting, repeats: int = 5) -> dict[str, float]:
    """Seconds (best of ``repeats``) of ours and of the reference clean-up on blobby label maps.

    The end-to-end runs start from random weights, whose teacher predicts nearly uniform
    label maps with few components; trained teachers early in self-training give many. Here
    both clean-ups get smooth random label maps of the teacher's batch shape (many blobs of
    every class), as a fair stand-in.
    """
    from scipy import ndimage

    from buseg.training.copy_paste import largest_component_per_class

    rng = np.random.default_rng(0)
    classes = 4 if setting.dimension == "2d" else 2
    shape = (setting.batch_size // 2, *setting.patch_size[::-1])
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=[0] + [3] * (len(shape) - 1))
    labels = torch.from_numpy(np.digitize(field, np.quantile(field, [0.6, 0.75, 0.9][: classes - 1])))
    if setting.dimension == "2d":

        def reference() -> torch.Tensor:
            return reference_bcp.largest_component_2d(labels, classes)
    else:

        def reference() -> torch.Tensor:
            return reference_bcp.largest_component_3d(labels)

    def best(function: Callable[[], Any]) -> float:
        values = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            values.append(time.perf_counter() - start)
        return min(values)

    if not torch.equal(largest_component_per_class(labels, classes), reference().long()):
        raise AssertionError("the clean-ups disagree")  # tested in test_speed_equivalence.py
    return {
        "ours_s": best(lambda: largest_component_per_class(labels, classes)),
        "reference_s": best(reference),
    }


# --------------------------------------------------------------------------------------
# Report


def machine_info(device: torch.device) -> dict[str, str]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "logical_cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "precision (default --amp)": precision_description(device, True),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    return info


def summarise(result: SettingResult, memory: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    records = result.records
    timed_slice = slice(result.warmup, result.warmup + result.timed)

    def timed(name: str) -> list[float]:
        record = records.get(name)
        return record.seconds[timed_slice] if record and not record.error else []

    def timed_cpu(name: str) -> list[float]:
        record = records.get(name)
        return record.cpu_seconds[timed_slice] if record and not record.error else []

    def paired_ratio(name: str, yardstick: str, values: Callable[[str], list[float]] = timed) -> float | None:
        mine, theirs = values(name), values(yardstick)
        ratios = [t / m for m, t in zip(mine, theirs, strict=False) if m > 0]
        return statistics.median(ratios) if ratios else None

    def median_or_none(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    rows = []
    bcp_median = median_or_none(timed("bcp"))
    bcp_cpu = median_or_none(timed_cpu("bcp"))
    for name, record in records.items():
        values = timed(name)
        median = statistics.median(values) if values else None
        mem = memory.get(name, {})
        sampling = record.sampling_seconds[timed_slice]
        rows.append(
            {
                "setting": result.setting.name,
                "setting_label": result.setting.label,
                "configuration": name,
                "kind": record.configuration.kind,
                "what": record.configuration.describe(),
                "timed_iterations": len(values),
                "median_s": median,
                "min_s": min(values) if values else None,
                "max_s": max(values) if values else None,
                "speedup_vs_reference": paired_ratio(name, REFERENCE) if name != REFERENCE else 1.0,
                "speedup_vs_same_semantics": paired_ratio(name, SAME_SEMANTICS)
                if name != SAME_SEMANTICS
                else 1.0,
                "cost_vs_bcp": (median / bcp_median) if (median and bcp_median) else None,
                "speedup_vs_fp32": paired_ratio(name, f"{name} fp32") if f"{name} fp32" in records else None,
                "median_cpu_s": median_or_none(timed_cpu(name)),
                "cpu_speedup_vs_reference": paired_ratio(name, REFERENCE, timed_cpu)
                if name != REFERENCE
                else 1.0,
                "cpu_speedup_vs_same_semantics": (
                    paired_ratio(name, SAME_SEMANTICS, timed_cpu) if name != SAME_SEMANTICS else 1.0
                ),
                "cpu_cost_vs_bcp": (
                    median_or_none(timed_cpu(name)) / bcp_cpu if (bcp_cpu and timed_cpu(name)) else None
                ),
                "sampling_s": statistics.median(sampling) if sampling else None,
                "peak_rss_mb": mem.get("peak_rss_mb"),
                "rss_before_step_mb": mem.get("rss_before_mb"),
                "gpu_peak_mb": record.gpu_peak_bytes / 2**20 if record.gpu_peak_bytes else None,
                "all_seconds": " ".join(f"{s:.3f}" for s in record.seconds),
                "error": (record.error or mem.get("error") or "").strip().splitlines()[-1:] or "",
            }
        )
        rows[-1]["error"] = rows[-1]["error"][0] if rows[-1]["error"] else ""
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_CSV_COLUMNS = (
    "setting",
    "configuration",
    "kind",
    "what",
    "timed_iterations",
    "median_s",
    "min_s",
    "max_s",
    "speedup_vs_reference",
    "speedup_vs_same_semantics",
    "cost_vs_bcp",
    "speedup_vs_fp32",
    "median_cpu_s",
    "cpu_speedup_vs_reference",
    "cpu_speedup_vs_same_semantics",
    "cpu_cost_vs_bcp",
    "sampling_s",
    "peak_rss_mb",
    "rss_before_step_mb",
    "gpu_peak_mb",
    "all_seconds",
    "error",
)

_METHOD_NOTE = (
    "Seconds per training iteration (whole iteration: sampling + augmentation, teacher, pseudo-labels, "
    "student, loss, backward, SGD, EMA). Median of the timed iterations; configurations interleaved "
    "round by round in one process. *Speed-up* = median over rounds of (reference time / this time); "
    "*vs its fp32 twin*: the same configuration with --no-amp (float32), paired by round; "
    "*vs same semantics* compares with the straightforward code computing what our engine computes. "
    "*Cost vs bcp* = median / median of bcp. **Wall** = elapsed seconds; **CPU** = CPU seconds of the "
    "process during the iteration (all its threads; only one configuration runs at a time and threads "
    "wait passively), the measure that other jobs on a shared machine disturb least. Peak RSS: fresh "
    "process per configuration, one iteration."
)

_TABLE_HEAD = [
    "| configuration | wall s/it | speed-up vs reference | vs same semantics | cost vs bcp "
    "| speed-up vs its fp32 twin "
    "| CPU s/it | CPU speed-up vs reference | vs same semantics | CPU cost vs bcp "
    "| peak RSS MB | RSS before step MB | GPU peak MB |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]

_REFERENCE_NOTE = (
    "The reference differs from our engine in what it computes (teacher in train mode: batch "
    "BatchNorm statistics and dropout; two teacher and two student passes: BatchNorm statistics per "
    "half batch); `reference same-semantics` removes those differences. See docs/speed.md."
)


def write_report(
    out: Path,
    preset: str,
    rows: list[dict[str, Any]],
    results: list[SettingResult],
    info: dict[str, str],
    command: str,
    started: str,
    wall_s: float,
) -> tuple[Path, Path]:
    """Write ``speed_<preset>.csv`` (one row per setting and configuration) and ``speed_<preset>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"speed_{preset}.csv", out / f"speed_{preset}.md"
    _write_csv(csv_path, rows)
    lines = _report_header(preset, info, command, started, wall_s)
    for result in results:
        lines += _setting_section(result, [r for r in rows if r["setting"] == result.setting.name])
    lines += _configurations_section(rows)
    _replace(md_path, "\n".join(lines))
    return csv_path, md_path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    # Through a temporary file: the report is rewritten after every setting, and a run stopped
    # while writing must leave the previous complete file, not half of a new one.
    temporary = path.with_suffix(".csv.tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(_CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file (see :func:`_write_csv`)."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _report_header(preset: str, info: dict[str, str], command: str, started: str, wall_s: float) -> list[str]:
    return [
        f"# Training speed ({preset} preset)",
        "",
        f"Command: `{command}`  ",
        f"Started: {started}; wall time {wall_s / 60:.1f} min.  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".",
        "",
        _METHOD_NOTE,
        "",
    ]


def _setting_section(result: SettingResult, rows: list[dict[str, Any]]) -> list[str]:
    """The markdown of one setting: what ran, the table of ``rows`` (this setting's), the notes."""
    loads = [f"{a[0]:.1f}" for a in result.load_average]
    lines = [
        f"## {result.setting.label}",
        "",
        f"Data: {result.data_description}. Warm-up {result.warmup}, timed {result.timed} iteration(s) "
        f"each; load average (1 min) per round: {', '.join(loads)}; wall {result.wall_seconds / 60:.1f} min.",
        "",
        *_TABLE_HEAD,
    ]
    lines += [_table_row(row) for row in rows]
    sampling = [r["sampling_s"] for r in rows if r["sampling_s"]]
    if sampling:
        lines += [
            "",
            f"Batch sampling and augmentation (same code on both sides): "
            f"{statistics.median(sampling):.2f} s of each iteration.",
        ]
    if result.clean_up:
        lines += ["", _clean_up_note(result.clean_up)]
    lines.append("")
    return lines


def _table_row(row: dict[str, Any]) -> str:
    name = row["configuration"] + (f" (error: {row['error']})" if row["error"] else "")
    return (
        f"| {name} | {_fmt(row['median_s'])} | "
        f"{_fmt(row['speedup_vs_reference'])} | {_fmt(row['speedup_vs_same_semantics'])} | "
        f"{_fmt(row['cost_vs_bcp'])} | {_fmt(row['speedup_vs_fp32'])} | {_fmt(row['median_cpu_s'])} | "
        f"{_fmt(row['cpu_speedup_vs_reference'])} | {_fmt(row['cpu_speedup_vs_same_semantics'])} | "
        f"{_fmt(row['cpu_cost_vs_bcp'])} | {_fmt(row['peak_rss_mb'], 0)} | "
        f"{_fmt(row['rss_before_step_mb'], 0)} | {_fmt(row['gpu_peak_mb'], 0)} |"
    )


def _clean_up_note(clean_up: dict[str, float]) -> str:
    return (
        f"Pseudo-label clean-up alone, on blobby label maps of the teacher's batch shape "
        f"(the random-weight teachers above give nearly uniform maps): ours "
        f"{clean_up['ours_s'] * 1000:.1f} ms, reference per-image per-class loop "
        f"{clean_up['reference_s'] * 1000:.1f} ms per iteration."
    )


def _configurations_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Configurations:", ""]
    for name in dict.fromkeys(r["configuration"] for r in rows):
        lines.append(f"- `{name}`: {CONFIGURATIONS[name].describe() or 'defaults'}")
    return [*lines, "", _REFERENCE_NOTE, ""]


# --------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), help="default: the preset's")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGURATIONS), help="default: the preset's")
    parser.add_argument(
        "--warmup", type=int, help="warm-up iterations per configuration (default: the preset's)"
    )
    parser.add_argument(
        "--timed", type=int, help="timed iterations per configuration (default: the preset's)"
    )
    parser.add_argument(
        "--memory",
        nargs="*",
        choices=sorted(SETTINGS),
        help="CPU: settings whose peak RSS is measured (fresh process per configuration); "
        "default: the preset's; give no value for none",
    )
    parser.add_argument(
        "--data-root",
        default=str(ROOT.parent / "shared" / "data"),
        help="folder with ACDC/ and LA/ (synthetic data where missing)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--turn-timeout", type=float, default=1800.0, help="seconds one iteration may take")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--single",
        metavar="CONFIG",
        choices=sorted(CONFIGURATIONS),
        help="run only this engine configuration, alone, in the main thread, for --timed "
        "iterations, and print each iteration's seconds (no report), under the "
        "OMP_WAIT_POLICY of the environment (unset: libgomp's default)",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser


def _run_single(args: argparse.Namespace) -> int:
    """``--single``: one engine configuration alone, each iteration's seconds printed, no report."""
    setting = SETTINGS[(args.settings or ["acdc-128"])[0]]
    data, description = load_data(setting, Path(args.data_root) if Path(args.data_root).is_dir() else None)
    print(
        f"{setting.label}, {args.single} alone, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
        f"load average {os.getloadavg()[0]:.1f}: {description}",
        flush=True,
    )
    values = single_run(setting, args.single, data, args.timed or 6, args.seed)
    print(
        f"median of iterations 2..: {statistics.median(values[1:] or values):.2f} s; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return 0


class _PresetRun:
    """A preset's settings one after the other, the command-line options overriding the preset's choices."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.preset = PRESETS[args.preset]
        self.data_root = Path(args.data_root) if args.data_root and Path(args.data_root).is_dir() else None
        self.memory_settings = self.preset["memory"] if args.memory is None else args.memory

    def settings(self) -> list[Setting]:
        return [SETTINGS[s] for s in (self.args.settings or self.preset["settings"])]

    def configuration_names(self, setting: Setting) -> list[str]:
        names = list(self.args.configs or self.preset["configs"].get(setting.name, DEFAULT_CONFIGURATIONS))
        # The preset's extras (e.g. fp32 twins on the GPU) only when --configs leaves the choice to it.
        names += [n for n in self.preset.get("extra_configs", []) if n not in names and not self.args.configs]
        return names

    def memory(self, setting: Setting, names: list[str]) -> dict[str, dict[str, Any]]:
        """Peak RSS per configuration (CPU, settings the preset or --memory names; else none)."""
        memory: dict[str, dict[str, Any]] = {}
        if self.device.type == "cpu" and setting.name in self.memory_settings:
            for name in names:
                memory[name] = measure_memory(
                    setting, name, self.data_root, torch.get_num_threads(), self.args.seed
                )
                print(f"  [{setting.name} memory] {name}: {memory[name]}", flush=True)
        return memory

    def measure(self, setting: Setting) -> tuple[SettingResult, dict[str, dict[str, Any]]]:
        """One setting: memory first (fresh processes), then the interleaved timing and the clean-up alone."""
        args = self.args
        names = self.configuration_names(setting)
        warmup = args.warmup if args.warmup is not None else self.preset["warmup"][setting.name]
        timed = args.timed if args.timed is not None else self.preset["timed"][setting.name]
        data, description = load_data(setting, self.data_root)
        print(f"{setting.label}: {description}; {', '.join(names)}", flush=True)
        memory = self.memory(setting, names)
        result = time_setting(
            setting,
            names,
            data,
            description,
            warmup=warmup,
            timed=timed,
            device=self.device,
            seed=args.seed,
            turn_timeout_s=args.turn_timeout,
        )
        result.clean_up = clean_up_timings(setting)
        return result, memory


def _run_preset(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(PRESETS[args.preset]["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print("the gpu preset needs a CUDA GPU", file=sys.stderr)
        return 2
    run = _PresetRun(args, device)
    command = shown_command(COMMAND, argv or sys.argv[1:])
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    start = time.perf_counter()
    info = machine_info(device)
    print(f"machine: {info}", flush=True)
    rows, results = [], []
    for setting in run.settings():
        result, memory = run.measure(setting)
        results.append(result)
        rows += summarise(result, memory)
        # After every setting, so that a long run stopped half-way still leaves a report.
        csv_path, md_path = write_report(
            Path(args.out), args.preset, rows, results, info, command, started, time.perf_counter() - start
        )
    print(f"wrote {csv_path} and {md_path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0
    if args.single:
        return _run_single(args)
    return _run_preset(args, argv)


if __name__ == "__main__":
    sys.exit(main())
