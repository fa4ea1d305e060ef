"""Shape and anatomy flags on hand-built label maps: each reason where it belongs, nowhere else."""

from __future__ import annotations

import numpy as np
import pytest

from buseg.errors import ConfigError
from buseg.prediction.shape_flags import (
    FLAG_ERROR_PROBABILITY,
    REASONS,
    expected_error_map,
    parse_nesting_rules,
    shape_flag_map,
)

NAMES = ["background", "wall", "cavity"]


def _code(reason: str) -> int:
    return 1 + REASONS.index(reason)


def _disc(shape_yx: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    y, x = np.indices(shape_yx)
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def _column(slices: int = 7, radius: float = 5.0) -> np.ndarray:
    """Class 1 as a disc of the same size on every slice (axis 0): nothing to flag."""
    labels = np.zeros((slices, 24, 24), dtype=np.uint8)
    labels[:, _disc((24, 24), (12, 12), radius)] = 1
    return labels


def test_a_smooth_structure_is_not_flagged():
    labels = _column()
    for k, radius in enumerate([3, 4, 5, 6, 6, 5, 4]):  # growing and shrinking gradually
        labels[k] = np.where(_disc((24, 24), (12, 12), radius), 1, 0)
    assert not shape_flag_map(labels, 2, 0).any()


def test_a_structure_missing_on_one_slice_is_flagged_where_its_neighbours_have_it():
    labels = _column()
    labels[3] = 0
    flags = shape_flag_map(labels, 2, 0)
    assert np.array_equal(flags[3] == _code("missing-on-slice"), labels[2] == 1)
    assert not np.delete(flags, 3, axis=0).any()


def test_a_structure_on_one_slice_only_is_flagged_as_extra():
    labels = np.zeros((5, 24, 24), dtype=np.uint8)
    labels[2, 4:9, 4:9] = 1
    flags = shape_flag_map(labels, 2, 0)
    assert (flags[2, 4:9, 4:9] == _code("extra-on-slice")).all()
    assert int((flags > 0).sum()) == 25


def test_an_abrupt_change_of_area_is_flagged_both_ways():
    labels = _column(radius=6)
    labels[2] = np.where(_disc((24, 24), (12, 12), 2), 1, 0)  # a fifth of its neighbours' area
    labels[5] = np.where(_disc((24, 24), (12, 12), 10), 1, 0)  # almost three times
    flags = shape_flag_map(labels, 2, 0)
    shrunk = _disc((24, 24), (12, 12), 6) & ~_disc((24, 24), (12, 12), 2)
    assert np.array_equal(flags[2] == _code("area-jump"), shrunk)
    labels[1] = np.where(_disc((24, 24), (12, 14), 6), 1, 0)  # the neighbour moved: either one counts
    flags = shape_flag_map(labels, 2, 0)
    either = (_disc((24, 24), (12, 12), 6) | _disc((24, 24), (12, 14), 6)) & ~_disc((24, 24), (12, 12), 2)
    assert np.array_equal(flags[2] == _code("area-jump"), either)
    grown = _disc((24, 24), (12, 12), 10) & ~_disc((24, 24), (12, 12), 6)
    assert np.array_equal(flags[5] == _code("area-jump"), grown)


def test_detached_fragments_are_flagged_but_not_the_main_component():
    labels = _column()
    labels[1:3, 20:23, 1:3] = 1  # 12 voxels apart from the column
    flags = shape_flag_map(labels, 2, 0)
    assert (flags[1:3, 20:23, 1:3] == _code("detached-fragment")).all()
    assert int((flags > 0).sum()) == 12


def test_the_slice_axis_is_the_one_given():
    labels = _column()
    labels[3] = 0  # missing on a slice of numpy axis 0 ...
    moved = np.ascontiguousarray(np.moveaxis(labels, 0, 2))  # ... which becomes numpy axis 2
    flags = shape_flag_map(moved, 2, 2)
    assert np.array_equal(np.moveaxis(flags, 2, 0), shape_flag_map(labels, 2, 0))
    assert not shape_flag_map(moved, 2, 0)[..., 3].any()  # along another axis: no missing slice


def _ring_with_cavity(gap: bool) -> np.ndarray:
    labels = np.zeros((3, 24, 24), dtype=np.uint8)
    wall = _disc((24, 24), (12, 12), 8) & ~_disc((24, 24), (12, 12), 5)
    labels[:, wall] = 1
    labels[:, _disc((24, 24), (12, 12), 5)] = 2
    if gap:
        labels[1, 11:14, 17:21] = 0  # a hole through the wall on the middle slice
    return labels


def test_nesting_flags_the_gap_in_the_wall_and_nothing_for_a_closed_wall():
    rules = parse_nesting_rules(["Cavity:wall"], NAMES)
    assert rules == [(2, 1)]
    assert not shape_flag_map(_ring_with_cavity(gap=False), 3, 0, nesting=rules).any()
    flags = shape_flag_map(_ring_with_cavity(gap=True), 3, 0, nesting=rules)
    nesting = flags == _code("nesting")
    assert nesting[1, 12, 17]  # the voxel the hole opened next to the cavity
    assert not nesting[[0, 2]].any()
    assert set(zip(*np.nonzero(nesting[1]), strict=True)) <= {
        (y, x) for y in range(11, 14) for x in range(17, 21)
    }
    assert not shape_flag_map(_ring_with_cavity(gap=True), 3, 0).any()  # the rule is optional


@pytest.mark.parametrize("rule", ["cavity", "cavity:liver", "wall:wall", "background:wall"])
def test_a_bad_nesting_rule_is_refused_naming_it(rule):
    with pytest.raises(ConfigError, match="--nesting"):
        parse_nesting_rules([rule], NAMES)


def test_the_chance_of_an_error_is_the_larger_of_uncertainty_and_the_flags_rate():
    uncertainty = np.array([[[0.1, 0.9, 0.2]]], dtype=np.float32)
    flags = np.array([[[0, _code("nesting"), _code("area-jump")]]], dtype=np.uint8)
    chance = expected_error_map(uncertainty, flags)
    assert chance.dtype == np.float32
    expected = [
        0.1,
        max(0.9, FLAG_ERROR_PROBABILITY["nesting"]),
        max(0.2, FLAG_ERROR_PROBABILITY["area-jump"]),
    ]
    assert np.allclose(chance[0, 0], expected)
    assert np.array_equal(expected_error_map(uncertainty, None), uncertainty)
