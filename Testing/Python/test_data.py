"""Reading training data: folders, manifests, .seg.nrrd names, label mapping, geometry, benchmark layouts."""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pytest
import torch

from buseg.config import TrainConfig
from buseg.data.sampling import PatchSampler, SliceSampler
from buseg.data.sources.acdc import acdc_split
from buseg.data.synthetic import make_case, rotation_direction
from buseg.data.training_data import load_training_data
from buseg.errors import ConfigError, InputError
from buseg.files.images import Volume, read_image, read_label, write_image, write_segmentation


def _config(labeled, unlabeled=None, dimension="2d") -> TrainConfig:
    c = TrainConfig()
    c.data.labeled = str(labeled)
    c.data.unlabeled = str(unlabeled) if unlabeled else None
    c.model.dimension = dimension
    c.method.name = "supervised" if unlabeled is None else "bcp"
    return c


def test_folder_with_class_names(tiny_dataset):
    data = load_training_data(_config(tiny_dataset["labeled"], tiny_dataset["unlabeled"]), log=lambda m: None)
    assert [c["name"] for c in data.classes] == ["background", "shell", "core", "satellite"]
    assert len(data.labeled_images) == 2 * 16  # two volumes cut into 16 axial slices
    assert len(data.unlabeled_images) == 3 * 16
    assert all(
        img.dtype == np.float32 and img.min() >= 0.0 and img.max() <= 1.0 for img in data.labeled_images
    )
    assert set(np.unique(np.concatenate([lab.ravel() for lab in data.labeled_labels]))) == {0, 1, 2, 3}
    assert data.spacing_mm == pytest.approx([1.2, 1.2, 2.5])


def test_slice_axis_cuts_along_the_chosen_image_axis(tiny_dataset):
    config = _config(tiny_dataset["labeled"])
    config.model.slice_axis = 0  # x: slices are (z, y) planes
    data = load_training_data(config, log=lambda m: None)
    assert len(data.labeled_images) == 2 * 48 and data.labeled_images[0].shape == (16, 48)


def _write_pair(root, name, case, *, label_path=None):
    write_image(case.image, root / "images" / f"{name}.nrrd")
    write_image(case.label, label_path or root / "labels" / f"{name}.nrrd")


def test_seg_nrrd_labels_map_classes_by_segment_name(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "lab"
    for index, order in enumerate([(1, 2, 3), (3, 1, 2)]):
        case = make_case(rng, (12, 32, 32))
        write_image(case.image, root / "images" / f"c{index}.nrrd")
        # The two files list the same segments in a different order (so different label values).
        names = {1: "shell", 2: "core", 3: "satellite"}
        classes = [
            {"index": value, "name": names[value], "color": [0.1 * value, 0.2, 0.3]} for value in order
        ]
        write_segmentation(case.label.array, case.image, classes, root / "labels" / f"c{index}.seg.nrrd")
    label = read_label(root / "labels" / "c1.seg.nrrd")
    assert label.segments[1]["name"] == "satellite"
    data = load_training_data(_config(root), log=lambda m: None)
    names = [c["name"] for c in data.classes]
    assert names[0] == "background" and sorted(names[1:]) == ["core", "satellite", "shell"]
    # The same anatomy gets the same class index in both cases, whatever the file's values.
    shell = names.index("shell")
    first, second = data.labeled_labels[:12], data.labeled_labels[12:]
    original = [make_case(np.random.default_rng(0), (12, 32, 32)).label.array]
    assert (np.stack(first) == shell).sum() == (original[0] == 1).sum()
    assert (np.stack(second) == shell).sum() > 0


def test_json_manifest_with_declared_classes(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path
    cases = [make_case(rng, (10, 32, 32)) for _ in range(3)]
    for i, case in enumerate(cases):
        write_image(case.image, root / f"img{i}.nii.gz")
        write_image(case.label, root / f"lab{i}.nii.gz")
    manifest = {
        "labeled": [{"image": "img0.nii.gz", "label": "lab0.nii.gz"}],
        "unlabeled": ["img1.nii.gz"],
        "validation": [{"image": "img2.nii.gz", "label": "lab2.nii.gz"}],
        "classes": [
            {"value": 1, "name": "A"},
            {"value": 2, "name": "B", "color": [1, 0, 0]},
            {"value": 3, "name": "C"},
        ],
    }
    (root / "m.json").write_text(json.dumps(manifest))
    config = _config(root / "m.json")
    config.method.name = "bcp"
    data = load_training_data(config, log=lambda m: None)
    assert [c["name"] for c in data.classes] == ["background", "A", "B", "C"]
    assert data.classes[2]["color"] == [1, 0, 0]
    assert len(data.validation) == 1 and len(data.unlabeled_images) == 10
    # A value the declared classes do not list is refused, naming the file.
    manifest["classes"] = manifest["classes"][:2]
    (root / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"lab0\.nii\.gz.*does not declare"):
        load_training_data(config, log=lambda m: None)


def test_csv_manifest_and_its_errors(tmp_path):
    rng = np.random.default_rng(2)
    case = make_case(rng, (10, 32, 32))
    write_image(case.image, tmp_path / "a.nrrd")
    write_image(case.label, tmp_path / "a_label.nrrd")
    write_image(case.image, tmp_path / "b.nrrd")
    (tmp_path / "m.csv").write_text("image,label,split\na.nrrd,a_label.nrrd,labeled\nb.nrrd,,unlabeled\n")
    config = _config(tmp_path / "m.csv")
    config.method.name = "bcp"
    data = load_training_data(config, log=lambda m: None)
    assert len(data.labeled_images) == 10 and len(data.unlabeled_images) == 10
    (tmp_path / "m.csv").write_text("image,label\na.nrrd,a_label.nrrd\nmissing.nrrd,\n")
    with pytest.raises(InputError, match="line 3: file not found"):
        load_training_data(config, log=lambda m: None)
    (tmp_path / "m.csv").write_text("image,label,split\na.nrrd,a_label.nrrd,labeled\na.nrrd,,unlabeled\n")
    with pytest.raises(InputError, match="both as labeled and as unlabeled"):
        load_training_data(config, log=lambda m: None)


def test_label_off_the_image_grid_is_refused_or_resampled(tmp_path):
    rng = np.random.default_rng(3)
    case = make_case(rng, (10, 32, 32))
    root = tmp_path / "lab"
    write_image(case.image, root / "images" / "a.nrrd")
    origin = tuple(np.add(case.label.origin, (0.0, 0.0, 2.5)))  # one slice off
    shifted = Volume(case.label.array, case.label.spacing_mm, origin, case.label.direction)
    write_image(shifted, root / "labels" / "a.nrrd")
    config = _config(root)
    with pytest.raises(InputError, match=r"a\.nrrd: label does not lie on its image's voxel grid \(origin"):
        load_training_data(config, log=lambda m: None)
    config.data.resample_labels_to_image = True
    data = load_training_data(config, log=lambda m: None)
    assert len(data.labeled_images) == 10


def test_image_geometry_round_trip(tmp_path):
    case = make_case(
        np.random.default_rng(4),
        (8, 20, 24),
        spacing_mm=(0.7, 0.9, 3.0),
        direction=rotation_direction(30),
        origin=(-12.5, 40.0, 7.25),
    )
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        path = tmp_path / f"img{suffix}"
        write_image(case.image, path)
        back = read_image(path)
        assert back.same_grid(case.image) is None, suffix
        np.testing.assert_allclose(back.array, case.image.array, rtol=1e-6)
    with pytest.raises(Exception, match="exists already"):
        write_image(case.image, tmp_path / "img.nrrd")


def test_acdc_and_la_layouts(tmp_path):
    acdc = tmp_path / "ACDC"
    (acdc / "data").mkdir(parents=True)
    slices = [f"patient{p:03d}_frame01_slice_{s}" for p in range(1, 6) for s in range(1, 3)]
    (acdc / "train_slices.list").write_text("\n".join(slices) + "\n")
    (acdc / "val.list").write_text("patient090_frame01\n")
    rng = np.random.default_rng(5)
    for name in slices:
        with h5py.File(acdc / "data" / f"{name}.h5", "w") as f:
            f["image"] = rng.random((40, 36)).astype(np.float32)
            f["label"] = rng.integers(0, 4, (40, 36)).astype(np.uint8)
    with h5py.File(acdc / "data" / "patient090_frame01.h5", "w") as f:
        f["image"] = rng.random((3, 40, 36)).astype(np.float32)
        f["label"] = rng.integers(0, 4, (3, 40, 36)).astype(np.uint8)
    labeled, unlabeled = acdc_split(acdc, 2)
    assert labeled == slices[:4] and unlabeled == slices[4:]
    config = TrainConfig()
    config.data.source, config.data.data_root, config.data.labeled_count = "acdc", str(acdc), 2
    config.method.name = "bcp"
    data = load_training_data(config, log=lambda m: None)
    assert len(data.labeled_images) == 4 and len(data.unlabeled_images) == 6 and len(data.validation) == 1
    assert [c["name"] for c in data.classes][1:] == ["right ventricle", "myocardium", "left ventricle"]

    la = tmp_path / "LA"
    names = [f"case{i}" for i in range(5)]
    (la / "train.list").parent.mkdir(parents=True)
    (la / "train.list").write_text("\n".join(names) + "\n")
    for name in names:
        (la / "volumes" / name).mkdir(parents=True)
        with h5py.File(la / "volumes" / name / "mri_norm2.h5", "w") as f:
            f["image"] = rng.random((30, 20, 10)).astype(np.float32)  # (x, y, z)
            f["label"] = (rng.random((30, 20, 10)) > 0.5).astype(np.uint8)
    (tmp_path / "val.list").write_text("case4\n")
    config = TrainConfig()
    config.data.source, config.data.data_root, config.data.labeled_count = "la", str(la), 2
    config.data.validation = str(tmp_path / "val.list")
    config.model.dimension = "3d"
    config.method.name = "bcp"
    data = load_training_data(config, log=lambda m: None)
    assert data.labeled_images[0].shape == (10, 20, 30)  # numpy (z, y, x)
    assert len(data.unlabeled_images) == 2 and [v.name for v in data.validation] == ["case4"]
    # Z-scored as the model file says (data.normalization) and as prediction does: the stored
    # values (uniform 0..1 here, mean 0.5) are not what `buseg predict` would feed the network.
    assert data.normalization == "zscore"
    for volume in [*data.labeled_images, *data.unlabeled_images, data.validation[0].image]:
        assert abs(float(volume.mean())) < 1e-4 and abs(float(volume.std()) - 1) < 1e-3


def test_samplers_keep_class_indices_above_255():
    # uint8 storage would wrap class 300 to 44 (and 256 to background) without a word.
    generator = torch.Generator().manual_seed(0)
    volume = np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)
    labels = np.full((4, 16, 16), 300, dtype=np.int32)
    labels[:, :8] = 256
    for sampler in (
        SliceSampler(list(volume), list(labels), (16, 16), augment=False),
        PatchSampler([volume], [labels], (4, 16, 16), augment=False),
    ):
        _, targets = sampler.sample(2, generator)
        assert set(torch.unique(targets).tolist()) == {256, 300}


def test_a_registered_data_source_is_offered_checked_and_read_with_no_other_edit(dataset_copy, monkeypatch):
    """A data source is one catalog entry naming its reader: ``--source`` offers it, the config checks
    what the entry says (``--data-root``, the dimension) and ``load_training_data`` calls its reader."""
    from buseg.catalogs import data_sources
    from buseg.cli import build_parser

    calls = []

    def reader(config, log):
        calls.append(config.data.source)
        return "the data"

    monkeypatch.setattr(sys.modules[__name__], "throwaway_reader", reader, raising=False)
    data_sources.register(
        data_sources.DataSource(
            "throwaway",
            f"{__name__}:throwaway_reader",
            "a test's",
            dimension="3d",
            needs_data_root=True,
            options=("data.data_root",),
        )
    )
    try:
        train = build_parser()._subparsers._group_actions[0].choices["train"]
        source = next(a for a in train._actions if a.dest == "data.source")
        assert "throwaway" in source.choices and "'throwaway': a test's" in source.help
        config = TrainConfig()
        config.data.source = "throwaway"
        with pytest.raises(ConfigError, match="--data-root is required with --source throwaway"):
            config.validate()
        config.data.data_root = str(dataset_copy["labeled"])
        config.model.dimension, config.model.patch_size = "3d", [32, 32, 16]
        config.validate()
        assert load_training_data(config) == "the data" and calls == ["throwaway"]
        config.model.dimension = "2d"
        with pytest.raises(ConfigError, match="throwaway data are 3D training data: use --dimension 3d"):
            load_training_data(config)
    finally:
        data_sources.unregister("throwaway")
    assert "throwaway" not in data_sources.data_source_names()


def test_options_of_the_benchmark_layouts_are_grouped_apart_and_refused_elsewhere(dataset_copy):
    """``--labeled-count`` and its kind belong to the data sources that read them: ``--help`` lists them
    under those sources, and a run from the user's folders refuses them instead of ignoring them."""
    from buseg.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    groups = {group.title: {a.dest for a in group._group_actions} for group in train._action_groups}
    assert groups["options of --source acdc and la"] == {
        "data.data_root",
        "data.labeled_count",
        "data.exclude_cases",
    }
    config = TrainConfig()
    config.data.labeled = str(dataset_copy["labeled"])
    config.validate()  # the defaults of those options are no request
    config.data.labeled_count = 3
    with pytest.raises(
        ConfigError, match="--labeled-count is read only with --source acdc or la, not with --source files"
    ):
        config.validate()
    config.data.source, config.data.data_root = "acdc", "/somewhere"
    config.validate()
