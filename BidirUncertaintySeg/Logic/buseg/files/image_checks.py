"""Checks of an image file's bytes where ITK's readers accept damage without a word.

ITK reads some damaged files as if they were whole, giving voxels that look fine and are wrong:

* **NIfTI headers** (:func:`check_nifti_header`, before ITK): a NaN or infinite qform field, a
  voxel spacing (``pixdim``) that is not a positive number, or an axis of size 0 or less are
  replaced by defaults (the identity direction, 1 mm, one slice); a sheared sform by the qform.
  NIfTI-2, which ITK cannot read, is named as such.
* **NIfTI data** (:func:`check_nifti_complete`): a truncated file is read with zeros for the
  missing voxels and NaN/infinite voxels as 0.
* **Compressed data** of NRRD (``encoding: gzip``/``bzip2``) and MetaImage (``CompressedData``),
  attached or in a detached data file (:func:`check_data_stream`, before ITK): a stream with a
  bad checksum or garbage after its header is decoded to garbage. Each stream is decompressed to
  its end here, in chunks (memory stays small whatever the image size), and must end cleanly
  and hold all the voxels; an uncompressed detached data file must hold all its bytes.

Both checks can write what they decompress to a copy (``copy_to``; for NRRD and MetaImage after
:func:`uncompressed_header`), which the reader then reads instead of decompressing the file a second
time (:func:`buseg.files.images.read_image`).

Each problem is an :class:`~buseg.errors.InputError` naming the file (and the header field or
data file). Headers this module does not understand are left to ITK.
"""

from __future__ import annotations

import bz2
import gzip
import math
import struct
import zlib
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from buseg.errors import InputError

# Compressed bytes read at a time, and the most decompressed bytes held at once.
_CHUNK_BYTES = 1 << 20
_OUTPUT_BYTES = 1 << 22
# The longest text header read (Slicer's .seg.nrrd headers list every segment: a few KiB each).
_MAX_HEADER_BYTES = 16 << 20

# --------------------------------------------------------------------------------------
# NIfTI


def _open_nifti(path: Path) -> BinaryIO:
    """The NIfTI file's uncompressed bytes (ITK reads a plain NIfTI named .nii.gz too)."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def nifti_header(header: bytes) -> tuple[str, int, int, int, int] | None:
    """(byte order, voxel count, bits per voxel, NIfTI datatype code, data offset) of a NIfTI-1/2 header."""
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(order + "8h", header[40:56])
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            offset = struct.unpack(order + "f", header[108:112])[0]
            offset = int(offset) if math.isfinite(offset) else 0
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:  # NIfTI-2
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    # math.prod: Python integers, where int64 would wrap for crafted dimensions and let a short file pass.
    voxels = math.prod(max(1, int(d)) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))])
    return order, voxels, max(1, int(bitpix)), int(datatype), max(int(offset), 348)


NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64
# Bits per voxel of each NIfTI datatype code (nifti1.h): a header whose bitpix disagrees is corrupt.
NIFTI_DATATYPE_BITS = {
    2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32,
    1024: 64, 1280: 64, 1536: 128, 1792: 128, 2048: 256, 2304: 32,
}  # fmt: skip
# The NIfTI-1 qform fields (name, byte offset, meaning): NaN or infinity there is replaced by ITK.
_QFORM_FIELDS = (
    ("quatern_b", 256, "orientation"),
    ("quatern_c", 260, "orientation"),
    ("quatern_d", 264, "orientation"),
    ("qoffset_x", 268, "origin x"),
    ("qoffset_y", 272, "origin y"),
    ("qoffset_z", 276, "origin z"),
)
NIFTI2_HINT = (
    "convert it to NIfTI-1 (e.g. nibabel: nib.Nifti1Image(img.dataobj, img.affine).to_filename('x.nii.gz')) "
    "or to NRRD (3D Slicer: load and save)"
)


def _nifti1_field_problem(head: bytes, order: str) -> str | None:
    """Why the fields of a NIfTI-1 header cannot be what the file means, naming the field; or None."""
    dims = struct.unpack(order + "8h", head[40:56])
    if not 1 <= dims[0] <= 7:
        return (
            f"its header field dim[0] (the number of dimensions) is {dims[0]}, not 1 to 7 (a corrupt header?)"
        )
    for axis in range(1, dims[0] + 1):
        if dims[axis] < 1:
            return (
                f"its header field dim[{axis}] (the size along axis {axis}) is {dims[axis]}: a size is at least 1 "
                "(a corrupt header? the image library would read fewer voxels than the file holds)"
            )
    pixdim = struct.unpack(order + "8f", head[76:108])
    for axis in range(1, min(dims[0], 3) + 1):
        if not (math.isfinite(pixdim[axis]) and pixdim[axis] > 0):
            return (
                f"its header field pixdim[{axis}] (the voxel spacing along axis {axis}) is {pixdim[axis]:g}: not a "
                "positive size (a corrupt header? the image library would use 1 mm)"
            )
    vox_offset = struct.unpack(order + "f", head[108:112])[0]
    single_file = head[344:347] == b"n+1"  # the voxels follow the header in the same file
    if single_file and not (math.isfinite(vox_offset) and vox_offset >= 352):
        return f"its header field vox_offset (where the voxels start) is {vox_offset:g}, not 352 or more"
    datatype, bitpix = struct.unpack(order + "2h", head[70:74])
    if NIFTI_DATATYPE_BITS.get(datatype, bitpix) != bitpix:
        return (
            f"its header field bitpix ({bitpix} bits per voxel) does not match its datatype {datatype} "
            f"({NIFTI_DATATYPE_BITS[datatype]} bits; a corrupt header?)"
        )
    if struct.unpack(order + "h", head[252:254])[0] > 0:  # qform_code: the qform is used
        for name, offset, meaning in _QFORM_FIELDS:
            value = struct.unpack(order + "f", head[offset : offset + 4])[0]
            if not math.isfinite(value):
                return (
                    f"its header field {name} ({meaning} of the qform) is {value:g}, not a finite number "
                    "(a corrupt header? the image library would replace it)"
                )
    return None


def is_orthogonal(direction: Sequence[float], *, tolerance: float = 1e-4) -> bool:
    """Whether a direction matrix (flat, row-major) is a rotation or reflection (no shear)."""
    d = round(len(direction) ** 0.5)
    matrix = np.asarray(direction, dtype=float).reshape(d, d)
    return bool(np.allclose(matrix.T @ matrix, np.eye(d), atol=tolerance, rtol=0))


def _sform_problem(rows: tuple[float, ...]) -> str | None:
    """Why an sform (3 rows of 4) cannot be read as it is (non-finite or sheared), or None.

    ITK holds only orthogonal directions: given a sheared sform it reads the qform instead with a
    warning only (another geometry than other tools show: voxels millimetres away), or fails
    with "no orthonormal definition".
    """
    matrix = np.asarray(rows, dtype=float).reshape(3, 4)[:, :3]
    lengths = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(rows)) or np.any(lengths == 0):
        return "its sform (orientation matrix) is not finite or has a zero column"
    if is_orthogonal(tuple((matrix / lengths).ravel())):
        return None
    return (
        "its sform (the orientation most tools use) is sheared (non-orthogonal), which the image library "
        "cannot hold: it would place the voxels elsewhere (reading the qform instead, with a warning only)"
    )


def check_nifti_header(path: Path) -> None:
    """Refuse a NIfTI header ITK would read with defaults in place of its fields (see the module
    docstring), a sheared sform, and NIfTI-2. Unparseable or damaged files are left to ITK and to
    :func:`check_nifti_complete`, which name the problem."""
    try:
        with _open_nifti(path) as handle:
            head = handle.read(540)
    except (OSError, EOFError, zlib.error):
        return
    for order in ("<", ">"):
        size = struct.unpack(order + "i", head[:4])[0] if len(head) >= 4 else 0
        if size == 540:
            raise InputError(
                "is a NIfTI-2 file, which the image library (ITK) cannot read; NIfTI-1 is supported",
                path=path,
                hint=NIFTI2_HINT,
            )
        if size == 348 and len(head) >= 348:
            break
    else:
        return
    problem = _nifti1_field_problem(head, order)
    if problem is None and struct.unpack(order + "h", head[254:256])[0] > 0:  # sform_code: the sform is used
        problem = _sform_problem(struct.unpack(order + "12f", head[280:328]))
        if problem is not None:
            raise InputError(problem, path=path, hint="convert it to NRRD, which holds a sheared direction")
    if problem is not None:
        raise InputError(problem, path=path)


class CopyFailed(Exception):  # noqa: N818 - a state: not an OSError, which says the file is damaged
    """The decompressed copy of a file could not be written (a full or read-only temporary folder)."""


Keep = Callable[[bytes], None]  # where decompressed bytes go as they are checked


def _keeper(copy: BinaryIO | None) -> Keep:
    """A function writing bytes to ``copy`` (a failed write raises CopyFailed), or ignoring them (None)."""
    if copy is None:
        return lambda data: None

    def keep(data: bytes) -> None:
        try:
            copy.write(data)
        except OSError as exc:
            raise CopyFailed(str(exc)) from exc

    return keep


class _Copying:
    """A binary stream whose bytes read are also written to ``copy``."""

    def __init__(self, source: BinaryIO, copy: BinaryIO) -> None:
        self.source, self.keep = source, _keeper(copy)

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.keep(data)
        return data


def is_gzip(path: Path) -> bool:
    """Whether the file's content is gzip-compressed (its first bytes), whatever its name."""
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def check_nifti_complete(path: Path, *, copy_to: BinaryIO | None = None) -> None:
    """Refuse what ITK's NIfTI reader accepts without a word: a truncated file (the missing voxels
    become zeros) and NaN or infinite voxel values (they become zeros too).

    The voxel data must reach ``vox_offset + voxels x bitpix / 8`` bytes; a ``.nii.gz`` is
    decompressed to the end (a cut gzip stream has no end marker); float data are scanned for
    NaN and infinity chunk by chunk. With ``copy_to``, every byte is also written there as it is
    read (the decompressed NIfTI of a ``.nii.gz``, which ITK can read without decompressing the file
    again); a write that fails raises :class:`CopyFailed`.
    """
    try:
        compressed = is_gzip(path)
        with _open_nifti(path) as opened:
            handle = opened if copy_to is None else _Copying(opened, copy_to)
            header = handle.read(540)
            info = nifti_header(header)
            if info is None:  # not a header this check knows (left to ITK): nothing to compare with
                while copy_to is not None and handle.read(_OUTPUT_BYTES):
                    pass  # the copy is the whole file all the same
                return
            order, voxels, bitpix, datatype, offset = info
            expected = offset + voxels * bitpix // 8
            float_type = NIFTI_FLOAT_TYPES.get(datatype)
            if float_type is None and not compressed and copy_to is None:
                size = path.stat().st_size
            else:
                size, bad = _scan_nifti_data(handle, header, order, offset, expected, float_type)
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


def _scan_nifti_data(
    handle: BinaryIO | _Copying, header: bytes, order: str, offset: int, expected: int, float_type: str | None
) -> tuple[int, int]:
    """(bytes in the file, NaN or infinite float voxels) read from ``handle`` to its end, chunk by chunk."""
    size, pending, bad = len(header), header[offset:expected], 0
    while True:
        chunk = handle.read(1 << 22)
        if float_type is not None:
            # Only the bytes from the data offset to the data end: a header with extensions puts the
            # voxels past the first chunk's start, and they end before any padding.
            data = pending + chunk[max(0, offset - size) : max(0, expected - size)]
            usable = len(data) - len(data) % int(float_type[1])
            values = np.frombuffer(data[:usable], dtype=order + float_type)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            pending = data[usable:]
        if not chunk:
            return size, bad
        size += len(chunk)


# --------------------------------------------------------------------------------------
# NRRD and MetaImage voxel data


class _DataBlock:
    """Where a NRRD or MetaImage file's voxel data lie and how they are stored."""

    def __init__(self, file: Path, offset: int, encoding: str, *, skip_lines: int = 0) -> None:
        self.file = file  # the header file itself (attached data) or the detached data file
        self.offset = offset  # bytes before the data in ``file`` (-1: the data end the file)
        self.encoding = encoding  # 'raw', 'gzip', 'bzip2', 'zlib' (MetaImage), or another (not checked)
        self.skip_lines = skip_lines  # NRRD 'line skip': lines before the data in a detached file
        self.skip_bytes = 0  # NRRD 'byte skip' of compressed data: bytes of the decompressed data skipped
        self.compressed_size: int | None = None  # MetaImage 'CompressedDataSize'


def _header_lines(handle: BinaryIO) -> tuple[list[str], int]:
    """The text lines of a NRRD header up to its blank line, and the offset after it (data start)."""
    lines: list[str] = []
    while handle.tell() < _MAX_HEADER_BYTES:
        raw = handle.readline()
        line = raw.decode("latin-1").rstrip("\r\n")
        if not raw or not line.strip():
            break
        lines.append(line)
    return lines, handle.tell()


def _nrrd_block(path: Path) -> _DataBlock | None:
    """The data block of a NRRD file (attached, or one detached data file), or None."""
    with open(path, "rb") as handle:
        lines, data_start = _header_lines(handle)
    if not lines or not lines[0].startswith("NRRD"):
        return None
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":=" in line:
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    encoding = {"gz": "gzip", "gzip": "gzip", "bz2": "bzip2", "bzip2": "bzip2", "raw": "raw"}.get(
        fields.get("encoding", "").lower(), "other"
    )
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file is None:
        block = _DataBlock(path, data_start, encoding)
    elif _several_files(data_file, path):
        return None  # several data files: each is read by ITK, not checked here
    else:
        skip_lines = int(fields.get("line skip", fields.get("lineskip", "0")) or 0)
        block = _DataBlock(path.parent / data_file, 0, encoding, skip_lines=skip_lines)
    byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")) or 0)
    if encoding == "raw" and byte_skip < 0:
        block.offset = -1
    elif encoding == "raw":
        block.offset += byte_skip
    else:
        block.skip_bytes = max(0, byte_skip)
    return block


def _metaimage_block(path: Path) -> _DataBlock | None:
    """The data block of a MetaImage file (attached, or one detached data file), or None."""
    fields = {}
    with open(path, "rb") as handle:
        while handle.tell() < _MAX_HEADER_BYTES:
            raw = handle.readline()
            if not raw:
                return None  # no ElementDataFile: not a header this check knows
            key, sep, value = raw.decode("latin-1").partition("=")
            if not sep:
                continue
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                data_start = handle.tell()
                break
        else:
            return None
    encoding = "zlib" if fields.get("compresseddata", "").lower() == "true" else "raw"
    data_file = fields["elementdatafile"]
    if data_file.upper() == "LOCAL":
        block = _DataBlock(path, data_start, encoding)
    elif _several_files(data_file, path):
        return None  # several data files: each is read by ITK, not checked here
    else:
        header_size = int(fields.get("headersize", "0") or 0)
        block = _DataBlock(path.parent / data_file, -1 if header_size < 0 else header_size, encoding)
    if "compresseddatasize" in fields:
        block.compressed_size = int(fields["compresseddatasize"])
    return block


def _several_files(data_file: str, path: Path) -> bool:
    """Whether a header's data file names several files: 'LIST', or a pattern with a numeric range
    ('slice%03d.raw 1 40 1'), as NRRD and MetaImage write them."""
    words = data_file.split()
    if not words:  # ITK would look for a data file named '' (a folder)
        raise InputError("its header names no data file (the data-file field is empty)", path=path)
    return data_file.upper().startswith("LIST") or ("%" in words[0] and len(words) >= 4)


def _data_block(path: Path) -> _DataBlock | None:
    suffix = path.name.lower()
    if suffix.endswith((".nrrd", ".nhdr")):
        return _nrrd_block(path)
    if suffix.endswith((".mha", ".mhd")):
        return _metaimage_block(path)
    return None


def check_data_file_found(path: Path) -> None:
    """Refuse a NRRD or MetaImage header whose detached data file is missing, naming that file (ITK's
    readers name the header only)."""
    try:
        block = _data_block(path)
    except (OSError, ValueError):
        return
    if block is not None and block.file != path and not block.file.is_file():
        raise InputError(f"its data file {block.file} was not found", path=path)


def uncompressed_header(path: Path, encodings: Collection[str]) -> bytes | None:
    """The header of a NRRD or MetaImage file whose voxel data are attached and compressed with one of
    ``encodings`` ('gzip', 'bzip2', 'zlib'), rewritten for the same voxels stored uncompressed after it
    (NRRD ``encoding: raw``, MetaImage ``CompressedData = False``); None for any other file (detached
    or uncompressed data, a header this module does not know), which is read as it is."""
    try:
        block = _data_block(path)
    except (OSError, ValueError, InputError):
        return None
    if block is None or block.file != path or block.encoding not in encodings:
        return None
    with open(path, "rb") as handle:
        lines = handle.read(block.offset).splitlines(keepends=True)
    if block.encoding == "zlib":
        return _metaimage_uncompressed(lines)
    return b"".join(
        b"encoding: raw" + line[len(line.rstrip(b"\r\n")) :] if _nrrd_key(line) == b"encoding" else line
        for line in lines
    )


def _nrrd_key(line: bytes) -> bytes | None:
    if line.startswith(b"#") or b":=" in line or b":" not in line:
        return None  # a comment, a key/value pair of the user (not a field), the magic or the blank line
    return line.split(b":", 1)[0].strip().lower()


def _metaimage_uncompressed(lines: list[bytes]) -> bytes | None:
    kept = []
    for line in lines:
        key = line.split(b"=", 1)[0].strip().lower()
        if key == b"headersize":
            return None  # bytes skipped before the data: left to ITK's reader of the file itself
        if key == b"compresseddata":
            line = b"CompressedData = False" + line[len(line.rstrip(b"\r\n")) :]
        if key != b"compresseddatasize":
            kept.append(line)
    return b"".join(kept)


def check_data_stream(path: Path, expected_bytes: int | None, *, copy_to: BinaryIO | None = None) -> None:
    """Refuse a NRRD or MetaImage file whose compressed voxel data do not decompress cleanly to their
    end, or whose data hold fewer than ``expected_bytes`` (None: not known, only the stream is checked);
    refuse a missing or short detached data file, naming it. See the module docstring.

    With ``copy_to``, compressed voxel data are also written there as they are decompressed (after
    :func:`uncompressed_header`: a file a reader reads without decompressing it again); a write that
    fails raises :class:`CopyFailed`.
    """
    try:
        block = _data_block(path)
    except (OSError, ValueError):
        return  # a header this check cannot parse: ITK's reader says what is wrong
    if block is None or block.encoding == "other" or (block.encoding == "raw" and block.file == path):
        return  # attached raw data cut short are refused by ITK's readers themselves
    attached = block.file == path
    data_name = "its voxel data" if attached else f"its data file {block.file}"
    are, do = ("are", "do") if attached else ("is", "does")
    try:
        with open(block.file, "rb") as handle:
            if block.encoding == "raw":
                size = _raw_size(handle, block)
            else:
                size = _decompressed_size(handle, block, _keeper(copy_to))
    except FileNotFoundError:
        raise InputError(f"its data file {block.file} was not found", path=path) from None
    except EOFError:
        raise InputError(
            f"{data_name} ({block.encoding}-compressed) {are} cut short: the compressed stream ends before its "
            "end marker",
            path=path,
            hint="the file was cut short (an interrupted copy or download?); copy it again",
        ) from None
    except (OSError, zlib.error) as exc:
        reason = str(exc) or type(exc).__name__
        raise InputError(
            f"{data_name} ({block.encoding}-compressed) {are} damaged and {do} not decompress cleanly: "
            f"{reason[:120]} (the image library would read garbage voxels without a word)",
            path=path,
            hint="copy the file again from its source",
        ) from None
    needed = None if expected_bytes is None else expected_bytes + block.skip_bytes
    if needed is not None and size < needed:
        stored = "" if block.encoding == "raw" else f" once decompressed ({block.encoding})"
        raise InputError(
            f"{data_name} {are} cut short: {size} bytes{stored} where the header needs {needed}",
            path=path,
            hint="the file was cut short (an interrupted copy or download?); copy it again",
        )


def _raw_size(handle: BinaryIO, block: _DataBlock) -> int:
    """Bytes of uncompressed voxel data after the skipped lines and bytes."""
    if block.offset < 0:
        return 1 << 62  # the data end the file (ITK reads the last bytes): any length fits
    _skip_lines(handle, block.skip_lines)
    start = handle.tell() + block.offset
    return handle.seek(0, 2) - start


def _decompressed_size(handle: BinaryIO, block: _DataBlock, keep: Keep) -> int:
    """Bytes of voxel data the compressed stream decompresses to, decompressed here to its end, a chunk
    at a time and each chunk given to ``keep``; a damaged or cut stream raises (OSError, EOFError or
    zlib.error)."""
    _skip_lines(handle, block.skip_lines)
    handle.seek(max(0, block.offset), 1)
    if block.encoding in ("gzip", "bzip2"):
        stream = gzip.GzipFile(fileobj=handle) if block.encoding == "gzip" else bz2.BZ2File(handle)
        size = 0
        with stream:
            while chunk := stream.read(_OUTPUT_BYTES):
                keep(chunk)
                size += len(chunk)
        return size
    return _zlib_size(handle, block.compressed_size, keep)


def _zlib_size(handle: BinaryIO, compressed_size: int | None, keep: Keep) -> int:
    """MetaImage's compressed data: one zlib (or gzip) stream, ``compressed_size`` bytes if given, which
    must reach its end marker."""
    decompressor = zlib.decompressobj(47)  # 32 + 15: a zlib or a gzip header, as MetaIO reads them
    remaining = compressed_size if compressed_size is not None and compressed_size >= 0 else 1 << 62
    size = 0
    while remaining > 0 and not decompressor.eof:
        data = handle.read(min(_CHUNK_BYTES, remaining))
        if not data:
            break
        remaining -= len(data)
        while data and not decompressor.eof:
            output = decompressor.decompress(data, _OUTPUT_BYTES)
            keep(output)
            size += len(output)
            data = decompressor.unconsumed_tail
    while not decompressor.eof:  # output held back by the limit above, or a stream without its end
        output = decompressor.decompress(b"", _OUTPUT_BYTES)
        if not output:
            raise EOFError("the compressed stream ends before its end marker")
        keep(output)
        size += len(output)
    return size


def _skip_lines(handle: BinaryIO, count: int) -> None:
    for _ in range(max(0, count)):
        handle.readline()
