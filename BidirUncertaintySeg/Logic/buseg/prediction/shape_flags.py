"""Confident misses: voxels a reviewer should see although the model is sure of them.

Entropy is high where the model hesitates, at the boundaries of what it found. A structure
missed (or hallucinated) on a whole slice, far from any boundary, is wrong with a confident
prediction, and no voxel threshold on the entropy finds it. These flags come from shape and
anatomy instead, computed on the label map slice by slice along the slice axis:

* ``missing-on-slice``: a class present on both neighbouring slices but absent on this one;
  flagged: where both neighbours have it (where either has it, if they do not overlap).
* ``extra-on-slice``: the reverse, a class on this slice but on neither neighbour; flagged:
  the class's voxels on this slice.
* ``area-jump``: the class's area on this slice is less than ``1 / area_jump_ratio`` or more
  than ``area_jump_ratio`` times the mean of its neighbours' areas (a smooth change, such
  as towards the apex of the heart, keeps the area near that mean); flagged: what either
  neighbour has and this slice lacks, or what this slice has and neither neighbour has.
* ``detached-fragment``: every 26-connected component of a class but its largest (a slice
  missing between two that have the class is bridged first: that is ``missing-on-slice``).
* ``nesting``: a rule "INNER:OUTER" says the structure INNER is enclosed by OUTER (ACDC:
  the left ventricle cavity by the myocardium); flagged: the voxels next to INNER (in the
  slice plane) that are neither INNER nor OUTER - the gaps in the wall. Rules are optional
  and per class (``--nesting``), because only the user knows their classes' anatomy.

Each flag becomes a code in one uint8 map (0 = none, ``1 + REASONS.index(reason)``; where
flags overlap, the first reason in :data:`REASONS` wins). :func:`expected_error_map` turns
flags and uncertainty into one per-voxel estimate of the chance of an error, which ranks
regions and slices together (:mod:`buseg.prediction.regions`).

Pure numpy/scipy (no torch), like :mod:`buseg.prediction.regions`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from buseg.errors import ConfigError

REASONS = ("nesting", "missing-on-slice", "extra-on-slice", "detached-fragment", "area-jump")
# Chance that a flagged voxel is wrong, per reason: the share of flagged voxels that were wrong on
# the 20 ACDC validation volumes, the lower of two CPU-preset models (copy-paste pre-training, BCP),
# rounded down to 0.05 (benchmarks/results/review_acdc_cpu.md; docs/benchmarks.md, review guidance).
FLAG_ERROR_PROBABILITY = {
    "nesting": 0.45,  # 60% / 50% of the flagged voxels wrong
    "missing-on-slice": 0.7,  # 73% (BCP model; the other flagged 1 voxel per volume)
    "extra-on-slice": 0.9,  # 100% of 10 voxels per volume (BCP model; none with the other)
    "detached-fragment": 0.8,  # 96% / 82%
    "area-jump": 0.3,  # 35% / 54%
}
AREA_JUMP_RATIO = 2.0


def reason_of_code(code: int) -> str:
    """The reason a flag code in :func:`shape_flag_map`'s map stands for."""
    return REASONS[code - 1]


def parse_nesting_rules(rules: Sequence[str], class_names: Sequence[str]) -> list[tuple[int, int]]:
    """(inner, outer) class indices of rules written "INNER:OUTER" with the model's class names."""
    lookup = {name.lower(): index for index, name in enumerate(class_names) if index > 0}
    pairs = []
    for rule in rules:
        inner, sep, outer = (part.strip().lower() for part in str(rule).partition(":"))
        if not sep or inner not in lookup or outer not in lookup or inner == outer:
            raise ConfigError(
                f"--nesting rule {rule!r} is not INNER:OUTER with two different foreground classes of the "
                f"model ({', '.join(class_names[1:])})"
            )
        pairs.append((lookup[inner], lookup[outer]))
    return pairs


def _mark(flags: np.ndarray, where: np.ndarray, reason: str) -> None:
    """Set ``reason``'s code where ``where`` holds and no earlier reason did."""
    flags[where & (flags == 0)] = 1 + REASONS.index(reason)


def _slice_presence_flags(stack: np.ndarray, flags: np.ndarray, cls: int, area_jump_ratio: float) -> None:
    """missing-on-slice, extra-on-slice and area-jump of one class (``stack``: slice axis first)."""
    mask = stack == cls
    areas = mask.sum(axis=(1, 2))
    for k in range(1, len(areas) - 1):
        before, here, after = areas[k - 1], areas[k], areas[k + 1]
        if here == 0 and before > 0 and after > 0:
            both = mask[k - 1] & mask[k + 1]
            _mark(flags[k], both if both.any() else mask[k - 1] | mask[k + 1], "missing-on-slice")
        elif here > 0 and before == 0 and after == 0:
            _mark(flags[k], mask[k], "extra-on-slice")
        elif here > 0 and before > 0 and after > 0:
            expected = (before + after) / 2
            if here * area_jump_ratio < expected:
                _mark(flags[k], (mask[k - 1] | mask[k + 1]) & ~mask[k], "area-jump")
            elif here > expected * area_jump_ratio:
                _mark(flags[k], mask[k] & ~(mask[k - 1] | mask[k + 1]), "area-jump")


def _fragment_flags(stack: np.ndarray, flags: np.ndarray, cls: int) -> None:
    """Components but the largest (``stack``: slice axis first). A slice missing between two that
    have the class is bridged first: that is one missing slice, not a detached part."""
    mask = stack == cls
    bridged = mask.copy()
    bridged[1:-1] |= mask[:-2] & mask[2:]
    component, count = ndimage.label(bridged, structure=np.ones((3, 3, 3), dtype=bool))
    if count > 1:
        sizes = np.bincount(component[mask])
        sizes[0] = 0
        _mark(flags, mask & (component != int(sizes.argmax())), "detached-fragment")


def _nesting_flags(stack: np.ndarray, flags: np.ndarray, inner: int, outer: int) -> None:
    """Gaps in OUTER's wall around INNER, slice by slice (``stack``: slice axis first)."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    inside = stack == inner
    ring = ndimage.binary_dilation(inside, structure=in_plane) & ~inside & (stack != outer)
    _mark(flags, ring, "nesting")


def shape_flag_map(
    labels: np.ndarray,
    num_classes: int,
    slice_axis_numpy: int,
    *,
    nesting: Sequence[tuple[int, int]] = (),
    area_jump_ratio: float = AREA_JUMP_RATIO,
) -> np.ndarray:
    """The flag codes (uint8, 0 = none) of a label map (z, y, x) whose slices run along ``slice_axis_numpy``."""
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label map, got shape {labels.shape}")
    flags = np.zeros(labels.shape, dtype=np.uint8)
    stack, flag_stack = np.moveaxis(labels, slice_axis_numpy, 0), np.moveaxis(flags, slice_axis_numpy, 0)
    for inner, outer in nesting:
        _nesting_flags(stack, flag_stack, inner, outer)
    for cls in range(1, num_classes):
        _slice_presence_flags(stack, flag_stack, cls, area_jump_ratio)
    for cls in range(1, num_classes):
        _fragment_flags(stack, flag_stack, cls)
    return flags


def expected_error_map(uncertainty: np.ndarray, flags: np.ndarray | None) -> np.ndarray:
    """Per voxel, the estimated chance that it is wrong: the larger of its uncertainty and its flag's
    :data:`FLAG_ERROR_PROBABILITY` (float32)."""
    if flags is None:
        return uncertainty.astype(np.float32, copy=False)
    table = np.array([0.0] + [FLAG_ERROR_PROBABILITY[r] for r in REASONS], dtype=np.float32)
    return np.maximum(uncertainty.astype(np.float32, copy=False), table[flags])
