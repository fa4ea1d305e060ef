"""The simulated clinician of the annotation-loop benchmark (benchmarks/annotation_loop.py), and what
its work costs.

Pure numpy, no model and no files, so that tests drive it on a few voxels. Every annotator starts
from the model's prediction of a scan (what the tool shows) and returns the label map the person
would add to the labeled set:

* ``full``: every slice labeled from the truth (the annotation is the truth);
* ``regions``: the prediction with the truth pasted inside the bounding boxes of the tool's first
  ``k`` flagged regions (a person who corrects what the tool points at, and nothing else);
* ``slices``: the prediction with the truth on the first ``count`` slices of the tool's slice
  review order;
* ``none``: nothing checked (the prediction, no slice shown): the control that measures what the
  fine-tuning alone does.

The cost of an annotation is counted against the prediction it started from: the *slices
edited* (slices where anything changed) and the *voxels changed*; beside them the *slices shown*,
the slices the person was asked to go through (full: every slice of the scan). Starting from the
prediction is the cheapest way to label a scan fully in the tool, so ``full``'s cost is a lower
bound and a comparison of the cheaper annotations against it is conservative.

Arrays are numpy order (z, y, x); ``slice_axis`` is the numpy axis the person scrolls through (0
for ACDC's short-axis stacks); region boxes are the tool's ``bbox_ijk_min`` / ``bbox_ijk_max``
(ITK order i = x, j = y, k = z, both ends included).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ANNOTATIONS = ("full", "regions", "slices", "none")
CHOOSERS = ("rank", "random")


@dataclass
class Annotation:
    """The label map a simulated person hands back, and the slices they were shown (indices along
    the slice axis, ascending)."""

    labels: np.ndarray
    shown_slices: tuple[int, ...]

    @property
    def slices_shown(self) -> int:
        return len(self.shown_slices)


def _checked(prediction: np.ndarray, truth: np.ndarray) -> None:
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from the truth's {truth.shape}")


def annotate_full(prediction: np.ndarray, truth: np.ndarray, slice_axis: int = 0) -> Annotation:
    """Every slice labeled from the truth."""
    _checked(prediction, truth)
    return Annotation(truth.copy(), tuple(range(truth.shape[slice_axis])))


def box_slices(bbox_ijk_min: Sequence[int], bbox_ijk_max: Sequence[int]) -> tuple[slice, ...]:
    """A region's bounding box (ITK order, both ends included) as numpy (z, y, x) slices."""
    return tuple(
        slice(int(low), int(high) + 1) for low, high in zip(bbox_ijk_min, bbox_ijk_max, strict=True)
    )[::-1]


def annotate_regions(
    prediction: np.ndarray,
    truth: np.ndarray,
    boxes: Sequence[tuple[Sequence[int], Sequence[int]]],
    k: int,
    slice_axis: int = 0,
) -> Annotation:
    """The prediction with the truth pasted inside the first ``k`` boxes (``(bbox_ijk_min,
    bbox_ijk_max)`` in the tool's order; fewer when the tool flags fewer)."""
    _checked(prediction, truth)
    labels = prediction.copy()
    shown: set[int] = set()
    for low, high in list(boxes)[: max(0, k)]:
        box = box_slices(low, high)
        labels[box] = truth[box]
        shown.update(range(box[slice_axis].start, box[slice_axis].stop))
    return Annotation(labels, tuple(sorted(shown)))


def annotate_none(prediction: np.ndarray) -> Annotation:
    """Nothing looked at or changed: the prediction, no slice shown."""
    return Annotation(prediction.copy(), ())


def annotate_slices(
    prediction: np.ndarray,
    truth: np.ndarray,
    slice_order: Sequence[int],
    count: int,
    slice_axis: int = 0,
) -> Annotation:
    """The prediction with the truth on the first ``count`` slices of ``slice_order`` (the tool's
    slice review order: indices along ``slice_axis``)."""
    _checked(prediction, truth)
    labels = prediction.copy()
    chosen = list(dict.fromkeys(int(k) for k in slice_order))[: max(0, count)]
    moved_labels, moved_truth = np.moveaxis(labels, slice_axis, 0), np.moveaxis(truth, slice_axis, 0)
    for index in chosen:
        moved_labels[index] = moved_truth[index]
    return Annotation(labels, tuple(sorted(chosen)))


def edit_cost(prediction: np.ndarray, annotation: np.ndarray, slice_axis: int = 0) -> dict[str, int]:
    """What a person changed to turn ``prediction`` into ``annotation``: the slices with any change
    and the voxels changed."""
    _checked(prediction, annotation)
    changed = prediction != annotation
    per_slice = np.moveaxis(changed, slice_axis, 0).reshape(changed.shape[slice_axis], -1).any(axis=1)
    return {"slices_edited": int(per_slice.sum()), "voxels_changed": int(changed.sum())}


def add_costs(costs: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Costs of several scans (a patient's frames, or rounds) added field by field."""
    total: dict[str, int] = {}
    for cost in costs:
        for key, value in cost.items():
            total[key] = total.get(key, 0) + int(value)
    return total


# --------------------------------------------------------------------------------------
# Which patient next


def patient_of(frame: str) -> str:
    """``patient012`` of ``patient012_frame01`` (a patient's frames are labeled together)."""
    match = re.match(r"(patient\d+)", frame)
    return match.group(1) if match else frame.split("_")[0]


def rank_patients(frame_scores: Mapping[str, float]) -> list[str]:
    """Patients in the tool's order: by the rank score of their highest-ranked frame (the tool ranks
    images; the first image of the list brings its patient), ties by patient name."""
    best: dict[str, float] = {}
    for frame, value in frame_scores.items():
        patient = patient_of(frame)
        best[patient] = max(best.get(patient, -np.inf), float(value))
    return sorted(best, key=lambda patient: (-best[patient], patient))


def random_patient(remaining: Iterable[str], seed: int, round_index: int) -> str:
    """A patient drawn uniformly from ``remaining``, the same for every arm of a seed and round that
    has the same patients left (so random+full and random+regions add the same patients)."""
    candidates = sorted(set(remaining))
    if not candidates:
        raise ValueError("no patient left in the pool")
    generator = np.random.default_rng([int(seed), int(round_index)])
    return candidates[int(generator.integers(len(candidates)))]
