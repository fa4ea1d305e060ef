"""Medical image input/output with geometry, and atomic file writing.

Images are read and written with SimpleITK (NIfTI, NRRD, MetaImage) and Slicer
segmentations (``.seg.nrrd``) with slicerio, so that spacing, origin and direction travel
with every array. Arrays are numpy order ``(z, y, x)`` (SimpleITK's); geometry is ITK's:
``spacing_mm`` and ``origin`` in (x, y, z) order, physical coordinates in LPS.

Everything written goes to a temporary file in the destination folder first and is renamed
into place, so a crash or a kill never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SEGMENTATION_SUFFIX = ".seg.nrrd"

# Colors for classes without one (Slicer's GenericAnatomyColors-like, easy to tell apart).
DEFAULT_COLORS = (
    (0.85, 0.33, 0.31),  # red
    (0.35, 0.70, 0.40),  # green
    (0.27, 0.51, 0.85),  # blue
    (0.95, 0.77, 0.25),  # yellow
    (0.62, 0.40, 0.80),  # purple
    (0.20, 0.75, 0.80),  # cyan
    (0.95, 0.55, 0.20),  # orange
    (0.80, 0.45, 0.65),  # pink
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_suffix(path: str | Path) -> str:
    """The recognised suffix of an image path ('.seg.nrrd', '.nii.gz', ...), or ''."""
    name = Path(path).name.lower()
    for suffix in (SEGMENTATION_SUFFIX, *IMAGE_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return ""


def case_name(path: str | Path) -> str:
    """File name without its (possibly double) image suffix."""
    name = Path(path).name
    suffix = image_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else Path(path).stem


def is_image_file(path: str | Path) -> bool:
    return Path(path).is_file() and image_suffix(path) != "" and not Path(path).name.startswith(".")


@dataclass
class Volume:
    """A 3D (or 2D) array with its physical geometry.

    ``array`` is numpy order (z, y, x); ``spacing_mm``, ``origin`` are (x, y, z); ``direction``
    is ITK's row-major 3x3 (or 2x2) matrix as a flat tuple; physical space is LPS.
    """

    array: np.ndarray
    spacing_mm: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    path: str | None = None

    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def size_xyz(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[::-1])

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_mm))

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """A SimpleITK image of ``array`` (default: this volume's) with this geometry."""
        data = self.array if array is None else array
        if data.shape != self.array.shape:
            raise ValueError(f"array shape {data.shape} differs from the volume's {self.array.shape}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(data))
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume with the same geometry and another array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.spacing_mm, self.origin, self.direction, self.path)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k) = (x, y, z) to LPS millimetres."""
        d = len(self.spacing_mm)
        direction = np.asarray(self.direction, dtype=float).reshape(d, d)
        matrix = np.eye(4)
        matrix[:d, :d] = direction @ np.diag(self.spacing_mm)
        matrix[:d, 3] = self.origin
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k) to RAS millimetres (what Slicer shows)."""
        return LPS_TO_RAS @ self.ijk_to_lps()

    def index_to_ras(self, ijk: Sequence[float]) -> tuple[float, float, float]:
        """Physical RAS position of a (fractional) voxel index given in (i, j, k) order."""
        point = np.ones(4)
        point[: len(ijk)] = ijk
        return tuple(float(v) for v in (self.ijk_to_ras() @ point)[:3])

    def same_grid(self, other: Volume, *, tolerance: float = 1e-4) -> str | None:
        """None if both lie on the same voxel grid, else a sentence saying how they differ."""
        if self.array.shape != other.array.shape:
            return f"size {other.size_xyz} differs from {self.size_xyz}"
        for name in ("spacing_mm", "origin", "direction"):
            a = np.asarray(getattr(self, name), dtype=float)
            b = np.asarray(getattr(other, name), dtype=float)
            scale = max(1.0, float(np.abs(a).max(initial=0.0)))
            if a.shape != b.shape or not np.allclose(a, b, atol=tolerance * scale, rtol=0):
                label = name.replace("_mm", "")
                return f"{label} {tuple(np.round(b, 5))} differs from {tuple(np.round(a, 5))}"
        return None


@dataclass
class LabelVolume(Volume):
    """An integer label map; ``segments`` maps label value -> {'name', 'color'} when known."""

    segments: dict[int, dict[str, Any]] = field(default_factory=dict)


def volume_from_sitk(image: sitk.Image, path: str | None = None) -> Volume:
    return Volume(
        array=sitk.GetArrayFromImage(image),
        spacing_mm=tuple(float(s) for s in image.GetSpacing()),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=tuple(float(d) for d in image.GetDirection()),
        path=path,
    )


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise InputError("file not found", path=path)
    if path.is_dir():
        raise InputError("is a folder, expected an image file", path=path)
    if not image_suffix(path):
        raise InputError(
            "unrecognised image format", path=path,
            hint=f"supported: {', '.join((SEGMENTATION_SUFFIX, *IMAGE_SUFFIXES))}",
        )
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "Exception" in line), first[-1] if first else "")
        raise InputError(f"cannot be read as an image (corrupt or truncated?): {detail.strip()[:200]}", path=path) from None


def read_image(path: str | Path, *, allow_2d: bool = False) -> Volume:
    """Read a scalar 3D image as float32 with its geometry.

    Refuses, with the file named: missing or unreadable files, vector/RGB pixels, 4D images,
    2D images (unless ``allow_2d``), and images containing NaN or infinity.
    """
    path = Path(path)
    image = _read_sitk(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector image); "
            "a scalar (grey-value) image is needed", path=path,
        )
    dim = image.GetDimension()
    if dim == 4:
        raise InputError("is a 4D image (a time series?); extract one 3D frame first", path=path)
    if dim == 2 and not allow_2d:
        raise InputError("is a 2D image; a 3D volume is needed (a single slice is a volume of depth 1)", path=path)
    if dim not in (2, 3):
        raise InputError(f"has {dim} dimensions; 3D volumes are supported", path=path)
    volume = volume_from_sitk(image, str(path))
    array = volume.array
    if not np.issubdtype(array.dtype, np.floating) or array.dtype != np.float32:
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"contains {bad} NaN or infinite voxel values", path=path)
    volume.array = array
    return volume


def read_label(path: str | Path, *, allow_2d: bool = False) -> LabelVolume:
    """Read a label map (integer image, or Slicer ``.seg.nrrd`` with segment names and colors).

    Non-integer voxel values are refused. For a ``.seg.nrrd`` the voxel values are the
    segments' label values, and ``segments`` gives each value's name and color; overlapping
    segments (several layers) are collapsed, later segments winning, with a warning in
    ``segments[value]['overlap']``.
    """
    path = Path(path)
    if image_suffix(path) == SEGMENTATION_SUFFIX:
        return _read_seg_nrrd(path)
    image = _read_sitk(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("is a vector/RGB image; a label map must have one integer value per voxel", path=path)
    if image.GetDimension() not in (2, 3) or (image.GetDimension() == 2 and not allow_2d):
        raise InputError(f"label map has {image.GetDimension()} dimensions; 3D is needed", path=path)
    volume = volume_from_sitk(image, str(path))
    array = volume.array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("label map contains NaN or infinite values", path=path)
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise InputError(
                "label map has non-integer values (is this an image rather than a label map?)", path=path
            )
    if array.min(initial=0) < 0:
        raise InputError(f"label map has negative values (min {array.min()})", path=path)
    array = array.astype(np.int32 if array.max(initial=0) > 255 else np.uint8)
    return LabelVolume(array, volume.spacing_mm, volume.origin, volume.direction, str(path))


def _read_seg_nrrd(path: Path) -> LabelVolume:
    import slicerio

    if not path.exists():
        raise InputError("file not found", path=path)
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio raises plain exceptions of many kinds for bad files
        raise InputError(f"cannot be read as a Slicer segmentation: {exc}", path=path) from None
    voxels = np.asarray(segmentation["voxels"])
    segments = segmentation.get("segments", [])
    if voxels.ndim == 3:
        layers = voxels[np.newaxis]
    elif voxels.ndim == 4:
        layers = voxels
    else:
        raise InputError(f"segmentation voxels have {voxels.ndim} dimensions; expected 3 (or 4 with layers)", path=path)
    labels_ijk = np.zeros(layers.shape[1:], dtype=np.uint8 if len(segments) < 255 else np.int32)
    info: dict[int, dict[str, Any]] = {}
    for index, segment in enumerate(segments, start=1):
        layer = int(segment.get("layer", 0))
        mask = layers[layer] == int(segment.get("labelValue", 1))
        overlap = bool((labels_ijk[mask] != 0).any())
        labels_ijk[mask] = index
        info[index] = {
            "name": segment.get("name") or segment.get("id") or f"Segment_{index}",
            "color": [float(c) for c in segment.get("color", DEFAULT_COLORS[(index - 1) % len(DEFAULT_COLORS)])],
        }
        if overlap:
            info[index]["overlap"] = True
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    if np.any(spacing == 0):
        raise InputError("segmentation has a zero voxel spacing", path=path)
    direction = ijk_to_lps[:3, :3] / spacing
    # slicerio indexes voxels (i, j, k); the engine uses numpy order (k, j, i).
    array = np.ascontiguousarray(labels_ijk.transpose(2, 1, 0))
    return LabelVolume(
        array, tuple(float(s) for s in spacing), tuple(float(o) for o in ijk_to_lps[:3, 3]),
        tuple(float(d) for d in direction.reshape(-1)), str(path), segments=info,
    )


# --------------------------------------------------------------------------------------
# Writing (atomic)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps the suffix (writers choose the format from it). Refuses to
    replace an existing file unless ``overwrite``. Translates permission and disk-full errors
    into :class:`OutputError` naming the file.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError("exists already; refusing to overwrite it", path=path, hint="pass --overwrite to replace it")
    suffix = image_suffix(path) or path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(handle)
    except OSError as exc:
        raise OutputError(f"cannot write here: {exc.strerror or exc}", path=path) from None
    temp = Path(temp_name)
    try:
        yield temp
        os.replace(temp, path)
    except OSError as exc:
        raise OutputError(f"cannot be written: {exc.strerror or exc}", path=path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes, *, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite=overwrite) as temp, open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: str | Path, data: Any, *, overwrite: bool = True) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), overwrite=overwrite)


def write_image(volume: Volume, path: str | Path, *, array: np.ndarray | None = None, overwrite: bool = False,
                compress: bool = True) -> None:
    """Write ``array`` (default: the volume's) with the volume's geometry, atomically."""
    image = volume.to_sitk(array)
    with atomic_path(path, overwrite=overwrite) as temp:
        try:
            sitk.WriteImage(image, str(temp), compress)
        except RuntimeError as exc:
            raise OutputError(f"cannot be written: {str(exc).strip().splitlines()[-1][:200]}", path=path) from None


def write_segmentation(
    labels: np.ndarray,
    reference: Volume,
    classes: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    overwrite: bool = False,
) -> None:
    """Write a Slicer ``.seg.nrrd`` of a label map on ``reference``'s grid.

    ``classes`` lists the foreground classes: dicts with ``index`` (value in ``labels``),
    ``name`` and ``color`` (0..1 RGB). Every class becomes a named, colored segment (also an
    empty one, so Slicer shows the full class list).
    """
    import slicerio

    if labels.shape != reference.array.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the reference {reference.array.shape}")
    labels_ijk = np.ascontiguousarray(np.asarray(labels).transpose(2, 1, 0))
    segmentation = slicerio.create_segmentation(labels_ijk.shape, reference.ijk_to_lps())
    segmentation["voxels"] = np.zeros(labels_ijk.shape, dtype=np.uint8 if len(classes) < 255 else np.uint16)
    segmentation["segments"] = []
    for position, cls in enumerate(classes):
        mask = labels_ijk == int(cls["index"])
        segmentation["voxels"][mask] = position + 1
        extent = [0, -1, 0, -1, 0, -1]
        if mask.any():
            # Projections per axis, not np.nonzero: its int64 coordinates took 1.8 GB for a class
            # filling a 512x512x300 volume.
            extent = []
            for axis in range(3):
                present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
                extent += [int(present[0]), int(present[-1])]
        segmentation["segments"].append({
            "id": f"Segment_{position + 1}",
            "name": str(cls["name"]),
            "color": [float(c) for c in cls.get("color", DEFAULT_COLORS[position % len(DEFAULT_COLORS)])],
            "labelValue": position + 1,
            "layer": 0,
            "extent": extent,
        })
    segmentation["containedRepresentationNames"] = ["Binary labelmap"]
    segmentation["masterRepresentation"] = "Binary labelmap"
    segmentation["referenceImageExtentOffset"] = [0, 0, 0]
    with atomic_path(path, overwrite=overwrite) as temp:
        slicerio.write_segmentation(str(temp), segmentation)
