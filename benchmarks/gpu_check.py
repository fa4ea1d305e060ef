"""Every GPU figure in one command, within a time budget: CUDA tests, training and inference speed, DDP.

A GPU machine is lent now and then for a few minutes; this script turns one such loan into
every figure the project needs, with no setup by hand (``make install`` is all it needs; no
network). In order, each part stopped at its own time limit:

1. **CUDA tests**: the tests marked ``cuda`` (``Testing/Python/test_cuda.py``: device
   selection, autocast on/off, GPU -> CPU -> GPU checkpoints, OOM retry, MC-dropout, 3D
   sliding window, fp16 GradScaler), in a pytest subprocess;
2. **training speed**: each method (ours, BCP, mean teacher, supervised) through
   :func:`buseg.training.loop.train` at the published setting (ACDC 256x256 batch 24, LA
   112x112x80 batch 8; ``benchmarks/quality.py``'s ``paper`` presets), 10 warm-up + 200
   timed iterations, and the projected time of the published run (s/it x 30 000 ACDC,
   x 15 000 LA self-training iterations);
3. **inference speed**: an ACDC volume and an LA volume (entropy and MC-dropout T = 8), and a
   512x512x300 CT-sized volume, with peak GPU memory (untrained networks of the reference
   architectures, as ``benchmarks/inference_speed.py``);
4. **DDP smoke test**: a 2-process ``torchrun`` training, NCCL on 2 GPUs, else gloo on the
   CPU (with one GPU NCCL cannot run 2 processes; the report says so).

The budget (``--budget-seconds``, default 8 minutes) is shared by the parts in proportion to
:data:`PART_SHARES`; time a part leaves unused goes to the later ones. A part that reaches
its limit stops (training: after the current iteration; inference: between batches;
subprocesses: killed) and keeps what it measured, marked *partial*. The report is rewritten
after every part, and a watchdog writes it and ends the process if the budget is exceeded
anyway, so a result file always exists.

Benchmark data: ``--data-root`` (ACDC/ and LA/), by default ``../shared/data`` beside the
repository (or ``shared/data`` inside it); where they are missing, generated images of the
same shapes are used and the report says so.

Usage::

    .venv/bin/python -m benchmarks.gpu_check                 # on a CUDA machine (make gpu-check)
    .venv/bin/python -m benchmarks.gpu_check --tiny          # tiny sizes: checks the logic, CPU or GPU

Writes ``gpu_<card>.md`` and ``gpu_<card>.json`` (``gpu_<card>-tiny.*`` with ``--tiny``) to
``--out`` (default benchmarks/results) and prints a one-screen summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import inference_speed, quality, speed
from benchmarks.paths import module_command
from buseg.catalogs.methods import CATALOG
from buseg.config import PredictConfig
from buseg.data.sources.hdf5 import read_h5
from buseg.data.sources.la import read_la_volume
from buseg.data.synthetic import write_dataset
from buseg.errors import Cancelled
from buseg.events import EventSink
from buseg.files.images import Volume
from buseg.model.checkpoint import load_model
from buseg.prediction.case import predict_case
from buseg.training.loop import train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COMMAND = module_command(__file__)

PARTS = ("cuda_tests", "training", "inference", "ddp")
PART_TITLES = {
    "cuda_tests": "CUDA tests",
    "training": "Training speed",
    "inference": "Inference speed",
    "ddp": "2-process DDP smoke test",
}
# Shares of the budget; the training part measures the most figures.
PART_SHARES = {"cuda_tests": 0.2, "training": 0.45, "inference": 0.2, "ddp": 0.15}
# A part given less than this is not started (it could not measure anything useful).
MIN_PART_SECONDS = 1.0
# Every method of the engine's catalog, ours first (the catalog's order); each is also a
# configuration of speed.CONFIGURATIONS (a test checks it). The tables use the catalog's short
# label, the part before its colon ("BUARL (ours)", "BCP", "Mean teacher", ...).
METHODS = tuple(CATALOG)
METHOD_LABELS = {name: entry.label.split(":")[0].split(" (labeled")[0] for name, entry in CATALOG.items()}
PUBLISHED = {"acdc": quality.PRESETS[("acdc", "paper")], "la": quality.PRESETS[("la", "paper")]}
# Targets of issue 17 (on one H100-class card).
TARGET_ACDC_RUN_MINUTES = 60.0
TARGET_INFERENCE_SECONDS = {"ACDC volume": 0.05, "LA volume": 1.0}
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Profile:
    """Sizes of everything the check runs: the published ones, or tiny ones that check the logic."""

    name: str
    settings: dict[str, speed.Setting]  # dataset -> training setting
    warmup_iterations: int
    timed_iterations: int
    acdc_patch: tuple[int, int]
    acdc_generated_zyx: tuple[int, int, int]
    la_patch: tuple[int, int, int]
    la_generated_zyx: tuple[int, int, int]
    la_stride_xyz: tuple[int, int, int] | None
    ct_zyx: tuple[int, int, int]
    mc_samples: int
    repeats: int
    ddp_iterations: int


def _paper_setting(dataset: str) -> speed.Setting:
    preset = PUBLISHED[dataset]
    return speed.Setting(
        f"{dataset}-paper", "2d" if dataset == "acdc" else "3d", tuple(preset.patch_size), preset.batch_size
    )


PROFILES = {
    "full": Profile(
        name="full",
        settings={"acdc": _paper_setting("acdc"), "la": _paper_setting("la")},
        warmup_iterations=10,
        timed_iterations=200,
        acdc_patch=(256, 256),
        acdc_generated_zyx=(10, 256, 216),
        la_patch=(112, 112, 80),
        la_generated_zyx=(88, 144, 144),
        la_stride_xyz=(18, 18, 4),  # the LA reference's sliding-window stride
        ct_zyx=(300, 512, 512),
        mc_samples=8,
        repeats=5,
        ddp_iterations=20,
    ),
    # Seconds, not minutes, on 2 CPU cores: the smallest sizes the networks take (V-Net: 16 per axis).
    "tiny": Profile(
        name="tiny",
        settings={
            "acdc": speed.Setting("acdc-tiny", "2d", (32, 32), 4),
            "la": speed.Setting("la-tiny", "3d", (16, 16, 16), 4),
        },
        warmup_iterations=1,
        timed_iterations=1,
        acdc_patch=(32, 32),
        acdc_generated_zyx=(2, 32, 32),
        la_patch=(16, 16, 16),
        la_generated_zyx=(16, 24, 24),
        la_stride_xyz=None,
        ct_zyx=(16, 24, 24),
        mc_samples=2,
        repeats=1,
        ddp_iterations=2,
    ),
}


# --------------------------------------------------------------------------------------
# Small helpers


def safe_card_name(name: str) -> str:
    """A card name as a file-name part: lower case, runs of other characters as one '-'."""
    safe = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return safe or "unknown"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset (None on the CPU: not comparable)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def run_limited(argv: list[str], limit_s: float, env: dict[str, str]) -> tuple[int | None, str, str, float]:
    """Run ``argv`` at most ``limit_s`` seconds: (exit code or None if killed, stdout, stderr, seconds).

    The child gets its own process group, killed as a whole at the limit (torchrun's workers
    and pytest's children would otherwise outlive it and hold the GPU).
    """
    start = time.perf_counter()
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    RUNNING_GROUPS.add(process.pid)
    try:
        stdout, stderr = process.communicate(timeout=max(limit_s, 0.1))
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        kill_group(process.pid)
        try:
            stdout, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            # A descendant that left the group (torchrun's workers can) still holds the pipes:
            # stop waiting for its output rather than hang the whole check.
            for stream in (process.stdout, process.stderr):
                with contextlib.suppress(OSError):
                    stream.close()
            stdout, stderr = "", ""
        code = None
    finally:
        RUNNING_GROUPS.discard(process.pid)
    return code, stdout or "", stderr or "", time.perf_counter() - start


# Process groups of the subprocesses running now: the watchdog ends them before it ends this process.
RUNNING_GROUPS: set[int] = set()


def kill_group(group: int) -> None:
    """Kill the process group ``group`` and every descendant of its leader, including those that
    started a session of their own (they would hold the output pipes open)."""
    import psutil

    try:
        descendants = psutil.Process(group).children(recursive=True)
    except psutil.Error:
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()


def clean_env() -> dict[str, str]:
    """This process's environment without a distributed run's variables, for the subprocesses (which
    find the engine installed, as this process does)."""
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


# --------------------------------------------------------------------------------------
# Machine and data


def nvidia_driver_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    with contextlib.suppress(OSError):
        match = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
        if match:
            return match.group(1)
    return "unknown"


def machine_facts(device: torch.device) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "card": "cpu",
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none (CPU build)",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "python": platform.python_version(),
        "cpu": speed.machine_info(torch.device("cpu"))["cpu"],
        "logical_cpus": os.cpu_count(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        facts.update(
            card=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            compute_capability=f"{properties.major}.{properties.minor}",
            driver=nvidia_driver_version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return facts


def find_data_root(given: str | None) -> tuple[Path | None, str]:
    """The benchmark data folder and how it was found; None (generated data) when there is none."""
    if given:
        path = Path(given)
        if not path.is_dir():
            raise SystemExit(f"gpu_check: --data-root {given}: no such folder")
        return path, f"--data-root {path}"
    for candidate in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data"):
        if candidate.is_dir():
            return candidate, f"found at {candidate}"
    return None, "no benchmark data beside the repository (../shared/data): generated data used"


# --------------------------------------------------------------------------------------
# The report: one dict, written as JSON and markdown after every part


class Report:
    """What the check measured so far, and the files it is written to (atomically, under a lock)."""

    def __init__(self, out_dir: Path, stem: str, header: dict[str, Any]):
        self.paths = (out_dir / f"{stem}.md", out_dir / f"{stem}.json")
        self.data: dict[str, Any] = {"schema": "buseg-gpu-check", **header, "parts": {}}
        self._lock = threading.RLock()
        self._start = time.perf_counter()

    def part(self, name: str) -> dict[str, Any]:
        with self._lock:
            return self.data["parts"].setdefault(name, {"title": PART_TITLES[name], "status": "not run yet"})

    def write(self, final_status: str | None = None) -> tuple[Path, Path]:
        with self._lock:
            self.data["wall_seconds"] = round(time.perf_counter() - self._start, 1)
            self.data["status"] = final_status or "running (the check did not finish)"
            self.data["targets"] = target_verdicts(self.data)
            md_path, json_path = self.paths
            for path, text in (
                (json_path, json.dumps(self.data, indent=2, default=str)),
                (md_path, markdown(self.data)),
            ):
                temporary = path.with_name(path.name + ".tmp")
                temporary.write_text(text + "\n")
                temporary.replace(path)
            return md_path, json_path


class Watchdog:
    """Writes the report and ends the process when the budget is exceeded despite the part limits.

    A part that cannot be interrupted (one training iteration, one batch of windows) may
    overrun; the lender's machine goes away at the end of the loan, so the figures measured
    so far are written before that. ``exit`` is replaceable for tests.
    """

    def __init__(self, report: Report, seconds: float, exit: Callable[[int], None] = os._exit):
        self.report, self.exit = report, exit
        self.timer = threading.Timer(max(seconds, 0.0), self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        status = "stopped by the watchdog: the time budget ran out during a part (partial results)"
        for part in self.report.data["parts"].values():
            if part.get("status") == "running":
                part["status"] = "partial: stopped by the watchdog at the end of the budget"
        md_path, _ = self.report.write(status)
        print(f"gpu_check: {status}; wrote {md_path}", file=sys.stderr, flush=True)
        for group in list(RUNNING_GROUPS):  # torchrun's or pytest's processes must not outlive this one
            kill_group(group)
        self.exit(3)

    def __enter__(self) -> Watchdog:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


# --------------------------------------------------------------------------------------
# Part 1: the CUDA tests in a pytest subprocess


TEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s+\((.*)\))?")
FAILURE_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+::\S+)(?: - (.*))?$")
COLLECTION_ERROR_LINE = re.compile(r"^ERROR \S+\.py(?: - .*)?$")  # a file, not a test (path::name)


def parse_pytest_output(stdout: str) -> list[dict[str, str]]:
    """Outcome of each test from ``pytest -v -rfEs`` output (what finished, if it was stopped)."""
    tests: dict[str, dict[str, str]] = {}
    for line in stdout.splitlines():
        match = TEST_LINE.match(line.strip())
        if match:
            name, outcome, reason = match.groups()
            tests[name] = {"test": name, "outcome": outcome.lower(), "detail": (reason or "").strip()}
    for line in stdout.splitlines():
        match = FAILURE_LINE.match(line.strip())
        if match and match.group(1) in tests and match.group(2):
            tests[match.group(1)]["detail"] = match.group(2)[:300]
    return list(tests.values())


def run_cuda_tests(part: dict[str, Any], limit_s: float, tests_path: str) -> None:
    argv = [sys.executable, "-m", "pytest", tests_path, "-m", "cuda", "-v", "-rfEs", "--no-header"]
    # A test file someone broke must not stop the CUDA tests of the others from running.
    argv += ["-p", "no:cacheprovider", "--continue-on-collection-errors"]
    # Wide lines: pytest cuts the short summary's failure messages to the terminal width.
    code, stdout, stderr, _ = run_limited(argv, limit_s, {**clean_env(), "COLUMNS": "300"})
    tests = parse_pytest_output(stdout)
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
    collection_errors = [m.group(0) for m in map(COLLECTION_ERROR_LINE.match, stdout.splitlines()) if m]
    part.update(command=" ".join(shlex.quote(a) for a in argv), tests=tests, counts=counts)
    if collection_errors:
        part["collection_errors"] = collection_errors
    if code is None:
        part["partial_reason"] = f"stopped at its limit ({limit_s:.0f} s) after {len(tests)} test(s)"
    elif code == 5:
        raise RuntimeError(f"no test marked cuda under {tests_path}")
    elif code not in (0, 1):
        raise RuntimeError(f"pytest exit code {code}: {(stderr or stdout).strip().splitlines()[-1:]}")


# --------------------------------------------------------------------------------------
# Part 2: training speed through train() itself


def time_training_run(
    method: str,
    setting: speed.Setting,
    data: Any,
    profile: Profile,
    device: torch.device,
    work: Path,
    stop_at: float,
) -> dict[str, Any]:
    """One method's iterations through train(): seconds of each, stopping at ``stop_at`` (perf_counter)."""
    seconds: list[float] = []
    started: dict[str, Any] = {}

    class Sink(EventSink):
        last = 0.0

        def handle(self, event: dict[str, Any]) -> None:
            now = time.perf_counter()
            if event["event"] == "started":
                started.update(precision=event.get("precision"), device=event.get("device"))
                self.last = now
            elif (
                event["event"] == "progress"
            ):  # every iteration (log_interval 1); reading the loss synchronises
                seconds.append(now - self.last)
                self.last = now

    iterations = profile.warmup_iterations + profile.timed_iterations
    config = speed.engine_config(speed.CONFIGURATIONS[method], setting, iterations, device, work, seed=1337)
    reset_peak_memory(device)
    stopped = False
    try:
        train(
            config,
            events=Sink(),
            data=data,
            overwrite=True,
            should_stop=lambda: time.perf_counter() >= stop_at,
        )
    except Cancelled:
        stopped = True
    row = iteration_figures(seconds, profile)
    row.update(
        gpu_peak_mib=peak_memory_mib(device), precision=started.get("precision"), stopped_at_limit=stopped
    )
    return row


def iteration_figures(seconds: list[float], profile: Profile) -> dict[str, Any]:
    """Counts and seconds per iteration of a run's iterations (the warm-up ones not timed)."""
    timed = seconds[profile.warmup_iterations :]
    return {
        "iterations_done": len(seconds),
        "warmup_iterations": profile.warmup_iterations,
        "timed_iterations": len(timed),
        "planned_timed_iterations": profile.timed_iterations,
        "s_per_iteration_median": round(statistics.median(timed), 4) if timed else None,
        "s_per_iteration_mean": round(statistics.fmean(timed), 4) if timed else None,
    }


def projection(run: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The published run's self-training time from the measured mean seconds per iteration."""
    iterations = PUBLISHED[dataset].iterations
    mean = run.get("s_per_iteration_mean")
    return {
        "published_iterations": iterations,
        "projected_minutes": round(mean * iterations / 60, 1) if mean else None,
    }


def run_training(
    part: dict[str, Any],
    limit_s: float,
    profile: Profile,
    data_root: Path | None,
    device: torch.device,
    methods: list[str],
) -> None:
    deadline = time.perf_counter() + limit_s
    part["runs"], part["data"] = [], {}
    planned = [(dataset, method) for dataset in profile.settings for method in methods]
    loaded: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="buseg-gpu-check-") as work:
        for index, (dataset, method) in enumerate(planned):
            setting = profile.settings[dataset]
            entry = {
                "dataset": dataset,
                "setting": setting.label,
                "method": method,
                "label": METHOD_LABELS[method],
            }
            # Each run gets an equal share of what is left, so a fast run leaves time to the later ones.
            share = (deadline - time.perf_counter()) / (len(planned) - index)
            if share < MIN_PART_SECONDS:
                part["runs"].append({**entry, "status": "not run: no time left"})
                continue
            try:
                if dataset not in loaded:
                    loaded[dataset], part["data"][dataset] = speed.load_data(setting, data_root)
                run = time_training_run(
                    method, setting, loaded[dataset], profile, device, Path(work), time.perf_counter() + share
                )
                status = "partial: stopped at its time limit" if run["stopped_at_limit"] else "complete"
                part["runs"].append({**entry, **run, **projection(run, dataset), "status": status})
            except Exception as exc:  # one failing method must not hide the others' figures
                part["runs"].append({**entry, "status": f"error: {one_line(exc)}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if any(r["status"] != "complete" for r in part["runs"]):
        part["partial_reason"] = "some runs stopped at their time limit, failed or did not start"


# --------------------------------------------------------------------------------------
# Part 3: inference speed


@dataclass
class InferenceCase:
    name: str
    volume: Volume
    description: str
    dimension: str
    num_classes: int
    patch_xyz: list[int]
    normalization: str
    configs: list[tuple[str, PredictConfig]]


def acdc_volume(data_root: Path | None, profile: Profile) -> tuple[Volume, str]:
    root = data_root / "ACDC" if data_root else None
    if root is not None and (root / "val.list").is_file():
        case = (root / "val.list").read_text().split()[0]
        image = read_h5(root / "data" / f"{case}.h5", "image")[0].astype(np.float32)
        return Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY), f"ACDC {case}"
    rng = np.random.default_rng(0)
    image = rng.normal(0.3, 0.2, profile.acdc_generated_zyx).astype(np.float32)
    return Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY), "generated (ACDC not found)"


def la_volume(data_root: Path | None, profile: Profile) -> tuple[Volume, str]:
    root = data_root / "LA" if data_root else None
    if root is not None and (root / "train.list").is_file():
        case = (root / "train.list").read_text().split()[0]
        image = read_la_volume(root, case)[0]
        return Volume(image, (0.625,) * 3, (0.0, 0.0, 0.0), IDENTITY), f"LA {case}"
    image = speed._synthetic_volume(0, profile.la_generated_zyx)[0]
    return Volume(image, (0.625,) * 3, (0.0, 0.0, 0.0), IDENTITY), "generated (LA not found)"


def ct_volume(profile: Profile) -> tuple[Volume, str]:
    """A CT-sized volume of noise around a body-like disc (its content does not change the time)."""
    rng = np.random.default_rng(1)
    z, y, x = profile.ct_zyx
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) ** 2 + (xx - x / 2) ** 2 < (0.43 * min(y, x)) ** 2).astype(np.float32)
    image = (body[None] * 1040.0 - 1000.0) + rng.standard_normal((z, y, x), dtype=np.float32) * 20.0
    return Volume(image.astype(np.float32), (0.8, 0.8, 1.5), (0.0, 0.0, 0.0), IDENTITY), "generated"


def inference_cases(profile: Profile, data_root: Path | None) -> list[InferenceCase]:
    entropy = PredictConfig(uncertainty="entropy")
    mc = PredictConfig(uncertainty="mc-dropout", samples=profile.mc_samples)
    stride = list(profile.la_stride_xyz) if profile.la_stride_xyz else None
    la_entropy = PredictConfig(uncertainty="entropy", stride=stride)
    la_mc = PredictConfig(uncertainty="mc-dropout", samples=profile.mc_samples, stride=stride)
    mc_name = f"mc-dropout T={profile.mc_samples}"
    acdc, acdc_what = acdc_volume(data_root, profile)
    la, la_what = la_volume(data_root, profile)
    ct, ct_what = ct_volume(profile)
    return [
        InferenceCase(
            "ACDC volume",
            acdc,
            acdc_what,
            "2d",
            4,
            list(profile.acdc_patch),
            "minmax",
            [("entropy", entropy), (mc_name, mc)],
        ),
        InferenceCase(
            "LA volume",
            la,
            la_what,
            "3d",
            2,
            list(profile.la_patch),
            "zscore",
            [("entropy", la_entropy), (mc_name, la_mc)],
        ),
        InferenceCase(
            "CT-sized volume",
            ct,
            ct_what,
            "3d",
            2,
            list(profile.la_patch),
            "percentile",
            [("entropy", entropy)],
        ),
    ]


def time_prediction(
    case: InferenceCase, model: Any, config: PredictConfig, repeats: int, device: torch.device, stop_at: float
) -> dict[str, Any]:
    """A warm-up prediction, then up to ``repeats`` timed ones while time is left."""

    def should_stop() -> bool:
        return time.perf_counter() >= stop_at

    model_seconds, seconds = [], []
    reset_peak_memory(device)
    try:
        predict_case(model, case.volume, config, should_stop=should_stop)  # first calls allocate, tune
        while len(seconds) < repeats and not should_stop():
            prediction = predict_case(model, case.volume, config, should_stop=should_stop)
            model_seconds.append(prediction.model_seconds)
            seconds.append(prediction.seconds)
    except Cancelled:
        pass
    return {
        "repeats": len(seconds),
        "model_seconds_median": round(statistics.median(model_seconds), 4) if model_seconds else None,
        "model_seconds_min": round(min(model_seconds), 4) if model_seconds else None,
        "seconds_median": round(statistics.median(seconds), 4) if seconds else None,
        "gpu_peak_mib": peak_memory_mib(device),
        "status": "complete"
        if len(seconds) == repeats
        else f"partial: {len(seconds)} of {repeats} repeats in its time",
    }


def run_inference(
    part: dict[str, Any], limit_s: float, profile: Profile, data_root: Path | None, device: torch.device
) -> None:
    deadline = time.perf_counter() + limit_s
    part["rows"] = []
    cases = inference_cases(profile, data_root)
    planned = [(case, name, config) for case in cases for name, config in case.configs]
    with tempfile.TemporaryDirectory(prefix="buseg-gpu-check-") as work:
        models: dict[str, Any] = {}
        for index, (case, method, config) in enumerate(planned):
            shape = "x".join(str(s) for s in case.volume.array.shape[::-1])
            row = {"volume": case.name, "shape_xyz": shape, "data": case.description, "method": method}
            if case.dimension == "3d":
                row["windows"] = f"stride {config.stride}" if config.stride else f"overlap {config.overlap}"
            share = (deadline - time.perf_counter()) / (len(planned) - index)
            if share < MIN_PART_SECONDS:
                part["rows"].append({**row, "status": "not run: no time left"})
                continue
            try:
                key = f"{case.dimension}-{case.normalization}"
                if key not in models:
                    path = Path(work) / f"{key}.pt"
                    inference_speed.model_file(
                        path, case.dimension, case.num_classes, case.patch_xyz, case.normalization
                    )
                    models[key] = load_model(path, device=device)
                row["model"] = (
                    f"{'U-Net' if case.dimension == '2d' else 'V-Net'} {'x'.join(map(str, case.patch_xyz))}"
                )
                row.update(
                    time_prediction(
                        case, models[key], config, profile.repeats, device, time.perf_counter() + share
                    )
                )
            except Exception as exc:
                row["status"] = f"error: {one_line(exc)}"
            part["rows"].append(row)
    if any(r["status"] != "complete" for r in part["rows"]):
        part["partial_reason"] = "some predictions stopped at their time limit, failed or did not start"


# --------------------------------------------------------------------------------------
# Part 4: 2-process DDP smoke test under torchrun


def ddp_plan(gpu_count: int) -> tuple[str, str, str]:
    """(backend, training device, why) for the 2-process smoke test."""
    if gpu_count >= 2:
        return "nccl", "cuda", f"NCCL on 2 of {gpu_count} GPUs"
    if gpu_count == 1:
        return "gloo", "cpu", "gloo on the CPU: one GPU only (NCCL needs one GPU per process)"
    return "gloo", "cpu", "gloo on the CPU: no GPU"


def ddp_argv(data: dict[str, Path], out: Path, device: str, iterations: int) -> list[str]:
    """``torchrun`` with 2 processes training ours on ``data`` (2D, tiny network, progress as JSON lines)."""
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "buseg",
    ]
    argv += [
        "train",
        "--method",
        "buarl",
        "--labeled",
        str(data["labeled"]),
        "--unlabeled",
        str(data["unlabeled"]),
    ]
    argv += [
        "--iterations",
        str(iterations),
        "--pretrain-iterations",
        "2",
        "--out",
        str(out),
        "--device",
        device,
    ]
    argv += ["--patch-size", "48", "48", "--batch-size", "4", "--base-channels", "8", "--log-interval", "1"]
    argv += ["--validation-interval", "0", "--progress", "jsonl"]
    return argv + (["--num-threads", "1"] if device == "cpu" else [])


def run_ddp(part: dict[str, Any], limit_s: float, profile: Profile, gpu_count: int) -> None:
    backend, device, why = ddp_plan(gpu_count)
    part.update(backend=backend, device=device, why=why, processes=2)
    with tempfile.TemporaryDirectory(prefix="buseg-gpu-check-ddp-") as work:
        data = write_dataset(
            Path(work) / "data", labeled=2, unlabeled=3, test=1, shape_zyx=(16, 48, 48), seed=7
        )
        out = Path(work) / "run"
        argv = ddp_argv(data, out, device, profile.ddp_iterations)
        code, stdout, stderr, seconds = run_limited(argv, limit_s, {**clean_env(), "OMP_NUM_THREADS": "1"})
        part["process_seconds"] = round(seconds, 1)
        events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        started = [e for e in events if e.get("event") == "started"]
        finished = [e for e in events if e.get("event") == "finished"]
        progress = [e["iteration"] for e in events if e.get("event") == "progress"]
        part["iterations_done"] = max(progress, default=0)
        if started:
            part.update(
                world_size=started[0].get("world_size"), device_reason=started[0].get("device_reason")
            )
        if code is None:
            part.update(partial_reason=f"stopped at its limit ({limit_s:.0f} s)", passed=False)
            return
        problems = check_ddp_run(code, started, finished, out)
        part["passed"] = not problems
        if problems:
            part.update(problems=problems, stderr_tail=stderr.strip().splitlines()[-8:])


def check_ddp_run(code: int, started: list[dict], finished: list[dict], out: Path) -> list[str]:
    """What is wrong with a finished 2-process run (nothing: it passed)."""
    problems = []
    if code != 0:
        problems.append(f"torchrun exit code {code}")
    if len(started) != 1 or started[0].get("world_size") != 2:
        problems.append(
            f"expected one started event with world_size 2, got {[s.get('world_size') for s in started]}"
        )
    if len(finished) != 1 or finished[0].get("status") != "completed":
        problems.append(
            f"expected one finished event with status completed, got {[f.get('status') for f in finished]}"
        )
    try:
        load_model(out / "model.pt")
    except Exception as exc:
        problems.append(f"model.pt: {one_line(exc)}")
    return problems


# --------------------------------------------------------------------------------------
# Targets, markdown and summary


def target_verdicts(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 17's targets against what was measured (none in a --tiny run: tiny sizes say nothing)."""
    if data.get("tiny"):
        return []
    verdicts = []
    runs = data["parts"].get("training", {}).get("runs", [])
    ours = next((r for r in runs if r["dataset"] == "acdc" and r["method"] == "buarl"), {})
    minutes = ours.get("projected_minutes")
    verdicts.append(
        {
            "target": f"paper-protocol ACDC run (ours, 30 000 iterations) <= {TARGET_ACDC_RUN_MINUTES:.0f} min",
            "measured": f"{minutes} min" if minutes is not None else "not measured",
            "met": None if minutes is None else minutes <= TARGET_ACDC_RUN_MINUTES,
        }
    )
    rows = data["parts"].get("inference", {}).get("rows", [])
    for volume, limit in TARGET_INFERENCE_SECONDS.items():
        row = next((r for r in rows if r["volume"] == volume and r["method"] == "entropy"), {})
        seconds = row.get("model_seconds_median")
        verdicts.append(
            {
                "target": f"inference of an {volume} (entropy, model time) <= {limit * 1000:.0f} ms",
                "measured": f"{seconds * 1000:.1f} ms" if seconds is not None else "not measured",
                "met": None if seconds is None else seconds <= limit,
            }
        )
    return verdicts


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(data: dict[str, Any]) -> str:
    machine = data["machine"]
    lines = [
        f"# GPU check: {machine['card']}{' (--tiny: logic check, sizes not the published ones)' if data['tiny'] else ''}",
        "",
        f"Command: `{data['command']}`  ",
        f"Started {data['started']}; wall time {data['wall_seconds']:.0f} s of a {data['budget_seconds']:.0f} s budget.  ",
        f"**Status: {data['status']}.**",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + ".  ",
        f"Benchmark data: {data['data_root']}.",
        "",
    ]
    parts = data["parts"]
    for name, render in (
        ("cuda_tests", _md_tests),
        ("training", _md_training),
        ("inference", _md_inference),
        ("ddp", _md_ddp),
    ):
        part = parts.get(name)
        if part is None:
            continue
        limit = part.get("limit_seconds")
        lines += [
            f"## {part['title']}",
            "",
            f"Status: **{part['status']}**"
            + (f" (limit {limit:.0f} s, took {part.get('seconds', 0):.0f} s)." if limit is not None else "."),
            "",
        ]
        lines += [*render(part), ""]
    if data["targets"]:
        lines += ["## Targets (issue 17)", "", "| target | measured | met |", "|---|---|---|"]
        for t in data["targets"]:
            met = "-" if t["met"] is None else ("yes" if t["met"] else "no")
            lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines)


def _md_tests(part: dict[str, Any]) -> list[str]:
    if "tests" not in part:
        return []
    counts = part["counts"]
    lines = [f"`{part['command']}`: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", ""]
    lines += [f"- could not be collected: `{line}`" for line in part.get("collection_errors", [])]
    lines += ["| test | outcome | detail |", "|---|---|---|"]
    lines += [f"| {t['test']} | {t['outcome']} | {t['detail'] or '-'} |" for t in part["tests"]]
    return lines


def _md_training(part: dict[str, Any]) -> list[str]:
    lines = [f"Data: {'; '.join(f'{k}: {v}' for k, v in part.get('data', {}).items()) or '-'}.", ""]
    lines += [
        "Whole iterations through `buseg.training.loop.train` (sampling, augmentation, the method's step, backward, "
        "SGD, EMA), self-training stage, no validation; the first iterations are warm-up, not timed. "
        "Projected = mean s/it x the published self-training iterations (pre-training not included).",
        "",
        "| setting | method | precision | timed iterations | s/it median | s/it mean | projected published run | GPU peak MiB | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part.get("runs", []):
        projected = (
            f"{r['projected_minutes']} min ({r['published_iterations']} it)"
            if r.get("projected_minutes") is not None
            else "-"
        )
        timed = (
            f"{r['timed_iterations']} of {r['planned_timed_iterations']}" if "timed_iterations" in r else "-"
        )
        lines.append(
            f"| {r['setting']} | {r['label']} | {_cell(r.get('precision'))} | {timed} | {_cell(r.get('s_per_iteration_median'))} "
            f"| {_cell(r.get('s_per_iteration_mean'))} | {projected} | {_cell(r.get('gpu_peak_mib'), 0)} | {r['status']} |"
        )
    return lines


def _md_inference(part: dict[str, Any]) -> list[str]:
    lines = [
        "Untrained networks of the reference architectures (time and memory do not depend on the weights). "
        "Model time = network passes, blending, argmax and entropy; predict_case = model time plus "
        "normalisation and regions. Median of the timed repeats after one warm-up.",
        "",
        "| volume | size x y z | data | model | windows | method | model time s | min s | predict_case s | GPU peak MiB | repeats | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part.get("rows", []):
        lines.append(
            f"| {r['volume']} | {r['shape_xyz']} | {r['data']} | {r.get('model', '-')} | {r.get('windows', '-')} | {r['method']} "
            f"| {_cell(r.get('model_seconds_median'))} | {_cell(r.get('model_seconds_min'))} | {_cell(r.get('seconds_median'))} "
            f"| {_cell(r.get('gpu_peak_mib'), 0)} | {r.get('repeats', '-')} | {r['status']} |"
        )
    return lines


def _md_ddp(part: dict[str, Any]) -> list[str]:
    if "backend" not in part:
        return []
    result = "passed" if part.get("passed") else "failed"
    lines = [
        f"`torchrun --nproc_per_node=2 -m buseg train` on generated data, {part['why']}: **{result}**, "
        f"{part.get('iterations_done', 0)} iterations, {part.get('process_seconds', '-')} s including start-up; "
        f"world size {part.get('world_size', '-')}; rank 0's device: {part.get('device_reason', '-')}.",
    ]
    lines += [f"- problem: {p}" for p in part.get("problems", [])]
    lines += [f"    {line}" for line in part.get("stderr_tail", [])]
    return lines


def summary_lines(data: dict[str, Any], md_path: Path) -> list[str]:
    """The one-screen summary printed at the end."""
    machine = data["machine"]
    parts = data["parts"]
    lines = [
        f"GPU check on {machine['card']} (driver {machine.get('driver', '-')}, torch {machine['torch']}, CUDA {machine['cuda']}): "
        f"{data['status']}, {data['wall_seconds']:.0f} s",
    ]
    for name in PARTS:
        part = parts.get(name, {})
        lines.append(f"  {PART_TITLES[name]}: {part.get('status', 'not run')}")
        if name == "cuda_tests" and "counts" in part:
            failed = [t["test"].split("::")[-1] for t in part["tests"] if t["outcome"] in ("failed", "error")]
            lines.append(
                "    "
                + ", ".join(f"{v} {k}" for k, v in part["counts"].items())
                + (f"; failed: {', '.join(failed)}" if failed else "")
            )
        for r in part.get("runs", []) if name == "training" else []:
            if r.get("s_per_iteration_mean") is not None:
                lines.append(
                    f"    {r['dataset']:<4} {r['label']:<13} {r['s_per_iteration_mean']:.3f} s/it -> {r['projected_minutes']} min for {r['published_iterations']} it"
                )
        for r in part.get("rows", []) if name == "inference" else []:
            if r.get("model_seconds_median") is not None:
                lines.append(
                    f"    {r['volume']:<15} {r['method']:<15} {r['model_seconds_median'] * 1000:.1f} ms, GPU peak {_cell(r.get('gpu_peak_mib'), 0)} MiB"
                )
        if name == "ddp" and "backend" in part:
            lines.append(f"    {part['why']}: {'passed' if part.get('passed') else 'failed'}")
    for t in data["targets"]:
        lines.append(
            f"  target {t['target']}: {t['measured']} ({'-' if t['met'] is None else 'met' if t['met'] else 'NOT met'})"
        )
    lines.append(f"  report: {md_path} (and .json)")
    return lines


# --------------------------------------------------------------------------------------
# Driver


def part_limit(name: str, deadline: float, remaining: list[str]) -> float:
    """This part's share of the time left before ``deadline``, among the parts still to run."""
    left = deadline - time.perf_counter()
    return max(0.0, left * PART_SHARES[name] / sum(PART_SHARES[p] for p in remaining))


def run_part(report: Report, name: str, limit_s: float, function: Callable[..., None], *args: Any) -> None:
    part = report.part(name)
    part["limit_seconds"] = round(limit_s, 1)
    if limit_s < MIN_PART_SECONDS:
        part["status"] = "not run: no time left in the budget"
        return
    part["status"] = "running"
    start = time.perf_counter()
    try:
        function(part, limit_s, *args)
        reason = part.pop("partial_reason", None)
        part["status"] = f"partial: {reason}" if reason else "complete"
    except Exception as exc:  # the other parts still run, and the report says what broke
        part["status"] = f"error: {one_line(exc)}"
        part["traceback"] = traceback.format_exc(limit=8).splitlines()[-12:]
    part["seconds"] = round(time.perf_counter() - start, 1)
    if name in ("training", "inference") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget-seconds", type=float, default=480.0, help="total wall time for all parts (default 8 min)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny sizes: checks the logic in seconds (CPU or GPU)"
    )
    parser.add_argument(
        "--data-root",
        help="folder with ACDC/ and LA/ (default: ../shared/data; generated data where missing)",
    )
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for gpu_<card>.md and .json")
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run (default all)"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to time (default all)"
    )
    parser.add_argument(
        "--cuda-tests",
        default=str(ROOT / "Testing" / "Python"),
        help="where pytest looks for the tests marked cuda",
    )
    return parser.parse_args(argv)


def prepare_out(out: Path) -> None:
    """Refuse an output folder that cannot be written before any work starts."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"gpu_check: --out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".gpu_check-write-test-"):
            pass
    except OSError as exc:
        raise SystemExit(f"gpu_check: --out {out}: cannot write there ({exc.strerror or exc})") from None


def check_arguments(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The data root and how it was found; SystemExit with a one-line message for anything unusable."""
    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit(
            "gpu_check: no CUDA GPU visible to torch; run it on a GPU machine, or with --tiny to check the logic"
        )
    if args.budget_seconds <= 0:
        raise SystemExit(f"gpu_check: --budget-seconds {args.budget_seconds:g}: must be positive")
    data_root, data_note = find_data_root(args.data_root)
    prepare_out(Path(args.out))
    return data_root, data_note


def run_parts(report: Report, args: argparse.Namespace, parts: dict[str, tuple], deadline: float) -> str:
    """Run the selected parts in order, each within its share of the time to ``deadline``; the final status."""
    selected = [p for p in PARTS if p in args.parts]
    for index, name in enumerate(selected):
        print(f"gpu_check: {PART_TITLES[name]} ...", flush=True)
        function, extra = parts[name]
        run_part(report, name, part_limit(name, deadline, selected[index:]), function, *extra)
        report.write()
    unfinished = [(p, report.part(p)["status"]) for p in selected if report.part(p)["status"] != "complete"]
    if not unfinished:
        return "complete"
    return "partial: " + ", ".join(f"{PART_TITLES[p]} {status.split(':')[0]}" for p, status in unfinished)


def main(argv: list[str] | None = None, *, watchdog_exit: Callable[[int], None] = os._exit) -> int:
    args = parse_args(argv)
    try:
        data_root, data_note = check_arguments(args)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    profile = PROFILES["tiny" if args.tiny else "full"]
    machine = machine_facts(device)
    arguments = sys.argv[1:] if argv is None else argv
    header = {
        "command": " ".join([COMMAND, *(shlex.quote(a) for a in arguments)]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "tiny": args.tiny,
        "budget_seconds": args.budget_seconds,
        "machine": machine,
        "data_root": data_note,
    }
    stem = f"gpu_{safe_card_name(machine['card'])}{'-tiny' if args.tiny else ''}"
    report = Report(Path(args.out), stem, header)
    parts = {
        "cuda_tests": (run_cuda_tests, (args.cuda_tests,)),
        "training": (run_training, (profile, data_root, device, args.methods)),
        "inference": (run_inference, (profile, data_root, device)),
        "ddp": (run_ddp, (profile, machine["gpu_count"])),
    }
    # Writing the report and printing the summary take a few seconds; the parts share the rest.
    deadline = start + args.budget_seconds - min(15.0, 0.05 * args.budget_seconds)
    with Watchdog(report, start + args.budget_seconds - time.perf_counter(), exit=watchdog_exit):
        report.write()
        md_path, _ = report.write(run_parts(report, args, parts, deadline))
    print("\n".join(summary_lines(report.data, md_path)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
