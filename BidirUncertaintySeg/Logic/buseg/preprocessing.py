"""Intensity normalisation and resizing shared by training and inference.

The normalisation mode is stored in the model file; inference calls the same function, so
an image is fed to the network exactly as the training images were.
"""

from __future__ import annotations

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
    """
    x = np.asarray(array, dtype=np.float32)
    if mode == "none":
        return x.copy()
    if mode == "zscore":
        mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
        return ((x - mean) / std).astype(np.float32) if std > 0 else np.zeros_like(x)
    if mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif mode == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, (0.5, 99.5)))
    else:
        raise ValueError(f"unknown normalization {mode!r}")
    if hi <= lo:
        return np.zeros_like(x)
    out = (x - lo) / (hi - lo)
    if mode == "percentile":
        np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


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
