"""Property-based tests (hypothesis) of the readers and of prediction over random inputs (issue 8).

For random shapes (including 2D, 4D, one-voxel-thin and tiny volumes), voxel spacings,
orientations (rotations and flips), pixel types, RGB/vector pixels, NaN/infinity and file
formats, and for randomly truncated or overwritten files, every call either succeeds with
the right geometry and values or raises a :class:`~buseg.errors.BusegError` that names the
file - never another exception, never a crash, never a wrong grid. Example counts are small
(the whole file runs in well under a minute); ``HYPOTHESIS_PROFILE=thorough`` runs more.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buseg.config import PredictConfig
from buseg.errors import BusegError
from buseg.files.images import Volume, read_image, read_label, write_segmentation
from buseg.model.checkpoint import save_checkpoint
from buseg.model.networks import build_network
from buseg.prediction.predict_files import predict_files

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
FUZZ = settings(
    max_examples=1000 if THOROUGH else 150,
    deadline=None,
    derandomize=not THOROUGH,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64)


def _rotation(angles, flip: bool) -> np.ndarray:
    a, b, c = angles
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx @ np.diag([1.0, 1.0, -1.0 if flip else 1.0])


@st.composite
def images(draw, *, valid_only: bool = False):
    """A random image as (array in numpy order, components, spacing, origin, direction) and what it should be."""
    ndim = 3 if valid_only else draw(st.sampled_from([3, 3, 3, 3, 2, 4]))
    shape = tuple(draw(st.lists(st.integers(1, 14), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    components = 1 if valid_only else draw(st.sampled_from([1, 1, 1, 1, 3]))
    spatial = min(ndim, 3)
    spacing = tuple(draw(st.lists(st.floats(0.05, 8.0), min_size=ndim, max_size=ndim)))
    origin = tuple(draw(st.lists(st.floats(-400.0, 400.0), min_size=ndim, max_size=ndim)))
    angles = draw(st.tuples(*[st.floats(-np.pi, np.pi)] * 3))
    rotation = _rotation(angles, draw(st.booleans()))[:spatial, :spatial] if spatial == 3 else np.eye(spatial)
    direction = np.eye(ndim)
    direction[:spatial, :spatial] = rotation
    if spatial == 3 and ndim == 3:
        direction = rotation
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    full = (*shape, components) if components > 1 else shape
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(max(info.min, -1000), min(info.max, 1000), size=full, endpoint=True).astype(
            dtype
        )
    else:
        array = (rng.normal(0, 100, size=full)).astype(dtype)
        special = draw(st.sampled_from([None, None, None, np.nan, np.inf]))
        if special is not None and not valid_only:
            array.flat[rng.integers(array.size)] = special
    return {
        "array": array,
        "components": components,
        "spacing": spacing,
        "origin": origin,
        "direction": tuple(direction.ravel()),
        "ndim": ndim,
    }


def _write(spec: dict, path: Path) -> None:
    image = sitk.GetImageFromArray(spec["array"], isVector=spec["components"] > 1)
    image.SetSpacing(spec["spacing"])
    image.SetOrigin(spec["origin"])
    image.SetDirection(spec["direction"])
    sitk.WriteImage(image, str(path), path.suffix == ".gz")


def _expected_volume(spec: dict) -> Volume:
    """The 3D volume a readable spec holds (a 4D image of one frame is its frame)."""
    if spec["ndim"] == 3:
        return Volume(spec["array"], spec["spacing"], spec["origin"], spec["direction"])
    direction = np.asarray(spec["direction"]).reshape(4, 4)[:3, :3]
    return Volume(spec["array"][0], spec["spacing"][:3], spec["origin"][:3], tuple(direction.ravel()))


def _expected_problems(spec: dict) -> list[str]:
    """What read_image must refuse (any one of them: the reader names the first it meets); [] when it must succeed."""
    problems = []
    if spec["components"] > 1:
        # ITK's NIfTI reader cannot read some vector images it writes ("maximum IO dimension is 5").
        problems += ["components per voxel", "cannot be read as an image"]
    if spec["ndim"] == 2:
        problems.append("2D image")
    if spec["ndim"] == 4 and spec["array"].shape[0] > 1:  # one frame is a 3D volume
        problems.append("4D image")
    if np.issubdtype(spec["array"].dtype, np.floating) and not np.isfinite(spec["array"]).all():
        problems.append("NaN or infinite")
    return problems


@pytest.fixture()
def small_memory(monkeypatch):
    """Pretend 1 GiB is free: a corrupt header that asks for more is refused before ITK allocates it."""
    import psutil

    real = psutil.virtual_memory

    class Memory:
        def __init__(self):
            self.__dict__.update(real()._asdict())
            self.available = 2**30

    monkeypatch.setattr(psutil, "virtual_memory", Memory)


@FUZZ
@given(spec=images(), suffix=st.sampled_from(SUFFIXES))
def test_read_image_returns_the_written_grid_or_a_clear_error(tmp_path_factory, spec, suffix):
    path = tmp_path_factory.mktemp("read") / f"image{suffix}"
    _write(spec, path)
    problems = _expected_problems(spec)
    try:
        volume = read_image(path)
    except BusegError as exc:
        assert str(path) in str(exc), exc
        assert any(problem in str(exc) for problem in problems), (problems, str(exc))
        return
    assert not problems, f"accepted although {problems}"
    expected = _expected_volume(spec)
    assert volume.array.dtype == np.float32 and volume.array.shape == expected.array.shape
    # NIfTI keeps geometry in float32 (and direction as a quaternion): a looser tolerance there.
    assert volume.same_grid(expected, tolerance=1e-4 if suffix.startswith(".nii") else 1e-6) is None
    np.testing.assert_allclose(volume.array, expected.array.astype(np.float32), rtol=1e-6)


def _damage(path, data, *, within_bytes: int | None = None) -> None:
    """Cut ``path`` short, or overwrite 1-8 random bytes (among the first ``within_bytes``)."""
    content = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        content = content[: data.draw(st.integers(0, len(content) - 1), label="length")]
    else:
        span = min(len(content), within_bytes or len(content))
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            content[data.draw(st.integers(0, span - 1), label="offset")] = data.draw(
                st.integers(0, 255), label="byte"
            )
    path.write_bytes(bytes(content))


@FUZZ
@given(spec=images(valid_only=True), suffix=st.sampled_from(SUFFIXES), data=st.data())
def test_damaged_files_are_read_whole_or_refused_naming_the_file(
    tmp_path_factory, small_memory, spec, suffix, data
):
    """Truncated files and files with random bytes overwritten (header or voxels)."""
    folder = tmp_path_factory.mktemp("damaged")
    path = folder / f"image{suffix}"
    _write(spec, path)
    _damage(path, data, within_bytes=600)  # mostly the header: where damage is not just another voxel value
    try:
        volume = read_image(path)
    except BusegError as exc:
        assert str(path) in str(exc), exc
        return
    # Whatever was read is a finite 3D float32 volume on a valid grid (a flipped voxel byte is
    # a different value: no reader can tell).
    assert volume.array.ndim == 3 and volume.array.dtype == np.float32 and np.isfinite(volume.array).all()
    assert all(s > 0 for s in volume.spacing_mm)


@FUZZ
@given(data=st.data())
def test_damaged_segmentations_are_read_whole_or_refused_naming_the_file(
    tmp_path_factory, small_memory, data
):
    folder = tmp_path_factory.mktemp("seg")
    shape = tuple(data.draw(st.lists(st.integers(1, 10), min_size=3, max_size=3), label="shape"))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    labels = rng.integers(0, 3, size=shape).astype(np.uint8)
    reference = Volume(
        np.zeros(shape, np.float32), (1.0, 0.5, 2.0), (3.0, -4.0, 5.0), tuple(np.eye(3).ravel())
    )
    path = folder / "labels.seg.nrrd"
    write_segmentation(labels, reference, [{"index": 1, "name": "a"}, {"index": 2, "name": "b"}], path)
    _damage(path, data)
    try:
        label = read_label(path)
    except BusegError as exc:
        assert str(path) in str(exc), exc
        return
    assert label.array.ndim == 3 and np.issubdtype(label.array.dtype, np.integer) and label.array.min() >= 0


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Untrained 2D and 3D models with two foreground classes whose label values differ from their indices."""
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for dimension, name, patch in (("2d", "unet2d", [32, 32]), ("3d", "vnet", [16, 16, 16])):
        torch.manual_seed(0)
        network = build_network(name, in_channels=1, num_classes=3, base_channels=2)
        metadata = {
            "method": "supervised",
            "dimension": dimension,
            "normalization": "zscore",
            "patch_size": patch,
            "slice_axis": 2,
            "network": {
                "name": name,
                "in_channels": 1,
                "num_classes": 3,
                "base_channels": 2,
                "dropout": True,
            },
            "classes": [
                {"index": i, "name": n, "label_value": v}
                for i, (n, v) in enumerate([("background", 0), ("a", 7), ("b", 200)])
            ],
        }
        paths[dimension] = folder / f"{dimension}.pt"
        save_checkpoint(paths[dimension], weights=network.state_dict(), metadata=metadata)
    return paths


@settings(
    max_examples=200 if THOROUGH else 30,
    deadline=None,
    derandomize=not THOROUGH,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=images(), suffix=st.sampled_from(SUFFIXES), dimension=st.sampled_from(["2d", "3d"]))
def test_predict_writes_outputs_on_the_inputs_grid_or_a_clear_error(
    tmp_path_factory, models, spec, suffix, dimension
):
    folder = tmp_path_factory.mktemp("predict")
    path = folder / f"case{suffix}"
    _write(spec, path)
    out = folder / "out"
    config = PredictConfig(
        model_path=str(models[dimension]), out_dir=str(out), num_threads=1, min_region_mm3=0.0
    )
    problems = _expected_problems(spec)
    try:
        result = predict_files([path], config)
    except BusegError as exc:
        assert str(path) in str(exc), exc
        assert any(problem in str(exc) for problem in problems), (problems, str(exc))
        assert not (out / "case").exists()  # no partial outputs
        return
    assert not problems, f"predicted although {problems}"
    image = read_image(path)
    outputs = {k: out / v for k, v in result.cases[0]["outputs"].items()}
    tolerance = 1e-4 if suffix.startswith(".nii") else 1e-6
    label = read_label(outputs["label"])
    uncertainty = read_image(outputs["uncertainty"])
    segmentation = read_label(outputs["segmentation"])
    for written in (label, uncertainty):
        assert written.same_grid(image, tolerance=tolerance) is None
    # .seg.nrrd stores the voxel-to-LPS matrix in decimal text: 1e-5 relative.
    assert segmentation.same_grid(image, tolerance=1e-4) is None
    assert set(np.unique(label.array)) <= {0, 7, 200}
    assert float(uncertainty.array.min()) >= 0.0 and float(uncertainty.array.max()) <= 1.0
    regions = json.loads(outputs["regions"].read_text())
    assert regions["geometry"]["size_ijk"] == list(image.size_xyz)
    for region in regions["regions"]:
        assert all(0 <= v < s for v, s in zip(region["bbox_ijk_max"], image.size_xyz, strict=True))
