"""The working resolution: volumes resampled to the spacing a model trains and predicts at.

A model trained with ``model.working_spacing_mm`` sees every volume on a *working grid*:
the same field of view, origin side and direction as the volume's own grid, with the working
spacing (the grid is centred on the volume's centre, so nothing shifts when the size is
rounded). Training images are resampled linearly and label maps by majority (the class with
the largest linearly interpolated one-hot share, which does not shift boundaries by half a voxel
as nearest neighbour would on an even downsampling factor). Predictions are made on the
working grid and brought back to the input's exact grid (:func:`buseg.prediction.case.predict_case`
uses this module, never the other way round):

* class probabilities are resampled linearly, one slab of output slices at a time
  (:data:`OUTPUT_SLAB_SLICES`), and the label map and the normalised entropy are computed there,
  so that boundaries are as smooth as the probabilities and memory holds the working grid's
  class probabilities, one output slab and the output maps (docs/inference.md);
* regions to review and the largest-component clean-up are computed on the input's grid.

SimpleITK does the resampling (ITK's linear interpolation, the geometry in physical space).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from buseg.files.images import LabelVolume, Volume, format_numbers
from buseg.memory import check_memory

# Output slices resampled together when predictions go back to the input grid: the slab's class
# probabilities (C x 8 x 512 x 512 float32 = 8 MB per class) stay small next to the output maps.
OUTPUT_SLAB_SLICES = 8
# Spacings closer than this (relative) are the same grid: no resampling.
SPACING_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Grid:
    """A voxel grid in physical space: numpy shape (z, y, x) and ITK geometry (x, y, z)."""

    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, volume: Volume) -> Grid:
        return cls(
            tuple(int(s) for s in volume.array.shape),
            tuple(float(s) for s in volume.spacing_mm),
            tuple(float(o) for o in volume.origin),
            tuple(float(d) for d in volume.direction),
        )

    @classmethod
    def plain(cls, shape: Sequence[int], spacing_mm: Sequence[float]) -> Grid:
        """A grid at the origin with the identity direction (benchmark arrays without geometry)."""
        dims = len(shape)
        return cls(
            tuple(int(s) for s in shape),
            tuple(float(s) for s in spacing_mm),
            (0.0,) * dims,
            tuple(float(v) for v in np.eye(dims).ravel()),
        )

    def image(self, array: np.ndarray) -> sitk.Image:
        if array.shape != self.shape:
            raise ValueError(f"array shape {array.shape} differs from the grid's {self.shape}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    if len(a) != len(b):
        return False
    return all(abs(x - y) <= SPACING_TOLERANCE * max(abs(y), 1e-9) for x, y in zip(a, b, strict=True))


def working_grid(
    grid: Grid, working_spacing_mm: Sequence[float], *, path: str | Path | None = None, whose: str = "the"
) -> Grid:
    """The grid with ``working_spacing_mm`` (x, y, z) covering ``grid``'s field of view, centred on it.

    A grid whose resampled volumes would not fit in memory (a working spacing far finer than the
    image's, e.g. 0.001 mm) is a ResourceError naming ``path`` and ``whose`` working spacing it is,
    raised before anything is allocated.
    """
    spacing = np.array(grid.spacing_mm, dtype=np.float64)
    working = np.array([float(s) for s in working_spacing_mm], dtype=np.float64)
    size_xyz = np.array(grid.shape[::-1], dtype=np.float64)
    if not (np.all(np.isfinite(working)) and np.all(working > 0)):
        raise ValueError(f"a working spacing is positive and finite, not {tuple(working_spacing_mm)}")
    exact_size = np.maximum(1.0, np.round(size_xyz * spacing / working))
    check_memory(
        float(np.prod(exact_size)) * RESAMPLE_BYTES_PER_VOXEL,
        f"resampling to {whose} working spacing {format_numbers(working)} mm makes a grid of "
        f"{'x'.join(f'{s:.0f}' for s in exact_size)} voxels (from {'x'.join(map(str, grid.shape[::-1]))}): "
        "the resampled volumes",
        path=path,
        hint=WORKING_GRID_MEMORY_HINT,
    )
    new_size = exact_size.astype(int)
    # Same centre: first voxel centre moved by half the difference of the two extents (centre to centre).
    shift = ((size_xyz - 1) * spacing - (new_size - 1) * working) / 2
    direction = np.array(grid.direction, dtype=np.float64).reshape(len(spacing), len(spacing))
    origin = np.array(grid.origin, dtype=np.float64) + direction @ shift
    return Grid(
        tuple(int(s) for s in new_size[::-1]),
        tuple(float(s) for s in working),
        tuple(float(o) for o in origin),
        grid.direction,
    )


# Bytes per working-grid voxel while a volume is resampled to it: the float32 result and, for a label
# map, each value's float32 share, the best share so far and the output (resample_label_array).
RESAMPLE_BYTES_PER_VOXEL = 16
# What to do when a working grid does not fit (working_grid, and prediction at a model's spacing).
WORKING_GRID_MEMORY_HINT = (
    "a working spacing closer to the images' own (--working-spacing-mm when training), or smaller "
    "(cropped, downsampled) images"
)


def _resample(image: sitk.Image, target: Grid, interpolator: int) -> np.ndarray:
    resampled = sitk.Resample(
        image,
        list(target.shape[::-1]),
        sitk.Transform(),
        interpolator,
        target.origin,
        target.spacing_mm,
        target.direction,
        0.0,
        image.GetPixelID(),
    )
    return sitk.GetArrayFromImage(resampled)


def resample_array(array: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """An intensity volume on ``source`` resampled linearly onto ``target`` (float32)."""
    return _resample(source.image(array.astype(np.float32, copy=False)), target, sitk.sitkLinear)


def resample_label_array(labels: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """A label map on ``source`` resampled onto ``target`` by majority: per value, the linearly
    interpolated one-hot share; the largest wins (the smaller value on a tie). Same dtype."""
    values = np.unique(labels)
    best = np.full(target.shape, -1.0, dtype=np.float32)
    out = np.zeros(target.shape, dtype=labels.dtype)
    for value in values:
        share = _resample(source.image((labels == value).astype(np.float32)), target, sitk.sitkLinear)
        wins = share > best
        out[wins] = value
        np.maximum(best, share, out=best)
    return out


def image_on_working_grid(volume: Volume, working_spacing_mm: Sequence[float]) -> Volume:
    """``volume`` resampled linearly to the working spacing (unchanged when already there)."""
    if not working_spacing_mm or same_spacing(volume.spacing_mm, working_spacing_mm):
        return volume
    source = Grid.of(volume)
    target = working_grid(source, working_spacing_mm, path=volume.path)
    array = resample_array(volume.array, source, target)
    return Volume(array, target.spacing_mm, target.origin, target.direction, volume.path)


def label_on_working_grid(label: LabelVolume, working_spacing_mm: Sequence[float]) -> LabelVolume:
    """``label`` resampled by majority to the working spacing (unchanged when already there)."""
    if not working_spacing_mm or same_spacing(label.spacing_mm, working_spacing_mm):
        return label
    source = Grid.of(label)
    target = working_grid(source, working_spacing_mm, path=label.path)
    array = resample_label_array(label.array, source, target)
    return LabelVolume(
        array, target.spacing_mm, target.origin, target.direction, label.path, segments=label.segments
    )


def model_working_spacing(metadata: dict[str, Any]) -> list[float] | None:
    """The working spacing a model file was trained at, or None (trained at the data's own spacing,
    or written before the working spacing existed)."""
    config = metadata.get("config") or {}
    spacing = (config.get("model") or {}).get("working_spacing_mm") or []
    return [float(s) for s in spacing] if len(spacing) == 3 else None


# --------------------------------------------------------------------------------------
# Predictions back to the input grid


def probabilities_to_grid(probabilities: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """Class probabilities (C, *source.shape) resampled linearly onto ``target`` (validation)."""
    return np.stack([resample_array(p, source, target) for p in probabilities])


def _slab(target: Grid, start: int, stop: int) -> Grid:
    direction = np.array(target.direction, dtype=np.float64).reshape(3, 3)
    origin = np.array(target.origin) + direction @ np.array([0.0, 0.0, start * target.spacing_mm[2]])
    return Grid((stop - start, *target.shape[1:]), target.spacing_mm, tuple(origin), target.direction)


def maps_on_grid(
    probabilities: np.ndarray, source: Grid, target: Grid, *, keep_probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Label map, normalised entropy and (optionally) probabilities on ``target`` from class
    probabilities on ``source``: resampled linearly one slab of :data:`OUTPUT_SLAB_SLICES` output
    slices at a time; the label map and entropy are computed on the slab."""
    import torch

    from buseg.model.uncertainty import class_argmax, normalized_entropy

    num_classes = probabilities.shape[0]
    class_images = [source.image(p.astype(np.float32, copy=False)) for p in probabilities]
    labels = np.zeros(target.shape, dtype=np.uint8 if num_classes <= 256 else np.int16)
    uncertainty = np.zeros(target.shape, dtype=np.float32)
    kept = np.zeros((num_classes, *target.shape), dtype=np.float32) if keep_probabilities else None
    for start in range(0, target.shape[0], OUTPUT_SLAB_SLICES):
        stop = min(start + OUTPUT_SLAB_SLICES, target.shape[0])
        slab = _slab(target, start, stop)
        part = np.stack([_resample(image, slab, sitk.sitkLinear) for image in class_images])
        # Interpolated probabilities still sum to 1 inside the volume; outside it (default 0) they
        # would not: renormalise so the entropy stays in 0..1.
        part /= np.maximum(part.sum(axis=0, keepdims=True), 1e-12)
        probs = torch.from_numpy(part).movedim(0, 1)  # (slices, C, y, x)
        labels[start:stop] = class_argmax(probs).numpy()
        uncertainty[start:stop] = normalized_entropy(probs, dim=1).numpy()
        if kept is not None:
            kept[:, start:stop] = part
    return labels, uncertainty, kept
