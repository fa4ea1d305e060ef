"""Running a trained network over whole volumes: label maps, uncertainty maps, flagged regions.

Three levels, each built on the one below:

* :func:`predict_probabilities` - class probabilities (C, z, y, x) of a normalised volume
  (the training loop validates with it);
* :func:`predict_case` - a :class:`Prediction` (label map, uncertainty map, flagged regions)
  of one image :class:`~buseg.io.Volume` with a loaded model and a
  :class:`~buseg.config.PredictConfig`; the Slicer module and scripts call this;
* :func:`predict_files` - images in, files out (``buseg predict``), with progress events.

How a volume is run:

* **2D models** run slice-wise along the axis they were trained on: each batch of slices is
  resized (bilinear) to the training in-plane size, run, and its probabilities resized back.
* **3D models** run with overlapping windows and Gaussian blending: the windows and the
  weights are MONAI's (``dense_patch_slices``, ``compute_importance_map``, the same as
  ``monai.inferers.sliding_window_inference``, which a test checks), but the windows are
  visited row by row along z (a row = the windows that start at one z) in a buffer one
  window deep, and the slices before the next row are finished (argmax, entropy) and
  dropped as soon as that row starts. So memory holds the image, the output maps and one
  window-deep slab of probabilities, never C full-size probability volumes: a 512x512x300
  volume needs about 2 GB (benchmarks/results/inference_speed.md).
* ``uncertainty``: the same functions as training (:mod:`buseg.uncertainty`): normalised
  entropy of the mean probabilities of 1 pass (``entropy``), T dropout passes
  (``mc-dropout``) or flips (``tta``), computed per slice batch / window batch (the blending
  is linear, so averaging per window equals averaging whole-volume passes).
* A batch that runs out of (GPU) memory is retried with half as many slices/windows.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from buseg import __version__
from buseg.checkpoint import LoadedModel, load_model
from buseg.config import PredictConfig, to_dict
from buseg.errors import BusegError, Cancelled, ConfigError, InputError, OutputError, ResourceError
from buseg.events import EventSink
from buseg.io import (
    SEGMENTATION_SUFFIX,
    Volume,
    case_name,
    image_suffix,
    is_image_file,
    read_image,
    read_image_header,
    resolved_path,
    safe_case_name,
    write_image,
    write_segmentation,
)
from buseg.measures import measure, measure_names
from buseg.memory import check_memory
from buseg.onnx_engine import choose_engine, engine_description, load_session, session_forward
from buseg.preprocessing import normalize_intensity, resize_slices
from buseg.regions import RegionSet, find_regions, regions_document, review_slice_axis
from buseg.resample import (
    WORKING_GRID_MEMORY_HINT,
    Grid,
    image_on_working_grid,
    maps_on_grid,
    model_working_spacing,
    same_spacing,
    working_grid,
)
from buseg.safe_files import atomic_path, ensure_output_folder, write_json_atomic
from buseg.shape_flags import parse_nesting_rules, shape_flag_map
from buseg.uncertainty import class_argmax, normalized_entropy

Forward = Callable[[torch.Tensor], torch.Tensor]
ProbabilityFn = Callable[[torch.Tensor], torch.Tensor]
Warn = Callable[[str], None]
logger = logging.getLogger("buseg")

SUMMARY_SCHEMA = "buseg-predict-summary"
FINISH_SLICES = 16  # slices per argmax/entropy step when a slab of probabilities is finished
# Output format for each input format (.mhd/.nhdr would need a second data file: not atomic).
OUTPUT_SUFFIX = {
    ".nii.gz": ".nii.gz",
    ".nii": ".nii",
    ".nrrd": ".nrrd",
    ".nhdr": ".nrrd",
    ".mha": ".mha",
    ".mhd": ".mha",
}


# --------------------------------------------------------------------------------------
# Probabilities of one batch: one pass, MC-dropout, or flips


def probability_function(
    network: nn.Module, method: str, samples: int = 1, forward: Forward | None = None
) -> ProbabilityFn:
    """A function batch -> mean softmax probabilities for the uncertainty measure ``method``
    (:mod:`buseg.measures`).

    ``forward`` may wrap the network call (autocast); the network must be in eval mode
    (mc-dropout switches only its dropout layers on, and back off afterwards).
    """
    try:
        entry = measure(method)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    return entry.probabilities(network, forward or network, samples)


def passes_per_input(method: str, samples: int, spatial_dims: int) -> int:
    """Forward passes each slice/window costs with the uncertainty measure ``method``."""
    return measure(method).passes(samples, spatial_dims)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's (or a CUDA/allocator) out-of-memory error."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _lower_batch(exc: BaseException, batch: int, what: str, device: torch.device, warn: Warn | None) -> int:
    """Half the batch after an out-of-memory error; re-raise anything else (or at batch size 1)."""
    if not is_out_of_memory(exc):
        raise exc
    _release_memory(device)
    if batch <= 1:
        raise ResourceError(
            f"out of memory on {device} even with one {what} per forward pass (the batch of {what}s was "
            "already lowered to 1)",
            hint="run with --device cpu (uses system memory), close other programs that use the GPU, or "
            "train a model with a smaller --patch-size or --base-channels",
        ) from None
    smaller = max(1, batch // 2)
    if warn is not None:
        warn(f"out of memory on {device} with {batch} {what}s per pass; retrying with {smaller}")
    return smaller


def release_freed_memory() -> None:
    """Give memory freed by the C allocator back to the operating system (glibc's malloc_trim).

    The network's intermediate tensors of tens of MB come from the allocator's heaps, which
    glibc keeps after they are freed; with several threads each has its own heap, and a
    long sliding-window run grew by about 1 GB this way (measured). No-op elsewhere.
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("prediction cancelled")


# --------------------------------------------------------------------------------------
# Probability chunks: the volume in pieces along one numpy axis, each (n, C, *plane)


Chunks = Iterator[tuple[int, int, torch.Tensor]]


def _slice_chunks(
    prob_fn: ProbabilityFn,
    image: np.ndarray,
    patch_size_xyz: Sequence[int],
    slice_axis: int,
    device: torch.device,
    batch_size: int,
    warn: Warn | None,
    should_stop: Callable[[], bool] | None,
) -> Chunks:
    """2D: probabilities of consecutive slice batches along ``2 - slice_axis``, at native in-plane size."""
    slices = np.moveaxis(image, 2 - slice_axis, 0)
    native = tuple(slices.shape[1:])
    size_hw = tuple(int(s) for s in patch_size_xyz[::-1])
    start, batch = 0, max(1, int(batch_size))
    while start < slices.shape[0]:
        _check_stop(should_stop)
        stop = min(slices.shape[0], start + batch)
        try:
            x = torch.from_numpy(np.ascontiguousarray(slices[start:stop]))[:, None].to(device)
            probs = resize_slices(
                prob_fn(resize_slices(x, size_hw, mode="bilinear")), native, mode="bilinear"
            )
        except Exception as exc:  # out-of-memory is retried with a smaller batch; anything else re-raised
            batch = _lower_batch(exc, stop - start, "slice", device, warn)
            continue
        yield start, stop, probs
        start = stop


def scan_interval(
    image_size_zyx: Sequence[int], roi_zyx: Sequence[int], overlap: float, stride_zyx: Sequence[int] | None
) -> tuple[int, ...]:
    """Window step per axis: the stride if given, else MONAI's ``int(roi * (1 - overlap))`` rule."""
    if stride_zyx is not None:
        return tuple(max(1, min(int(s), int(r))) for s, r in zip(stride_zyx, roi_zyx, strict=True))
    steps = []
    for size, roi in zip(image_size_zyx, roi_zyx, strict=True):
        step = roi if size == roi else int(roi * (1 - overlap))
        steps.append(max(1, step))
    return tuple(steps)


def _window_chunks(
    prob_fn: ProbabilityFn,
    image: np.ndarray,
    patch_size_xyz: Sequence[int],
    device: torch.device,
    batch_size: int,
    overlap: float,
    stride_xyz: Sequence[int] | None,
    warn: Warn | None,
    should_stop: Callable[[], bool] | None,
) -> Chunks:
    """3D: Gaussian-blended sliding windows, finished slab by slab along z (see the module docstring)."""
    plan = _WindowPlan.of(image, patch_size_xyz, overlap, stride_xyz, warn)
    weight_on_device = plan.weight.to(device)
    slab = _BlendSlab(plan)
    batch = max(1, int(batch_size))
    progress = _WindowProgress(sum(len(row) for row in plan.rows.values()))
    for row_start, row in plan.rows.items():
        if row_start > slab.base and slab.acc is not None:
            yield from slab.finish(row_start - slab.base)
            release_freed_memory()
        slab.base = row_start
        index = 0
        while index < len(row):
            _check_stop(should_stop)
            group = row[index : index + batch]
            try:
                x = torch.stack([plan.volume[w] for w in group])[:, None].to(device)
                probs = (prob_fn(x) * weight_on_device).to("cpu", torch.float32)
            except Exception as exc:  # out-of-memory is retried with a smaller batch; anything else re-raised
                batch = _lower_batch(exc, len(group), "window", device, warn)
                continue
            slab.add(probs, group)
            index += len(group)
            progress.add(len(group))
    if slab.acc is not None:
        yield from slab.finish(plan.size[0] - slab.base)
    del slab  # the slab buffers go before the caller writes its outputs
    release_freed_memory()


@dataclass
class _WindowPlan:
    """Where the windows of one 3D volume go, and how much each of their voxels weighs."""

    volume: torch.Tensor  # the image (z, y, x), padded up to the window where it is smaller
    size: tuple[int, ...]  # the padded volume's shape
    depth: int  # the window's z size: the depth of the slab of probabilities kept
    rows: dict[int, list[tuple[slice, ...]]]  # the windows by z start, in z order
    weight: torch.Tensor  # the Gaussian importance map of a window, on the CPU
    keep: tuple[slice, ...]  # the image inside the padded volume

    @classmethod
    def of(
        cls,
        image: np.ndarray,
        patch_size_xyz: Sequence[int],
        overlap: float,
        stride_xyz: Sequence[int] | None,
        warn: Warn | None = None,
    ) -> _WindowPlan:
        """MONAI's windows and weights (as ``sliding_window_inference``), grouped in rows along z;
        a pass of very many windows is announced through ``warn``, one of too many refused."""
        from monai.data.utils import compute_importance_map, dense_patch_slices

        roi = tuple(int(s) for s in patch_size_xyz[::-1])
        volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        # Pad (zeros, centred, as MONAI does) up to the window so that small volumes see a full window.
        pads = [max(0, r - s) for r, s in zip(roi, volume.shape, strict=True)]
        if any(pads):
            volume = torch.nn.functional.pad(
                volume[None], [v for p in reversed(pads) for v in (p // 2, p - p // 2)]
            )[0]
        size = tuple(volume.shape)
        steps = scan_interval(size, roi, overlap, None if stride_xyz is None else list(stride_xyz)[::-1])
        _check_window_work(size, roi, steps, overlap, stride_xyz, warn)
        windows = sorted(dense_patch_slices(size, roi, steps), key=lambda w: w[0].start)
        weight = compute_importance_map(
            roi, mode="gaussian", sigma_scale=0.125, device="cpu", dtype=torch.float32
        )
        keep = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, image.shape, strict=True))
        rows: dict[int, list[tuple[slice, ...]]] = {}
        for window in windows:  # windows sharing a z start form a row; rows are visited in z order
            rows.setdefault(window[0].start, []).append(window)
        return cls(volume, size, roi[0], rows, weight, keep)


# Windows of one sliding-window pass: more is refused; more than MANY_WINDOWS is announced. The
# reference LA stride (18 18 4) on a full-resolution LA volume gives about 2200.
MAX_WINDOWS = 200_000
MANY_WINDOWS = 10_000
# A sliding-window pass reports how far it got at most this often (on the log: stderr).
WINDOW_PROGRESS_SECONDS = 10.0


def window_count(size_zyx: Sequence[int], roi_zyx: Sequence[int], steps_zyx: Sequence[int]) -> int:
    """How many windows :func:`monai.data.utils.dense_patch_slices` makes, without making them."""
    per_axis = [
        math.ceil(max(0, s - r) / step) + 1 for s, r, step in zip(size_zyx, roi_zyx, steps_zyx, strict=True)
    ]
    return math.prod(per_axis)


def _check_window_work(
    size_zyx: Sequence[int],
    roi_zyx: Sequence[int],
    steps_zyx: Sequence[int],
    overlap: float,
    stride_xyz: Sequence[int] | None,
    warn: Warn | None,
) -> None:
    """Refuse a pass of more than :data:`MAX_WINDOWS` windows (``--overlap 0.999`` on a CT: tens of
    millions), and say beforehand when it runs more than :data:`MANY_WINDOWS` (``--overlap 0.999``
    on a 64x64x32 image with 16^3 windows: 40 000, a minute or more), whose progress goes to the log."""
    count = window_count(size_zyx, roi_zyx, steps_zyx)
    if count <= MANY_WINDOWS:
        return
    coverage = count * math.prod(roi_zyx) / math.prod(size_zyx)
    setting = f"--stride {' '.join(map(str, stride_xyz))}" if stride_xyz else f"--overlap {overlap:g}"
    work = (
        f"{setting} gives {count} windows of {'x'.join(map(str, roi_zyx[::-1]))} voxels for an image of "
        f"{'x'.join(map(str, size_zyx[::-1]))} (each voxel computed {coverage:.0f} times)"
    )
    hint = "lower --overlap (0.5, the default, computes each voxel about 8 times) or raise --stride"
    if count > MAX_WINDOWS:
        raise InputError(f"{work}: more than the {MAX_WINDOWS} windows allowed", hint=hint)
    if warn is not None:
        warn(f"{work}; this takes a while (progress on the log); {hint}")


@dataclass
class _WindowProgress:
    """'sliding windows: 1200 of 40000 done, about 50 s left' on the log while a long pass runs."""

    total: int
    done: int = 0
    start_seconds: float = field(default_factory=time.perf_counter)
    reported_seconds: float = field(default_factory=time.perf_counter)

    def add(self, windows: int) -> None:
        self.done += windows
        now = time.perf_counter()
        if now - self.reported_seconds >= WINDOW_PROGRESS_SECONDS and self.done < self.total:
            self.reported_seconds = now
            left_seconds = (now - self.start_seconds) / self.done * (self.total - self.done)
            logger.info(
                "sliding windows: %d of %d done, about %.0f s left", self.done, self.total, left_seconds
            )


class _BlendSlab:
    """The slices [base, base + depth) of the padded volume while windows are added to them: the
    weighted sum of the windows' probabilities and the sum of their weights. Slices no later
    window reaches are finished (blended, cropped, yielded) and the rest shifted forward."""

    def __init__(self, plan: _WindowPlan) -> None:
        self.plan = plan
        self.base = 0
        # (C, depth, Y, X): weighted sum of probabilities; made at the first batch, when C is known.
        self.acc: torch.Tensor | None = None
        self.total = torch.zeros((plan.depth, *plan.size[1:]))  # (depth, Y, X): sum of weights

    def add(self, probs: torch.Tensor, group: Sequence[tuple[slice, ...]]) -> None:
        """Add the weighted probabilities (n, C, *roi) of the windows ``group`` (of the row at ``base``)."""
        if self.acc is None:
            self.acc = torch.zeros((probs.shape[1], self.plan.depth, *self.plan.size[1:]))
        for p, w in zip(probs, group, strict=True):
            self.acc[:, :, w[1], w[2]] += p
            self.total[:, w[1], w[2]] += self.plan.weight

    def finish(self, count: int) -> Chunks:
        """Yield the blended slices [base, base + count), cropped to the image; shift the rest forward."""
        acc, total, base, keep = self.acc, self.total, self.base, self.plan.keep
        for start in range(0, count, FINISH_SLICES):
            z0, z1 = (
                max(base + start, keep[0].start),
                min(base + min(count, start + FINISH_SLICES), keep[0].stop),
            )
            if z1 > z0:
                part = slice(z0 - base, z1 - base)
                blended = acc[:, part, keep[1], keep[2]] / total[part, keep[1], keep[2]]
                yield z0 - keep[0].start, z1 - keep[0].start, blended.movedim(0, 1)
        self._shift(count)

    def _shift(self, count: int) -> None:
        """Move the slices from ``count`` on to the front and zero the slices freed at the end."""
        acc, total, depth = self.acc, self.total, self.plan.depth
        # Shift in pieces no longer than ``count``: source and destination never overlap.
        for start in range(0, depth - count, count):
            length = min(count, depth - count - start)
            acc[:, start : start + length] = acc[:, start + count : start + count + length]
            total[start : start + length] = total[start + count : start + count + length]
        acc[:, max(depth - count, 0) :] = 0
        total[max(depth - count, 0) :] = 0


def probability_chunks(
    prob_fn: ProbabilityFn,
    image: np.ndarray,
    *,
    dimension: str,
    patch_size_xyz: Sequence[int],
    slice_axis: int = 2,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    overlap: float = 0.5,
    stride_xyz: Sequence[int] | None = None,
    warn: Warn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[int, Chunks]:
    """The numpy axis the chunks run along, and the chunks (start, stop, probabilities (n, C, *plane))."""
    device = torch.device(device)
    if image.ndim != 3:
        raise ValueError(f"expected a 3D volume (z, y, x), got shape {image.shape}")
    if dimension == "2d":
        return 2 - slice_axis, _slice_chunks(
            prob_fn, image, patch_size_xyz, slice_axis, device, batch_size, warn, should_stop
        )
    return 0, _window_chunks(
        prob_fn, image, patch_size_xyz, device, batch_size, overlap, stride_xyz, warn, should_stop
    )


@torch.no_grad()
def predict_probabilities(
    network: nn.Module | Forward,
    image: np.ndarray,
    *,
    dimension: str,
    patch_size_xyz: Sequence[int],
    slice_axis: int = 2,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    overlap: float = 0.5,
    stride_xyz: Sequence[int] | None = None,
) -> torch.Tensor:
    """Softmax probabilities (C, z, y, x) on the CPU for a normalised volume (z, y, x).

    ``network`` is called on batches on ``device`` and must be in the mode the caller
    wants (eval for a deterministic prediction; dropout on for an MC-dropout sample).
    This keeps C full-size float32 volumes: for large images use :func:`predict_case`.
    """
    axis, chunks = probability_chunks(
        lambda x: torch.softmax(network(x).float(), dim=1),
        image,
        dimension=dimension,
        patch_size_xyz=patch_size_xyz,
        slice_axis=slice_axis,
        device=device,
        batch_size=batch_size,
        overlap=overlap,
        stride_xyz=stride_xyz,
    )
    out: torch.Tensor | None = None
    for start, stop, probs in chunks:
        if out is None:
            out = torch.empty((probs.shape[1], *image.shape), dtype=torch.float32)
        torch.movedim(out, 1 + axis, 0)[start:stop] = probs.to("cpu", torch.float32)
    return out


# --------------------------------------------------------------------------------------
# One image: Prediction


@dataclass
class Prediction:
    """The result of :func:`predict_case`; every array lies on ``reference``'s grid (z, y, x).

    ``reference`` carries the input image's geometry and path; its ``array`` is a read-only
    placeholder of the image's shape (the prediction does not keep the image's voxels).
    """

    labels: np.ndarray  # class index per voxel (0 = background); label_values() gives the file values
    uncertainty_map: np.ndarray  # float32, normalised entropy of the mean probabilities, 0..1
    regions: RegionSet
    reference: Volume
    classes: list[dict[str, Any]]
    method: str
    passes: int  # forward passes per slice/window
    model_seconds: float
    seconds: float
    probabilities: np.ndarray | None = None  # (C, z, y, x) float32, only with keep_probabilities
    warnings: list[str] = field(default_factory=list)
    engine: str = "torch"  # which engine ran the network: 'torch' or 'onnx' (ONNX Runtime)

    def label_values(self) -> np.ndarray:
        """The label map in the model's label values (what the training labels used), smallest dtype."""
        lut = np.array([int(c["label_value"]) for c in self.classes])
        dtype = np.uint8 if lut.max() <= 255 else (np.uint16 if lut.max() <= 65535 else np.int32)
        return lut.astype(dtype)[self.labels]

    def statistics(self) -> dict[str, Any]:
        """Per-image numbers: mean uncertainty, voxel volume of each class."""
        voxel_mm3 = self.reference.voxel_volume_mm3
        # count_nonzero per class: bincount would first copy the labels as int64 (8 bytes per voxel).
        return {
            "mean_uncertainty": float(self.uncertainty_map.mean(dtype=np.float64)),
            "class_volumes_mm3": {
                c["name"]: float(np.count_nonzero(self.labels == c["index"]) * voxel_mm3)
                for c in self.classes[1:]
            },
        }


def inference_network(network: nn.Module, dimension: str) -> nn.Module:
    """A copy of ``network`` that computes the same in eval mode, faster on the CPU.

    Each Conv (or ConvTranspose) directly followed by a BatchNorm with running statistics is
    folded into one convolution (exact up to float rounding), and 2D networks use the
    channels-last memory layout (measured 2.5x faster for the U-Net on this CPU together).
    Dropout layers stay, so MC-dropout samples the same network. The caller's network is
    not changed.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fast = copy.deepcopy(network).eval()
    convolutions = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    norms = (nn.BatchNorm2d, nn.BatchNorm3d)
    for module in list(fast.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, norm = module[i], module[i + 1]
            if (
                isinstance(conv, convolutions)
                and isinstance(norm, norms)
                and norm.track_running_stats
                and norm.running_mean is not None
            ):
                transpose = isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d))
                module[i] = fuse_conv_bn_eval(conv, norm, transpose=transpose)
                module[i + 1] = nn.Identity()
    if dimension == "2d":
        fast = fast.to(memory_format=torch.channels_last)
    return fast


def network_device(network: nn.Module) -> torch.device:
    parameter = next(network.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _forward_for(network: nn.Module, device: torch.device, amp: bool, dimension: str) -> Forward:
    """The network call with the input in the network's memory layout, under autocast where the
    device runs mixed precision (:func:`buseg.device.autocast_dtype`); logits come back float32."""
    from buseg.device import autocast_dtype

    dtype = autocast_dtype(device) if amp else None
    layout = torch.channels_last if dimension == "2d" else torch.contiguous_format
    autocast = (
        (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    )

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = network(x.contiguous(memory_format=layout))
        # Back to float32 (softmax/entropy stay full precision) and to the standard layout, in one
        # copy: argmax/entropy over classes are ~10x slower on channels-last.
        return logits.to(torch.float32, memory_format=torch.contiguous_format)

    return forward


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Fixed dropout masks for this prediction without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def window_batch_size(config: PredictConfig, device: torch.device) -> int:
    """Windows per pass: the configured number, or 4 on a GPU and 1 on the CPU (measured: no faster
    with more on the CPU, and each window's activations take about 0.3 GB for the V-Net)."""
    if config.sw_batch_size > 0:
        return config.sw_batch_size
    return 1 if device.type == "cpu" else 4


def check_model_settings(model: LoadedModel, config: PredictConfig) -> None:
    """Refuse settings the model cannot honour (a measure that needs dropout, such as MC-dropout,
    without dropout layers)."""
    from buseg.networks import has_dropout

    if measure(config.uncertainty).needs_dropout and not has_dropout(model.network):
        others = " or ".join(name for name in measure_names() if not measure(name).needs_dropout)
        raise ConfigError(
            f"--uncertainty {config.uncertainty} needs a model with dropout layers; this model was trained "
            "without dropout",
            hint=f"use --uncertainty {others}",
        )


def largest_component_per_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep each class's largest 26-connected component; the other components become background."""
    from scipy import ndimage

    out = labels.copy()
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for index in range(1, num_classes):
        mask = labels == index
        if not mask.any():
            continue
        component, count = ndimage.label(mask, structure=structure)
        if count > 1:
            sizes = np.bincount(component[mask])
            sizes[0] = 0
            out[mask & (component != int(sizes.argmax()))] = 0
    return out


def _spacing_warning(model: LoadedModel, image: Volume) -> str | None:
    trained = model.metadata.get("spacing_mm")
    if model.dimension != "3d" or not trained or len(trained) != 3:
        return None
    ratios = [s / t for s, t in zip(image.spacing_mm, trained, strict=True) if t > 0]
    if ratios and (max(ratios) > 1.5 or min(ratios) < 1 / 1.5):
        return (
            f"voxel spacing {tuple(round(s, 3) for s in image.spacing_mm)} mm differs from the training "
            f"spacing {tuple(round(t, 3) for t in trained)} mm; a 3D model sees structures at another "
            "scale - resample the image to the training spacing for reliable results"
        )
    return None


def review_regions(
    model: LoadedModel,
    labels: np.ndarray,
    uncertainty: np.ndarray,
    reference: Volume,
    config: PredictConfig,
    nesting: Sequence[tuple[int, int]] = (),
) -> RegionSet:
    """The regions to review and the slice order (docs/inference.md): uncertainty and shape flags,
    cut along the slice axis a 2D model ran on (a 3D model's: the axis of the coarsest spacing)."""
    axis_ijk = model.slice_axis if model.dimension == "2d" else review_slice_axis(reference.spacing_mm)
    flags = None
    if config.shape_flags:
        flags = shape_flag_map(labels, model.num_classes, 2 - axis_ijk, nesting=nesting)
    return find_regions(
        uncertainty,
        reference,
        labels=labels,
        class_names=[c["name"] for c in model.classes],
        threshold=config.region_threshold,
        min_region_mm3=config.min_region_mm3,
        min_region_voxels=config.min_region_voxels,
        max_regions=config.max_regions,
        flags=flags,
        slice_axis_ijk=axis_ijk,
        region_slices=config.region_slices,
        region_extent_mm=config.region_extent_mm,
    )


def _check_finite_output(probs: torch.Tensor, model: LoadedModel, image: Volume) -> None:
    """NaN or infinite probabilities are an error, never a result: argmax would call every such
    voxel background and the entropy would call it certain."""
    if not bool(torch.isfinite(probs).all()):
        raise InputError(
            f"the network's output is not finite (NaN or infinity) for this image (model {model.path}); "
            "no segmentation is written",
            path=image.path,
            hint="check the image's intensities (values near the float limits?) and the model file",
        )


def _input_notes(model: LoadedModel, image: Volume) -> list[str]:
    """What the user should know about this input before trusting its segmentation."""
    notes = []
    message = _spacing_warning(model, image)
    if message:
        notes.append(message)
    if image.array.size and float(image.array.min()) == float(image.array.max()):
        notes.append(
            f"the image is constant (every voxel is {float(image.array.min()):g}): its segmentation carries "
            "no information"
        )
    return notes


def _engine_forward(
    model: LoadedModel, network: nn.Module, device: torch.device, config: PredictConfig
) -> tuple[str, Forward]:
    """The engine that runs this prediction and its batch -> float32 logits function."""
    engine, _ = choose_engine(config.engine, device, config.uncertainty, config.amp, model.dimension)
    if engine == "onnx":  # the same network exported once (cached), run by ONNX Runtime in float32
        session = load_session(model.network, lambda: network, model.dimension, model.path)[0]
        return engine, session_forward(session)
    return engine, _forward_for(network, device, config.amp, model.dimension)


class _CaseMaps:
    """The label, uncertainty (and optionally probability) maps of one case, filled chunk by chunk."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, keep_probabilities: bool) -> None:
        self.labels = np.zeros(shape, dtype=np.uint8 if num_classes <= 256 else np.int16)
        self.uncertainty = np.zeros(shape, dtype=np.float32)
        self.probabilities = np.zeros((num_classes, *shape), dtype=np.float32) if keep_probabilities else None

    def fill(self, axis: int, first: int, probs: torch.Tensor) -> None:
        """Store the chunk ``probs`` (N, C, ...) whose N entries start at index ``first`` along ``axis``."""
        label_view = np.moveaxis(self.labels, axis, 0)
        uncertainty_view = np.moveaxis(self.uncertainty, axis, 0)
        # A few slices at a time: the entropy's temporaries stay small for a large slab.
        for offset in range(0, probs.shape[0], FINISH_SLICES):
            part = probs[offset : offset + FINISH_SLICES]
            rows = slice(first + offset, first + offset + part.shape[0])
            label_view[rows] = class_argmax(part).cpu().numpy()
            uncertainty_view[rows] = normalized_entropy(part, dim=1).cpu().numpy()
            if self.probabilities is not None:
                np.moveaxis(self.probabilities, 1 + axis, 0)[rows] = part.cpu().numpy()


def _geometry_only(image: Volume) -> Volume:
    """The image's geometry without its voxels: a zero-stride placeholder of the right shape lets the
    caller free the image (300 MB for a 512x512x300 CT) before the outputs are written."""
    return Volume(
        np.broadcast_to(np.zeros((), dtype=np.float32), image.array.shape),
        image.spacing_mm,
        image.origin,
        image.direction,
        image.path,
    )


def _model_maps(
    model: LoadedModel,
    image: Volume,
    config: PredictConfig,
    keep_probabilities: bool,
    note: Warn,
    should_stop: Callable[[], bool] | None,
) -> tuple[str, _CaseMaps]:
    """The model's pass over the whole volume (slice batches or sliding windows): the engine that ran
    it and the label, uncertainty (and probability) maps it filled."""
    network = inference_network(model.network, model.dimension)
    device = network_device(network)
    engine, forward = _engine_forward(model, network, device, config)
    normalized = normalize_intensity(image.array, model.normalization)
    prob_fn = probability_function(network, config.uncertainty, config.samples, forward)
    maps = _CaseMaps(image.array.shape, model.num_classes, keep_probabilities)
    batch_size = config.slice_batch_size if model.dimension == "2d" else window_batch_size(config, device)
    with _seeded(config.seed, device), torch.inference_mode():
        axis, chunks = probability_chunks(
            prob_fn,
            normalized,
            dimension=model.dimension,
            patch_size_xyz=model.patch_size_xyz,
            slice_axis=model.slice_axis,
            device=device,
            batch_size=batch_size,
            overlap=config.overlap,
            stride_xyz=config.stride,
            warn=note,
            should_stop=should_stop,
        )
        try:
            for first, _, probs in chunks:
                _check_finite_output(probs, model, image)
                maps.fill(axis, first, probs)
                del probs
        except InputError as exc:  # the window settings refused for this image: name the image
            if exc.path is not None:
                raise
            raise InputError(exc.message, path=image.path, hint=exc.hint) from None
    return engine, maps


def _network_input(model: LoadedModel, image: Volume, config: PredictConfig) -> Volume:
    """The volume the network runs on: ``image`` itself, or ``image`` resampled to the working spacing
    the model was trained at (its outputs are brought back to ``image``'s grid by :func:`_image_grid_maps`).

    The working grid can be far larger than the image whose memory was estimated from its header: it
    is refused, naming the model file, before anything of that size is allocated.
    """
    working_spacing = model_working_spacing(model.metadata)
    if not working_spacing or same_spacing(image.spacing_mm, working_spacing):
        return image
    target = working_grid(Grid.of(image), working_spacing, path=model.path, whose="the model's")
    check_memory(
        prediction_memory_bytes(target.shape[::-1], model, config, network_device(model.network)),
        f"predicting {Path(image.path or 'the image').name} at the model's working spacing "
        f"({'x'.join(map(str, target.shape[::-1]))} voxels)",
        path=model.path,
        hint=WORKING_GRID_MEMORY_HINT,
    )
    return image_on_working_grid(image, working_spacing)


def _image_grid_maps(
    maps: _CaseMaps, network_input: Volume, image: Volume, keep_probabilities: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Label map, uncertainty map and (with ``keep_probabilities``) probabilities on ``image``'s grid.

    From a working grid the class probabilities are resampled and the label map and entropy computed
    from them on ``image``'s grid (:func:`~buseg.resample.maps_on_grid`), not the labels resampled.
    """
    if network_input is image:
        return maps.labels, maps.uncertainty, maps.probabilities
    return maps_on_grid(
        maps.probabilities, Grid.of(network_input), Grid.of(image), keep_probabilities=keep_probabilities
    )


def predict_case(
    model: LoadedModel,
    image: Volume,
    config: PredictConfig | None = None,
    *,
    keep_probabilities: bool = False,
    should_stop: Callable[[], bool] | None = None,
    warn: Warn | None = None,
) -> Prediction:
    """Segment ``image`` with ``model``: label map, uncertainty map and flagged regions.

    The image is normalised as in training (the model's normalisation over the whole volume).
    One path for every case: to the model's working grid (when it was trained at a working
    spacing), the network's pass there, the maps back on ``image``'s grid, then the clean-up
    and the regions to review on that grid. ``config`` supplies the uncertainty method,
    regions, windows and post-processing (its file and device fields are not used: the model
    is already on its device).
    """
    config = config or PredictConfig()
    check_model_settings(model, config)
    nesting = parse_nesting_rules(config.nesting, [c["name"] for c in model.classes])
    if image.array.ndim != 3:
        raise InputError(f"expected a 3D volume, got {image.array.ndim} dimensions", path=image.path)
    start = time.perf_counter()
    network_input = _network_input(model, image, config)
    notes = _input_notes(model, network_input)
    for message in notes if warn is not None else ():
        warn(message)

    def note(message: str) -> None:
        notes.append(message)
        if warn is not None:
            warn(message)

    model_start = time.perf_counter()
    keep = keep_probabilities or network_input is not image  # resampled from the probabilities
    engine, maps = _model_maps(model, network_input, config, keep, note, should_stop)
    model_seconds = time.perf_counter() - model_start
    labels, uncertainty, probabilities = _image_grid_maps(maps, network_input, image, keep_probabilities)
    del maps, network_input
    if config.largest_component:
        labels = largest_component_per_class(labels, model.num_classes)
    reference = _geometry_only(image)
    region_set = review_regions(model, labels, uncertainty, reference, config, nesting)
    release_freed_memory()
    spatial_dims = 2 if model.dimension == "2d" else 3
    return Prediction(
        labels=labels,
        uncertainty_map=uncertainty,
        regions=region_set,
        reference=reference,
        classes=model.classes,
        method=config.uncertainty,
        passes=passes_per_input(config.uncertainty, config.samples, spatial_dims),
        model_seconds=model_seconds,
        seconds=time.perf_counter() - start,
        probabilities=probabilities,
        warnings=notes,
        engine=engine,
    )


# --------------------------------------------------------------------------------------
# Files: inputs, outputs, the batch job


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(case name, path) of every image given: files, or the image files in folders (sorted).

    A folder without images of its own but with an ``images/`` sub-folder is read from there.
    Segmentations (.seg.nrrd) are not images. Case names are made safe as file names
    (:func:`~buseg.io.safe_case_name`) and must be unique (they name the output folders).
    """
    found: list[tuple[str, Path]] = []
    if not inputs:
        raise InputError("no input images given")
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise InputError("input not found", path=path)
        if not path.is_dir():  # a FIFO or device too: refused by name when read, as an unreadable file
            if image_suffix(path) in ("", SEGMENTATION_SUFFIX):
                raise InputError("not an image file (NIfTI, NRRD or MetaImage expected)", path=path)
            found.append((case_name(path), path))
            continue

        def images_in(folder: Path) -> list[Path]:
            return sorted(
                p for p in folder.iterdir() if is_image_file(p) and image_suffix(p) != SEGMENTATION_SUFFIX
            )

        files = images_in(path)
        if not files and (path / "images").is_dir():
            files = images_in(path / "images")
        if not files:
            raise InputError("no image files (NIfTI, NRRD, MHA) in this folder", path=path)
        found += [(case_name(f), f) for f in files]
    # Absolute paths: the outputs name their inputs. Safe case names: they name output folders and
    # files, so a name such as '..' or 'con' must not lead outside the output folder or to a device.
    found = [(safe_case_name(case), resolved_path(path)) for case, path in found]
    seen: dict[str, Path] = {}
    for case, path in found:
        if case.lower() in seen:  # case-insensitively: so are the file systems of Windows and macOS
            raise InputError(
                f"two inputs have the case name {case!r}: {seen[case.lower()]} and {path}",
                path=path,
                hint="case names name the output folders; rename one of them",
            )
        seen[case.lower()] = path
    return found


def output_suffix(input_path: Path, output_format: str) -> str:
    if output_format != "auto":
        return "." + output_format.lstrip(".")
    return OUTPUT_SUFFIX.get(image_suffix(input_path), ".nii.gz")


def output_paths(out_dir: Path, case: str, suffix: str) -> dict[str, Path]:
    """Where the outputs of one case go: ``out_dir/<case>/...``."""
    folder = out_dir / case
    return {
        "label": folder / f"{case}_label{suffix}",
        "segmentation": folder / f"{case}{SEGMENTATION_SUFFIX}",
        "uncertainty": folder / f"{case}_uncertainty{suffix}",
        "regions": folder / "regions.json",
    }


def write_prediction(
    prediction: Prediction,
    paths: dict[str, Path],
    *,
    overwrite: bool = False,
    context: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write a case's four outputs all-or-nothing: temporary files first, renamed only when all are written."""
    reference = prediction.reference
    foreground = [c for c in prediction.classes if c["index"] > 0]
    document = regions_document(
        prediction.regions,
        reference,
        **(context or {}),
        uncertainty={"method": prediction.method, "passes": prediction.passes},
        statistics=prediction.statistics(),
        outputs={k: p.name for k, p in paths.items() if k != "regions"},
    )

    @contextlib.contextmanager
    def naming(kind: str) -> Iterator[None]:
        """An error while writing a temporary file names the output it was to become."""
        try:
            yield
        except OutputError as exc:
            raise OutputError(exc.message, path=paths[kind], hint=exc.hint) from None

    with contextlib.ExitStack() as stack:
        temps = {
            kind: stack.enter_context(atomic_path(path, overwrite=overwrite)) for kind, path in paths.items()
        }
        # Largest first, and the allocator's free memory handed back in between: writers copy
        # their array (the float32 map of a 512x512x300 CT is 300 MB).
        with naming("uncertainty"):
            write_image(
                reference,
                temps["uncertainty"],
                array=prediction.uncertainty_map.astype(np.float32, copy=False),
                overwrite=True,
            )
        release_freed_memory()
        with naming("label"):
            write_image(reference, temps["label"], array=prediction.label_values(), overwrite=True)
        release_freed_memory()
        with naming("segmentation"):
            write_segmentation(
                prediction.labels, reference, foreground, temps["segmentation"], overwrite=True
            )
        with naming("regions"):
            write_json_atomic(temps["regions"], json_safe(document), overwrite=True)
    return {kind: str(path) for kind, path in paths.items()}


SUMMARY_SLICES = 3  # slices to check first, per case in summary.json


def review_summary(region_set: RegionSet) -> dict[str, Any]:
    """What summary.json says per case about where to look: the slice axis and the first slices."""
    review = region_set.slice_review or {"axis_ijk": None, "slices": []}
    return {
        "slice_axis_ijk": review["axis_ijk"],
        "slices_to_check": review["slices"][:SUMMARY_SLICES],
        "first_region_reason": region_set.regions[0].reason if region_set.regions else None,
    }


def json_safe(value: Any) -> Any:
    """``value`` with NaN/infinity replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def load_for_prediction(config: PredictConfig) -> tuple[LoadedModel, torch.device, str]:
    """The model on the configured device (threads set), and why that device."""
    from buseg.device import configure_threads, resolve_device

    configure_threads(config.num_threads)
    device, reason = resolve_device(config.device)
    model = load_model(config.model_path, device=device)
    check_model_settings(model, config)
    # Refuse impossible settings before the first case.
    choose_engine(config.engine, device, config.uncertainty, config.amp, model.dimension)
    return model, device, reason


def engine_info(model: LoadedModel, config: PredictConfig, device: torch.device) -> dict[str, str]:
    """The engine of a prediction run and its arithmetic, in words (the run's device line and summary).

    With ONNX Runtime the network is exported (or its cached export loaded) here, so that an export
    failure stops the run before its first case.
    """
    engine, reason = choose_engine(config.engine, device, config.uncertainty, config.amp, model.dimension)
    info = {"engine": engine, "precision": engine_description(engine, reason, device, config.amp)}
    if engine == "onnx":
        inference_form = functools.partial(inference_network, model.network, model.dimension)
        info["onnx_export"] = load_session(model.network, inference_form, model.dimension, model.path)[1]
    return info


@dataclass
class CaseOutcome:
    index: int
    case: str
    path: Path
    prediction: Prediction | None
    error: BusegError | None
    seconds: float


# Image, normalised copy, uncertainty, labels, region map, and the review's flag codes, region keys and
# chance-of-error map (predict_case, review_regions).
BYTES_PER_VOXEL = 26


def prediction_memory_bytes(
    size_xyz: Sequence[int], model: LoadedModel, config: PredictConfig, device: torch.device | str = "cpu"
) -> int:
    """Peak memory :func:`predict_case` needs for an image of ``size_xyz`` voxels (an upper estimate).

    Per voxel: the float32 image and its normalised copy, the uncertainty map, labels and the
    region map (:data:`BYTES_PER_VOXEL`). On top, 3D: the window-deep slab of blended
    probabilities (classes + 1 weight map, padded to the window) and a padded copy of a
    volume smaller than a window; 2D: one batch of slices resized to the training size and
    back, with their probabilities. Memory on a GPU is not counted (out-of-memory there is
    retried with fewer slices or windows).
    """
    sizes = [max(1, int(s)) for s in size_xyz]
    frames = int(np.prod(sizes[3:], dtype=np.int64))  # a 4D header: every frame is read
    size = ([*sizes[:3]] + [1] * (3 - len(sizes[:3])))[::-1]  # spatial, numpy order (z, y, x); 2D: depth 1
    voxels = int(np.prod(size, dtype=np.int64))
    classes = model.num_classes
    total = BYTES_PER_VOXEL * voxels * frames
    if model.dimension == "3d":
        roi = [int(s) for s in model.patch_size_xyz[::-1]]
        padded = [max(s, r) for s, r in zip(size, roi, strict=True)]
        total += (classes + 1) * roi[0] * padded[1] * padded[2] * 4
        if padded != size:
            total += int(np.prod(padded, dtype=np.int64)) * 4
        batch = window_batch_size(config, torch.device(device))
        total += batch * (classes + 2) * int(np.prod(roi, dtype=np.int64)) * 4
    else:
        axis = 2 - model.slice_axis
        plane = voxels // max(1, size[axis])
        patch = int(np.prod(model.patch_size_xyz, dtype=np.int64))
        total += config.slice_batch_size * (classes + 1) * (plane + patch) * 4 * 2
    return int(total)


def iter_predictions(
    images: Sequence[tuple[str, Path]],
    model: LoadedModel,
    config: PredictConfig,
    *,
    sink: EventSink,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[CaseOutcome]:
    """Predict the images one by one; an unreadable image, or one too large for the memory, is
    reported (warning) and skipped, not fatal. The memory an image needs is estimated from its
    header before its voxels are read."""
    device = network_device(model.network)
    for index, (case, path) in enumerate(images, start=1):
        _check_stop(should_stop)
        start = time.perf_counter()
        try:
            header = read_image_header(path)
            check_memory(
                prediction_memory_bytes(header.size_xyz, model, config, device),
                f"predicting {path.name} ({'x'.join(map(str, header.size_xyz))} voxels)",
            )
            volume = read_image(path)
            prediction = predict_case(
                model,
                volume,
                config,
                should_stop=should_stop,
                warn=lambda m, case=case: sink.emit("warning", message=f"{case}: {m}"),
            )
            del volume  # not needed for writing the outputs
        except (InputError, ResourceError) as exc:
            sink.emit("warning", message=f"{case}: skipped: {exc}", detail={"case": case, "path": str(path)})
            yield CaseOutcome(index, case, path, None, exc, time.perf_counter() - start)
            continue
        yield CaseOutcome(index, case, path, prediction, None, time.perf_counter() - start)


@dataclass
class PredictResult:
    out_dir: Path
    summary_path: Path
    cases: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.cases if c["status"] != "ok"]


def _refuse_existing_outputs(planned: dict[str, dict[str, Path]], summary_path: Path, out_dir: Path) -> None:
    """An OutputError naming the first output an earlier run left, if any (nothing is replaced)."""
    existing = [p for paths in planned.values() for p in paths.values() if p.exists()]
    existing += [summary_path] if summary_path.exists() else []
    if existing:
        raise OutputError(
            f"exists already ({len(existing)} output file(s) of an earlier run in {out_dir}); refusing to "
            "overwrite",
            path=existing[0],
            hint="pass --overwrite to replace them, or choose another --out",
        )


def _case_entry(
    outcome: Any, paths: dict[str, Path], out_dir: Path, config: PredictConfig, model_file: str
) -> tuple[dict[str, Any], Any]:
    """Write one predicted case's outputs; returns its summary entry and the 'case' event's outputs."""
    prediction = outcome.prediction
    write_start = time.perf_counter()
    outputs = write_prediction(
        prediction,
        paths,
        overwrite=config.overwrite,
        context={"case": outcome.case, "image": str(outcome.path), "model": model_file},
    )
    entry = {
        "case": outcome.case,
        "input": str(outcome.path),
        "status": "ok",
        "outputs": {k: str(p.relative_to(out_dir)) for k, p in paths.items()},
        "seconds": outcome.seconds + (time.perf_counter() - write_start),
        "model_seconds": prediction.model_seconds,
        **prediction.statistics(),
        "flagged_volume_mm3": prediction.regions.flagged_volume_mm3,
        "regions_listed": len(prediction.regions.regions),
        **review_summary(prediction.regions),
        "warnings": prediction.warnings,
    }
    return entry, outputs


def _raise_for_failures(result: PredictResult, errors: list[BusegError], total: int) -> None:
    """The job's error when cases failed: the case's own error for one input, else a list of them."""
    if not result.failed:
        return
    if total == 1:
        raise errors[0]  # the one case's own error (and exit code: a ResourceError is 3)
    names = ", ".join(c["case"] for c in result.failed[:10])
    raise InputError(
        f"{len(result.failed)} of {total} case(s) could not be predicted: {names} "
        f"(first: {errors[0].message})",
        path=result.failed[0]["input"],
        hint=f"details in the warnings and in {result.summary_path}",
    )


def predict_files(
    inputs: Sequence[str | Path],
    config: PredictConfig,
    *,
    events: EventSink | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PredictResult:
    """``buseg predict``: segment every input image and write its outputs under ``config.out_dir``.

    Per case ``<out>/<case>/``: ``<case>_label.<ext>`` (label values), ``<case>.seg.nrrd``
    (named, colored segments), ``<case>_uncertainty.<ext>`` (float32, 0..1), ``regions.json``;
    plus ``<out>/summary.json``. Nothing existing is replaced unless ``config.overwrite``.
    An unreadable image is skipped with a warning and the job fails at the end (after the
    other cases) with an error listing it.
    """
    sink = events or EventSink()
    config.validate()
    images = collect_images(inputs)
    out_dir = Path(config.out_dir)
    planned = {
        case: output_paths(out_dir, case, output_suffix(path, config.output_format)) for case, path in images
    }
    summary_path = out_dir / "summary.json"
    if not config.overwrite:
        _refuse_existing_outputs(planned, summary_path, out_dir)
    model, device, reason = load_for_prediction(config)
    engine = engine_info(model, config, device)
    ensure_output_folder(out_dir)  # before the first case is computed
    classes = [c["name"] for c in model.classes]
    sink.emit(
        "started",
        job="predict",
        config=to_dict(config),
        device=str(device),
        device_reason=reason,
        **engine,
        total=len(images),
        classes=classes,
        buseg_version=__version__,
    )
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "schema_version": 1,
        "buseg_version": __version__,
        "model": str(Path(config.model_path).resolve()),
        "device": str(device),
        **engine,
        "config": to_dict(config),
        "classes": model.classes,
        "cases": [],
    }
    errors: list[BusegError] = []
    for outcome in iter_predictions(images, model, config, sink=sink, should_stop=should_stop):
        if outcome.prediction is None:
            entry = {
                "case": outcome.case,
                "input": str(outcome.path),
                "status": "failed",
                "error": str(outcome.error),
            }
            errors.append(outcome.error)
        else:
            paths = planned[outcome.case]
            entry, outputs = _case_entry(outcome, paths, out_dir, config, summary["model"])
            sink.emit(
                "case",
                index=outcome.index,
                total=len(images),
                case=outcome.case,
                outputs=outputs,
                seconds=entry["seconds"],
            )
        summary["cases"].append(entry)
        # Rewritten after every case, so an interrupted run leaves a consistent summary.
        write_json_atomic(summary_path, json_safe(summary), overwrite=True)
    result = PredictResult(out_dir, summary_path, summary["cases"])
    _raise_for_failures(result, errors, len(images))
    return result
