"""Inference speed and memory against the targets of issue 3, on this machine.

Targets (2 CPU cores):

* ACDC validation volume, 2D U-Net, ``entropy``: model time <= 0.5 s, file -> files <= 2 s;
* the same with ``mc-dropout`` T = 8: model time <= 3 s;
* LA volume, V-Net, the published sliding-window stride 18x18x4: model time <= 60 s;
* a 512x512x300 volume: peak RAM of the ``buseg predict`` process (file -> files) <= 4 GB.

The networks are **untrained** (random weights; the reference architectures and sizes: U-Net
16-256 channels with 4 classes, V-Net 16 base filters with 2 classes): time and memory do not
depend on the weights. "Model time" is :attr:`Prediction.model_seconds` (network passes,
resizing/blending, argmax and entropy); "file -> files" is :func:`predict_files` in this
process (load the model, read the image, predict, find regions, write the label map,
.seg.nrrd, uncertainty map, regions.json and summary.json); the command-line time adds
starting Python and importing torch. ACDC volumes carry no spacing: 1 mm is used.

The machine is shared: the load average before and after is recorded, and times are given as
the median and the minimum of the repeats (the minimum is the best estimate of the time on
an idle machine).

Usage::

    .venv/bin/python benchmarks/inference_speed.py [--data-root ../shared/data] [--threads 2]
        [--repeats 5] [--memory both|3d|2d|none]

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

from buseg.checkpoint import load_model, save_checkpoint
from buseg.config import PredictConfig
from buseg.inference import predict_case, predict_files
from buseg.io import Volume, write_image
from buseg.networks import build_network

HERE = Path(__file__).resolve().parent
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


def timed(function, repeats: int) -> tuple[list[float], object]:
    values, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        values.append(time.perf_counter() - start)
    return values, result


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s (min {min(values):.2f})"


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


def acdc(root: Path, work: Path, threads: int, repeats: int, rows: list[dict]) -> None:
    case = (root / "ACDC" / "val.list").read_text().split()[0]
    with h5py.File(root / "ACDC" / "data" / f"{case}.h5", "r") as handle:
        image = np.asarray(handle["image"], dtype=np.float32)
    volume = Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    source = work / f"{case}.nii.gz"
    write_image(volume, source, overwrite=True)
    shape = "x".join(str(s) for s in volume.size_xyz)
    for size in (256, 128):
        path = model_file(work / f"unet{size}.pt", "2d", 4, [size, size], "minmax")
        model = load_model(path)
        what = f"ACDC {case} ({shape}), U-Net {size}x{size}, {threads} thread(s)"
        for method, samples, target in (("entropy", 1, 0.5), ("mc-dropout", 8, 3.0)):
            config = PredictConfig(uncertainty=method, samples=samples)
            predict_case(model, volume, config)  # warm-up (first calls allocate)
            model_seconds = [predict_case(model, volume, config).model_seconds for _ in range(repeats)]
            rows.append(
                {
                    "benchmark": f"{what}, {method}{' T=8' if samples > 1 else ''}: model time",
                    "target": f"<= {target} s",
                    "median_s": statistics.median(model_seconds),
                    "min_s": min(model_seconds),
                    "peak_gb": "",
                    "passed": statistics.median(model_seconds) <= target,
                }
            )
            print(rows[-1], flush=True)
        counter = iter(range(10**6))

        def file_to_files(path=path, counter=counter, size=size, threads=threads) -> None:
            out = work / f"e2e_{size}_{threads}_{next(counter)}"
            predict_files(
                [source], PredictConfig(model_path=str(path), out_dir=str(out), num_threads=threads)
            )

        file_to_files()
        seconds, _ = timed(file_to_files, repeats)
        rows.append(
            {
                "benchmark": f"{what}, entropy: file -> files (predict_files)",
                "target": "<= 2 s",
                "median_s": statistics.median(seconds),
                "min_s": min(seconds),
                "peak_gb": "",
                "passed": statistics.median(seconds) <= 2.0,
            }
        )
        print(rows[-1], flush=True)
        wall, code, peak = run_cli(
            [
                "predict",
                str(source),
                "--model",
                str(path),
                "--out",
                str(work / f"cli{size}_{threads}"),
                "--num-threads",
                str(threads),
                "--progress",
                "none",
            ],
            threads,
        )
        rows.append(
            {
                "benchmark": f"{what}, entropy: `python -m buseg predict` incl. interpreter start",
                "target": "(information)",
                "median_s": wall,
                "min_s": wall,
                "peak_gb": peak / 1e9,
                "passed": code == 0,
            }
        )
        print(rows[-1], flush=True)


def la(root: Path, work: Path, threads: int, rows: list[dict]) -> None:
    case = (root / "LA" / "train.list").read_text().split()[0]
    with h5py.File(root / "LA" / "volumes" / case / "mri_norm2.h5", "r") as handle:
        image = np.ascontiguousarray(np.asarray(handle["image"], dtype=np.float32).transpose(2, 1, 0))
    volume = Volume(image, (0.625, 0.625, 0.625), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    model = load_model(model_file(work / "vnet.pt", "3d", 2, [112, 112, 80], "zscore"))
    config = PredictConfig(stride=[18, 18, 4])
    from monai.data.utils import dense_patch_slices

    from buseg.inference import scan_interval

    roi = (80, 112, 112)
    windows = len(dense_patch_slices(image.shape, roi, scan_interval(image.shape, roi, 0.5, (4, 18, 18))))
    prediction = predict_case(model, volume, config)
    rows.append(
        {
            "benchmark": f"LA {case} ({'x'.join(map(str, volume.size_xyz))}), V-Net 112x112x80, stride 18x18x4 "
            f"({windows} windows), {threads} thread(s), entropy: model time",
            "target": "<= 60 s",
            "median_s": prediction.model_seconds,
            "min_s": prediction.model_seconds,
            "peak_gb": "",
            "passed": prediction.model_seconds <= 60,
        }
    )
    print(rows[-1], flush=True)


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
                "median_s": wall,
                "min_s": wall,
                "peak_gb": peak / 1e9,
                "passed": code == 0 and peak <= 4e9,
            }
        )
        print(rows[-1], flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2],
        help="torch CPU threads (the machine has 2 cores); several values repeat the ACDC "
        "benchmarks with each, LA and memory use the first",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", choices=("both", "3d", "2d", "none"), default="both")
    parser.add_argument("--skip-la", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    root = Path(args.data_root)
    load_before = os.getloadavg()
    started = time.time()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="buseg-bench-") as temp:
        work = Path(temp)
        for threads in args.threads:
            torch.set_num_threads(threads)
            acdc(root, work, threads, args.repeats, rows)
        torch.set_num_threads(args.threads[0])
        if not args.skip_la:
            la(root, work, args.threads[0], rows)
        if args.memory != "none":
            memory(work, args.threads[0], args.memory, rows)
    load_after = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "inference_speed.csv", "w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["benchmark", "target", "median_s", "min_s", "peak_gb", "passed"]
        )
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Inference speed and memory (issue 3 targets)",
        "",
        f"Generated by `benchmarks/inference_speed.py` on {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
        f"{time.time() - started:.0f} s. Machine: {platform.processor() or platform.machine()}, "
        f"{psutil.cpu_count()} logical CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; torch "
        f"{torch.__version__}; torch threads per row. Load average (1 min) before {load_before[0]:.2f}, after "
        f"{load_after[0]:.2f}: the machine is shared, so times above ~1 x cores of load are pessimistic.",
        "",
        "**Untrained networks** of the reference architectures (random weights): speed and memory do not depend "
        "on the weights. Model time = network passes + resizing/blending + argmax/entropy; file -> files = "
        "`predict_files` in-process (model load, read, predict, regions, four outputs + summary).",
        "",
        "| benchmark | target | median | min | peak RAM | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{r['peak_gb']:.2f} GB" if r["peak_gb"] != "" else ""
        lines.append(
            f"| {r['benchmark']} | {r['target']} | {r['median_s']:.2f} s | {r['min_s']:.2f} s | {peak} | "
            f"{'yes' if r['passed'] else 'no'} |"
        )
    (out / "inference_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
