"""The demo's population of generated scans (buseg.data.synthetic.draw_case): it varies what real scans
vary, within the ranges its docstring sources, the same seed gives the same cases, and a dataset of
it is laid out as the narrow generator's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from buseg.data.synthetic import SCANNERS, TINY_SCANNERS, Population, draw_case, write_population_dataset
from buseg.files.images import read_image, read_label


def _cases(count: int, population: Population = TINY_SCANNERS, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [draw_case(rng, population) for _ in range(count)]


def test_the_same_seed_gives_the_same_cases():
    first, second = _cases(2, seed=7), _cases(2, seed=7)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.image.array, b.image.array)
        np.testing.assert_array_equal(a.label.array, b.label.array)
        assert a.image.spacing_mm == b.image.spacing_mm


def test_cases_vary_in_grid_spacing_and_intensity_scale_within_the_ranges():
    cases = _cases(12)
    slice_spacings = [c.image.spacing_mm[2] for c in cases]
    matrices = [c.image.array.shape[1] for c in cases]
    slice_counts = [c.image.array.shape[0] for c in cases]
    maxima = [float(c.image.array.max()) for c in cases]
    low, high = TINY_SCANNERS.slice_spacing_mm
    assert all(low <= s <= high for s in slice_spacings)
    assert max(slice_spacings) / min(slice_spacings) > 2
    assert all(TINY_SCANNERS.matrix[0] <= m <= TINY_SCANNERS.matrix[1] for m in matrices)
    assert len(set(matrices)) > 3
    assert all(TINY_SCANNERS.slices[0] <= n <= TINY_SCANNERS.slices[1] for n in slice_counts)
    assert max(maxima) - min(maxima) > 100  # scanner scales and offsets differ by far more than contrast
    for case in cases:
        assert case.image.array.dtype == np.float32 and case.label.array.dtype == np.uint8
        assert case.image.array.shape == case.label.array.shape
        assert case.image.spacing_mm[0] == case.image.spacing_mm[1]


def test_every_structure_is_in_the_volume_and_the_core_inside_the_shell():
    cases = _cases(6, SCANNERS)
    assert len({c.label.array.shape[0] for c in cases}) > 3  # stacks of different slice counts
    for case in cases:
        label = case.label.array
        counts = np.bincount(label.ravel(), minlength=4)
        assert counts[1] > 0 and counts[2] > 0 and counts[3] > 0, counts
        # The core lies inside the shell: no core voxel touches the background in-plane.
        core = label == 2
        neighbours = np.zeros_like(core)
        for axis in (1, 2):
            for step in (-1, 1):
                neighbours |= np.roll(core, step, axis=axis)
        assert not np.any(neighbours & (label == 0) & ~core)


def test_contrast_and_noise_vary_by_an_order_of_magnitude_in_the_population():
    """Contrast-to-noise between shell and background, measured on the images: the population
    spans low-contrast (CT-like) to high-contrast (cine-MR-like) scans."""
    ratios = []
    for case in _cases(24, seed=1):
        image, label = case.image.array.astype(np.float64), case.label.array
        # Inner shell voxels (away from partial volume) against background far from any structure.
        shell, background = image[label == 1], image[label == 0]
        ratios.append(abs(np.median(shell) - np.median(background)) / background.std())
    assert max(ratios) / min(ratios) > 10


def test_a_population_dataset_is_laid_out_as_the_narrow_generators(tmp_path):
    folders = write_population_dataset(
        tmp_path, labeled=2, unlabeled=2, test=1, validation=1, population=TINY_SCANNERS, seed=3
    )
    assert set(folders) == {"labeled", "unlabeled", "test", "validation"}
    assert len(list((tmp_path / "labeled" / "images").glob("*.nii.gz"))) == 2
    assert len(list((tmp_path / "unlabeled").glob("*.nii.gz"))) == 2
    assert json.loads((tmp_path / "test" / "classes.json").read_text()) == {
        "1": "shell",
        "2": "core",
        "3": "satellite",
    }
    image = read_image(tmp_path / "validation" / "images" / "validation_000.nii.gz")
    label = read_label(tmp_path / "validation" / "labels" / "validation_000.nii.gz")
    assert image.array.shape == label.array.shape
    # Drawn in order labeled, unlabeled, test, validation: the first labeled case is the seed's first draw.
    first = draw_case(np.random.default_rng(3), TINY_SCANNERS)
    written = read_image(tmp_path / "labeled" / "images" / "labeled_000.nii.gz")
    np.testing.assert_allclose(written.array, first.image.array, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(SCANNERS.log_uniform))
def test_log_uniform_ranges_are_drawn_within_them(name):
    rng = np.random.default_rng(0)
    low, high = getattr(SCANNERS, name)
    values = [SCANNERS.draw(rng, name) for _ in range(200)]
    assert low <= min(values) and max(values) <= high
    # Log-uniform: about as many draws below the geometric mean as above it.
    below = sum(v < np.sqrt(low * high) for v in values)
    assert 60 < below < 140
