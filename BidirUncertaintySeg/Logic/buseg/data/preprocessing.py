"""Intensity normalisation and resizing shared by training and inference.

The normalisation mode is stored in the model file; inference calls the same function, so
an image is fed to the network exactly as the training images were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F


def resolve_normalization(mode: str, dimension: str) -> str:
    """'auto' means minmax for 2D (ACDC-style) and zscore for 3D (LA-style)."""
    if mode == "auto":
        return "minmax" if dimension == "2d" else "zscore"
    return mode


def normalize_intensity(array: np.ndarray, mode: str) -> np.ndarray:
    """Return a float32 copy of ``array`` normalised per image.

    * ``zscore``: (x - mean) / std over the whole image;
    * ``minmax``: (x - min) / (max - min) to 0..1;
    * ``percentile``: the 0.5-99.5 percentile window mapped to 0..1 and clipped (robust to
      outliers such as metal in CT or bright vessels in MR);
    * ``none``: unchanged.

    A constant image maps to zeros (callers that must refuse constant images check first).
    Differences and scales are computed in float64, slab by slab: finite float32 values near
    3e38 would overflow to infinity in float32 (``max - min`` of such an image is 6e38) and the
    network would see NaN.
    """
    x = np.asarray(array, dtype=np.float32)
    if mode == "none":
        return x.copy()
    if mode == "zscore":
        mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
        return _affine(x, mean, std) if std > 0 and math.isfinite(std) else np.zeros_like(x)
    if mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif mode == "percentile":
        # float64 so that the interpolation between two huge neighbours cannot overflow either.
        lo, hi = (
            float(v) for v in np.percentile(x.astype(np.float64, copy=False) if _huge(x) else x, (0.5, 99.5))
        )
    else:
        raise ValueError(f"unknown normalization {mode!r}")
    if hi <= lo:
        return np.zeros_like(x)
    out = _affine(x, lo, hi - lo)
    if mode == "percentile":
        np.clip(out, 0.0, 1.0, out=out)
    return out


def _huge(x: np.ndarray) -> bool:
    """Whether differences of ``x``'s values could overflow float32."""
    return bool(x.size) and max(abs(float(x.min())), abs(float(x.max()))) > 1e37


def _affine(x: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """``(x - offset) / scale`` as float32.

    Ordinary images are computed in float32 exactly as before (the same values the existing
    models were trained on); only images whose differences could overflow float32 go through
    float64, a slab at a time (bounded extra memory).
    """
    if not _huge(x) and abs(scale) < 1e37:
        return ((x - offset) / scale).astype(np.float32, copy=False)
    out = np.empty(x.shape, dtype=np.float32)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    step = 1 << 22  # 4 Mi voxels: 32 MiB of float64 at a time
    for start in range(0, flat_in.size, step):
        part = flat_in[start : start + step].astype(np.float64)
        part -= offset
        part /= scale
        flat_out[start : start + step] = part
    return out


def resize_slices(slices: torch.Tensor, size: Sequence[int], *, mode: str) -> torch.Tensor:
    """Resize a batch (N, C, H, W) to ``size`` (H, W): 'bilinear' for images, 'nearest' for labels.

    The reference zooms images with nearest-neighbour order 0 as well; we use bilinear for
    images (smoother input, same at inference) and nearest for labels.
    """
    size = tuple(int(s) for s in size)
    if tuple(slices.shape[-2:]) == size:
        return slices
    if mode == "nearest":
        return F.interpolate(slices, size=size, mode="nearest-exact")
    return F.interpolate(slices, size=size, mode="bilinear", align_corners=False)
