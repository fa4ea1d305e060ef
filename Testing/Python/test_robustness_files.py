"""Image and model files that were read as if whole, or gave a traceback (issue 35).

One test per class of docs/robustness.md ("Damaged image and model files"): compressed voxel
data that do not decompress cleanly (MetaImage, NRRD gzip and bzip2, detached data files,
Slicer segmentations), NIfTI-1 header fields ITK replaces by defaults, NIfTI-2, detached data
files cut short, error messages that named a temporary link instead of the user's file, model
metadata no training writes, crafted working spacings, and a stale ONNX export beside a model.
The inputs are small volumes written with SimpleITK and then patched byte by byte.
"""

from __future__ import annotations

import bz2
import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from model_files import model_metadata
from test_robustness import _case, _config, _labeled_folder

from buseg.cli import main
from buseg.errors import InputError, ModelFileError, ResourceError
from buseg.evaluation.evaluate import evaluate_files
from buseg.files.images import read_image, read_label, write_segmentation
from buseg.model.checkpoint import FORMAT, load_model, network_from_metadata
from buseg.training.loop import train

VOXELS = np.arange(6 * 12 * 10, dtype=np.int16).reshape(6, 12, 10) % 97


def _write(path: Path, array: np.ndarray = VOXELS, *, compress: bool = True) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-10.0, 4.0, 7.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def _data_start(data: bytes) -> int:
    """Where the voxel data of a NRRD or MetaImage file with attached data begin."""
    if data.startswith(b"NRRD"):
        return data.index(b"\n\n") + 2
    marker = b"ElementDataFile = LOCAL\n"
    return data.index(marker) + len(marker)


def _damage(path: Path, how: str) -> Path:
    """Damage the compressed stream of ``path`` in place: 20 bytes flipped in its middle, or every
    byte after the stream's own header (2 bytes zlib, 10 gzip) replaced by random bytes."""
    data = bytearray(path.read_bytes())
    start = _data_start(bytes(data))
    if how == "flipped":
        middle = start + (len(data) - start) // 2
        data[middle : middle + 20] = bytes(b ^ 0xFF for b in data[middle : middle + 20])
    else:
        kept = start + (10 if data[start : start + 2] == b"\x1f\x8b" else 2)
        data[kept:] = np.random.default_rng(1).integers(0, 256, len(data) - kept, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def _as_bzip2(path: Path) -> Path:
    """The NRRD at ``path`` with its gzip data recompressed as bzip2 ('encoding: bzip2', which Slicer's
    segmentation reader takes and ITK's NRRD reader does not)."""
    data = path.read_bytes()
    start = _data_start(data)
    header = data[:start].replace(b"encoding: gzip", b"encoding: bzip2")
    path.write_bytes(header + bz2.compress(gzip.decompress(data[start:])))
    return path


DAMAGED = "are damaged and do not decompress cleanly"


@pytest.mark.parametrize("how", ["flipped", "random"])
@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_damaged_compressed_images_are_refused_not_decoded_to_garbage(tmp_path, suffix, how):
    path = _write(tmp_path / f"a{suffix}")
    assert np.array_equal(read_image(path).array, VOXELS)  # the undamaged file reads as written
    _damage(path, how)
    with pytest.raises(InputError, match=DAMAGED) as error:
        read_image(path)
    assert str(path) in str(error.value)


def test_damaged_compressed_label_files_are_refused_for_training_and_evaluation(tmp_path):
    """A gzip NRRD label, and Slicer .seg.nrrd files compressed with gzip (as Slicer writes them) and
    bzip2."""
    labels = (VOXELS % 3).astype(np.uint8)
    plain = _damage(_write(tmp_path / "truth" / "a.nrrd", labels), "flipped")
    reference = read_image(_write(tmp_path / "image.nrrd", labels))
    classes = [{"index": i, "name": f"c{i}", "color": [0.5, 0.5, 0.5]} for i in (1, 2)]
    segmentations = [tmp_path / "seg" / "gzip.seg.nrrd", tmp_path / "seg" / "bzip2.seg.nrrd"]
    for segmentation in segmentations:
        write_segmentation(labels, reference, classes, segmentation)
    _as_bzip2(segmentations[1])
    for segmentation, how in zip(segmentations, ("random", "flipped"), strict=True):
        assert np.array_equal(read_label(segmentation).array, labels)
        _damage(segmentation, how)
    for path in (plain, *segmentations):
        with pytest.raises(InputError, match=DAMAGED) as error:
            read_label(path)
        assert str(path) in str(error.value)
    _write(tmp_path / "predicted" / "a.nrrd", labels)
    with pytest.raises(InputError, match=DAMAGED):
        evaluate_files([tmp_path / "predicted" / "a.nrrd"], [plain], tmp_path / "scores")


def test_compressed_data_are_checked_to_their_end_in_small_pieces(tmp_path):
    """A long run of zeros (8 MiB decompressed from a few KiB) is read whole; cut a few bytes before
    its end, the stream has no end marker and is refused (gzip in NRRD, zlib in MetaImage)."""
    zeros = np.zeros((32, 256, 512), dtype=np.int16)
    for suffix in (".nrrd", ".mha"):
        path = _write(tmp_path / f"zeros{suffix}", zeros)
        assert read_image(path).array.shape == zeros.shape
        data = path.read_bytes()
        path.write_bytes(data[:-12])
        with pytest.raises(InputError, match=r"cut short|damaged"):
            read_image(path)


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
@pytest.mark.parametrize("compress", [False, True])
def test_a_detached_data_file_cut_short_or_missing_is_named(tmp_path, suffix, compress):
    header = _write(tmp_path / f"a{suffix}", compress=compress)
    (data_file,) = [p for p in tmp_path.iterdir() if p != header]
    data_file.write_bytes(data_file.read_bytes()[:-40])
    with pytest.raises(InputError, match=r"cut short|damaged") as error:
        read_image(header)
    assert f"its data file {data_file}" in str(error.value)
    data_file.unlink()
    with pytest.raises(InputError, match=f"its data file {data_file} was not found"):
        read_image(header)


# --------------------------------------------------------------------------------------
# NIfTI headers


def _nifti(path: Path, *, sform: bool = False) -> Path:
    """A NIfTI-1 file of VOXELS (int16) with only the qform in use (sform_code 0) unless ``sform``."""
    _write(path, compress=False)
    raw = bytearray(gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes())
    if not sform:
        raw[254:256] = struct.pack("<h", 0)
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def _patch(path: Path, offset: int, fmt: str, value) -> Path:
    compressed = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if compressed else path.read_bytes())
    struct.pack_into("<" + fmt, raw, offset, value)
    path.write_bytes(gzip.compress(bytes(raw)) if compressed else bytes(raw))
    return path


NAN, INF = float("nan"), float("inf")
# field as the message names it: (byte offset, struct format, value)
NIFTI_FAULTS = {
    "qoffset_x": (268, "f", NAN),  # the origin was read 40 mm off
    "quatern_b": (256, "f", NAN),  # the identity direction was read
    "quatern_d": (264, "f", INF),
    "pixdim[1]": (80, "f", INF),  # 1 mm was read
    "pixdim[2]": (84, "f", 0.0),
    "pixdim[3]": (88, "f", -2.5),
    "dim[3]": (46, "h", 0),  # one slice of six was read
    "dim[3] ": (46, "h", -8),
    "dim[0]": (40, "h", 9),
    "vox_offset": (108, "f", NAN),
    "bitpix": (72, "h", 8),
}


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("field", list(NIFTI_FAULTS))
def test_nifti_header_fields_itk_would_replace_are_refused_by_name(tmp_path, field, suffix):
    path = _nifti(tmp_path / f"a{suffix}")
    volume = read_image(path)
    assert np.array_equal(volume.array, VOXELS) and np.allclose(volume.spacing_mm, (0.8, 0.9, 2.5))
    offset, fmt, value = NIFTI_FAULTS[field]
    _patch(path, offset, fmt, value)
    with pytest.raises(InputError, match=re.escape(f"its header field {field.strip()}")):
        read_image(path)
    with pytest.raises(InputError, match=re.escape(str(path))):
        read_label(path)


def test_a_nan_qform_under_a_valid_sform_is_refused_too(tmp_path):
    path = _patch(_nifti(tmp_path / "a.nii", sform=True), 268, "f", NAN)
    with pytest.raises(InputError, match="qoffset_x"):
        read_image(path)


def _nifti2(path: Path) -> Path:
    """A NIfTI-2 file of VOXELS (540-byte header, 64-bit sizes and double geometry)."""
    header = bytearray(540)
    struct.pack_into("<i", header, 0, 540)
    header[4:12] = b"n+2\x00\r\n\x1a\n"
    struct.pack_into("<2h", header, 12, 4, 16)  # int16
    struct.pack_into("<8q", header, 16, 3, *VOXELS.shape[::-1], 1, 1, 1, 1)
    struct.pack_into("<8d", header, 104, 1.0, 0.8, 0.9, 2.5, 1, 1, 1, 1)
    struct.pack_into("<q", header, 168, 544)
    struct.pack_into("<ii", header, 344, 0, 1)  # qform_code 0, sform_code 1
    struct.pack_into("<12d", header, 400, 0.8, 0, 0, 1, 0, 0.9, 0, 2, 0, 0, 2.5, 3)
    data = bytes(header) + bytes(4) + VOXELS.astype("<i2").tobytes()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti2_is_named_as_not_supported(tmp_path, suffix):
    path = _nifti2(tmp_path / f"a{suffix}")
    with pytest.raises(
        InputError, match=re.escape("is a NIfTI-2 file, which the image library (ITK) cannot read")
    ) as error:
        read_image(path)
    assert str(path) in str(error.value) and "nibabel" in (error.value.hint or "")


def test_read_errors_name_the_users_file_never_a_temporary_link(tmp_path):
    """Files read through a link in a temporary folder (a name that is not UTF-8; a .nii.gz beside a
    .nii of the same name): ITK's message named the link (/tmp/buseg-read-...)."""
    odd = tmp_path / "b\udce9.nrrd"  # a Latin-1 'é' in a file name
    odd.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 x\nencoding: raw\n\n" + bytes(64))
    ambiguous = tmp_path / "c.nii.gz"
    ambiguous.write_bytes(b"not an image at all" * 30)
    _nifti(tmp_path / "c.nii")
    for path in (odd, ambiguous):
        with pytest.raises(InputError) as error:
            read_image(path)
        message = str(error.value)
        assert "buseg-read-" not in message and str(path) in message, message


# --------------------------------------------------------------------------------------
# Model files


def _crafted_model(path: Path, dimension: str = "2d", **changes) -> Path:
    """A model file whose metadata carry ``changes`` (written with torch.save: save_checkpoint refuses
    them), with the weights of the network the unchanged metadata describe."""
    metadata = {
        "format": FORMAT,
        "format_version": 1,
        **model_metadata(["background", "liver", "tumour"], dimension=dimension),
    }
    weights = network_from_metadata(metadata).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"metadata": {**metadata, **changes}, "weights": weights}, path)
    return path


def _classes(*values: int) -> list[dict]:
    names = ("background", "liver", "tumour")
    return [
        {"index": i, "name": n, "label_value": v} for i, (n, v) in enumerate(zip(names, values, strict=True))
    ]


METADATA_TRAINING_NEVER_WRITES = {
    "patch 1x1": ({"patch_size": [1, 1]}, re.escape("patch_size [1, 1] cannot be fed to the network")),
    "patch 40x32": ({"patch_size": [40, 32]}, "a multiple of 16"),
    "background value 5": (
        {"classes": _classes(5, 1, 2)},
        "the background class 'background' .* label value 5",
    ),
    "foreground value 0": ({"classes": _classes(5, 0, 2)}, "the background class"),
    "only a foreground value 0": ({"classes": _classes(0, 1, 0)}, "listed twice"),
    "foreground 0, background 0 elsewhere": ({"classes": _classes(0, 0, 2)}, "listed twice"),
    "working spacing a string": (
        {"config": {"model": {"working_spacing_mm": "abc"}}},
        "working_spacing_mm 'abc'",
    ),
    "working spacing zeros": ({"config": {"model": {"working_spacing_mm": [0, 0, 0]}}}, "working_spacing_mm"),
    "working spacing negative": (
        {"config": {"model": {"working_spacing_mm": [1, -1, 1]}}},
        "working_spacing_mm",
    ),
    "working spacing NaN": ({"config": {"model": {"working_spacing_mm": [1, NAN, 1]}}}, "working_spacing_mm"),
    "working spacing of two": ({"config": {"model": {"working_spacing_mm": [1, 1]}}}, "working_spacing_mm"),
    "config a string": ({"config": "x"}, "'config' .the training settings. is not a mapping"),
    "config model a list": ({"config": {"model": [1]}}, "'config' .the training settings. is not a mapping"),
}


@pytest.mark.parametrize("kind", list(METADATA_TRAINING_NEVER_WRITES))
def test_model_metadata_training_never_writes_are_refused_naming_the_file(tmp_path, kind):
    changes, message = METADATA_TRAINING_NEVER_WRITES[kind]
    path = _crafted_model(tmp_path / "model.pt", **changes)
    with pytest.raises(ModelFileError, match=message) as error:
        load_model(path)
    assert error.value.path == str(path)


def test_a_crafted_working_spacing_is_one_line_error_naming_the_model(tmp_path, caplog):
    _write(tmp_path / "images" / "a.nrrd", VOXELS.astype(np.float32))
    model = _crafted_model(tmp_path / "model.pt", config={"model": {"working_spacing_mm": "abc"}})
    argv = ["predict", "--model", str(model), str(tmp_path / "images"), "--progress", "none"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert f"{model}: its training config's working_spacing_mm 'abc'" in caplog.text


def test_a_working_grid_beyond_the_memory_is_refused_before_it_is_allocated(tmp_path, caplog):
    """0.001 mm made ITK try to allocate ~10^12 voxels: prediction (the model's spacing) names the model
    file, training (--working-spacing-mm) the image; nothing of that size is allocated."""
    _write(tmp_path / "images" / "a.nrrd", VOXELS.astype(np.float32))
    model = _crafted_model(tmp_path / "model.pt", config={"model": {"working_spacing_mm": [0.001] * 3}})
    argv = ["predict", "--model", str(model), str(tmp_path / "images"), "--progress", "none"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 3
    assert (
        f"{model}: resampling to the model's working spacing (0.001, 0.001, 0.001) mm makes a grid of"
        in caplog.text
    )
    assert (
        "hint: a working spacing closer to the images' own (--working-spacing-mm when training)"
        in caplog.text
    )
    case = _case(shape=(10, 24, 24))
    root = _labeled_folder(tmp_path / "train", case.image, case.label)
    config = _config(root, dimension="3d")
    config.model.patch_size, config.model.working_spacing_mm = [16, 16, 16], [0.001, 0.001, 0.001]
    config.out_dir = str(tmp_path / "run")
    with pytest.raises(ResourceError, match="resampling to the working spacing") as error:
        train(config)
    assert error.value.path == str(root / "images" / "a.nrrd")


def test_one_memory_check_names_the_file_and_says_what_to_do(tmp_path, monkeypatch):
    """The single memory check (training images, prediction, working grids) puts the file that asks
    for the memory and the caller's hint in its error, and the default hint where none is given."""
    import psutil

    from buseg.data.resample import WORKING_GRID_MEMORY_HINT
    from buseg.memory import SMALLER_IMAGES_HINT, check_memory

    class Memory:
        available = 2**30

    monkeypatch.setattr(psutil, "virtual_memory", Memory)
    model = tmp_path / "model.pt"
    with pytest.raises(ResourceError) as error:
        check_memory(2**31, "the resampled volumes", path=model, hint=WORKING_GRID_MEMORY_HINT)
    assert error.value.path == str(model) and error.value.hint == WORKING_GRID_MEMORY_HINT
    assert str(error.value) == (
        f"{model}: the resampled volumes need about 2.0 GiB in memory, more than 70% of the 1.0 GiB "
        f"available\n  hint: {WORKING_GRID_MEMORY_HINT}"
    )
    with pytest.raises(ResourceError) as error:
        check_memory(2**31, "the 2 training images")
    assert error.value.path is None and error.value.hint == SMALLER_IMAGES_HINT
    check_memory(2**29, "half a GiB")  # under 70% of what is free: no error


def test_predict_refuses_each_damaged_file_by_name_and_predicts_the_others(tmp_path, capsys):
    """predict reads every header first (for its memory estimate): the same refusals there."""
    folder = tmp_path / "images"
    _write(folder / "good.nrrd", VOXELS.astype(np.float32))
    _nifti2(folder / "nifti2.nii")
    _patch(_nifti(folder / "nan_origin.nii"), 268, "f", NAN)
    header = _write(folder / "detached.nhdr", compress=False)
    (folder / "detached.raw").unlink()
    _damage(_write(folder / "damaged.mha"), "flipped")
    model = _crafted_model(tmp_path / "model.pt")
    argv = [
        "predict",
        "--model",
        str(model),
        str(folder),
        "--out",
        str(tmp_path / "out"),
        "--progress",
        "plain",
    ]
    assert main(argv) == 2
    warnings = capsys.readouterr().err
    for name, message in (
        ("nifti2.nii", "is a NIfTI-2 file"),
        ("nan_origin.nii", "its header field qoffset_x"),
        ("detached.nhdr", f"its data file {header.with_suffix('.raw')} was not found"),
        ("damaged.mha", f"its voxel data (zlib-compressed) {DAMAGED}"),
    ):
        assert f"{folder / name}: {message}" in warnings, name
    assert (tmp_path / "out" / "good").is_dir()


def test_nifti_voxels_past_a_long_header_are_checked_where_they_lie(tmp_path):
    """A NIfTI-1 file whose voxels start past the first 540 bytes (extensions, or padding before
    vox_offset) is whole: its padding is not voxel data, and its last voxels are checked too."""
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 6, 8), np.float32)), str(plain))
    raw = plain.read_bytes()
    offset = struct.unpack("<f", raw[108:112])[0]
    gap = 1008
    shifted = bytearray(raw[:348]) + b"\0\0\0\0" + b"\xff" * gap  # NaN-looking padding, not voxels
    shifted[108:112] = struct.pack("<f", offset + gap)
    whole = tmp_path / "long_header.nii"
    whole.write_bytes(bytes(shifted) + raw[int(offset) :])
    assert float(read_image(whole).array.mean()) == 1.0
    voxels = bytearray(raw[int(offset) :])
    voxels[-4:] = struct.pack("<f", float("nan"))  # the last voxel, which the old scan never reached
    damaged = tmp_path / "long_header_nan.nii"
    damaged.write_bytes(bytes(shifted) + bytes(voxels))
    with pytest.raises(InputError, match=r"NaN or infinite") as raised:
        read_image(damaged)
    assert "long_header_nan.nii" in str(raised.value)


def _is_compressed(data: bytes) -> bool:
    """Whether the start of an image file says its voxels are compressed (gzip, NRRD or MetaImage)."""
    return data.startswith(b"\x1f\x8b") or any(
        words in data for words in (b"encoding: gzip", b"encoding: bzip2", b"CompressedData = True")
    )


def _count_decompression(monkeypatch) -> tuple[list[int], list[bool]]:
    """Bytes decompressed by gzip.open readers, and whether each file given to a reader (ITK,
    slicerio) is compressed."""
    import slicerio

    decompressed, given_compressed = [], []
    real_open, real_read, real_read_segmentation = gzip.open, sitk.ReadImage, slicerio.read_segmentation

    class Counting:
        def __init__(self, stream):
            self.stream = stream

        def read(self, size=-1):
            data = self.stream.read(size)
            decompressed.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    def reading(read):
        def read_and_note(name, *args, **kwargs):
            given_compressed.append(_is_compressed(Path(name).read_bytes()[:4096]))
            return read(name, *args, **kwargs)

        return read_and_note

    monkeypatch.setattr(gzip, "open", lambda *args, **kwargs: Counting(real_open(*args, **kwargs)))
    monkeypatch.setattr(sitk, "ReadImage", reading(real_read))
    monkeypatch.setattr(slicerio, "read_segmentation", reading(real_read_segmentation))
    return decompressed, given_compressed


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".seg.nrrd"])
def test_a_compressed_image_is_decompressed_once_per_read(tmp_path, suffix, monkeypatch):
    """The checks decompress the whole file (NIfTI data cut short, NaN voxels that ITK reads as 0;
    NRRD and MetaImage streams that decode to garbage): the reader gets the uncompressed copy they
    wrote instead of decompressing the file a second time."""
    path = tmp_path / f"a{suffix}"
    if suffix == ".seg.nrrd":
        volume = read_image(_write(tmp_path / "image.nrrd"))
        write_segmentation((VOXELS % 3).astype(np.uint8), volume, [{"index": 1, "name": "x"}], path)
        expected = (VOXELS % 3 == 1).astype(np.uint8)
    else:
        _write(path, VOXELS.astype(np.float32))
        expected = VOXELS
    assert _is_compressed(path.read_bytes()[:4096])
    decompressed, given_compressed = _count_decompression(monkeypatch)
    volume = read_label(path) if suffix == ".seg.nrrd" else read_image(path)
    assert np.array_equal(volume.array, expected) and np.allclose(volume.spacing_mm, (0.8, 0.9, 2.5))
    assert np.allclose(volume.origin, (-10.0, 4.0, 7.0))
    assert given_compressed == [False]  # the reader decompressed nothing
    if suffix == ".nii.gz":  # once, and the header check's first 540 bytes
        assert sum(decompressed) <= len(gzip.decompress(path.read_bytes())) + 540


def test_checks_of_a_decompressed_copy_name_the_users_file(tmp_path):
    with_nan = VOXELS.astype(np.float32)
    with_nan[2, 3, 4] = NAN
    with pytest.raises(InputError, match=r"nan\.nii\.gz: contains 1 NaN or infinite voxel values"):
        read_image(_write(tmp_path / "nan.nii.gz", with_nan))
    for suffix in (".nrrd", ".mha"):
        path = _damage(_write(tmp_path / f"flipped{suffix}"), "flipped")
        with pytest.raises(InputError, match=re.escape(f"{path}: its voxel data")):
            read_image(path)
    odd = _write(tmp_path / "plain.nrrd").rename(tmp_path / "b\udce9.nrrd")  # not UTF-8: ITK aborts on it
    assert np.array_equal(read_image(odd).array, VOXELS)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_a_compressed_image_is_read_where_no_decompressed_copy_can_be_written(tmp_path, suffix, monkeypatch):
    """No temporary folder (or a full one): the reader decompresses the file itself, the checks stay."""
    import tempfile

    from buseg.files import image_checks

    path = _write(tmp_path / f"a{suffix}", VOXELS.astype(np.float32))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "tmp"))
    _, given_compressed = _count_decompression(monkeypatch)
    assert np.array_equal(read_image(path).array, VOXELS)
    assert given_compressed == [True]
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError, match=rf"cut{re.escape(suffix)}: .*cut short"):
        read_image(cut)

    class FullDisk:
        def write(self, data):
            raise OSError(28, "No space left on device")

    with pytest.raises(image_checks.CopyFailed):  # not said as damage of the user's file
        if suffix == ".nii.gz":
            image_checks.check_nifti_complete(path, copy_to=FullDisk())
        else:
            image_checks.check_data_stream(path, None, copy_to=FullDisk())


@pytest.mark.parametrize("suffix", [".nhdr", ".mhd"])
def test_a_header_whose_data_file_field_is_empty_is_named(tmp_path, suffix):
    image = tmp_path / f"image{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 6, 8), np.float32)), str(image))
    field = "data file:" if suffix == ".nhdr" else "ElementDataFile ="
    lines = image.read_text().splitlines()
    image.write_text("\n".join(f"{field} " if line.startswith(field) else line for line in lines) + "\n")
    with pytest.raises(InputError, match="names no data file") as raised:
        read_image(image)
    assert image.name in str(raised.value)


def test_safe_writing_knows_the_image_suffix_of_two_parts_and_imports_no_format(tmp_path):
    # A temporary file must end in the whole image suffix (writers choose the format from it);
    # safe_files keeps its own copy of the one compound suffix so that it needs nothing of io.
    import ast
    import inspect

    from buseg.files import safe_files
    from buseg.files.images import IMAGE_SUFFIXES

    assert [s for s in IMAGE_SUFFIXES if s.count(".") > 1] == [safe_files._COMPOUND_SUFFIX]
    imported = {
        node.module
        for node in ast.walk(ast.parse(inspect.getsource(safe_files)))
        if isinstance(node, ast.ImportFrom)
    }
    assert "io" not in imported and "buseg.files.images" not in imported
    for name, suffix in (("case.NII.GZ", ".NII.GZ"), ("...nii.gz", ".nii.gz"), ("table.v2.csv", ".csv")):
        with safe_files.atomic_path(tmp_path / name) as temp:
            assert temp.name.startswith(safe_files.TEMPORARY_PREFIX) and temp.name.endswith(suffix), name
