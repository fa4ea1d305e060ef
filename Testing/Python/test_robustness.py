"""Bad input and untrusted files get a clear error naming the file (issue 8), never a silent wrong answer.

Each test is one item of docs/robustness.md: labels off their image's grid, label maps that
are not label maps, classes the data do not support, files whose content is not what their
name says, bad images (for training and for prediction), images too large for the memory
(refused from the header, before reading), truncated and corrupt files, folders without
images, a model that cannot handle the data, model metadata that lie, semi-supervised
training without unlabeled data, and names that would lead outside the output folder
(engine and Slicer export). Faults (kills, full disks, out of memory, locks) are in
test_faults.py; random inputs in test_fuzz.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from model_files import model_metadata, write_untrained_model

from buseg.config import PredictConfig, TrainConfig
from buseg.data.synthetic import make_case, rotation_direction
from buseg.data.training_data import load_training_data
from buseg.errors import InputError, ModelFileError, ResourceError
from buseg.files.images import Volume, read_image, read_label, safe_case_name, write_image, write_segmentation
from buseg.model.checkpoint import FORMAT, load_model
from buseg.model.networks import build_network
from buseg.prediction.predict_files import predict_files

ROOT = Path(__file__).resolve().parents[2]
IDENTITY = tuple(np.eye(3).ravel())


def _case(seed: int = 0, shape=(10, 24, 24)):
    return make_case(np.random.default_rng(seed), shape)


def _config(labeled, unlabeled=None, validation=None, dimension="2d", method=None) -> TrainConfig:
    config = TrainConfig()
    config.data.labeled = str(labeled)
    config.data.unlabeled = str(unlabeled) if unlabeled else None
    config.data.validation = str(validation) if validation else None
    config.model.dimension = dimension
    config.method.name = method or ("supervised" if unlabeled is None else "bcp")
    return config


def _load(config: TrainConfig):
    return load_training_data(config, log=lambda message: None)


def _labeled_folder(root: Path, image: Volume, label: Volume | None = None, *, label_name="a.nrrd") -> Path:
    write_image(image, root / "images" / "a.nrrd", overwrite=True)
    if label is not None:
        write_image(label, root / "labels" / label_name, overwrite=True)
    return root


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory) -> Path:
    """An untrained 2D model with two foreground classes (enough to run every prediction path)."""
    return _model_file(tmp_path_factory.mktemp("model") / "model.pt", "2d")


def _metadata(dimension="2d", **changes) -> dict:
    names = ["background", "liver", "tumour"]
    metadata = model_metadata(
        names,
        dimension=dimension,
        colors=[[0.2 * i, 0.5, 0.5] for i in range(len(names))],
        patch_size=[32, 32] if dimension == "2d" else [16, 16, 16],
    )
    return {"format": FORMAT, "format_version": 1, **metadata, **changes}


def _model_file(path: Path, dimension="2d", **changes) -> Path:
    return write_untrained_model(path, _metadata(dimension, **changes))


def _predict_config(model: Path, out: Path, **changes) -> PredictConfig:
    return PredictConfig(model_path=str(model), out_dir=str(out), num_threads=1, **changes)


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


# --------------------------------------------------------------------------------------
# Labels and their images


@pytest.mark.parametrize("difference", ["size", "spacing", "direction"])
def test_label_off_its_images_grid_is_refused_or_resampled_on_request(tmp_path, difference):
    """(The origin case is in test_data.py.) Size, spacing and direction: refused naming the label
    file and what differs; --resample-labels-to-image puts the label on the image's grid."""
    case = _case()
    label = case.label
    if difference == "size":  # 4 more columns on the same grid: resampling must crop them off exactly
        wider = np.concatenate([label.array, np.zeros((10, 24, 4), np.uint8)], axis=2)
        label = Volume(wider, label.spacing_mm, label.origin, label.direction)
    elif difference == "spacing":
        label = Volume(label.array, tuple(s * 1.05 for s in label.spacing_mm), label.origin, label.direction)
    else:
        label = Volume(label.array, label.spacing_mm, label.origin, rotation_direction(90))
    root = _labeled_folder(tmp_path / "lab", case.image, label)
    config = _config(root, dimension="3d")
    config.model.patch_size = [16, 16, 16]
    with pytest.raises(
        InputError, match=rf"labels/a\.nrrd: label does not lie on its image's voxel grid \({difference}"
    ) as error:
        _load(config)
    assert "--resample-labels-to-image" in error.value.hint
    config.data.resample_labels_to_image = True
    data = _load(config)
    assert data.labeled_labels[0].shape == case.image.array.shape
    if difference == "size":
        assert np.array_equal(data.labeled_labels[0], case.label.array)
    else:
        assert (data.labeled_labels[0] > 0).any()


BAD_LABELS = {
    "non-integer values": (lambda lab: lab.astype(np.float32) * 0.5, "non-integer values"),
    "negative values": (lambda lab: lab.astype(np.int16) - 1, "negative values"),
    "NaN values": (lambda lab: np.where(lab > 0, np.nan, 0).astype(np.float32), "NaN or infinite"),
    "an image given as label": (
        lambda lab: (np.arange(lab.size) % 1000).reshape(lab.shape).astype(np.int16),
        "999 different values",
    ),
    "empty": (lambda lab: np.zeros_like(lab), "no foreground voxels"),
}


@pytest.mark.parametrize("kind", list(BAD_LABELS))
def test_label_maps_that_are_not_label_maps_are_refused(tmp_path, kind):
    make, message = BAD_LABELS[kind]
    case = _case()
    root = _labeled_folder(tmp_path / "lab", case.image, case.label.with_array(make(case.label.array)))
    with pytest.raises(InputError, match=message) as error:
        _load(_config(root))
    assert error.value.path == str(root / "labels" / "a.nrrd")


def test_labels_in_another_format_than_announced(tmp_path):
    case = _case()
    root = _labeled_folder(tmp_path / "lab", case.image)
    # An RGB picture given as the label.
    rgb = sitk.Image([24, 24, 10], sitk.sitkVectorUInt8, 3)
    (root / "labels").mkdir()
    sitk.WriteImage(rgb, str(root / "labels" / "a.nrrd"))
    with pytest.raises(InputError, match=r"a\.nrrd: is a vector/RGB image"):
        _load(_config(root))
    # A plain label map (or an image) named .seg.nrrd: no segments -> not a Slicer segmentation
    # (it used to be read as an empty segmentation).
    (root / "labels" / "a.nrrd").unlink()
    write_image(case.label, root / "labels" / "a.seg.nrrd")
    with pytest.raises(InputError, match=r"a\.seg\.nrrd: is not a Slicer segmentation") as error:
        _load(_config(root))
    assert "named .nrrd" in error.value.hint
    # Image files whose content is another format than their name says.
    write_image(case.image, tmp_path / "real.nii.gz")
    shutil.copy(tmp_path / "real.nii.gz", tmp_path / "gzipped.nii")
    with pytest.raises(InputError, match=r"gzipped\.nii: cannot be read") as error:
        read_image(tmp_path / "gzipped.nii")
    assert "gzip-compressed data" in error.value.hint
    write_image(case.image, tmp_path / "real.nrrd")
    shutil.copy(tmp_path / "real.nrrd", tmp_path / "nrrd.nii.gz")
    with pytest.raises(InputError, match=r"nrrd\.nii\.gz: cannot be read") as error:
        read_image(tmp_path / "nrrd.nii.gz")
    assert "a NRRD file" in error.value.hint
    # An uncompressed NIfTI named .nii.gz is read correctly (ITK reads both): not an error.
    write_image(case.image, tmp_path / "plain.nii", compress=False)
    shutil.copy(tmp_path / "plain.nii", tmp_path / "plain.nii.gz")
    assert np.array_equal(read_image(tmp_path / "plain.nii.gz").array, case.image.array)


def test_classes_the_labeled_data_do_not_support_are_refused(tmp_path):
    cases = [_case(seed) for seed in range(2)]
    for index, case in enumerate(cases):
        write_image(case.image, tmp_path / f"img{index}.nrrd")
        write_image(case.label, tmp_path / f"lab{index}.nrrd")
    # A validation label with a class (4) that no training label has.
    extra = cases[1].label.array.copy()
    extra[0, :2, :2] = 4
    write_image(cases[1].label.with_array(extra), tmp_path / "lab1.nrrd", overwrite=True)
    manifest = {
        "labeled": [{"image": "img0.nrrd", "label": "lab0.nrrd"}],
        "validation": [{"image": "img1.nrrd", "label": "lab1.nrrd"}],
    }
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"lab1\.nrrd: has label 4, which no labeled training case has"):
        _load(_config(tmp_path / "m.json"))
    # A declared class that occurs in no labeled case.
    manifest = {
        "labeled": [{"image": "img0.nrrd", "label": "lab0.nrrd"}],
        "classes": [{"value": v, "name": n} for v, n in ((1, "a"), (2, "b"), (3, "c"), (7, "never"))],
    }
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(
        InputError, match=r"m\.json: class\(es\) never declared but absent from every labeled case"
    ):
        _load(_config(tmp_path / "m.json"))
    # A declared class name that would break the segmentation files it ends up in.
    manifest["classes"] = [{"value": 1, "name": "liver\nSegment1_Name:=x"}]
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="contains control characters"):
        _load(_config(tmp_path / "m.json"))


# --------------------------------------------------------------------------------------
# Images


def _bad_image(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.nrrd"
    case = _case()
    array = case.image.array.copy()
    if kind == "constant":
        write_image(case.image.with_array(np.full_like(array, 7.0)), path)
    elif kind in ("NaN", "infinity"):
        array[3, 4, 5] = np.nan if kind == "NaN" else np.inf
        write_image(case.image.with_array(array), path)
    elif kind == "2D":
        sitk.WriteImage(sitk.GetImageFromArray(array[0]), str(path))
    elif kind == "4D":  # a time series of two frames
        frame = sitk.GetImageFromArray(array)
        sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(path))
    elif kind == "RGB":
        sitk.WriteImage(sitk.GetImageFromArray(np.stack([array] * 3, axis=-1), isVector=True), str(path))
    elif kind == "tiny":
        write_image(Volume(array[:4], case.image.spacing_mm, case.image.origin, case.image.direction), path)
    return path


IMAGE_PROBLEMS = {
    "constant": "is constant",
    "NaN": "NaN or infinite",
    "infinity": "NaN or infinite",
    "2D": "is a 2D image",
    "4D": "is a 4D image",
    "RGB": "RGB or vector image",
    "tiny": "is too small",
}


@pytest.mark.parametrize("kind", list(IMAGE_PROBLEMS))
def test_bad_images_are_refused_for_training_naming_the_file(tmp_path, kind):
    image = _bad_image(kind, tmp_path)
    case = _case()
    root = tmp_path / "lab"
    (root / "images").mkdir(parents=True)
    shutil.copy(image, root / "images" / "a.nrrd")
    label = case.label.array[:4] if kind == "tiny" else case.label.array
    write_image(
        Volume(label, case.label.spacing_mm, case.label.origin, case.label.direction),
        root / "labels" / "a.nrrd",
    )
    config = _config(root, dimension="3d")
    config.model.patch_size = [16, 16, 16]
    with pytest.raises(InputError, match=IMAGE_PROBLEMS[kind]) as error:
        _load(config)
    assert error.value.path == str(root / "images" / "a.nrrd")


def test_bad_images_are_refused_for_prediction_and_the_others_predicted(tmp_path, model_2d):
    folder = tmp_path / "in"
    folder.mkdir()
    kinds = ["NaN", "2D", "4D", "RGB"]
    for kind in kinds:
        shutil.copy(_bad_image(kind, tmp_path), folder / f"{kind}.nrrd")
    write_image(_case().image.with_array(np.full((10, 24, 24), 3.0, np.float32)), folder / "constant.nrrd")
    out = tmp_path / "out"
    warnings = []

    class Sink:
        def emit(self, event, **fields):
            if event == "warning":
                warnings.append(fields["message"])

        def close(self):
            pass

    with pytest.raises(InputError, match=r"4 of 5 case\(s\) could not be predicted") as error:
        predict_files([folder], _predict_config(model_2d, out), events=Sink())
    assert "2D" in str(error.value)
    for kind in kinds:  # each refusal says which file and why; nothing is written for it
        assert any(
            w.startswith(f"{kind}: skipped")
            and str(folder / f"{kind}.nrrd") in w
            and IMAGE_PROBLEMS[kind] in w
            for w in warnings
        ), (kind, warnings)
        assert not (out / kind).exists()
    # A constant image is predicted (nothing is wrong with the file) with a warning that says so.
    assert (out / "constant" / "constant.seg.nrrd").is_file()
    assert any("constant: the image is constant" in w for w in warnings)


def _huge_header(path: Path) -> Path:
    """A detached NRRD header announcing 100000^3 float voxels (3.6 PB) for a data file of 64 bytes."""
    path.write_text(
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\nspacings: 1 1 1\n"
        "encoding: raw\nendian: little\ndata file: huge.raw\n"
    )
    path.with_suffix(".raw").write_bytes(bytes(64))  # what is really there
    return path


def test_images_too_large_for_the_memory_are_refused_from_their_header(tmp_path, model_2d):
    huge = _huge_header(tmp_path / "huge.nhdr")
    start = time.perf_counter()
    with pytest.raises(
        ResourceError, match=r"huge\.nhdr: its header says 100000x100000x100000 voxels \(\d+\.\d GiB"
    ):
        read_image(huge)
    # Training: the whole set is estimated from the headers before any image is read.
    case = _case()
    root = tmp_path / "lab"
    write_image(case.image, root / "images" / "a.nrrd")
    write_image(case.label, root / "labels" / "a.nrrd")
    (tmp_path / "unl").mkdir()
    _huge_header(tmp_path / "unl" / "huge.nhdr")
    with pytest.raises(ResourceError, match=r"the 2 training images need about \d+\.\d GiB in memory"):
        _load(_config(root, tmp_path / "unl"))
    # Prediction: each case is estimated with the prediction's memory model before it is read.
    with pytest.raises(
        ResourceError, match=r"huge\.nhdr.*100000x100000x100000 voxels.* need about \d+\.\d GiB"
    ):
        predict_files([huge], _predict_config(model_2d, tmp_path / "out"))
    assert time.perf_counter() - start < 20  # refused, not attempted
    assert not (tmp_path / "out" / "huge").exists()


def test_prediction_memory_model_counts_the_window_slab_of_a_3d_model(tmp_path):
    """A 3D model's window-deep slab of probabilities is part of the estimate: a huge window makes a small image
    expensive (a model file cannot make prediction allocate what was not estimated)."""
    from buseg.prediction.case import BYTES_PER_VOXEL, prediction_memory_bytes

    small = load_model(_model_file(tmp_path / "small.pt", "3d"))
    wide = load_model(_model_file(tmp_path / "wide.pt", "3d", patch_size=[512, 512, 256]))
    config = PredictConfig()
    size = (40, 40, 20)
    voxels = 40 * 40 * 20
    assert (
        BYTES_PER_VOXEL * voxels < prediction_memory_bytes(size, small, config) < 3 * BYTES_PER_VOXEL * voxels
    )
    assert (
        prediction_memory_bytes(size, wide, config) > 4 * 256 * 512 * 512 * 4
    )  # classes + weights, one slab


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"])
def test_truncated_files_are_refused_not_read_with_zeros(tmp_path, suffix):
    """ITK reads a truncated NIfTI (compressed or not) without complaint, filling the rest with zeros."""
    case = _case()
    path = tmp_path / f"full{suffix}"
    if suffix == ".seg.nrrd":
        write_segmentation(case.label.array, case.image, [{"index": 1, "name": "x"}], path)
    else:
        write_image(case.image, path, compress=suffix != ".nii")
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * 0.8)])
    reader = read_label if suffix == ".seg.nrrd" else read_image
    with pytest.raises(InputError, match=r"cut\.[a-z.]+: .*(truncated|cut short|cannot be read)") as error:
        reader(cut)
    assert error.value.path == str(cut)
    assert reader(path).array.shape == case.image.array.shape  # the whole file is fine


def test_folders_without_images_are_refused(tmp_path, model_2d):
    (tmp_path / "lab" / "images").mkdir(parents=True)
    (tmp_path / "lab" / "labels").mkdir()
    (tmp_path / "lab" / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match=r"lab/images: no images"):
        _load(_config(tmp_path / "lab"))
    case = _case()
    write_image(case.image, tmp_path / "lab" / "images" / "a.nrrd")
    write_image(case.label, tmp_path / "lab" / "labels" / "a.nrrd")
    (tmp_path / "unl").mkdir()
    with pytest.raises(InputError, match=r"unl: no images"):
        _load(_config(tmp_path / "lab", tmp_path / "unl"))
    with pytest.raises(InputError, match=r"unl: no image files"):
        predict_files([tmp_path / "unl"], _predict_config(model_2d, tmp_path / "out"))


def test_copies_of_an_image_in_two_roles_are_reported(tmp_path):
    """The same file twice is refused (test_data.py); the same voxels under another name get a warning."""
    case = _case()
    root = _labeled_folder(tmp_path / "lab", case.image, case.label)
    (tmp_path / "unl").mkdir()
    shutil.copy(root / "images" / "a.nrrd", tmp_path / "unl" / "copy.nrrd")
    write_image(_case(1).image, tmp_path / "unl" / "other.nrrd")
    data = _load(_config(root, tmp_path / "unl"))
    assert len(data.warnings) == 1
    assert (
        "copy.nrrd (unlabeled) has the same voxels as" in data.warnings[0]
        and "a.nrrd (labeled)" in data.warnings[0]
    )


# --------------------------------------------------------------------------------------
# Models and the data they are given


def test_a_model_is_refused_for_data_it_cannot_handle(tmp_path, model_2d):
    image = tmp_path / "image.nrrd"
    write_image(_case().image, image)
    # Two input channels (a multi-modal model): refused when loaded, before any case is read.
    net = {"name": "unet2d", "in_channels": 2, "num_classes": 3, "base_channels": 4, "dropout": True}
    weights = build_network("unet2d", in_channels=2, num_classes=3, base_channels=4).state_dict()
    torch.save({"metadata": _metadata(network=net), "weights": weights}, tmp_path / "two.pt")
    with pytest.raises(ModelFileError, match=r"two\.pt: the model expects 2 images per case"):
        predict_files([image], _predict_config(tmp_path / "two.pt", tmp_path / "out"))
    # A newer, unknown format version.
    payload = torch.load(model_2d, weights_only=True)
    payload["metadata"]["format_version"] = 99
    torch.save(payload, tmp_path / "newer.pt")
    with pytest.raises(ModelFileError, match=r"newer\.pt: written by a newer buseg \(model format 99"):
        predict_files([image], _predict_config(tmp_path / "newer.pt", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # Images of the wrong dimension: a 2D picture and a 4D series are refused naming the file.
    for kind in ("2D", "4D"):
        with pytest.raises(InputError, match=rf"{kind}\.nrrd: is a {kind} image"):
            predict_files([_bad_image(kind, tmp_path)], _predict_config(model_2d, tmp_path / kind))
    # A 3D model on a volume thinner than its window works (the window is padded).
    model_3d = _model_file(tmp_path / "3d.pt", "3d")
    write_image(_case(shape=(3, 24, 24)).image, tmp_path / "thin.nrrd")
    result = predict_files([tmp_path / "thin.nrrd"], _predict_config(model_3d, tmp_path / "thin"))
    assert read_label(tmp_path / "thin" / result.cases[0]["outputs"]["label"]).array.shape == (3, 24, 24)


def _network(**changes):
    return {
        "name": "unet2d",
        "in_channels": 1,
        "num_classes": 3,
        "base_channels": 4,
        "dropout": True,
        **changes,
    }


def _classes(names=("background", "liver", "tumour"), **changes):
    return [
        {"index": i, "name": n, "label_value": i, **(changes if i == 1 else {})} for i, n in enumerate(names)
    ]


BAD_METADATA = {
    "dimension not a string": ({"dimension": 2}, "'dimension' missing or not a str"),
    "classes not a list": ({"classes": {"0": "background"}}, "'classes' missing or not a list"),
    "patch size a string": ({"patch_size": "32x32"}, "'patch_size' missing or not a list"),
    "patch size of booleans": ({"patch_size": [True, True]}, "patch_size"),
    "channels a string": (
        {"network": _network(base_channels="4")},
        "'base_channels' is not a sensible integer",
    ),
    "negative channels": ({"network": _network(in_channels=-1)}, "'in_channels' is not a sensible integer"),
    "zero classes": ({"network": _network(num_classes=0)}, "'num_classes' is not a sensible integer"),
    "huge channels": ({"network": _network(base_channels=4000)}, "weights do not match the network"),
    "huge class count": (
        {
            "network": _network(num_classes=4000),
            "classes": [{"index": i, "name": f"c{i}", "label_value": i} for i in range(4000)],
        },
        "weights do not match the network",
    ),
    "class list shorter than outputs": (
        {"classes": _classes()[:2]},
        "2 classes listed but the network has 3",
    ),
    "class label value a string": ({"classes": _classes(label_value="1")}, "has no valid label_value"),
    "class label value negative": ({"classes": _classes(label_value=-5)}, "has no valid label_value"),
    "class name twice": ({"classes": _classes(("background", "liver", "liver"))}, "listed twice"),
    "class name with a line break": (
        {"classes": _classes(("background", "liver\nx", "t"))},
        "control characters",
    ),
    "class color not RGB": ({"classes": _classes(color="red")}, "color that is not three numbers"),
    "network of another dimension": (
        {"network": _network(name="vnet")},
        "a vnet network cannot be a 2d model",
    ),
    "slice axis out of range": ({"slice_axis": 7}, "slice_axis 7 is not 0, 1 or 2"),
    "negative spacing": ({"spacing_mm": [1.0, -1.0, 1.0]}, "spacing_mm"),
    "dropout not a boolean": ({"network": _network(dropout="yes")}, "'dropout' is not true/false"),
}


@pytest.mark.parametrize("kind", list(BAD_METADATA))
def test_model_metadata_that_lie_are_refused_before_any_allocation(tmp_path, kind):
    changes, message = BAD_METADATA[kind]
    weights = build_network("unet2d", in_channels=1, num_classes=3, base_channels=4).state_dict()
    path = tmp_path / "model.pt"
    torch.save({"metadata": _metadata(**changes), "weights": weights}, path)
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match=message) as error:
        load_model(path)
    assert error.value.path == str(path)
    # Refused from the metadata: a network of 4000 base channels would take more than 100 GB
    # (such a file got this machine's out-of-memory killer before the shape check).
    assert time.perf_counter() - start < 10


# --------------------------------------------------------------------------------------
# Semi-supervised training without unlabeled data: an error, with what to do (docs/data.md)


def test_semi_supervised_training_without_unlabeled_data_is_an_error(tmp_path):
    case = _case()
    root = _labeled_folder(tmp_path / "lab", case.image, case.label)
    with pytest.raises(InputError, match="method bcp is semi-supervised but no unlabeled images") as error:
        _load(_config(root, method="bcp"))
    assert "--method supervised" in error.value.hint
    # The LA layout with every case labeled or held out.
    import h5py

    la = tmp_path / "LA"
    names = ["c0", "c1", "c2"]
    (la).mkdir()
    (la / "train.list").write_text("\n".join(names) + "\n")
    for name in names:
        (la / "volumes" / name).mkdir(parents=True)
        with h5py.File(la / "volumes" / name / "mri_norm2.h5", "w") as f:
            f["image"] = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
            f["label"] = np.ones((16, 16, 16), np.uint8)
    (tmp_path / "val.list").write_text("c1\nc2\n")
    config = TrainConfig()
    config.data.source, config.data.data_root, config.data.labeled_count = "la", str(la), 1
    config.data.validation = str(tmp_path / "val.list")
    config.model.dimension, config.method.name = "3d", "buarl"
    with pytest.raises(
        InputError, match="method buarl is semi-supervised but no unlabeled case remains"
    ) as error:
        _load(config)
    assert "--labeled-count" in error.value.hint


# --------------------------------------------------------------------------------------
# Names that would lead outside the output folder


def test_safe_case_names():
    import re

    assert safe_case_name("case_01") == "case_01" and safe_case_name("") == "case"
    # Names that lose characters keep a short hash of the original: never one name for two inputs.
    assert re.fullmatch(r"case_[0-9a-f]{8}", safe_case_name(".."))
    assert safe_case_name(".") != safe_case_name("..")
    assert re.fullmatch(r"_\.\._etc_passwd_[0-9a-f]{8}", safe_case_name("../../etc/passwd"))
    assert safe_case_name("/abs/path").startswith("_abs_path_")
    assert safe_case_name("a\\b").startswith("a_b_") and safe_case_name("C:evil").startswith("C_evil_")
    assert safe_case_name("con") == "con_" and safe_case_name("NUL.backup") == "NUL.backup_"
    assert safe_case_name("COM1") == "COM1_" and safe_case_name("console") == "console"
    assert safe_case_name(".hidden").startswith("hidden_")
    assert safe_case_name("Pat ?*:|2").startswith("Pat_2_")
    assert safe_case_name("Pat ?*:|2") != safe_case_name("Pat ?2") != safe_case_name("Pat_2")
    assert len(safe_case_name("x" * 1000)) <= 128 and safe_case_name("x" * 1000) != safe_case_name("x" * 999)


def test_inputs_and_class_names_cannot_make_predict_or_rank_write_outside_the_output_folder(tmp_path):
    from buseg.prediction.ranking import rank_files

    # Class names from the model file end up in the .seg.nrrd and regions.json, never in paths.
    model = _model_file(
        tmp_path / "m" / "model.pt",
        classes=[
            {"index": 0, "name": "background", "label_value": 0},
            {"index": 1, "name": "../../escaped", "label_value": 1},
            {"index": 2, "name": "/etc/passwd", "label_value": 2},
        ],
    )
    inputs = tmp_path / "inputs"
    image = _case().image
    names = ["...nii.gz", "con.nii.gz", "..hidden.nii.gz", "a b;c.nii.gz"]
    for name in names:
        write_image(image, inputs / name)
    before = _files_under(tmp_path)
    out = tmp_path / "work" / "out"
    result = predict_files([inputs / n for n in names], _predict_config(model, out))
    assert {c["case"] for c in result.cases} == {safe_case_name(n[: -len(".nii.gz")]) for n in names}
    assert {c["case"].rsplit("_", 1)[0] for c in result.cases} == {"case", "con", "hidden", "a_b_c"}
    ranking = tmp_path / "work" / "ranking"
    rank_files([inputs / n for n in names], _predict_config(model, ranking), save_predictions=True)
    written = _files_under(tmp_path) - before
    assert written and all(out in p.parents or ranking in p.parents for p in written), sorted(
        map(str, written)
    )
    assert all(p.parent.parent in (out, ranking) or p.parent in (out, ranking) for p in written)
    first = safe_case_name("..")
    segments = read_label(out / first / f"{first}.seg.nrrd").segments
    assert [s["name"] for s in segments.values()] == ["../../escaped", "/etc/passwd"]


# --------------------------------------------------------------------------------------
# The Slicer module's export


@pytest.mark.slicer
def test_slicer_export_keeps_node_names_inside_their_folders(tmp_path):
    pytest.importorskip("slicer", reason="needs PyPI slicer-core")
    sys.path.insert(0, str(ROOT / "BidirUncertaintySeg"))
    sys.path.insert(0, str(Path(__file__).parent))
    from slicer_app import create_slicer_app
    from test_slicer_files import add_segmentation, add_volume

    from BidirUncertaintySegLib import engine, nodefiles, workflow
    from BidirUncertaintySegLib.errors import ModuleError

    app = create_slicer_app()
    flow = workflow.Workflow(
        workflow.SlicerContext(
            app.scene, app.segmentations_logic, runsFolder=tmp_path / "runs", workFolder=tmp_path / "work"
        )
    )
    names = ["../../escape", "/etc/passwd", "con", "a\\b", "..", "NUL"]
    cases = [_case(seed) for seed in range(len(names))]
    volumes = [add_volume(app.scene, c.image, n) for c, n in zip(cases, names, strict=True)]
    # slicer-core renames nothing: the nodes keep these names (the scene allows any text).
    assert [v.GetName() for v in volumes] == names
    labeled = [
        (v, add_segmentation(app.scene, c.label.array, v, ["shell", "core", "satellite"]))
        for v, c in zip(volumes[:3], cases, strict=False)
    ]
    # Semi-supervised without unlabeled volumes: refused before anything is written.
    with pytest.raises(ModuleError, match="learns from unlabeled volumes too"):
        flow.prepareTraining(labeled, [], outDir=tmp_path / "runs" / "none")
    before = _files_under(tmp_path)
    out_dir, _, _ = flow.prepareTraining(labeled, volumes[3:], outDir=tmp_path / "runs" / "r")
    written = _files_under(tmp_path) - before
    inputs = out_dir / workflow.INPUTS_FOLDER
    assert written and all(inputs in p.parents for p in written), sorted(map(str, written))
    assert sorted(p.name for p in (inputs / nodefiles.IMAGES_FOLDER).iterdir()) == sorted(
        f"{n}.nrrd" for n in ["escape", "etc_passwd", "con_", "a_b", "volume", "NUL_"]
    )
    # The engine names a prediction's case as the module looks it up.
    for name in names:
        exported = Path(f"{nodefiles.safeFileName(name)}.nrrd")
        assert engine.caseName(exported) == safe_case_name(nodefiles.safeFileName(name)) == exported.stem
    manifest = json.loads((inputs / nodefiles.MANIFEST_NAME).read_text())
    for entry in manifest["labeled"] + manifest["unlabeled"]:
        assert not Path(entry["image"]).is_absolute() and ".." not in Path(entry["image"]).parts


# --------------------------------------------------------------------------------------
# Options, outputs and the user's files (issue 35)


def _all_scalar_fields(cls, prefix=""):
    """(dotted name, type, is a list) of every bool, int, float and str field of a config (and of
    every list of them), sections included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _all_scalar_fields(hint, f"{prefix}{f.name}.")
            continue
        is_list = typing.get_origin(hint) is list
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if base[0] in (bool, int, float, str):
            yield f"{prefix}{f.name}", base[0], is_list


NOT_OF_TYPE = {
    bool: [[0], "maybe", "true", 1, 0, {}],
    int: [True, 2.5, "3", [3]],
    float: [True, "0.5", [0.5]],
    str: [["a"], 3, {"a": 1}, True],
}


def _nested(dotted: str, value) -> dict:
    *sections, name = dotted.split(".")
    data: dict = {name: value}
    for section in reversed(sections):
        data = {section: data}
    return data


@pytest.mark.parametrize("cls", [TrainConfig, PredictConfig], ids=["train", "predict"])
def test_config_files_take_only_values_of_each_fields_type(cls):
    from buseg.config import from_dict
    from buseg.errors import ConfigError

    fields = list(_all_scalar_fields(cls))
    assert {kind for _, kind, _ in fields} >= {bool, int, float, str}
    for dotted, kind, is_list in fields:
        for value in NOT_OF_TYPE[kind]:
            with pytest.raises(ConfigError, match=dotted.rsplit(".", 1)[-1]):
                from_dict(cls, _nested(dotted, [value] if is_list else value))
    # What JSON writes for each type is taken as it is; 3.0 is the whole number 3.
    assert from_dict(TrainConfig, {"optim": {"amp": False, "iterations": 3.0, "lr": 1}}).optim.iterations == 3
    assert from_dict(PredictConfig, {"overwrite": True, "samples": 2}).overwrite is True


def _error_event(stdout: str) -> dict:
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return next(e for e in events if e["event"] == "error")


def test_a_config_file_with_a_truthy_overwrite_replaces_nothing(tmp_path, model_2d, capsys):
    from buseg.cli import main

    image = tmp_path / "in" / "a.nrrd"
    write_image(_case().image, image)
    out = tmp_path / "out"
    argv = ["predict", str(image), "--model", str(model_2d), "--out", str(out), "--num-threads", "1"]
    assert main([*argv, "--progress", "none"]) == 0
    label = out / "a" / "a_label.nrrd"
    before = label.stat().st_mtime_ns
    config = tmp_path / "config.json"
    for value in ([0], "maybe", 1):
        config.write_text(json.dumps({"overwrite": value}))
        capsys.readouterr()
        assert main([*argv, "--config", str(config), "--progress", "jsonl"]) == 2
        assert "overwrite" in _error_event(capsys.readouterr().out)["message"]
        assert label.stat().st_mtime_ns == before


def test_files_that_merely_look_temporary_are_never_deleted(tmp_path, model_2d):
    from buseg.cli import main
    from buseg.files.safe_files import atomic_path
    from buseg.training.loop import prepare_output_folder

    image = tmp_path / "in" / "a.nrrd"
    write_image(_case().image, image)
    out = tmp_path / "out"
    users = [
        out / ".backup.20240101.tmp",
        out / "mydata" / ".notes.draft_v2.tmp.md",
        out / ".summary.json.draft_01.tmp.json",
        out / "a" / ".a_label.nrrd.k2j4h5g6.tmp.nrrd",
    ]
    for path in users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    argv = ["predict", str(image), "--model", str(model_2d), "--out", str(out), "--num-threads", "1"]
    assert main([*argv, "--progress", "none"]) == 0
    assert all(p.read_text() == "mine" for p in users)
    # Nor in a training folder: only its own files' temporaries go.
    run = tmp_path / "run"
    keep = [
        run / ".last.pt.mine.tmp.txt",
        run / ".history.json.draft.tmp",
        run / ".config.json.abcdefgh.tmp.md",
    ]
    stale = [run / ".buseg-tmp-last.pt.k2j4h5g6.pt", run / ".last.pt.k2j4h5g6.tmp.pt"]
    for path in keep + stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    prepare_output_folder(run, resume=False, overwrite=False)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    # Every temporary name buseg writes carries its own prefix.
    with atomic_path(tmp_path / "x.nii.gz") as temp:
        assert temp.name.startswith(".buseg-tmp-x.nii.gz.") and temp.name.endswith(".nii.gz")


BAD_CLASSES_FILES = {
    "colour out of 0..1": ([{"value": 1, "name": "liver", "color": [2, 0, 0]}], "'color'"),
    "colour not numbers": ([{"value": 1, "name": "liver", "color": ["red", 0, 0]}], "'color'"),
    "colour of booleans": ([{"value": 1, "name": "liver", "color": [True, 0, 0]}], "'color'"),
    "name a list": ({"1": ["liver"]}, "not text"),
    "name a mapping": ([{"value": 1, "name": {"en": "liver"}}], "not text"),
    "name a number": ({"1": 5}, "not text"),
    "name of label value 0": ({"1": "background"}, "label value 0"),
}


@pytest.mark.parametrize("kind", list(BAD_CLASSES_FILES))
def test_a_bad_classes_file_is_refused_when_read_before_any_training(tmp_path, kind):
    content, message = BAD_CLASSES_FILES[kind]
    case = _case()
    labeled = _labeled_folder(tmp_path / "labeled", case.image, case.label)
    (labeled / "classes.json").write_text(json.dumps(content))
    with pytest.raises(InputError, match=message) as error:
        _load(_config(labeled))
    assert error.value.path == str(labeled / "classes.json")


def test_case_names_of_the_tools_own_files_get_folders_that_cannot_collide(tmp_path, model_2d):
    from buseg.prediction.ranking import rank_files

    inputs = tmp_path / "inputs"
    names = ["buseg.lock", "summary.json", "ranking.json", "ranking.csv"]
    for name in names:
        write_image(_case().image, inputs / f"{name}.nii.gz")
    out = tmp_path / "out"
    for overwrite in (False, True):
        result = predict_files(sorted(inputs.iterdir()), _predict_config(model_2d, out, overwrite=overwrite))
        assert sorted(c["case"] for c in result.cases) == sorted(f"{n}_" for n in names)
        assert (out / "summary.json").is_file() and (out / "summary.json_").is_dir()
    ranking = tmp_path / "ranking"
    rank_files(sorted(inputs.iterdir()), _predict_config(model_2d, ranking), save_predictions=True)
    assert (ranking / "ranking.json").is_file() and (ranking / "ranking.json_").is_dir()
    assert safe_case_name("Summary.JSON") == "Summary.JSON_" and safe_case_name("summary") == "summary"


def test_folders_and_files_in_the_way_of_outputs_are_named(tmp_path, model_2d, capsys):
    from buseg.cli import main

    image = tmp_path / "in" / "a.nrrd"
    write_image(_case().image, image)
    args = ["--model", str(model_2d), "--num-threads", "1", "--progress", "jsonl"]
    # --out is a file
    not_a_folder = tmp_path / "out.txt"
    not_a_folder.write_text("mine")
    assert main(["predict", str(image), "--out", str(not_a_folder), *args]) == 2
    error = _error_event(capsys.readouterr().out)
    assert error["path"] == str(not_a_folder) and "is a file, but it must be a folder" in error["message"]
    from buseg.errors import OutputError
    from buseg.training.loop import prepare_output_folder

    with pytest.raises(OutputError, match="is a file, but it must be a folder"):
        prepare_output_folder(not_a_folder / "run", resume=False, overwrite=False)
    assert not_a_folder.read_text() == "mine"
    # a case's folder is a file
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("mine")
    assert main(["predict", str(image), "--out", str(out), *args, "--overwrite"]) == 2
    error = _error_event(capsys.readouterr().out)
    assert error["path"] == str(out / "a") and "is a file, but it must be a folder" in error["message"]
    assert (out / "a").read_text() == "mine"
    # a folder where buseg writes a file (left by an earlier version's case 'summary.json')
    (out / "a").unlink()
    (out / "summary.json").mkdir()
    assert main(["predict", str(image), "--out", str(out), *args, "--overwrite"]) == 2
    error = _error_event(capsys.readouterr().out)
    assert error["path"] == str(out / "summary.json") and "is a folder" in error["message"]


def test_a_lock_whose_process_id_now_belongs_to_another_process_is_taken_over(tmp_path):
    import subprocess

    import psutil

    from buseg.errors import OutputError
    from buseg.files.safe_files import FolderLock

    lock = tmp_path / "buseg.lock"
    sleeper = subprocess.Popen(["sleep", "60"])  # alive, and no buseg job (pid 1 after a restart)
    python = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(python.pid).create_time()
        for owner, live in [
            (f"{sleeper.pid}\nbuseg predict\n", False),  # an earlier version's lock: no start time
            (f"{python.pid}\nbuseg predict\n{started - 3600!r}\n", False),  # the id was reused
            (f"{python.pid}\nbuseg predict\n{started!r}\n", True),  # its owner runs
        ]:
            lock.write_text(owner)
            if live:
                with pytest.raises(OutputError, match=f"process {python.pid}") as error:
                    FolderLock(tmp_path).acquire()
                assert f"delete the lock file {lock}" in error.value.hint and lock.read_text() == owner
            else:
                with FolderLock(tmp_path):
                    pid, _, when = lock.read_text().splitlines()
                    assert int(pid) == os.getpid()
                    assert float(when) == psutil.Process().create_time()
                assert not lock.exists()
    finally:
        for process in (sleeper, python):
            process.kill()
            process.wait()
    # An empty lock: another job has just created it (refused), or was killed while writing it (taken over).
    lock.write_text("")
    with pytest.raises(OutputError, match="another job is writing"):
        FolderLock(tmp_path).acquire()
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with FolderLock(tmp_path):
        assert lock.read_text().startswith(f"{os.getpid()}\n")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "-1"),
        ("--weight-decay", "-1"),
        ("--base-channels", "0"),
        ("--momentum", "5"),
        ("--consistency-weight", "-5"),
        ("--self-training-lr", "0"),
        ("--seed", "-1"),
    ],
)
def test_numbers_out_of_their_range_are_refused_by_flag(tmp_path, capsys, flag, value):
    from buseg.cli import main

    argv = [
        "train",
        "--labeled",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "run"),
        "--progress",
        "jsonl",
    ]
    assert main([*argv, flag, value]) == 2
    error = _error_event(capsys.readouterr().out)
    assert error["kind"] == "ConfigError" and error["message"].startswith(flag), error
    assert not (tmp_path / "run").exists()


def test_demo_refuses_a_negative_seed(tmp_path, capsys):
    from buseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--seed", "-1", "--out", str(tmp_path / "demo")])
    assert exit_info.value.code == 2 and "--seed" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_an_image_given_as_labeled_data_is_named_as_such(tmp_path):
    case = _case()
    labeled = _labeled_folder(tmp_path / "labeled", case.image, case.label)
    with pytest.raises(InputError, match=r"is an image file, not a folder \(expected a folder with 'images'"):
        _load(_config(labeled / "images" / "a.nrrd"))


def test_a_label_file_without_its_image_is_refused_like_an_image_without_its_label(tmp_path):
    case = _case()
    labeled = _labeled_folder(tmp_path / "labeled", case.image, case.label)
    write_image(case.label, labeled / "labels" / "b_label.nrrd")
    with pytest.raises(InputError, match="no image for this label file") as error:
        _load(_config(labeled))
    assert error.value.path == str(labeled / "labels" / "b_label.nrrd")


def test_a_csv_manifest_with_a_byte_order_mark_is_read(tmp_path):
    case = _case()
    labeled = _labeled_folder(tmp_path / "labeled", case.image, case.label)
    manifest = labeled / "cases.csv"  # as spreadsheet programs write it: a UTF-8 byte-order mark first
    manifest.write_text("\ufeffimage,label\nimages/a.nrrd,labels/a.nrrd\n", encoding="utf-8")
    assert _load(_config(manifest)).labeled_case_names == ["a"]


def test_window_counts_are_estimated_before_the_windows_are_made():
    from monai.data.utils import dense_patch_slices

    from buseg.prediction.windows import scan_interval, window_count

    for size, roi, overlap in [
        ((32, 64, 64), (16, 16, 16), 0.999),
        ((17, 50, 33), (16, 16, 16), 0.5),
        ((8,) * 3, (8,) * 3, 0.9),
    ]:
        steps = scan_interval(size, roi, overlap, None)
        assert window_count(size, roi, steps) == len(dense_patch_slices(size, roi, steps))
    assert (
        window_count((32, 64, 64), (16, 16, 16), scan_interval((32, 64, 64), (16,) * 3, 0.999, None)) == 40817
    )


class _Events:
    def __init__(self):
        self.warnings = []

    def emit(self, event, **fields):
        if event == "warning":
            self.warnings.append(fields["message"])

    def close(self):
        pass


def test_dense_sliding_windows_are_announced_with_progress_or_refused(tmp_path, monkeypatch, caplog):
    from buseg.prediction import windows

    model = _model_file(tmp_path / "m" / "model3d.pt", "3d")  # 16x16x16 windows
    image = Volume(
        np.random.default_rng(0).normal(size=(64, 96, 96)).astype(np.float32), (1, 1, 1), (0, 0, 0), IDENTITY
    )
    write_image(image, tmp_path / "in" / "big.nrrd")
    deadline = time.perf_counter() + 20  # the code before this check ran 320 000 windows for minutes
    events = _Events()
    with pytest.raises(InputError, match=r"--overlap 0\.999 gives 321489 windows") as error:
        predict_files(
            [tmp_path / "in" / "big.nrrd"],
            _predict_config(model, tmp_path / "out", overlap=0.999),
            events=events,
            should_stop=lambda: time.perf_counter() > deadline,
        )
    assert error.value.path == str(tmp_path / "in" / "big.nrrd") and "lower --overlap" in error.value.hint
    # Fewer, but still many windows: said beforehand, with progress on the log while they run.
    monkeypatch.setattr(windows, "MANY_WINDOWS", 20)
    monkeypatch.setattr(windows, "WINDOW_PROGRESS_SECONDS", 0.0)
    events = _Events()
    small = tmp_path / "in2" / "small.nrrd"
    write_image(Volume(image.array[:24, :40, :40].copy(), (1, 1, 1), (0, 0, 0), IDENTITY), small)
    with caplog.at_level("INFO", logger="buseg"):
        predict_files([small], _predict_config(model, tmp_path / "out2", overlap=0.5), events=events)
    assert any("--overlap 0.5 gives 32 windows" in w and "this takes a while" in w for w in events.warnings)
    assert any(
        "sliding windows: " in r.getMessage() and " of 32 done" in r.getMessage() for r in caplog.records
    )


def test_evaluate_warns_when_the_truths_classes_json_names_values_otherwise_than_the_model(
    tmp_path, model_2d
):
    from buseg.evaluation.evaluate import evaluate_files

    case = _case()
    write_image(case.image, tmp_path / "in" / "a.nrrd")
    predict_files([tmp_path / "in" / "a.nrrd"], _predict_config(model_2d, tmp_path / "pred"))
    truth = tmp_path / "truth"
    write_image(case.label, truth / "labels" / "a.nrrd")
    for names, warned in ([{"1": "liver", "2": "tumour"}, False], [{"1": "tumour", "2": "liver"}, True]):
        (truth / "classes.json").write_text(json.dumps(names))
        events = _Events()
        evaluate_files([tmp_path / "pred"], [truth], tmp_path / "eval", overwrite=True, events=events)
        renamed = [w for w in events.warnings if "name label values differently" in w]
        assert bool(renamed) == warned, events.warnings
    assert "1 is 'tumour' in the ground truth but 'liver' in the predictions" in renamed[0]
    # A classes.json there is checked as training checks it.
    (truth / "classes.json").write_text(json.dumps({"1": ["liver"]}))
    with pytest.raises(InputError, match="not text"):
        evaluate_files([tmp_path / "pred"], [truth], tmp_path / "eval", overwrite=True)
