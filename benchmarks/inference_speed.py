"""Inference speed with float32, bfloat16 and ONNX Runtime side by side, against the targets of issue 12.

Targets (model time, one thread):

* ACDC validation volume, 2D U-Net at 256x256, ``entropy``: <= 0.5 s with bfloat16, <= 0.6 s with
  ONNX Runtime float32 (the engine of CPUs without bfloat16);
* the same with ``mc-dropout`` T = 8: <= 3 s (bfloat16; ONNX Runtime does not run mc-dropout);
* LA volume, V-Net, the published sliding-window stride 18x18x4: <= 45 s.

The ACDC volume is also run at 128x128 (the CPU preset's size). Each workload runs in three
columns - torch float32 (``--no-amp``: today's reference), torch bfloat16 autocast
(``BUSEG_CPU_BF16=1``) and ONNX Runtime float32 (``--engine onnx``) - alternating within each
repeat, so that a shared machine's load hits all three alike; the speed-up is the median of the
paired ratios. ``--memory`` adds the peak RAM of ``buseg predict`` on a 512x512x300 volume
(issue 3: <= 4 GB) with the default engine and precision of this CPU.

The networks are **untrained** (random weights; the reference architectures and sizes: U-Net
16-256 channels with 4 classes, V-Net 16 base filters with 2 classes): time does not depend on
the weights. "Model time" is :attr:`Prediction.model_seconds` (network passes, resizing/blending,
argmax and entropy). ACDC volumes carry no spacing: 1 mm is used.

Usage::

    .venv/bin/python -m benchmarks.inference_speed [--data-root ../shared/data] [--threads 1]
        [--repeats 3] [--la-repeats 1] [--quick] [--memory both|3d|2d|none]

Writes ``benchmarks/results/inference_speed.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import torch

from benchmarks.paths import module_command, shown_command
from buseg.config import PredictConfig
from buseg.device import cpu_native_bf16
from buseg.files.images import Volume, write_image
from buseg.model.checkpoint import load_model, save_checkpoint
from buseg.model.networks import build_network
from buseg.prediction.case import predict_case
from buseg.prediction.onnx_backend import onnx_measure_names, onnxruntime_version

HERE = Path(__file__).resolve().parent
COMMAND = module_command(__file__)
ACDC_CLASSES = ("right ventricle", "myocardium", "left ventricle")


def model_file(path: Path, dimension: str, num_classes: int, patch: list[int], normalization: str) -> Path:
    """An untrained model file of the reference architecture (random weights, default BatchNorm statistics)."""
    torch.manual_seed(0)
    name = "unet2d" if dimension == "2d" else "vnet"
    network = build_network(name, in_channels=1, num_classes=num_classes, base_channels=16, dropout=True)
    names = ACDC_CLASSES if num_classes == 4 else ("left atrium",)
    metadata = {
        "method": "untrained-benchmark",
        "dimension": dimension,
        "normalization": normalization,
        "network": {
            "name": name,
            "in_channels": 1,
            "num_classes": num_classes,
            "base_channels": 16,
            "dropout": True,
        },
        "classes": [{"index": 0, "name": "background", "label_value": 0, "color": [0, 0, 0]}]
        + [
            {"index": i, "name": n, "label_value": i, "color": [0.8, 0.3, 0.3]}
            for i, n in enumerate(names, 1)
        ],
        "patch_size": patch,
        "slice_axis": 2,
    }
    save_checkpoint(path, weights=network.state_dict(), metadata=metadata)
    return path


def run_cli(argv: list[str], threads: int) -> tuple[float, int, int]:
    """Run ``python -m buseg ...``; return wall seconds, exit code and peak RSS (bytes) of the process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "buseg", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watched = psutil.Process(process.pid)
    peak = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        # VmHWM is the kernel's own peak RSS of the process (no spike between polls is missed);
        # elsewhere, poll the RSS.
        try:
            hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
            peak = max(peak, int(hwm[0].split()[1]) * 1024 if hwm else watched.memory_info().rss)
        except (OSError, psutil.Error, ValueError, IndexError):
            pass
        time.sleep(0.05)
    stderr = process.stderr.read()
    if process.returncode != 0:
        print(stderr, file=sys.stderr)
    return time.perf_counter() - start, process.returncode, peak


BACKENDS = (
    # (column, what it runs): fp32 = today's reference, bf16 = torch autocast, onnx = ONNX Runtime float32
    ("fp32", "torch float32 (--no-amp --engine torch)"),
    ("bf16", "torch bfloat16 autocast (--engine torch, BUSEG_CPU_BF16=1)"),
    ("onnx", "ONNX Runtime float32 (--engine onnx)"),
)


def engine_config(column: str, **settings) -> PredictConfig | None:
    """The prediction config of a column; None where the engine cannot run these settings."""
    os.environ["BUSEG_CPU_BF16"] = "1" if column == "bf16" else "0"
    if column == "fp32":
        return PredictConfig(amp=False, engine="torch", **settings)
    if column == "bf16":
        return PredictConfig(amp=True, engine="torch", **settings)
    if settings.get("uncertainty", "entropy") not in onnx_measure_names():
        return None  # mc-dropout: the exported inference graph has no dropout (docs/inference.md)
    return PredictConfig(engine="onnx", **settings)


def side_by_side(
    model, volume: Volume, settings: dict, repeats: int, threads: int, warm_up: bool = True
) -> dict[str, dict]:
    """Model seconds per column, the columns alternating within each repeat (same machine load).

    Besides the wall-clock model time, an estimate of it on an idle machine: the model time times
    the share of the CPU the process got during the call (process CPU seconds / (wall x threads)).
    """
    configs = {column: engine_config(column, **settings) for column, _ in BACKENDS}
    runnable = {column: config for column, config in configs.items() if config is not None}
    for column, config in runnable.items() if warm_up else ():  # first calls allocate
        engine_config(column, **settings)
        predict_case(model, volume, config)
    seconds: dict[str, dict] = {column: {"wall": [], "cpu": []} for column in runnable}
    for _ in range(repeats):
        for column, config in runnable.items():
            engine_config(column, **settings)  # sets BUSEG_CPU_BF16 for the column
            wall, cpu = time.perf_counter(), time.process_time()
            model_seconds = predict_case(model, volume, config).model_seconds
            share = (time.process_time() - cpu) / ((time.perf_counter() - wall) * threads)
            seconds[column]["wall"].append(model_seconds)
            seconds[column]["cpu"].append(model_seconds * min(1.0, share))
    return seconds


def result_row(benchmark: str, targets: dict[str, float], seconds: dict[str, dict]) -> dict:
    """One table row: per column the median and min wall model time, the median CPU-time estimate and the
    median of the paired wall-time ratios to fp32; targets judged on the CPU-time estimate."""
    row: dict = {"benchmark": benchmark}
    for column, _ in BACKENDS:
        values = seconds.get(column)
        row[f"{column}_median_s"] = statistics.median(values["wall"]) if values else None
        row[f"{column}_min_s"] = min(values["wall"]) if values else None
        row[f"{column}_cpu_s"] = statistics.median(values["cpu"]) if values else None
        if column != "fp32":
            pairs = zip(seconds["fp32"]["wall"], values["wall"], strict=True) if values else []
            row[f"{column}_speedup"] = statistics.median(f / v for f, v in pairs) if values else None
    met = [
        f"{column} {'yes' if row[f'{column}_cpu_s'] <= limit else 'no'}"
        for column, limit in targets.items()
        if row.get(f"{column}_cpu_s") is not None
    ]
    row["target"] = ", ".join(f"{column} <= {limit:g} s" for column, limit in targets.items()) or "-"
    row["met"] = ", ".join(met) or "-"
    print(row, flush=True)
    return row


def acdc(root: Path, work: Path, threads: int, repeats: int, sizes: list[int], rows: list[dict]) -> None:
    case = (root / "ACDC" / "val.list").read_text().split()[0]
    with h5py.File(root / "ACDC" / "data" / f"{case}.h5", "r") as handle:
        image = np.asarray(handle["image"], dtype=np.float32)
    volume = Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    shape = "x".join(str(s) for s in volume.size_xyz)
    for size in sizes:
        model = load_model(model_file(work / f"unet{size}.pt", "2d", 4, [size, size], "minmax"))
        what = f"ACDC {case} ({shape}), U-Net {size}x{size}, {threads} thread(s)"
        runs = [("entropy", 1, {"bf16": 0.5, "onnx": 0.6} if size == 256 else {})]
        if size == 256:
            runs.append(("mc-dropout", 8, {"bf16": 3.0}))
        for method, samples, targets in runs:
            settings = {"uncertainty": method, "samples": samples}
            seconds = side_by_side(model, volume, settings, repeats, threads)
            label = f"{what}, {method}{' T=8' if samples > 1 else ''}: model time"
            rows.append(result_row(label, targets, seconds))


def la(root: Path, work: Path, threads: int, repeats: int, rows: list[dict]) -> None:
    from monai.data.utils import dense_patch_slices

    from buseg.prediction.windows import scan_interval

    case = (root / "LA" / "train.list").read_text().split()[0]
    with h5py.File(root / "LA" / "volumes" / case / "mri_norm2.h5", "r") as handle:
        image = np.ascontiguousarray(np.asarray(handle["image"], dtype=np.float32).transpose(2, 1, 0))
    volume = Volume(image, (0.625, 0.625, 0.625), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    model = load_model(model_file(work / "vnet.pt", "3d", 2, [112, 112, 80], "zscore"))
    roi = (80, 112, 112)
    windows = len(dense_patch_slices(image.shape, roi, scan_interval(image.shape, roi, 0.5, (4, 18, 18))))
    # No warm-up: one allocation is nothing against 45 windows (the ONNX session is loaded outside the model time).
    seconds = side_by_side(model, volume, {"stride": [18, 18, 4]}, repeats, threads, warm_up=False)
    label = (
        f"LA {case} ({'x'.join(map(str, volume.size_xyz))}), V-Net 112x112x80, stride 18x18x4 "
        f"({windows} windows), {threads} thread(s), entropy: model time"
    )
    rows.append(result_row(label, {"bf16": 45.0, "onnx": 45.0}, seconds))


def export_seconds(work: Path, rows_info: list[str]) -> None:
    """The one-off ONNX export + session load per model file (cached afterwards)."""
    from buseg.prediction import onnx_backend
    from buseg.prediction.case import inference_network

    for name, dimension, classes, patch in (
        ("unet256", "2d", 4, [256, 256]),
        ("vnet", "3d", 2, [112, 112, 80]),
    ):
        path = model_file(work / f"export_{name}.pt", dimension, classes, patch, "minmax")
        model = load_model(path)
        onnx_backend._SESSIONS.clear()
        start = time.perf_counter()
        onnx_backend.load_session(
            model.network,
            lambda model=model, dimension=dimension: inference_network(model.network, dimension),
            dimension,
            path,
        )
        rows_info.append(
            f"ONNX export + session load of the {name} model file (once; cached beside it): "
            f"{time.perf_counter() - start:.1f} s"
        )
        print(rows_info[-1], flush=True)


def memory(work: Path, threads: int, which: str, rows: list[dict]) -> None:
    """Peak RSS of `buseg predict` on a 512x512x300 int16 CT-like volume (file -> files)."""
    rng = np.random.default_rng(0)
    y, x = np.ogrid[:512, :512]
    body = ((y - 256) ** 2 + (x - 256) ** 2 < 220**2)[None]
    array = np.where(body, 40, -1000).astype(np.int16) + rng.integers(
        -20, 20, (300, 512, 512), dtype=np.int16
    )
    array[100:200, 200:300, 150:260] += 100  # an "organ"
    del body
    ct = Volume(array, (0.8, 0.8, 1.5), (-200.0, -200.0, -300.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    source = work / "ct.nrrd"
    write_image(ct, source, overwrite=True, compress=False)
    del array, ct
    variants = []
    if which in ("both", "3d"):
        variants.append(
            (
                "3d",
                model_file(work / "vnet_ct.pt", "3d", 2, [112, 112, 80], "percentile"),
                ["--overlap", "0"],
                "V-Net 112x112x80, overlap 0 (100 windows)",
            )
        )
    if which in ("both", "2d"):
        variants.append(
            (
                "2d",
                model_file(work / "unet_ct.pt", "2d", 4, [256, 256], "percentile"),
                [],
                "U-Net 256x256, 300 slices",
            )
        )
    for name, path, extra, label in variants:
        wall, code, peak = run_cli(
            [
                "predict",
                str(source),
                "--model",
                str(path),
                "--out",
                str(work / f"ct_{name}"),
                "--num-threads",
                str(threads),
                "--progress",
                "none",
                *extra,
            ],
            threads,
        )
        rows.append(
            {
                "benchmark": f"512x512x300 volume, {label}, {threads} thread(s): peak RAM of `buseg predict` "
                "(file -> files)",
                "target": "<= 4 GB",
                "wall_s": wall,
                "peak_gb": peak / 1e9,
                "met": "yes" if code == 0 and peak <= 4e9 else "no",
            }
        )
        print(rows[-1], flush=True)


def write_results(out: Path, rows: list[dict], memory_rows: list[dict], notes: list[str]) -> None:
    """``inference_speed.csv`` (one row per benchmark, every column) and ``inference_speed.md``."""
    out.mkdir(parents=True, exist_ok=True)
    fields = ["benchmark", "target", "met"] + [
        f"{column}_{kind}"
        for column, _ in BACKENDS
        for kind in ("median_s", "min_s", "cpu_s", "speedup")
        if not (column == "fp32" and kind == "speedup")
    ]
    with open(out / "inference_speed.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    def cell(row: dict, column: str) -> str:
        median = row.get(f"{column}_median_s")
        if median is None:
            return "not supported"
        text = f"{median:.2f} s (min {row[f'{column}_min_s']:.2f}; CPU {row[f'{column}_cpu_s']:.2f})"
        return text if column == "fp32" else f"{text}, {row[f'{column}_speedup']:.2f}x"

    lines = [*notes, "", "| benchmark | " + " | ".join(label for _, label in BACKENDS) + " | target | met |"]
    lines.append("|---" * (len(BACKENDS) + 3) + "|")
    for row in rows:
        lines.append(
            f"| {row['benchmark']} | "
            + " | ".join(cell(row, c) for c, _ in BACKENDS)
            + f" | {row['target']} | "
            f"{row['met']} |"
        )
    if memory_rows:
        lines += [
            "",
            "| peak RAM (default engine and precision of this CPU) | target | wall | peak RAM | met |",
        ]
        lines.append("|---|---|---|---|---|")
        for row in memory_rows:
            lines.append(
                f"| {row['benchmark']} | {row['target']} | {row['wall_s']:.1f} s | {row['peak_gb']:.2f} GB | "
                f"{row['met']} |"
            )
    (out / "inference_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and ONNX Runtime")
    parser.add_argument("--repeats", type=int, default=3, help="ACDC repeats per column (LA: --la-repeats)")
    parser.add_argument("--la-repeats", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="ACDC at 256x256 only, one repeat, no LA, no memory"
    )
    parser.add_argument("--memory", choices=("both", "3d", "2d", "none"), default="none")
    parser.add_argument("--skip-la", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.skip_la, args.memory = 1, True, "none"
    root = Path(args.data_root)
    torch.set_num_threads(args.threads)
    load_before, started = os.getloadavg(), time.time()
    rows: list[dict] = []
    memory_rows: list[dict] = []
    info: list[str] = []
    with tempfile.TemporaryDirectory(prefix="buseg-bench-") as temp:
        work = Path(temp)
        export_seconds(work, info)
        acdc(root, work, args.threads, args.repeats, [256] if args.quick else [128, 256], rows)
        if not args.skip_la:
            la(root, work, args.threads, args.la_repeats, rows)
        os.environ.pop("BUSEG_CPU_BF16", None)  # the memory rows run the CLI as a user would
        if args.memory != "none":
            memory(work, args.threads, args.memory, memory_rows)
    load_after = os.getloadavg()
    notes = [
        "# Inference speed: float32, bfloat16 and ONNX Runtime side by side",
        "",
        f"Generated by `{shown_command(COMMAND, sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {time.time() - started:.0f} s. Machine: "
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} logical CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {cpu_native_bf16()[1]}; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime_version()}; {args.threads} thread(s). Load average (1 min) before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f}: the machine is shared, so absolute times are "
        "pessimistic; the columns alternate within each repeat, so the speed-ups (median of the paired "
        "ratios to fp32) are measured under the same load.",
        "",
        "**Untrained networks** of the reference architectures (random weights): speed does not depend on the "
        "weights. Model time = network passes + resizing/blending + argmax/entropy "
        "(`Prediction.model_seconds`); the one-off ONNX export is not in it:",
        "",
        *[f"* {line}" for line in info],
        "",
        "Cells: median (min) of the wall-clock model time; CPU: the median estimate of the model time on an "
        "idle machine (wall time x the share of the CPU the process got: process CPU seconds / (wall x "
        "threads)), which is what the targets are judged on; and the speed-up over fp32 in wall time. "
        "MC-dropout is not supported by the "
        "ONNX engine (its inference graph has no dropout; `auto` runs it on torch).",
    ]
    write_results(Path(args.out), rows, memory_rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
