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

from .errors import InputError, OutputError, ResourceError

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


# Names Windows reserves for devices, in any case and with any extension ("con.nii.gz" opens the console).
WINDOWS_RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}


def safe_case_name(name: str, fallback: str = "case") -> str:
    """A case name that is safe as one file or folder name on every system.

    Output folders and files are named after cases, and case names come from input file
    names (or a scene's node names): characters other than letters, digits, ``.``, ``_`` and
    ``-`` become ``_``, leading dots go (no hidden files, no ``..``), device names of Windows
    (``con``, ``nul``, ``com1`` ...) get a ``_`` appended, and the length is capped. Already
    safe names are unchanged, so the names of ordinary files stay as they are.
    """
    import re

    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name or "")).lstrip(".").rstrip(". ")[:128]
    if not text.strip("_"):
        return fallback
    if text.split(".")[0].lower() in WINDOWS_RESERVED:
        text = f"{text}_"
    return text


def ensure_output_folder(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check that files can be created in it, before any work is done."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".buseg-write-test.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to the output folder: {exc.strerror or exc}", path=folder) from None
    return folder


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


# What a file's first bytes say it is (to tell a user whose file is named for another format).
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"NRRD", "a NRRD file"),
    (b"ObjectType", "a MetaImage file"),
    (b"\x89PNG", "a PNG picture"),
    (b"\xff\xd8\xff", "a JPEG picture"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x89HDF", "an HDF5 file"),
    (b"II*\x00", "a TIFF picture"),
    (b"MM\x00*", "a TIFF picture"),
)


def _content_kind(path: Path) -> str | None:
    """What the file's content looks like, from its first bytes (None if unknown or unreadable)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(352)
    except OSError:
        return None
    if not head:
        return "empty (0 bytes)"
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1"):
        return "a NIfTI file"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


# The content each suffix announces (as _content_kind names it); gzip: a compressed NIfTI.
_EXPECTED_KIND = {
    ".nii": ("a NIfTI file",),
    ".nii.gz": ("gzip-compressed data", "a NIfTI file"),
    ".nrrd": ("a NRRD file",),
    ".nhdr": ("a NRRD file",),
    SEGMENTATION_SUFFIX: ("a NRRD file",),
    ".mha": ("a MetaImage file",),
    ".mhd": ("a MetaImage file",),
}


def format_hint(path: str | Path) -> str | None:
    """A hint when a file's content is not what its name announces ('its content is a NRRD file ...')."""
    kind = _content_kind(Path(path))
    if kind is None or kind in _EXPECTED_KIND.get(image_suffix(path), ()):
        return None
    return f"its content is {kind}, not what the name {Path(path).name!r} announces"


def _read_error(exc: RuntimeError) -> str:
    """The informative line of a SimpleITK read error (without source file names and object addresses)."""
    import re

    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    lines = [
        re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\):|sitk::ERROR:|\[nrrd\] \w+:)\s*", "", line)
        for line in lines
        if not line.startswith(("Exception thrown in SimpleITK", "Reason:"))
    ]
    return (lines[-1] if lines else "")[:200]


@contextlib.contextmanager
def _unambiguous(path: Path) -> Iterator[Path]:
    """A name under which ITK reads exactly ``path``.

    ITK's NIfTI library, asked for ``case.nii.gz``, reads ``case.nii`` instead when both lie in
    the same folder (it tries the uncompressed name first): another file's voxels, silently.
    Such a file is read through a link of its own in a temporary folder.
    """
    name = path.name
    if not (name.lower().endswith(".nii.gz") and path.with_name(name[:-3]).exists()):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="buseg-read-") as folder:
        link = Path(folder) / "image.nii.gz"
        try:
            os.symlink(path.resolve(), link)
        except OSError:  # no symbolic links (Windows without the privilege): a copy
            import shutil

            shutil.copyfile(path, link)
        yield link


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise InputError("file not found", path=path)
    if path.is_dir():
        raise InputError("is a folder, expected an image file", path=path)
    if not image_suffix(path):
        raise InputError(
            "unrecognised image format",
            path=path,
            hint=f"supported: {', '.join((SEGMENTATION_SUFFIX, *IMAGE_SUFFIXES))}",
        )
    _check_fits_in_memory(read_image_header(path))  # a corrupt or absurd header is refused before allocating
    try:
        with _unambiguous(path) as readable:
            image = sitk.ReadImage(str(readable))
    except RuntimeError as exc:
        raise InputError(
            f"cannot be read as an image (corrupt, truncated or not a {image_suffix(path)} file): {_read_error(exc)}",
            path=path,
            hint=format_hint(path),
        ) from None
    if image_suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    return image


def _nifti_header(header: bytes) -> tuple[str, int, int, int, int] | None:
    """(byte order, voxel count, bits per voxel, NIfTI datatype code, data offset) of a NIfTI-1/2 header."""
    import struct

    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:  # NIfTI-2
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    voxels = int(np.prod([max(1, int(d)) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]]))
    return order, voxels, max(1, int(bitpix)), int(datatype), max(int(offset), 348)


NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64


def _check_nifti_complete(path: Path) -> None:
    """Refuse what ITK's NIfTI reader accepts without a word: a truncated file (the missing voxels
    become zeros) and NaN or infinite voxel values (they become zeros too).

    The voxel data must reach ``vox_offset + voxels x bitpix / 8`` bytes; a ``.nii.gz`` is
    decompressed to the end (a cut gzip stream has no end marker); float data are scanned for
    NaN and infinity chunk by chunk.
    """
    import gzip
    import zlib

    try:
        with open(path, "rb") as handle:
            compressed = handle.read(2) == b"\x1f\x8b"  # ITK reads a plain NIfTI named .nii.gz too
        with gzip.open(path, "rb") if compressed else open(path, "rb") as handle:
            header = handle.read(540)
            info = _nifti_header(header)
            if info is None:
                return  # not a header this check knows (ITK read it): nothing to compare with
            order, voxels, bitpix, datatype, offset = info
            expected = offset + voxels * bitpix // 8
            float_type = NIFTI_FLOAT_TYPES.get(datatype)
            if float_type is None and not compressed:
                size = path.stat().st_size
            else:
                size, pending, bad = len(header), header[offset:expected], 0
                while True:
                    chunk = handle.read(1 << 22)
                    if float_type is not None:
                        data = pending + chunk[: max(0, expected - size)]
                        usable = len(data) - len(data) % int(float_type[1])
                        values = np.frombuffer(data[:usable], dtype=order + float_type)
                        bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                        pending = data[usable:]
                    if not chunk:
                        break
                    size += len(chunk)
                if bad:
                    raise InputError(
                        f"contains {bad} NaN or infinite voxel values (ITK would silently read them as 0)",
                        path=path,
                    )
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(
            f"cannot be read: the compressed data are cut short or corrupt ({exc})", path=path
        ) from None
    if size < expected:
        raise InputError(
            f"is truncated: {size} bytes of voxel data and header where {expected} are needed",
            path=path,
            hint="the file was cut short (an interrupted copy or download?); copy it again",
        )


@dataclass
class ImageHeader:
    """What an image file's header says, read without its voxels."""

    size_xyz: tuple[int, ...]
    components: int
    bytes_per_component: int
    path: str

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size_xyz, dtype=np.int64))


def _check_fits_in_memory(header: ImageHeader, *, fraction: float = 0.7) -> None:
    """Refuse, before reading, an image whose decoded voxels (as read, and as float32) would not fit in memory."""
    import psutil

    needed = header.voxels * header.components * (header.bytes_per_component + 4)
    available = psutil.virtual_memory().available
    if needed > fraction * available:
        size = "x".join(str(s) for s in header.size_xyz)
        raise ResourceError(
            f"its header says {size} voxels ({needed / 2**30:.1f} GiB to read), more than {fraction:.0%} of the "
            f"{available / 2**30:.1f} GiB of memory available",
            path=header.path,
            hint="crop or downsample the image, or use a machine with more memory",
        )


def read_image_header(path: str | Path) -> ImageHeader:
    """Size and pixel type of an image from its header alone (to estimate memory before reading)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    reader = sitk.ImageFileReader()
    try:
        with _unambiguous(path) as readable:
            reader.SetFileName(str(readable))
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(
            f"cannot be read as an image (corrupt, truncated or unsupported): {_read_error(exc)}",
            path=path,
            hint=format_hint(path),
        ) from None
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    sizes = {"8-bit": 1, "16-bit": 2, "32-bit": 4, "64-bit": 8}
    width = next((b for key, b in sizes.items() if key in pixel), 4)
    return ImageHeader(
        tuple(int(s) for s in reader.GetSize()), max(1, reader.GetNumberOfComponents()), width, str(path)
    )


def _single_frame_as_3d(image: sitk.Image, path: Path) -> sitk.Image:
    """A 4D image of one frame (size 1 along the 4th axis) as the 3D volume it is.

    The NIfTI reader already drops such an axis, the NRRD and MetaImage readers keep it: the
    same volume is read alike from every format. The 4th axis must not mix with the spatial
    ones (a block-diagonal direction), else the image stays 4D and is refused as such.
    """
    if image.GetDimension() != 4 or image.GetSize()[3] != 1:
        return image
    direction = np.asarray(image.GetDirection()).reshape(4, 4)
    if not (np.allclose(direction[3, :3], 0) and np.allclose(direction[:3, 3], 0)):
        return image
    try:
        return sitk.Extract(image, [*image.GetSize()[:3], 0], [0, 0, 0, 0])
    except RuntimeError:
        return image


def read_image(path: str | Path, *, allow_2d: bool = False) -> Volume:
    """Read a scalar 3D image as float32 with its geometry.

    Refuses, with the file named: missing or unreadable files, vector/RGB pixels, 4D images
    of more than one frame, 2D images (unless ``allow_2d``), and images containing NaN or
    infinity.
    """
    path = Path(path)
    image = _single_frame_as_3d(_read_sitk(path), path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector image); "
            "a scalar (grey-value) image is needed",
            path=path,
        )
    dim = image.GetDimension()
    if dim == 4:
        raise InputError("is a 4D image (a time series?); extract one 3D frame first", path=path)
    if dim == 2 and not allow_2d:
        raise InputError(
            "is a 2D image; a 3D volume is needed (a single slice is a volume of depth 1)", path=path
        )
    if dim not in (2, 3):
        raise InputError(f"has {dim} dimensions; 3D volumes are supported", path=path)
    volume = volume_from_sitk(image, str(path))
    array = volume.array
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"contains {bad} NaN or infinite voxel values", path=path)
    if array.dtype != np.float32:
        largest = float(np.finfo(np.float32).max)
        if np.issubdtype(array.dtype, np.floating) and array.size and float(np.abs(array).max()) > largest:
            raise InputError(
                f"has voxel values beyond the float32 range (largest magnitude "
                f"{float(np.abs(array).max()):.3g}); is the file corrupt?",
                path=path,
            )
        array = array.astype(np.float32)
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
    image = _single_frame_as_3d(_read_sitk(path), path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            "is a vector/RGB image; a label map must have one integer value per voxel", path=path
        )
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
        raise InputError(
            f"cannot be read as a Slicer segmentation (corrupt or truncated?): {str(exc)[:200]}",
            path=path,
            hint=format_hint(path),
        ) from None
    voxels = np.asarray(segmentation["voxels"])
    segments = segmentation.get("segments", [])
    if not segments:
        raise InputError(
            "is not a Slicer segmentation: its header lists no segments (an image or a plain label map named "
            ".seg.nrrd?)",
            path=path,
            hint="a plain label map is read when the file is named .nrrd",
        )
    if not np.issubdtype(voxels.dtype, np.integer):
        raise InputError(f"segmentation voxels are {voxels.dtype}, not integer label values", path=path)
    if voxels.ndim == 3:
        layers = voxels[np.newaxis]
    elif voxels.ndim == 4:
        layers = voxels
    else:
        raise InputError(
            f"segmentation voxels have {voxels.ndim} dimensions; expected 3 (or 4 with layers)", path=path
        )
    labels_ijk = np.zeros(layers.shape[1:], dtype=np.uint8 if len(segments) < 255 else np.int32)
    info: dict[int, dict[str, Any]] = {}
    for index, segment in enumerate(segments, start=1):
        layer = int(segment.get("layer", 0))
        mask = layers[layer] == int(segment.get("labelValue", 1))
        overlap = bool((labels_ijk[mask] != 0).any())
        labels_ijk[mask] = index
        info[index] = {
            "name": segment.get("name") or segment.get("id") or f"Segment_{index}",
            "color": [
                float(c) for c in segment.get("color", DEFAULT_COLORS[(index - 1) % len(DEFAULT_COLORS)])
            ],
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
        array,
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in ijk_to_lps[:3, 3]),
        tuple(float(d) for d in direction.reshape(-1)),
        str(path),
        segments=info,
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
        raise OutputError(
            "exists already; refusing to overwrite it", path=path, hint="pass --overwrite to replace it"
        )
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


def write_image(
    volume: Volume,
    path: str | Path,
    *,
    array: np.ndarray | None = None,
    overwrite: bool = False,
    compress: bool = True,
) -> None:
    """Write ``array`` (default: the volume's) with the volume's geometry, atomically."""
    image = volume.to_sitk(array)
    with atomic_path(path, overwrite=overwrite) as temp:
        try:
            sitk.WriteImage(image, str(temp), compress)
        except RuntimeError as exc:
            raise OutputError(
                f"cannot be written: {str(exc).strip().splitlines()[-1][:200]}", path=path
            ) from None


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
        segmentation["segments"].append(
            {
                "id": f"Segment_{position + 1}",
                "name": str(cls["name"]),
                "color": [float(c) for c in cls.get("color", DEFAULT_COLORS[position % len(DEFAULT_COLORS)])],
                "labelValue": position + 1,
                "layer": 0,
                "extent": extent,
            }
        )
    segmentation["containedRepresentationNames"] = ["Binary labelmap"]
    segmentation["masterRepresentation"] = "Binary labelmap"
    segmentation["referenceImageExtentOffset"] = [0, 0, 0]
    with atomic_path(path, overwrite=overwrite) as temp:
        slicerio.write_segmentation(str(temp), segmentation)
