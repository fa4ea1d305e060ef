"""A network over a whole volume: class probabilities, batch by batch, within memory.

The lowest level of prediction, under :mod:`buseg.prediction.case` (one image) and the training
loop's validation (:func:`predict_probabilities`):

* **the probability function of a batch**: one pass, MC dropout or flips, as the uncertainty
  measure's catalog entry says (:mod:`buseg.catalogs.measures`);
* **2D models** run slice-wise along the axis they were trained on: each batch of slices is
  resized (bilinear) to the training in-plane size, run, and its probabilities resized back;
* **3D models** run with overlapping windows and Gaussian blending: the windows and the
  weights are MONAI's (``dense_patch_slices``, ``compute_importance_map``, the same as
  ``monai.inferers.sliding_window_inference``, which a test checks), but the windows are
  visited row by row along z (a row = the windows that start at one z) in a buffer one
  window deep, and the slices before the next row are handed on (:data:`Chunks`) as soon as
  that row starts. So memory holds one window-deep slab of probabilities, never C full-size
  probability volumes (benchmarks/results/inference_speed.md);
* a batch that runs out of (GPU) memory is retried with half as many slices/windows.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from buseg.catalogs.measures import measure
from buseg.data.preprocessing import resize_slices
from buseg.errors import Cancelled, ConfigError, InputError, ResourceError

Forward = Callable[[torch.Tensor], torch.Tensor]
ProbabilityFn = Callable[[torch.Tensor], torch.Tensor]
Warn = Callable[[str], None]
logger = logging.getLogger("buseg")
FINISH_SLICES = 16  # slices per argmax/entropy step when a slab of probabilities is finished


# --------------------------------------------------------------------------------------
# Probabilities of one batch: one pass, MC-dropout, or flips


def probability_function(
    network: nn.Module, method: str, samples: int = 1, forward: Forward | None = None
) -> ProbabilityFn:
    """A function batch -> mean softmax probabilities for the uncertainty measure ``method``
    (:mod:`buseg.catalogs.measures`).

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


def check_stop(should_stop: Callable[[], bool] | None) -> None:
    """Raise :class:`~buseg.errors.Cancelled` when the caller asks prediction to stop."""
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
        check_stop(should_stop)
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
            check_stop(should_stop)
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
