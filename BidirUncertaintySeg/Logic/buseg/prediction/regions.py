"""Flagged regions: where a reviewer should look, measured in physical space and ranked.

A *region* is a connected group (26-connectivity) of voxels whose normalised uncertainty is
above a threshold. Regions smaller than ``min_region_mm3`` (or ``min_region_voxels``) are
dropped: single noisy voxels are not worth a clinician's time. The rest are ranked by their
**review value** = the sum of the uncertainty over the region's voxels times the voxel volume
(mm^3). Normalised entropy is a stand-in for the chance that a voxel is wrong, so the
review value approximates the volume of expected errors a reviewer can fix there: a large,
very uncertain region comes first; a thin band of mild uncertainty comes later. Region ids
are ranks (1 = review first); at most ``max_regions`` are listed, and the summary says how
much of the uncertain volume the list covers.

**Review regions** (what ``buseg predict`` lists): with a slice axis given, regions are cut
so that a person fixes each in one go. Voxels are flagged by uncertainty or by a shape flag
(:mod:`buseg.prediction.shape_flags`, each flag a reason of its own); the connected groups are found
within slabs of ``region_slices`` consecutive slices along the slice axis (a band of
uncertainty around a whole structure becomes one piece per slab), and a piece wider than
``region_extent_mm`` in the slice plane is cut into equal tiles no wider than that. Each
piece is ranked by its expected error: the sum over its voxels of the chance that a voxel is
wrong (:func:`buseg.prediction.shape_flags.expected_error_map`: its uncertainty, or its flag's measured
error rate). The same estimate summed per slice gives the slice review order
(:func:`slice_review`).

Pure numpy/scipy (no torch): the Slicer module and tests can call it on any map.
Coordinates: ``*_ijk`` are voxel indices in ITK/Slicer order (i = x column, j = y row,
k = z slice); ``*_ras`` are millimetres in RAS, as Slicer shows them, computed with the
image's full geometry (spacing, origin, direction).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from buseg.files.images import Volume

SCHEMA = "buseg-regions"
SCHEMA_VERSION = 1


@dataclass
class Region:
    """One flagged region (see the module docstring for the definitions)."""

    id: int
    voxel_count: int
    volume_mm3: float
    mean_uncertainty: float
    max_uncertainty: float
    review_value: float
    classes: list[str]
    class_voxels: dict[str, int]
    centroid_ijk: list[float]
    centroid_ras: list[float]
    bbox_ijk_min: list[int]
    bbox_ijk_max: list[int]
    bbox_ras_min: list[float]
    bbox_ras_max: list[float]
    # Why it is listed: "uncertainty" or a shape flag's reason (buseg.prediction.shape_flags.REASONS).
    reason: str = "uncertainty"
    expected_error_voxels: float = 0.0  # sum over its voxels of the chance that a voxel is wrong

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegionSet:
    """The listed regions (best first) and what the list leaves out."""

    regions: list[Region]
    threshold: float
    flagged_voxels: int
    flagged_volume_mm3: float
    found: int
    dropped_small: int
    beyond_cap: int
    listed_review_value: float
    total_review_value: float
    settings: dict[str, Any] = field(default_factory=dict)
    # The slices best first (see slice_review); None when no slice axis was given.
    slice_review: dict[str, Any] | None = None

    @property
    def coverage(self) -> float:
        """Share of the review value of all flagged voxels that the listed regions hold."""
        return self.listed_review_value / self.total_review_value if self.total_review_value > 0 else 1.0

    def summary(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "flagged_voxels": self.flagged_voxels,
            "flagged_volume_mm3": self.flagged_volume_mm3,
            "regions_found": self.found,
            "regions_dropped_small": self.dropped_small,
            "regions_beyond_cap": self.beyond_cap,
            "regions_listed": len(self.regions),
            "listed_review_value": self.listed_review_value,
            "total_review_value": self.total_review_value,
            "coverage": self.coverage,
        }


def _ras_box(
    reference: Volume, low_ijk: Sequence[float], high_ijk: Sequence[float]
) -> tuple[list[float], list[float]]:
    """Axis-aligned RAS bounds of the voxel box from ``low`` to ``high`` (voxel edges, i.e. +-0.5)."""
    matrix = reference.ijk_to_ras()
    corners = np.array([[*c, 1.0] for c in itertools.product(*zip(low_ijk, high_ijk, strict=True))])
    ras = (matrix @ corners.T)[:3]
    return [float(v) for v in ras.min(axis=1)], [float(v) for v in ras.max(axis=1)]


# Voxels per slab when gathering region statistics: bounds the temporaries for a large CT,
# even when a lost model flags most of it.
SLAB_VOXELS = 4_000_000


def _region_statistics(
    component: np.ndarray, found: int, uncertainty: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per region id (0 = none): voxel count, sum and max of uncertainty, centroid (numpy axis order)."""
    n = found + 1
    counts, sums, maxima = np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n)
    coordinate_sums = np.zeros((component.ndim, n))
    plane = int(np.prod(component.shape[1:])) or 1
    step = max(1, SLAB_VOXELS // plane)
    for start in range(0, component.shape[0], step):
        slab = component[start : start + step]
        selected = slab > 0
        if not selected.any():
            continue
        ids = slab[selected]
        values = uncertainty[start : start + step][selected].astype(np.float64)
        counts += np.bincount(ids, minlength=n)
        sums += np.bincount(ids, weights=values, minlength=n)
        np.maximum.at(maxima, ids, values)
        for axis, coordinate in enumerate(np.nonzero(selected)):
            offset = start if axis == 0 else 0
            coordinate_sums[axis] += np.bincount(ids, weights=coordinate + offset, minlength=n)
    centroids = coordinate_sums / np.maximum(counts, 1)
    return counts, sums, maxima, centroids


def _split_wide(
    pieces: np.ndarray, count: int, tile_voxels: Sequence[int], next_id: int
) -> tuple[np.ndarray, int]:
    """Cut every piece wider than ``tile_voxels`` (per in-plane axis, axes 1 and 2 of ``pieces``)
    into equal tiles no wider than that; returns the relabelled pieces (ids from ``next_id``)."""
    out = np.zeros(pieces.shape, dtype=np.int32)
    for index, box in enumerate(ndimage.find_objects(pieces, max_label=count), start=1):
        if box is None:
            continue
        inside = pieces[box] == index
        extents = [box[a].stop - box[a].start for a in (1, 2)]
        cuts = [max(1, math.ceil(e / max(1, t))) for e, t in zip(extents, tile_voxels, strict=True)]
        if cuts == [1, 1]:
            out[box][inside] = next_id
            next_id += 1
            continue
        grid = np.indices(inside.shape[1:])
        tile = (grid[0] * cuts[0] // extents[0]) * cuts[1] + grid[1] * cuts[1] // extents[1]
        tile_ids = np.broadcast_to(tile, inside.shape)[inside]
        present, compact = np.unique(tile_ids, return_inverse=True)
        out[box][inside] = next_id + compact.astype(np.int32)
        next_id += present.size
    return out, next_id


def _label_pieces(
    keys: np.ndarray, slice_axis_numpy: int | None, region_slices: int, tile_voxels: Sequence[int] | None
) -> tuple[np.ndarray, int, list[int]]:
    """Connected pieces (26-connectivity) of each non-zero key value: over the whole volume
    without a slice axis, else within slabs of ``region_slices`` slices, wide ones tiled.
    Returns the piece map (0 = none), the number of pieces and each piece's key (index id - 1)."""
    structure = np.ones((3, 3, 3), dtype=bool)
    component = np.zeros(keys.shape, dtype=np.int32)
    piece_keys: list[int] = []
    axis = 0 if slice_axis_numpy is None else slice_axis_numpy
    key_stack, out_stack = np.moveaxis(keys, axis, 0), np.moveaxis(component, axis, 0)
    slab = key_stack.shape[0] if slice_axis_numpy is None else max(1, int(region_slices))
    found = 0
    for start in range(0, key_stack.shape[0], slab):
        part = key_stack[start : start + slab]
        for key in (int(k) for k in np.unique(part) if k):
            pieces, count = ndimage.label(part == key, structure=structure)
            if tile_voxels is not None and count:
                pieces, stop = _split_wide(pieces, count, tile_voxels, 1)
                count = stop - 1
            if count:
                selected = pieces > 0
                out_stack[start : start + slab][selected] = pieces[selected] + found
                piece_keys += [key] * count
                found += count
    return component, found, piece_keys


def _tile_voxels(reference: Volume, slice_axis_numpy: int, region_extent_mm: float) -> list[int] | None:
    """The widest piece (voxels along the two in-plane numpy axes) for ``region_extent_mm``; None: no tiling."""
    if region_extent_mm <= 0:
        return None
    spacing_numpy = list(reference.spacing_mm)[::-1]
    in_plane = [a for a in range(3) if a != slice_axis_numpy]
    return [max(1, int(region_extent_mm / spacing_numpy[a])) for a in in_plane]


def find_regions(
    uncertainty: np.ndarray,
    reference: Volume,
    *,
    labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    threshold: float = 0.5,
    min_region_mm3: float = 10.0,
    min_region_voxels: int = 1,
    max_regions: int = 50,
    flags: np.ndarray | None = None,
    slice_axis_ijk: int | None = None,
    region_slices: int = 1,
    region_extent_mm: float = 0.0,
) -> RegionSet:
    """Regions of ``uncertainty > threshold`` (and of each shape flag), measured and ranked for review.

    ``uncertainty`` (z, y, x) lies on ``reference``'s grid (only its geometry is used).
    ``labels`` (class indices, same shape) and ``class_names`` (indexed by class) name the
    predicted classes each region touches. ``max_regions = 0`` lists every region.
    ``flags`` (codes of :func:`buseg.prediction.shape_flags.shape_flag_map`) add the confident misses.
    Without ``slice_axis_ijk`` a region is a whole connected component (no slabs, no tiles,
    no slice order); with it, see the module docstring.
    """
    _check_shapes(uncertainty, reference, labels, flags)
    voxel_mm3 = reference.voxel_volume_mm3
    axis_numpy = None if slice_axis_ijk is None else 2 - int(slice_axis_ijk)
    settings = _settings(
        threshold,
        min_region_mm3,
        min_region_voxels,
        max_regions,
        slice_axis_ijk,
        region_slices,
        region_extent_mm,
        shape_flags=flags is not None,
    )
    error_chance, keys = _voxel_maps(uncertainty, threshold, flags)
    tiles = None if axis_numpy is None else _tile_voxels(reference, axis_numpy, region_extent_mm)
    pieces = _Pieces.measure(
        keys, uncertainty, flags is not None, error_chance, axis_numpy, region_slices, tiles
    )
    kept, dropped, beyond = pieces.ranked(voxel_mm3, min_region_mm3, min_region_voxels, max_regions)
    regions = pieces.regions(kept, reference, labels, class_names)
    review = None
    if axis_numpy is not None:
        review = slice_review(error_chance, keys > 0, reference, int(slice_axis_ijk))
    return RegionSet(
        regions=regions,
        threshold=threshold,
        flagged_voxels=pieces.flagged_voxels,
        flagged_volume_mm3=pieces.flagged_voxels * voxel_mm3,
        found=int(pieces.found),
        dropped_small=dropped,
        beyond_cap=beyond,
        listed_review_value=float(sum(r.review_value for r in regions)),
        total_review_value=float(pieces.error_sums[1:].sum()) * voxel_mm3,
        settings=settings,
        slice_review=review,
    )


def _check_shapes(
    uncertainty: np.ndarray, reference: Volume, labels: np.ndarray | None, flags: np.ndarray | None
) -> None:
    """Refuse maps that do not lie on the same grid (a ValueError naming the map that differs)."""
    for name, array in (("labels", labels), ("flags", flags)):
        if array is not None and array.shape != uncertainty.shape:
            raise ValueError(
                f"{name} shape {array.shape} differs from the uncertainty map's {uncertainty.shape}"
            )
    if uncertainty.shape != reference.array.shape:
        raise ValueError(
            f"uncertainty shape {uncertainty.shape} differs from the image's {reference.array.shape}"
        )


def _settings(
    threshold: float,
    min_region_mm3: float,
    min_region_voxels: int,
    max_regions: int,
    slice_axis_ijk: int | None,
    region_slices: int,
    region_extent_mm: float,
    *,
    shape_flags: bool,
) -> dict[str, Any]:
    """The settings recorded in ``regions.json`` (the slab and tile sizes only with a slice axis)."""
    return {
        "threshold": threshold,
        "min_region_mm3": min_region_mm3,
        "min_region_voxels": min_region_voxels,
        "max_regions": max_regions,
        "connectivity": 26,
        "review_value": "sum of the chance of an error x voxel mm3",
        "slice_axis_ijk": slice_axis_ijk,
        "region_slices": region_slices if slice_axis_ijk is not None else None,
        "region_extent_mm": region_extent_mm if slice_axis_ijk is not None else None,
        "shape_flags": shape_flags,
    }


def _voxel_maps(
    uncertainty: np.ndarray, threshold: float, flags: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel, the chance that it is wrong (:func:`buseg.prediction.shape_flags.expected_error_map`) and why
    it is flagged: 0 none, 1 uncertainty, 1 + flag code for a shape flag (a flag takes precedence,
    so that a confident miss is listed with its own reason)."""
    from buseg.prediction.shape_flags import expected_error_map

    error_chance = expected_error_map(uncertainty, flags)
    keys = (uncertainty > threshold).astype(np.uint8)
    if flags is not None:
        flagged_by_shape = flags > 0
        keys[flagged_by_shape] = flags[flagged_by_shape] + 1
    return error_chance, keys


@dataclass
class _Pieces:
    """The labelled pieces of the flagged voxels and their statistics, indexed by piece id (0 = none)."""

    component: np.ndarray  # piece id per voxel
    found: int
    piece_keys: list[int]  # each piece's voxel key (see _voxel_maps), at index id - 1
    counts: np.ndarray
    sums: np.ndarray  # of the uncertainty
    maxima: np.ndarray  # of the uncertainty
    centroids: np.ndarray  # (3, ids), numpy axis order
    error_sums: np.ndarray  # of the chance of an error

    @classmethod
    def measure(
        cls,
        keys: np.ndarray,
        uncertainty: np.ndarray,
        shape_flags: bool,
        error_chance: np.ndarray,
        slice_axis_numpy: int | None,
        region_slices: int,
        tile_voxels: Sequence[int] | None,
    ) -> _Pieces:
        """Label the pieces of ``keys`` (see :func:`_label_pieces`) and measure them. Without
        ``shape_flags`` the chance of an error is the uncertainty: its sums are not gathered twice."""
        component, found, piece_keys = _label_pieces(keys, slice_axis_numpy, region_slices, tile_voxels)
        counts, sums, maxima, centroids = _region_statistics(component, found, uncertainty)
        error_sums = _region_statistics(component, found, error_chance)[1] if shape_flags else sums
        return cls(component, found, piece_keys, counts, sums, maxima, centroids, error_sums)

    @property
    def flagged_voxels(self) -> int:
        return int(self.counts[1:].sum())

    def ranked(
        self, voxel_mm3: float, min_region_mm3: float, min_region_voxels: int, max_regions: int
    ) -> tuple[np.ndarray, int, int]:
        """The ids of the pieces to list, best first; how many were too small; how many the cap left out."""
        counts, candidates = self.counts, np.arange(1, self.found + 1)
        big = (counts[candidates] * voxel_mm3 >= min_region_mm3) & (counts[candidates] >= min_region_voxels)
        kept = candidates[big]
        dropped = int(self.found - kept.size)
        # Rank: expected error, then peak uncertainty, then size; the label id breaks exact ties.
        order = np.lexsort((kept, -counts[kept], -self.maxima[kept], -self.error_sums[kept]))
        kept = kept[order]
        beyond = max(0, kept.size - max_regions) if max_regions > 0 else 0
        if max_regions > 0:
            kept = kept[:max_regions]
        return kept, dropped, beyond

    def regions(
        self,
        kept: np.ndarray,
        reference: Volume,
        labels: np.ndarray | None,
        class_names: Sequence[str] | None,
    ) -> list[Region]:
        """The listed pieces as regions, their ids the ranks (1 = review first)."""
        boxes = ndimage.find_objects(self.component)
        names = list(class_names) if class_names is not None else None
        return [
            self.region(rank, label_id, boxes[label_id - 1], reference, labels, names)
            for rank, label_id in enumerate(kept, start=1)
        ]

    def region(
        self,
        rank: int,
        label_id: int,
        box: tuple[slice, ...],
        reference: Volume,
        labels: np.ndarray | None,
        names: list[str] | None,
    ) -> Region:
        """One piece measured in physical space (``box``: its bounding box, numpy order)."""
        from buseg.prediction.shape_flags import reason_of_code

        voxel_mm3 = reference.voxel_volume_mm3
        centroid_ijk = [float(v) for v in self.centroids[:, label_id][::-1]]
        class_voxels = _class_voxels(labels, self.component, box, label_id, names)
        low_ijk = [s.start for s in box][::-1]
        high_ijk = [s.stop - 1 for s in box][::-1]
        ras_min, ras_max = _ras_box(reference, [v - 0.5 for v in low_ijk], [v + 0.5 for v in high_ijk])
        count = int(self.counts[label_id])
        key = self.piece_keys[label_id - 1]
        return Region(
            id=rank,
            voxel_count=count,
            volume_mm3=count * voxel_mm3,
            mean_uncertainty=float(self.sums[label_id] / count),
            max_uncertainty=float(self.maxima[label_id]),
            review_value=float(self.error_sums[label_id] * voxel_mm3),
            classes=list(class_voxels),
            class_voxels=class_voxels,
            centroid_ijk=centroid_ijk,
            centroid_ras=list(reference.index_to_ras(centroid_ijk)),
            bbox_ijk_min=[int(v) for v in low_ijk],
            bbox_ijk_max=[int(v) for v in high_ijk],
            bbox_ras_min=ras_min,
            bbox_ras_max=ras_max,
            reason="uncertainty" if key == 1 else reason_of_code(key - 1),
            expected_error_voxels=float(self.error_sums[label_id]),
        )


def _class_voxels(
    labels: np.ndarray | None,
    component: np.ndarray,
    box: tuple[slice, ...],
    label_id: int,
    names: list[str] | None,
) -> dict[str, int]:
    """Voxels of each predicted class inside one region, most first."""
    class_voxels: dict[str, int] = {}
    if labels is None:
        return class_voxels
    inside = labels[box][component[box] == label_id]
    per_class = [int(np.count_nonzero(inside == index)) for index in range(int(inside.max()) + 1)]
    for index in np.argsort(-np.array(per_class), kind="stable"):
        if per_class[index]:
            name = names[index] if names is not None and index < len(names) else f"class_{index}"
            class_voxels[name] = per_class[index]
    return class_voxels


def slice_review(
    error_chance: np.ndarray, flagged: np.ndarray, reference: Volume, slice_axis_ijk: int
) -> dict[str, Any]:
    """The slices along ``slice_axis_ijk`` ranked by expected error (sum of the chance of an error
    over the slice), best first, each with the RAS point to centre the view on: the
    error-weighted centre of its flagged voxels (of the whole slice if none is flagged).
    Slices without any expected error are left out."""
    axis = 2 - int(slice_axis_ijk)
    stack, marks = np.moveaxis(error_chance, axis, 0), np.moveaxis(flagged, axis, 0)
    totals = stack.sum(axis=(1, 2), dtype=np.float64)
    order = sorted((k for k in range(len(totals)) if totals[k] > 0), key=lambda k: (-totals[k], k))
    in_plane = [a for a in range(3) if a != axis]
    slices = []
    for k in order:
        weights = np.where(marks[k], stack[k], 0).astype(np.float64)
        if weights.sum() <= 0:
            weights = stack[k].astype(np.float64)
        grid = np.indices(weights.shape)
        centre_numpy = [0.0, 0.0, 0.0]
        centre_numpy[axis] = float(k)
        for plane_axis, coordinate in zip(in_plane, grid, strict=True):
            centre_numpy[plane_axis] = float((coordinate * weights).sum() / weights.sum())
        slices.append(
            {
                "index": int(k),
                "expected_error_voxels": float(totals[k]),
                "center_ras": [float(v) for v in reference.index_to_ras(centre_numpy[::-1])],
            }
        )
    return {"axis_ijk": int(slice_axis_ijk), "slices": slices}


def review_slice_axis(spacing_mm: Sequence[float]) -> int:
    """The IJK axis to review a 3D prediction along: the one of the coarsest spacing (k on a tie),
    the axis a person scrolls through in a scan of thick slices."""
    coarsest = max(float(s) for s in spacing_mm)
    return max(axis for axis, s in enumerate(spacing_mm) if float(s) >= coarsest * (1 - 1e-6))


def geometry_dict(reference: Volume) -> dict[str, Any]:
    """The image grid the region coordinates refer to (so a reader can check it is the same image)."""
    return {
        "size_ijk": list(reference.size_xyz),
        "spacing_mm": [float(s) for s in reference.spacing_mm],
        "origin_lps": [float(o) for o in reference.origin],
        "direction_lps": [float(d) for d in reference.direction],
        "ijk_to_ras": reference.ijk_to_ras().round(9).tolist(),
    }


def regions_document(region_set: RegionSet, reference: Volume, **context: Any) -> dict[str, Any]:
    """The content of ``regions.json`` (schema in docs/inference.md); ``context`` adds case/model/method fields."""
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        **context,
        "coordinate_system": "RAS",
        "geometry": geometry_dict(reference),
        "settings": region_set.settings,
        "summary": region_set.summary(),
        "regions": [r.to_dict() for r in region_set.regions],
        **({"slice_review": region_set.slice_review} if region_set.slice_review is not None else {}),
    }
