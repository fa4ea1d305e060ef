"""The working resolution: training volumes resampled to ``model.working_spacing_mm``, predictions
made there and brought back to the input's exact grid; the ``--preset`` mechanism."""

from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import torch

from buseg.cli import build_parser
from buseg.commands.train import config_from_args
from buseg.config import TRAIN_PRESETS, PredictConfig, TrainConfig, apply_preset
from buseg.data.resample import (
    Grid,
    image_on_working_grid,
    maps_on_grid,
    model_working_spacing,
    resample_label_array,
    working_grid,
)
from buseg.data.synthetic import write_dataset
from buseg.data.training_data import load_training_data
from buseg.errors import ConfigError
from buseg.files.images import Volume, read_image, read_label
from buseg.model.checkpoint import load_model, save_checkpoint
from buseg.model.networks import build_network
from buseg.prediction.case import predict_case
from buseg.prediction.predict_files import predict_files
from buseg.training.loop import train

SPACING = (1.2, 1.2, 2.5)
WORKING = [2.4, 2.4, 2.5]  # half the voxels along x and y, z unchanged


def _oblique_grid(shape_zyx: tuple[int, int, int], spacing) -> Grid:
    a = np.deg2rad(20)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return Grid(shape_zyx, tuple(spacing), (-31.5, 12.25, 80.0), tuple(rotation.ravel()))


def test_label_round_trip_at_the_same_spacing_is_the_identity():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(7, 19, 23)).astype(np.uint8)  # every voxel its own boundary
    grid = _oblique_grid(labels.shape, (0.7, 1.1, 3.0))
    same = working_grid(grid, grid.spacing_mm)
    assert same == grid
    assert np.array_equal(resample_label_array(labels, grid, same), labels)


def test_working_grid_covers_the_same_field_of_view_centred():
    grid = _oblique_grid((10, 40, 31), (0.625, 0.625, 0.625))
    coarse = working_grid(grid, [1.25, 1.25, 1.25])
    assert coarse.shape == (5, 20, 16) and coarse.direction == grid.direction

    def centre(g: Grid) -> np.ndarray:
        direction = np.array(g.direction).reshape(3, 3)
        half_extent = (np.array(g.shape[::-1]) - 1) * np.array(g.spacing_mm) / 2
        return np.array(g.origin) + direction @ half_extent

    assert np.allclose(centre(coarse), centre(grid), atol=1e-9)


def test_probabilities_come_back_on_the_input_grid_with_its_boundaries():
    grid = _oblique_grid((12, 32, 32), (0.625, 0.625, 0.625))
    _, y, x = np.mgrid[:12, :32, :32]
    truth = (((x - 15.5) ** 2 + (y - 15.5) ** 2) < 10.0**2).astype(np.uint8)  # a cylinder
    coarse_grid = working_grid(grid, [1.25, 1.25, 1.25])
    coarse_labels = resample_label_array(truth, grid, coarse_grid)
    probabilities = np.stack([coarse_labels == 0, coarse_labels == 1]).astype(np.float32)
    labels, uncertainty, kept = maps_on_grid(probabilities, coarse_grid, grid, keep_probabilities=True)
    assert (
        labels.shape == truth.shape and uncertainty.shape == truth.shape and kept.shape == (2, *truth.shape)
    )
    assert (labels == truth).mean() > 0.97
    assert np.allclose(kept.sum(axis=0), 1.0, atol=1e-5)
    assert uncertainty.min() >= 0.0 and uncertainty.max() <= 1.0
    assert uncertainty[truth == labels].mean() < uncertainty[truth != labels].mean()  # unsure at the border


def _config(data, out) -> TrainConfig:
    config = TrainConfig()
    config.method.name = "supervised"
    config.data.labeled = str(data["labeled"])
    config.data.validation = str(data["validation"])
    config.model.dimension = "3d"
    config.model.base_channels = 4
    config.model.patch_size = [16, 16, 16]
    config.model.working_spacing_mm = list(WORKING)
    config.optim.iterations = 4
    config.optim.batch_size = 2
    config.validation_interval = 4
    config.checkpoint_interval = 1000
    config.out_dir = str(out)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("working")
    data = write_dataset(
        root / "data",
        labeled=2,
        unlabeled=0,
        test=1,
        validation=1,
        shape_zyx=(16, 40, 36),
        spacing_mm=SPACING,
    )
    config = _config(data, root / "run")
    loaded = load_training_data(config, log=lambda message: None)
    result = train(config.validate(), data=copy.deepcopy(loaded))
    return data, loaded, result


def test_training_data_and_the_model_file_are_at_the_working_spacing(trained):
    data, loaded, result = trained
    native = read_image(next((data["labeled"] / "images").iterdir()))
    assert native.array.shape == (16, 40, 36)
    assert loaded.labeled_images[0].shape == (16, 20, 18) == loaded.labeled_labels[0].shape
    assert loaded.spacing_mm == WORKING
    # Validation: the network sees the working grid, the score compares with the labels as drawn.
    case = loaded.validation[0]
    assert case.image.shape == (16, 20, 18) and case.labels.shape == (16, 40, 36)
    assert case.to_case_grid(torch.rand(3, 16, 20, 18)).shape == (3, 16, 40, 36)
    assert result.history["validation"], "validation ran"
    model = load_model(result.model_path)
    assert model.metadata["spacing_mm"] == WORKING
    assert model_working_spacing(model.metadata) == WORKING


def test_prediction_runs_on_the_working_grid_and_outputs_keep_the_input_geometry(trained, tmp_path):
    data, _, result = trained
    image_path = next((data["test"] / "images").iterdir())
    image = read_image(image_path)
    model = load_model(result.model_path)
    config = PredictConfig(model_path=str(result.model_path), out_dir=str(tmp_path / "out"), num_threads=1)

    prediction = predict_case(model, image, config, keep_probabilities=True)
    working = image_on_working_grid(image, WORKING)
    coarse = predict_case(model, working, config, keep_probabilities=True)
    assert coarse.labels.shape == (16, 20, 18)
    expected = maps_on_grid(coarse.probabilities, Grid.of(working), Grid.of(image), keep_probabilities=True)
    assert np.array_equal(prediction.labels, expected[0])
    assert np.allclose(prediction.uncertainty_map, expected[1], atol=1e-6)
    assert np.allclose(prediction.probabilities, expected[2], atol=1e-6)
    assert prediction.reference.same_grid(image) is None

    outcome = predict_files([image_path], config)
    outputs = {k: tmp_path / "out" / v for k, v in outcome.cases[0]["outputs"].items()}
    for written in (read_label(outputs["label"]), read_image(outputs["uncertainty"])):
        assert written.array.shape == image.array.shape
        assert written.same_grid(image, tolerance=1e-5) is None


def test_a_model_file_without_a_working_spacing_still_loads_and_predicts_at_the_input_grid(tmp_path):
    torch.manual_seed(0)
    network = build_network("vnet", in_channels=1, num_classes=2, base_channels=4)
    old_config = {"model": {"dimension": "3d", "patch_size": [16, 16, 16]}, "seed": 1337}
    metadata = {
        "method": "supervised",
        "dimension": "3d",
        "normalization": "zscore",
        "patch_size": [16, 16, 16],
        "spacing_mm": [1.0, 1.0, 1.0],
        "network": {"name": "vnet", "in_channels": 1, "num_classes": 2, "base_channels": 4, "dropout": True},
        "classes": [
            {"index": 0, "name": "background", "label_value": 0, "color": [0, 0, 0]},
            {"index": 1, "name": "organ", "label_value": 1, "color": [1, 0, 0]},
        ],
        "config": old_config,  # written before model.working_spacing_mm existed
    }
    path = tmp_path / "old.pt"
    save_checkpoint(path, weights=network.state_dict(), metadata=metadata)
    model = load_model(path)
    assert model_working_spacing(model.metadata) is None
    rng = np.random.default_rng(1)
    image = Volume(
        rng.normal(size=(16, 24, 20)).astype(np.float32), (2.0, 2.0, 2.0), (0, 0, 0), tuple(np.eye(3).ravel())
    )
    prediction = predict_case(model, image, PredictConfig(model_path=str(path)))
    assert prediction.labels.shape == image.array.shape


def _write_la(root, cases: list[str], shape_xyz=(40, 32, 24)) -> None:
    rng = np.random.default_rng(2)
    (root / "train.list").write_text("\n".join(cases) + "\n")
    for case in cases:
        folder = root / "volumes" / case
        folder.mkdir(parents=True)
        label = np.zeros(shape_xyz, dtype=np.uint8)
        label[10:30, 8:24, 6:18] = 1
        with h5py.File(folder / "mri_norm2.h5", "w") as handle:
            handle["image"] = (rng.normal(size=shape_xyz) + 2 * label).astype(np.float32)
            handle["label"] = label


def test_the_la_loader_honours_the_working_spacing(tmp_path):
    _write_la(tmp_path, ["a", "b", "c", "d"])
    (tmp_path / "val.list").write_text("d\n")
    config = TrainConfig()
    config.data.source, config.data.data_root, config.data.labeled_count = "la", str(tmp_path), 2
    config.data.validation = str(tmp_path / "val.list")
    config.model.dimension = "3d"
    config.model.working_spacing_mm = [1.25, 1.25, 1.25]
    loaded = load_training_data(config, log=lambda message: None)
    assert loaded.spacing_mm == [1.25, 1.25, 1.25]
    assert loaded.labeled_images[0].shape == (12, 16, 20) == loaded.labeled_labels[0].shape
    assert loaded.unlabeled_images[0].shape == (12, 16, 20)
    assert loaded.labeled_labels[0].sum() == 10 * 8 * 6  # the box, halved along each side
    assert loaded.validation[0].image.shape == (12, 16, 20) and loaded.validation[0].labels.shape == (
        24,
        32,
        40,
    )
    config.model.working_spacing_mm = []
    assert load_training_data(config, log=lambda message: None).labeled_images[0].shape == (24, 32, 40)


def test_a_preset_fills_the_config_and_explicit_flags_override_it():
    parser = build_parser()
    args = parser.parse_args(["train", "--preset", "cpu-3d", "--labeled", "x", "--base-channels", "16"])
    config = config_from_args(args)
    preset = TRAIN_PRESETS["cpu-3d"]
    assert config.model.dimension == "3d"
    assert config.model.working_spacing_mm == preset["model.working_spacing_mm"]
    assert config.model.patch_size == preset["model.patch_size"]
    assert config.optim.iterations == preset["optim.iterations"]
    assert config.model.base_channels == 16 != preset["model.base_channels"]
    assert config_from_args(parser.parse_args(["train", "--labeled", "x"])).model.working_spacing_mm == []
    # The console API and the Slicer module fill the same object.
    assert (
        apply_preset(TrainConfig(), "cpu-3d").model.working_spacing_mm == preset["model.working_spacing_mm"]
    )
    with pytest.raises(ConfigError, match="not a preset"):
        apply_preset(TrainConfig(), "gpu-9d")


@pytest.mark.parametrize("spacing", [[1.0, 1.0], [1.0, 0.0, 1.0]])
def test_a_bad_working_spacing_is_refused(spacing):
    config = TrainConfig()
    config.data.labeled = "x"
    config.model.working_spacing_mm = spacing
    with pytest.raises(ConfigError, match="--working-spacing-mm"):
        config.validate()
