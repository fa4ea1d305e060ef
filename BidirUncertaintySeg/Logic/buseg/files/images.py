"""Medical image input/output with geometry: reading, checking and writing the image formats.

Images are read and written with SimpleITK (NIfTI, NRRD, MetaImage) and Slicer
segmentations (``.seg.nrrd``) with slicerio, so that spacing, origin and direction travel
with every array. Arrays are numpy order ``(z, y, x)`` (SimpleITK's); geometry is ITK's:
``spacing_mm`` and ``origin`` in (x, y, z) order, physical coordinates in LPS.

Everything written goes through :func:`buseg.files.safe_files.atomic_path` (a temporary file renamed
into place), so a crash or a kill never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import SimpleITK as sitk

from buseg.errors import BusegError, InputError, OutputError, ResourceError
from buseg.files import image_checks
from buseg.files.image_checks import is_orthogonal
from buseg.files.safe_files import atomic_path, check_utf8_output, is_utf8

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
    names (or a scene's node names): characters other than letters and digits of any script
    (Unicode, NFC), ``.``, ``_`` and ``-`` become ``_``, leading dots go (no hidden files, no
    ``..``), device names of Windows (``con``, ``nul``, ``com1`` ...) and the names of buseg's
    own files in an output folder (``summary.json``, ``buseg.lock`` ...) get a ``_`` appended, and
    the length is capped. Already safe names are unchanged, so the names of ordinary files stay
    as they are. A name that loses characters gets a short hash of the original appended, so two
    different names never become the same case name (no transliteration: '肝臓' stays '肝臓').
    """
    import re

    original = unicodedata.normalize("NFC", str(name or ""))
    # \w of a str pattern: letters, digits and '_' of every script (not marks, symbols or controls).
    text = re.sub(r"[^\w.-]+", "_", original).lstrip(".").rstrip(". ")[:_CASE_NAME_CHARACTERS]
    if text == original or not original:
        return _windows_safe(text) if text.strip("_") else fallback
    digest = hashlib.blake2b(original.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
    stem = text[: _CASE_NAME_CHARACTERS - len(digest) - 1]
    return _windows_safe(f"{stem}_{digest}" if stem.strip("_") else f"{fallback}_{digest}")


_CASE_NAME_CHARACTERS = 128


# Files buseg itself writes beside the case folders of an output folder (predict, rank,
# evaluate): a case of that name would make its folder collide with the file ("File exists").
TOOL_FILE_NAMES = {
    "buseg.lock",
    "train.lock",
    "summary.json",
    "ranking.csv",
    "ranking.json",
    "metrics.csv",
    "metrics.json",
}


def _windows_safe(text: str) -> str:
    """``text`` with a ``_`` appended where it is a Windows device name or the name of one of
    buseg's own files in an output folder (a case 'summary.json' gets the folder 'summary.json_')."""
    reserved = text.split(".")[0].lower() in WINDOWS_RESERVED or text.lower() in TOOL_FILE_NAMES
    return f"{text}_" if reserved else text


def is_image_file(path: str | Path) -> bool:
    """Whether a folder entry is named like an image (not hidden, not a folder).

    Entries that cannot be read - broken or looping links, FIFOs, devices - count too: they
    are then refused by name when read (:func:`regular_file_problem`), never skipped silently.
    """
    path = Path(path)
    if image_suffix(path) == "" or path.name.startswith("."):
        return False
    try:
        return os.path.lexists(path) and not path.is_dir()
    except OSError:
        return True  # a name the system cannot even look up: reported when it is read


def regular_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file (missing, a folder, a FIFO, a device, a broken or
    looping link, a name too long ...), or None for a regular file.

    Opening a FIFO would block until another program writes to it, and a device would be
    read without end: only regular files (or links to them) are read.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except ValueError:  # from a manifest or summary: no system accepts such a name
        return "the path contains a NUL character"
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.lexists(path):
            return "is a broken symbolic link (its target does not exist)"
        if exc.errno == errno.ELOOP:
            return "is a symbolic link that points to itself (a loop)"
        if exc.errno == errno.ENOENT:
            return "file not found"
        if exc.errno == errno.ENAMETOOLONG:
            return "the path or a name in it is longer than the system allows"
        return f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, expected a file"
    kind = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a device", stat.S_ISBLK: "a device"}
    what = next((name for test, name in kind.items() if test(mode)), "not a regular file")
    return f"is {what}, not a regular file"


def check_regular_file(path: str | Path, error: type[BusegError] = InputError) -> Path:
    """``path`` if it is a regular file, else ``error`` naming it and saying what it is."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise error(problem, path=path)
    return Path(path)


def resolved_path(path: str | Path) -> Path:
    """``path`` made absolute with its links resolved; a link loop (which ``Path.resolve`` raises
    RuntimeError for) or an unreadable link stays as it is named, to be refused when read."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


JSON_MAX_BYTES = 64 * 2**20


def read_json(path: str | Path, *, what: str = "JSON file", error: type[BusegError] = InputError) -> Any:
    """The content of a JSON file, or ``error`` naming the file: unreadable, not UTF-8, not JSON,
    larger than 64 MiB or nested too deeply (Python's parser recurses: a deep file would crash it)."""
    path = check_regular_file(path, error)
    try:
        if path.stat().st_size > JSON_MAX_BYTES:
            raise error(f"is larger than {JSON_MAX_BYTES // 2**20} MiB; not a {what}", path=path)
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise error(f"cannot be read: {exc.strerror or exc}", path=path) from None
    except UnicodeDecodeError:
        raise error(f"is not a {what}: not UTF-8 text", path=path) from None
    except json.JSONDecodeError as exc:
        raise error(
            f"is not a valid {what}: {exc.msg} (line {exc.lineno}, column {exc.colno})", path=path
        ) from None
    except RecursionError:
        raise error(f"is not a {what}: nested too deeply", path=path) from None


def error_from_os_error(exc: OSError) -> BusegError | None:
    """The one-line error for an OS-level error on a file (name too long, no space, a FIFO ...):
    ``PATH: what the system says``; None when the error names no file."""
    path = exc.filename if exc.filename is not None else exc.filename2
    if path is None:
        return None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return OutputError(f"cannot be written: {reason}", path=path)
    if exc.errno == errno.ENAMETOOLONG:
        return InputError(f"the path or a name in it is longer than the system allows ({reason})", path=path)
    return InputError(reason, path=path)


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
            return f"size {format_numbers(other.size_xyz)} differs from {format_numbers(self.size_xyz)}"
        for name in ("spacing_mm", "origin", "direction"):
            a = np.asarray(getattr(self, name), dtype=float)
            b = np.asarray(getattr(other, name), dtype=float)
            scale = max(1.0, float(np.abs(a).max(initial=0.0)))
            if a.shape != b.shape or not np.allclose(a, b, atol=tolerance * scale, rtol=0):
                label = name.replace("_mm", "")
                return f"{label} {format_numbers(b)} differs from {format_numbers(a)}"
        return None


def format_numbers(values: Sequence[Any]) -> str:
    """Numbers as people read them, '(-40, 0.5, 1)': no numpy reprs, at most 5 decimals."""
    return "(" + ", ".join(_number(round(float(v), 5)) for v in np.asarray(values).ravel()) + ")"


# Formats whose header stores only an orthogonal orientation (NIfTI's qform/sform as ITK writes them).
ORTHOGONAL_ONLY_SUFFIXES = (".nii", ".nii.gz")


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
    if len(head) >= 8 and head[4:7] in (b"n+2", b"ni2"):
        return "a NIfTI-2 file"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


# The content each suffix announces (as _content_kind names it); gzip: a compressed NIfTI.
_EXPECTED_KIND = {
    ".nii": ("a NIfTI file", "a NIfTI-2 file"),
    ".nii.gz": ("gzip-compressed data", "a NIfTI file", "a NIfTI-2 file"),
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


# ITK's refusals of an impossible geometry, said in words (its own text ends in matrix rows).
_GEOMETRY_ERRORS = (
    (
        r"Bad direction, determinant is 0",
        "its direction matrix is singular (an axis direction is zero, or two axes point the same way): "
        "the voxels have no position in space",
    ),
    (
        r"Zero-valued spacing",
        "its voxel spacing is zero, infinite or not a number along an axis: the voxels have no size",
    ),
)


def _read_error(exc: RuntimeError, readable: Path | None = None, path: Path | None = None) -> str:
    """The informative line of a SimpleITK read error (without source file names and object addresses);
    ``readable``, the name ITK was given for the user's ``path`` (a link in a temporary folder), is
    said as ``path``."""
    import re

    text = str(exc)
    if readable is not None and path is not None and readable != path:
        text = text.replace(str(readable), str(path))
    for pattern, meaning in _GEOMETRY_ERRORS:
        if re.search(pattern, text):
            return meaning
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
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
    And SimpleITK aborts the whole process (a C++ exception, no Python error) on a path that is
    not valid UTF-8 (a file name in another encoding). Such a file is read through a link of its
    own, with a plain name, in a temporary folder.
    """
    name = path.name
    ambiguous = name.lower().endswith(".nii.gz") and path.with_name(name[:-3]).exists()
    if is_utf8(path) and not ambiguous:
        yield path
        return
    if image_suffix(path) in (".mhd", ".nhdr"):  # the header names a data file beside it: no link
        raise InputError(
            "its path is not valid UTF-8 text, which the image library cannot open",
            path=path,
            hint="rename the file (and its data file) or its folder",
        )
    with tempfile.TemporaryDirectory(prefix="buseg-read-") as folder:
        link = Path(folder) / f"image{image_suffix(path)}"
        try:
            os.symlink(path.resolve(), link)
        except OSError:  # no symbolic links (Windows without the privilege): a copy
            import shutil

            shutil.copyfile(path, link)
        yield link


# Beyond these a header is corrupt, not a medical image: a 100 m voxel, a position a km away.
MAX_SPACING_MM = 1e5
MAX_ORIGIN_MM = 1e6
# Geometry keys of the text headers (NRRD, MetaImage) whose values must be finite numbers.
_GEOMETRY_KEYS = (
    "space origin",
    "space directions",
    "spacings",
    "offset",
    "origin",
    "position",
    "elementspacing",
    "transformmatrix",
    "rotation",
    "orientation",
    "centerofrotation",
)


def _check_text_header_geometry(path: Path) -> None:
    """Refuse a NRRD/MetaImage header whose geometry holds 'nan' or 'inf': ITK's MetaImage reader
    reads such an origin as 0 without a word (voxels elsewhere)."""
    import re

    try:
        with open(path, "rb") as handle:
            head = handle.read(65536)
    except OSError:
        return
    for raw in head.split(b"\n"):
        line = raw.decode("latin-1").strip()
        if not line or line.lower().startswith(("elementdatafile", "data file")):
            break
        key, sep, value = line.partition("=") if "=" in line.split(":")[0] else line.partition(":")
        if sep and key.strip().lower() in _GEOMETRY_KEYS and re.search(r"(?i)\b(nan|inf|infinity)\b", value):
            raise InputError(
                f"its header's {key.strip()!r} is not a finite number: {value.strip()[:80]}",
                path=path,
            )


def _check_geometry(volume: Volume, path: Path) -> None:
    """Spacing, origin and direction that are finite and plausible (a corrupt header is refused, not used)."""
    spacing = np.asarray(volume.spacing_mm, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0) or np.any(spacing > MAX_SPACING_MM):
        raise InputError(
            f"has the voxel spacing {format_numbers(spacing)} mm: not a positive size up to {MAX_SPACING_MM:g} mm "
            "(a corrupt header?)",
            path=path,
        )
    origin = np.asarray(volume.origin, dtype=float)
    if not np.all(np.isfinite(origin)) or np.any(np.abs(origin) > MAX_ORIGIN_MM):
        raise InputError(
            f"has the origin {format_numbers(origin)} mm, not a plausible position (a corrupt header?)",
            path=path,
        )
    if not np.all(np.isfinite(volume.direction)):
        raise InputError("has a direction matrix that is not finite (a corrupt header?)", path=path)


def _read_sitk(path: Path) -> sitk.Image:
    problem = regular_file_problem(path)
    if problem is not None:
        raise InputError(problem.replace("a file", "an image file"), path=path)
    if not image_suffix(path):
        raise InputError(
            "unrecognised image format",
            path=path,
            hint=f"supported: {', '.join((SEGMENTATION_SUFFIX, *IMAGE_SUFFIXES))}",
        )
    if image_suffix(path) in (".nrrd", ".nhdr", ".mha", ".mhd"):
        _check_text_header_geometry(path)
    header = read_image_header(path)
    _check_fits_in_memory(header)  # a corrupt or absurd header is refused before allocating
    if header.complex:
        # One rule for every format: NIfTI and NRRD would be read with the imaginary part dropped.
        raise InputError(
            "has complex voxel values (real and imaginary parts); a real-valued image is needed "
            "(save the magnitude or the real part)",
            path=path,
        )
    with _checked_copy(path, header.data_bytes) as copy:
        if copy is not None:
            return _itk_read(copy, path)
    image_checks.check_data_stream(path, header.data_bytes)
    with _unambiguous(path) as readable:
        image = _itk_read(readable, path)
    if image_suffix(path) in (".nii", ".nii.gz"):
        image_checks.check_nifti_complete(path)
    return image


def _itk_read(readable: Path, path: Path) -> sitk.Image:
    """ITK's reading of ``readable``, the user's ``path`` or a file standing for it (named in errors as ``path``)."""
    try:
        return sitk.ReadImage(str(readable))
    except RuntimeError as exc:
        raise InputError(
            f"cannot be read as an image (corrupt, truncated or not a {image_suffix(path)} file): "
            f"{_read_error(exc, readable, path)}",
            path=path,
            hint=format_hint(path),
        ) from None


# The compressed encodings each reader decodes itself (ITK's NrrdIO has no bzip2): only those are copied
# decompressed, so that a file is read, or refused, alike whether a copy can be written or not.
ITK_ENCODINGS = ("gzip", "zlib")
SLICERIO_ENCODINGS = ("gzip", "bzip2")


@contextlib.contextmanager
def _checked_copy(path: Path, expected_bytes: int | None) -> Iterator[Path | None]:
    """A compressed image file's checked, decompressed copy, for its reader; None where ``path`` is not
    compressed or no copy can be written, and is read as it is.

    The checks ITK's readers need (NIfTI data cut short, NaN voxels it reads as 0; NRRD and MetaImage
    streams that decode to garbage, :mod:`buseg.files.image_checks`) decompress the whole file: its bytes
    are written, as they are checked, to a file in a temporary folder that the reader reads without
    decompressing the file again (as a copy, it also stands for a file whose name ITK cannot take).
    """
    try:
        plan = _copy_plan(path, expected_bytes)
    except OSError:  # the file's first bytes unreadable now: its reader says why
        plan = None
    if plan is None:
        yield None
        return
    name, write_checked = plan
    with contextlib.ExitStack() as stack:
        copy = None
        try:
            folder = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="buseg-read-", ignore_cleanup_errors=True)
            )
            target = Path(folder) / name
            with open(target, "wb") as handle:
                write_checked(handle)
            copy = target
        except (OSError, image_checks.CopyFailed):
            pass  # no room for a copy (a full or read-only temporary folder): the reader decompresses the file
        yield copy


def _copy_plan(path: Path, expected_bytes: int | None) -> tuple[str, Callable[[BinaryIO], None]] | None:
    """The copy's name and what writes it, checked, for a compressed ``path``; None for any other file."""
    suffix = image_suffix(path)
    if suffix == ".nii.gz":
        if not image_checks.is_gzip(path):
            return None
        return "image.nii", lambda handle: image_checks.check_nifti_complete(path, copy_to=handle)
    encodings = SLICERIO_ENCODINGS if suffix == SEGMENTATION_SUFFIX else ITK_ENCODINGS
    header = image_checks.uncompressed_header(path, encodings)
    if header is None:
        return None

    def write_checked(handle: BinaryIO) -> None:
        handle.write(header)
        image_checks.check_data_stream(path, expected_bytes, copy_to=handle)

    return f"image{suffix}", write_checked


@dataclass
class ImageHeader:
    """What an image file's header says, read without its voxels."""

    size_xyz: tuple[int, ...]
    components: int
    bytes_per_component: int
    path: str
    complex: bool = False

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size_xyz, dtype=np.int64))

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data the file must hold (uncompressed)."""
        return self.voxels * self.components * self.bytes_per_component


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
    """Size and pixel type of an image from its header alone (to estimate memory before reading).

    Header faults ITK would read with defaults (NIfTI), and a missing data file (NRRD, MetaImage,
    which ITK does not name), are refused here, before ITK sees the file.
    """
    path = check_regular_file(path)
    if image_suffix(path) in (".nii", ".nii.gz"):
        image_checks.check_nifti_header(path)
    elif image_suffix(path) in (".nrrd", ".nhdr", ".mha", ".mhd"):
        image_checks.check_data_file_found(path)
    reader = sitk.ImageFileReader()
    with _unambiguous(path) as readable:
        try:
            reader.SetFileName(str(readable))
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(
                f"cannot be read as an image (corrupt, truncated or unsupported): {_read_error(exc, readable, path)}",
                path=path,
                hint=format_hint(path),
            ) from None
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    sizes = {"8-bit": 1, "16-bit": 2, "32-bit": 4, "64-bit": 8}
    width = next((b for key, b in sizes.items() if key in pixel), 4)
    complex_pixels = reader.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)
    return ImageHeader(
        tuple(int(s) for s in reader.GetSize()),
        max(1, reader.GetNumberOfComponents()),
        width,
        str(path),
        complex=complex_pixels,
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
    _check_geometry(volume, path)
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
    _check_geometry(volume, path)
    array = volume.array
    array = label_values_array(volume.array, path)
    return LabelVolume(array, volume.spacing_mm, volume.origin, volume.direction, str(path))


# The largest label value a class can have (model files store it as a 32-bit signed integer).
MAX_LABEL_VALUE = 2**31 - 1


def label_values_array(array: np.ndarray, path: str | Path | None) -> np.ndarray:
    """A label map's values, checked in the type they were stored in, as uint8 (values up to 255)
    or int32.

    Every reader of label maps (training, evaluation, the benchmark loaders) goes through here:
    values are compared before any conversion, so a value that does not fit 32 bits (an int64
    4294967299, a uint32 2147483651) is refused instead of wrapping around into another class.
    Non-integer, NaN, infinite, negative and complex values are refused too.
    """
    array = np.asarray(array)
    if np.iscomplexobj(array):
        raise InputError("label map has complex values; a label map holds integers", path=path)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"label map has {array.dtype} values, not integers", path=path)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("label map contains NaN or infinite values", path=path)
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise InputError(
                "label map has non-integer values (is this an image rather than a label map?)", path=path
            )
    if not array.size:
        return array.astype(np.uint8)
    lowest, highest = array.min(), array.max()  # in the stored type: no wrap-around
    if lowest < 0:
        raise InputError(f"label map has negative values (min {_number(lowest)})", path=path)
    if highest > MAX_LABEL_VALUE:
        raise InputError(
            f"label map has the value {_number(highest)}, larger than the largest label value a class can "
            f"have ({MAX_LABEL_VALUE}); is this a label map?",
            path=path,
        )
    return array.astype(np.uint8 if highest <= 255 else np.int32)


def _number(value: Any) -> str:
    """A number as people write it (no numpy repr, integers without '.0')."""
    value = float(value) if not isinstance(value, (int, np.integer)) else int(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _read_seg_nrrd(path: Path) -> LabelVolume:
    import slicerio

    check_regular_file(path)
    with _checked_copy(path, None) as copy:
        if copy is None:  # slicerio's reader is given only whole gzip streams
            image_checks.check_data_stream(path, None)
        readable = copy or path
        try:
            segmentation = slicerio.read_segmentation(str(readable))
        except Exception as exc:  # slicerio raises plain exceptions of many kinds for bad files
            said = str(exc).replace(str(readable), str(path))
            raise InputError(
                f"cannot be read as a Slicer segmentation (corrupt or truncated?): {said[:200]}",
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
# Writing images and segmentations


def write_image(
    volume: Volume,
    path: str | Path,
    *,
    array: np.ndarray | None = None,
    overwrite: bool = False,
    compress: bool = True,
) -> None:
    """Write ``array`` (default: the volume's) with the volume's geometry, atomically.

    A sheared (non-orthogonal) direction is refused for NIfTI: ITK would write another
    orientation with a warning only, and voxels would land millimetres away from where they
    belong. NRRD and MetaImage hold such a direction as it is.
    """
    if image_suffix(path) in ORTHOGONAL_ONLY_SUFFIXES and not is_orthogonal(volume.direction):
        raise OutputError(
            f"NIfTI cannot hold the input's non-orthogonal (sheared) direction {format_numbers(volume.direction)}; "
            "written as NIfTI, its voxels would lie elsewhere in space",
            path=path,
            hint="write NRRD or MetaImage, which hold this geometry (--output-format nrrd or mha)",
        )
    check_utf8_output(path)
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
