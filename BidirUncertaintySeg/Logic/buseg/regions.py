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

Pure numpy/scipy (no torch): the Slicer module and tests can call it on any map.
Coordinates: ``*_ijk`` are voxel indices in ITK/Slicer order (i = x column, j = y row,
k = z slice); ``*_ras`` are millimetres in RAS, as Slicer shows them, computed with the
image's full geometry (spacing, origin, direction).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .io import Volume

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
) -> RegionSet:
    """Connected regions of ``uncertainty > threshold``, measured and ranked for review.

    ``uncertainty`` (z, y, x) lies on ``reference``'s grid (only its geometry is used).
    ``labels`` (class indices, same shape) and ``class_names`` (indexed by class) name the
    predicted classes each region touches. ``max_regions = 0`` lists every region.
    """
    if uncertainty.shape != reference.array.shape:
        raise ValueError(
            f"uncertainty shape {uncertainty.shape} differs from the image's {reference.array.shape}"
        )
    if labels is not None and labels.shape != uncertainty.shape:
        raise ValueError(
            f"labels shape {labels.shape} differs from the uncertainty map's {uncertainty.shape}"
        )
    voxel_mm3 = reference.voxel_volume_mm3
    settings = {
        "threshold": threshold,
        "min_region_mm3": min_region_mm3,
        "min_region_voxels": min_region_voxels,
        "max_regions": max_regions,
        "connectivity": 26,
        "review_value": "sum of uncertainty x voxel mm3",
    }
    component, found = ndimage.label(
        uncertainty > threshold, structure=np.ones((3,) * uncertainty.ndim, dtype=bool)
    )
    counts, sums, maxima, centroids = _region_statistics(component, found, uncertainty)
    total_review = float(sums[1:].sum()) * voxel_mm3
    flagged = int(counts[1:].sum())

    candidates = np.arange(1, found + 1)
    big = (counts[candidates] * voxel_mm3 >= min_region_mm3) & (counts[candidates] >= min_region_voxels)
    kept = candidates[big]
    dropped = int(found - kept.size)
    # Rank: review value, then peak uncertainty, then size; the label id breaks exact ties.
    order = np.lexsort((kept, -counts[kept], -maxima[kept], -sums[kept]))
    kept = kept[order]
    beyond = max(0, kept.size - max_regions) if max_regions > 0 else 0
    if max_regions > 0:
        kept = kept[:max_regions]

    boxes = ndimage.find_objects(component)
    names = list(class_names) if class_names is not None else None
    regions = []
    for rank, label_id in enumerate(kept, start=1):
        box = boxes[label_id - 1]
        centroid_ijk = [float(v) for v in centroids[:, label_id][::-1]]
        class_voxels: dict[str, int] = {}
        if labels is not None:
            inside = labels[box][component[box] == label_id]
            per_class = [int(np.count_nonzero(inside == index)) for index in range(int(inside.max()) + 1)]
            for index in np.argsort(-np.array(per_class), kind="stable"):
                if per_class[index]:
                    name = names[index] if names is not None and index < len(names) else f"class_{index}"
                    class_voxels[name] = per_class[index]
            del inside
        low_ijk = [s.start for s in box][::-1]
        high_ijk = [s.stop - 1 for s in box][::-1]
        ras_min, ras_max = _ras_box(reference, [v - 0.5 for v in low_ijk], [v + 0.5 for v in high_ijk])
        count = int(counts[label_id])
        regions.append(
            Region(
                id=rank,
                voxel_count=count,
                volume_mm3=count * voxel_mm3,
                mean_uncertainty=float(sums[label_id] / count),
                max_uncertainty=float(maxima[label_id]),
                review_value=float(sums[label_id] * voxel_mm3),
                classes=list(class_voxels),
                class_voxels=class_voxels,
                centroid_ijk=centroid_ijk,
                centroid_ras=list(reference.index_to_ras(centroid_ijk)),
                bbox_ijk_min=[int(v) for v in low_ijk],
                bbox_ijk_max=[int(v) for v in high_ijk],
                bbox_ras_min=ras_min,
                bbox_ras_max=ras_max,
            )
        )
    return RegionSet(
        regions=regions,
        threshold=threshold,
        flagged_voxels=flagged,
        flagged_volume_mm3=flagged * voxel_mm3,
        found=int(found),
        dropped_small=dropped,
        beyond_cap=beyond,
        listed_review_value=float(sum(r.review_value for r in regions)),
        total_review_value=total_review,
        settings=settings,
    )


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
    }
