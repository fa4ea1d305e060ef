"""Flagged regions from hand-built uncertainty maps: counts, volumes, ranking, physical coordinates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from buseg.files.images import Volume
from buseg.prediction.regions import find_regions, regions_document

SPACING = (0.5, 1.0, 2.0)  # x, y, z: voxel = 1 mm^3
ORIGIN = (10.0, -20.0, 5.0)


def _oblique_direction() -> tuple[float, ...]:
    """A rotation about an oblique axis (every matrix entry non-zero), row-major."""
    a, b = np.deg2rad(30), np.deg2rad(-20)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


@pytest.fixture()
def reference() -> Volume:
    return Volume(np.zeros((10, 20, 30), dtype=np.float32), SPACING, ORIGIN, _oblique_direction())


def _ras_with_sitk(reference: Volume, ijk) -> np.ndarray:
    """Physical point of a continuous index by SimpleITK (LPS), turned into RAS: an independent check."""
    lps = reference.to_sitk().TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk])
    return np.array([-lps[0], -lps[1], lps[2]])


def _map(reference: Volume) -> np.ndarray:
    u = np.full(reference.array.shape, 0.1, dtype=np.float32)
    u[1:3, 3:7, 2:6] = 0.9  # A: x 2..5, y 3..6, z 1..2 -> 32 voxels, 32 mm^3
    u[4:8, 10:15, 10:20] = 0.6  # B: x 10..19, y 10..14, z 4..7 -> 200 voxels
    u[9, 18, 25] = 1.0  # a speck: 1 voxel
    u[0, 0, 28] = 0.95  # two voxels touching only at a corner (26-connected: one region)
    u[1, 1, 29] = 0.95
    u[6:9, 0:3, 0:3] = 0.45  # below the threshold: never flagged
    return u


@pytest.mark.parametrize("slab_voxels", [4_000_000, 600, 1])  # one slab, a slice per slab, a row per slab
def test_regions_are_counted_measured_and_ranked_by_review_value(reference, monkeypatch, slab_voxels):
    monkeypatch.setattr("buseg.prediction.regions.SLAB_VOXELS", slab_voxels)
    u = _map(reference)
    result = find_regions(u, reference, threshold=0.5, min_region_mm3=5.0, max_regions=10)
    assert result.found == 4  # A, B, speck, corner pair
    assert result.dropped_small == 2  # the speck (1 mm^3) and the corner pair (2 mm^3)
    assert [r.voxel_count for r in result.regions] == [200, 32]
    b, a = result.regions
    # B: 200 voxels x 0.6 = 120 mm^3 of expected errors; A: 32 x 0.9 = 28.8: B is worth more review.
    assert [b.id, a.id] == [1, 2]
    assert b.review_value == pytest.approx(120.0, rel=1e-5) and a.review_value == pytest.approx(
        28.8, rel=1e-5
    )
    assert b.volume_mm3 == pytest.approx(200.0) and a.volume_mm3 == pytest.approx(32.0)
    assert a.mean_uncertainty == pytest.approx(0.9) and a.max_uncertainty == pytest.approx(0.9)
    assert a.bbox_ijk_min == [2, 3, 1] and a.bbox_ijk_max == [5, 6, 2]
    assert result.flagged_voxels == 200 + 32 + 1 + 2
    assert result.flagged_volume_mm3 == pytest.approx(235.0)
    assert result.coverage == pytest.approx((120 + 28.8) / (120 + 28.8 + 1.0 + 2 * 0.95), rel=1e-5)


def test_centroids_and_boxes_are_in_ras_with_the_full_geometry(reference, monkeypatch):
    monkeypatch.setattr("buseg.prediction.regions.SLAB_VOXELS", 600)  # statistics gathered over several slabs
    result = find_regions(_map(reference), reference, threshold=0.5, min_region_mm3=5.0)
    a = next(r for r in result.regions if r.voxel_count == 32)
    centre_ijk = (3.5, 4.5, 1.5)
    assert a.centroid_ijk == pytest.approx(list(centre_ijk))
    assert np.allclose(a.centroid_ras, _ras_with_sitk(reference, centre_ijk), atol=1e-6)
    # The box spans voxel edges: its RAS bounds are those of the 8 corners of the voxel block.
    corners = [
        _ras_with_sitk(reference, (i, j, k)) for i in (1.5, 5.5) for j in (2.5, 6.5) for k in (0.5, 2.5)
    ]
    assert np.allclose(a.bbox_ras_min, np.min(corners, axis=0), atol=1e-6)
    assert np.allclose(a.bbox_ras_max, np.max(corners, axis=0), atol=1e-6)
    # The centroid lies inside the box; with this rotation the box is not axis-aligned in RAS.
    assert np.all(np.array(a.bbox_ras_min) < a.centroid_ras) and np.all(
        np.array(a.centroid_ras) < a.bbox_ras_max
    )


def test_min_voxels_cap_and_classes_touched(reference):
    u = _map(reference)
    labels = np.zeros(u.shape, dtype=np.uint8)
    labels[1:3, 3:5, 2:6] = 2  # half of A predicted as class 2
    names = ["background", "liver", "tumour"]
    result = find_regions(
        u,
        reference,
        labels=labels,
        class_names=names,
        threshold=0.5,
        min_region_mm3=0,
        min_region_voxels=2,
        max_regions=2,
    )
    assert [r.voxel_count for r in result.regions] == [200, 32]  # the 1-voxel speck needs 2 voxels
    assert result.beyond_cap == 1 and result.dropped_small == 1  # the corner pair is ranked out by the cap
    a = result.regions[1]
    assert sorted(a.classes) == ["background", "tumour"]
    assert a.class_voxels == {"tumour": 16, "background": 16}
    assert result.regions[0].classes == ["background"]


def test_no_uncertain_voxels_gives_no_regions_and_max_regions_zero_lists_all(reference):
    quiet = np.zeros(reference.array.shape, dtype=np.float32)
    empty = find_regions(quiet, reference)
    assert empty.regions == [] and empty.found == 0 and empty.coverage == 1.0
    every = find_regions(_map(reference), reference, threshold=0.5, min_region_mm3=0, max_regions=0)
    assert len(every.regions) == 4 and every.beyond_cap == 0


def test_regions_document_is_plain_json_with_the_geometry(reference):
    result = find_regions(_map(reference), reference, threshold=0.5, min_region_mm3=5.0)
    document = json.loads(json.dumps(regions_document(result, reference, case="c1")))
    assert document["schema"] == "buseg-regions" and document["coordinate_system"] == "RAS"
    assert document["case"] == "c1" and len(document["regions"]) == 2
    assert document["geometry"]["size_ijk"] == [30, 20, 10]
    matrix = np.array(document["geometry"]["ijk_to_ras"])
    assert np.allclose(
        matrix @ [3.5, 4.5, 1.5, 1], [*_ras_with_sitk(reference, (3.5, 4.5, 1.5)), 1], atol=1e-6
    )
    assert document["summary"]["regions_listed"] == 2


# --------------------------------------------------------------------------------------
# Review regions: cut along the slice axis, tiled in the plane, flags with their reasons,
# the slice order


def _band(reference: Volume) -> np.ndarray:
    """A ring of uncertainty (0.8) around a structure on slices k = 2..7: one 3D component."""
    u = np.zeros(reference.array.shape, dtype=np.float32)
    y, x = np.indices(u.shape[1:])
    ring = np.abs(np.hypot(y - 10, x - 15) - 6) < 1.0
    u[2:8, ring] = 0.8
    return u


def test_a_band_around_a_whole_structure_is_cut_into_one_region_per_slab(reference):
    u = _band(reference)
    whole = find_regions(u, reference, min_region_mm3=0, max_regions=0)
    assert len(whole.regions) == 1 and whole.slice_review is None  # without a slice axis: the old rule
    per_slice = find_regions(u, reference, min_region_mm3=0, max_regions=0, slice_axis_ijk=2)
    assert len(per_slice.regions) == 6
    assert {r.bbox_ijk_min[2] for r in per_slice.regions} == set(range(2, 8))
    assert all(
        r.bbox_ijk_min[2] == r.bbox_ijk_max[2] and r.reason == "uncertainty" for r in per_slice.regions
    )
    assert sum(r.voxel_count for r in per_slice.regions) == whole.regions[0].voxel_count
    pairs = find_regions(u, reference, min_region_mm3=0, max_regions=0, slice_axis_ijk=2, region_slices=4)
    assert [r.bbox_ijk_max[2] - r.bbox_ijk_min[2] + 1 for r in pairs.regions] == [4, 2]  # slabs 0-3, 4-7


def test_regions_wider_than_the_extent_are_cut_into_tiles_no_wider(reference):
    u = _band(reference)
    tiles = find_regions(
        u, reference, min_region_mm3=0, max_regions=0, slice_axis_ijk=2, region_extent_mm=4.0
    )
    spacing_x, spacing_y = reference.spacing_mm[:2]
    assert len(tiles.regions) > 6
    for region in tiles.regions:
        assert (region.bbox_ijk_max[0] - region.bbox_ijk_min[0] + 1) * spacing_x <= 4.0
        assert (region.bbox_ijk_max[1] - region.bbox_ijk_min[1] + 1) * spacing_y <= 4.0
        assert region.bbox_ijk_min[2] == region.bbox_ijk_max[2]
    assert sum(r.voxel_count for r in tiles.regions) == int((u > 0.5).sum())


def test_shape_flags_become_regions_with_their_reason_ranked_by_expected_error(reference):
    from buseg.prediction.shape_flags import FLAG_ERROR_PROBABILITY, REASONS

    u = np.zeros(reference.array.shape, dtype=np.float32)
    u[5, 2:5, 2:12] = 0.6  # 30 voxels of uncertainty: 18 expected errors
    flags = np.zeros(u.shape, dtype=np.uint8)
    flags[5, 10:15, 15:25] = 1 + REASONS.index("missing-on-slice")  # 50 confident voxels
    flags[1, 10:12, 15:17] = 1 + REASONS.index("detached-fragment")  # 4 voxels
    result = find_regions(u, reference, flags=flags, min_region_mm3=0, slice_axis_ijk=2)
    assert [r.reason for r in result.regions] == ["missing-on-slice", "uncertainty", "detached-fragment"]
    first = result.regions[0]
    assert first.expected_error_voxels == pytest.approx(50 * FLAG_ERROR_PROBABILITY["missing-on-slice"])
    assert first.review_value == pytest.approx(first.expected_error_voxels * reference.voxel_volume_mm3)
    assert first.mean_uncertainty == 0.0  # the model was sure: no threshold on u finds it
    assert result.regions[1].expected_error_voxels == pytest.approx(18.0)


def test_the_slice_order_ranks_slices_by_expected_error_with_a_point_to_look_at(reference):
    u = np.full(reference.array.shape, 0.01, dtype=np.float32)
    u[6, 4:8, 20:24] = 0.9  # slice k = 6: the most expected error
    u[3, 15:17, 3:5] = 0.7  # slice k = 3: second
    result = find_regions(u, reference, min_region_mm3=0, slice_axis_ijk=2)
    review = result.slice_review
    assert review["axis_ijk"] == 2 and [s["index"] for s in review["slices"]][:2] == [6, 3]
    assert len(review["slices"]) == 10
    top = review["slices"][0]
    assert top["expected_error_voxels"] == pytest.approx(float(u[6].sum(dtype=np.float64)), rel=1e-5)
    assert np.allclose(top["center_ras"], _ras_with_sitk(reference, (21.5, 5.5, 6.0)), atol=1e-5)
    along_i = find_regions(u, reference, min_region_mm3=0, slice_axis_ijk=0).slice_review
    assert along_i["axis_ijk"] == 0 and along_i["slices"][0]["index"] in range(20, 24)
    assert len(along_i["slices"]) == 30
    document = json.loads(json.dumps(regions_document(result, reference)))
    assert document["slice_review"] == review
    assert {"id", "voxel_count", "review_value", "bbox_ijk_min", "reason"} <= set(document["regions"][0])


def test_the_review_axis_of_a_3d_image_is_its_coarsest():
    from buseg.prediction.regions import review_slice_axis

    assert review_slice_axis((0.5, 1.0, 2.0)) == 2
    assert review_slice_axis((3.0, 1.0, 1.0)) == 0
    assert review_slice_axis((1.0, 1.0, 1.0)) == 2
