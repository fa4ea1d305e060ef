"""``buseg evaluate``: label-map files against ground-truth files, per case and class.

Pairs prediction and truth files by case name (a prediction folder of ``buseg predict`` or any
folder of label maps), aligns their classes by name where the files declare them, scores each
pair with :func:`buseg.metrics.evaluate_arrays` and writes the per-case CSV and the summary
JSON atomically; progress goes to an :class:`~buseg.events.EventSink`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from buseg.errors import Cancelled, InputError, OutputError
from buseg.events import EventSink
from buseg.files.images import (
    MAX_LABEL_VALUE,
    LabelVolume,
    case_name,
    image_suffix,
    is_image_file,
    read_json,
    read_label,
)
from buseg.files.safe_files import atomic_path, ensure_output_folder
from buseg.metrics import METRICS, ClassResult, evaluate_arrays, summarize

# Suffixes that name a label map rather than a case ("case_label.nii.gz", "case_gt.nrrd", ...).
NAME_SUFFIXES = (
    "_label",
    "_labels",
    "_labelmap",
    "_seg",
    "_segmentation",
    "_pred",
    "_prediction",
    "_gt",
    "_truth",
    "_mask",
)
SKIP_SUFFIXES = ("_uncertainty",)


def normalized_case_name(path: str | Path) -> str:
    """Case name of a label file without label-ish suffixes ('p1_label.nii.gz' -> 'p1')."""
    name = case_name(path)
    for suffix in NAME_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _label_files_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if is_image_file(p) and not any(case_name(p).endswith(s) for s in SKIP_SUFFIXES)
    )


def collect_label_files(inputs: Sequence[str | Path], *, role: str) -> tuple[dict[str, Path], dict[int, str]]:
    """Case name -> label file for files or folders; plus class names (label value -> name) if known.

    A folder written by ``buseg predict`` (it has a summary.json) contributes the label maps
    and class names listed there; another folder contributes the label files in it (or in its
    ``labels/`` sub-folder when it holds none, or else the ``<case>/<case>_label.*`` files of
    its sub-folders).
    """
    found: dict[str, Path] = {}
    names: dict[int, str] = {}

    def add(path: Path, case: str | None = None) -> None:
        case = case or normalized_case_name(path)
        if case in found and found[case] != path:
            raise InputError(
                f"two {role} files for case {case!r}: {found[case]} and {path}",
                path=path,
                hint="pass one file per case",
            )
        found[case] = path

    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise InputError(f"{role} not found", path=path)
        if not path.is_dir():  # a file, or a FIFO or device: refused by name when read
            if not image_suffix(path):
                raise InputError(f"not a label map or segmentation file ({role})", path=path)
            add(path)
            continue
        summary = path / "summary.json"
        if os.path.lexists(summary):
            data = read_json(summary, what="prediction summary")
            if isinstance(data, dict) and data.get("schema") == "buseg-predict-summary":
                summary_names, labels = _summary_label_files(data, summary)
                names.update(summary_names)
                for case, label in labels:
                    add(label if label.is_absolute() else path / label, case)
                continue
        names.update(_declared_class_names(path))
        files = _label_files_in(path)
        if not files and (path / "labels").is_dir():
            files = _label_files_in(path / "labels")
        if not files:  # case sub-folders as `buseg predict`/`rank --save-predictions` write them
            files = sorted(
                f
                for sub in path.iterdir()
                if sub.is_dir()
                for f in _label_files_in(sub)
                if case_name(f) == f"{sub.name}_label"
            )
        if not files:
            raise InputError(f"no label files found in this folder ({role})", path=path)
        for file in files:
            add(file)
    return found, names


def _declared_class_names(folder: Path) -> dict[int, str]:
    """Label value -> name from the classes.json of a label folder (as training reads it: in the
    folder, or beside its ``labels/`` sub-folder), checked the same way; {} without one."""
    from buseg.data.cases import classes_from_file

    for candidate in (
        folder / "classes.json",
        folder.parent / "classes.json" if folder.name == "labels" else None,
    ):
        if candidate is not None and os.path.lexists(candidate):
            return {int(c["value"]): c["name"] for c in classes_from_file(candidate)}
    return {}


def _summary_label_files(
    data: dict[str, Any], summary: Path
) -> tuple[dict[int, str], list[tuple[str, Path]]]:
    """Class names (label value -> name) and (case, label file) of a ``buseg predict`` summary.json,
    every field checked: a summary edited by hand or damaged is refused by name, not half used."""

    def bad(what: str) -> InputError:
        return InputError(f"is not a valid prediction summary: {what}", path=summary)

    classes, cases = data.get("classes", []), data.get("cases", [])
    if not isinstance(classes, list) or not isinstance(cases, list):
        raise bad("'classes' and 'cases' must be lists")
    names: dict[int, str] = {}
    for number, entry in enumerate(classes):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise bad(f"classes[{number}] is not a class with a name")
        index, value = entry.get("index", 0), entry.get("label_value")
        if not _plain_int(index) or not _plain_int(value) or not 0 <= value <= MAX_LABEL_VALUE:
            raise bad(f"classes[{number}] has no integer 'index' and 'label_value' (0..{MAX_LABEL_VALUE})")
        if index > 0:
            names[value] = entry["name"]
    labels: list[tuple[str, Path]] = []
    for number, entry in enumerate(cases):
        if not isinstance(entry, dict) or not isinstance(entry.get("case"), str) or not entry["case"]:
            raise bad(f"cases[{number}] is not a case with a name")
        outputs = entry.get("outputs") or {}
        label = outputs.get("label") if isinstance(outputs, dict) else None
        if entry.get("status") == "ok":
            if not isinstance(label, str) or not label:
                raise bad(f"cases[{number}] ({entry['case'][:80]}) names no label file")
            labels.append((entry["case"], Path(label)))
    return names, labels


def _plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _value_names(label: LabelVolume, known: dict[int, str]) -> dict[int, str]:
    if label.segments:
        return {v: str(s["name"]) for v, s in label.segments.items()}
    return dict(known)


def _align_segmentation(label: LabelVolume, target_names: dict[int, str], *, path: Path) -> np.ndarray:
    """Re-number a .seg.nrrd's segments to the label values that carry the same names on the other side."""
    by_name = {name: value for value, name in target_names.items()}
    out = np.zeros(label.array.shape, dtype=np.int32)
    for index, segment in label.segments.items():
        name = str(segment["name"])
        if name not in by_name:
            raise InputError(
                f"segment {name!r} has no class of that name on the other side "
                f"(known: {', '.join(sorted(by_name)) or 'none - a plain label map has no names'})",
                path=path,
                hint="compare label maps with label maps, or name the segments like the model's classes",
            )
        out[label.array == index] = by_name[name]
    return out


@dataclass
class EvaluationResult:
    rows: list[ClassResult]
    summary: dict[str, Any]
    csv_path: Path
    json_path: Path
    unmatched_predictions: list[str]
    unmatched_truths: list[str]


def _load_pair(
    pred_path: Path, truth_path: Path, pred_names: dict[int, str], truth_names: dict[int, str]
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], dict[int, str]]:
    """Both label maps of a case on one grid and in one value space, and the names of those values.

    Values are compared as they are, except that a .seg.nrrd (segments numbered in file order)
    is renumbered by segment name to the other side's label values.
    """
    pred = read_label(pred_path)
    truth = read_label(truth_path)
    difference = truth.same_grid(pred)
    if difference:
        raise InputError(
            f"prediction does not lie on the ground truth's voxel grid: {difference}",
            path=pred_path,
            hint=f"ground truth: {truth_path}",
        )
    pred_array, truth_array = pred.array, truth.array
    if truth.segments:
        anchor = _value_names(pred, pred_names)
        truth_array = _align_segmentation(truth, anchor, path=truth_path)
    elif pred.segments:
        anchor = _value_names(truth, truth_names)
        pred_array = _align_segmentation(pred, anchor, path=pred_path)
    else:
        anchor = {**truth_names, **pred_names}
    return pred_array, truth_array, truth.spacing_mm, anchor


def _rows_csv(rows: Sequence[ClassResult]) -> str:
    buffer = io.StringIO()
    fields = list(ClassResult.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        data = asdict(row)
        writer.writerow(
            {k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}
        )
    return buffer.getvalue()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def evaluate_files(
    predictions: Sequence[str | Path],
    truths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    label_values: Sequence[int] | None = None,
    overwrite: bool = False,
    events: EventSink | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EvaluationResult:
    """Evaluate predicted label maps against ground truth, matched by case name; write metrics.csv/json.

    Classes are the label values given (``label_values``) or else every non-zero value found in
    any truth or prediction; each case gets a row for each class (so a class a prediction
    misses is counted, by the protocol's rule).
    """
    sink = events or EventSink()
    _check_label_values(label_values)
    out = Path(out_dir)
    csv_path, json_path = out / "metrics.csv", out / "metrics.json"
    for path in (csv_path, json_path):
        if path.exists() and not overwrite:
            raise OutputError("exists already; refusing to overwrite it", path=path, hint="pass --overwrite")
    matched = _match_files(predictions, truths)
    ensure_output_folder(out)  # before the work, not after it
    _announce(sink, matched, predictions, truths, out, label_values)
    start = time.perf_counter()
    scorer = _CaseScorer(matched, label_values)
    scorer.score_all(sink, should_stop)
    classes = scorer.classes()
    rows = scorer.rows(classes)
    summary = summarize(rows)
    document = {
        "schema": "buseg-evaluation",
        "schema_version": 1,
        "protocol": "medpy-style dc/jc/hd95/asd; a class missing from the prediction scores 0 on all four; "
        "see docs/inference.md",
        "predictions": [str(p) for p in predictions],
        "truths": [str(t) for t in truths],
        "classes": [{"label_value": v, "name": n} for v, n in classes],
        "summary": summary,
        "cases": [asdict(r) for r in rows],
        "unmatched_predictions": matched.unmatched_predictions,
        "unmatched_truths": matched.unmatched_truths,
        "seconds": time.perf_counter() - start,
    }
    with atomic_path(csv_path, overwrite=overwrite) as temp:
        temp.write_text(_rows_csv(rows))
    with atomic_path(json_path, overwrite=overwrite) as temp:
        temp.write_text(json.dumps(_json_safe(document), indent=2) + "\n")
    return EvaluationResult(
        rows, summary, csv_path, json_path, matched.unmatched_predictions, matched.unmatched_truths
    )


def _check_label_values(label_values: Sequence[int] | None) -> None:
    invalid = [
        v
        for v in label_values or ()
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= MAX_LABEL_VALUE
    ]
    if invalid:
        raise InputError(
            f"label value(s) {', '.join(map(str, invalid))} cannot be evaluated: foreground label values are "
            f"1..{MAX_LABEL_VALUE} (0 is the background)"
        )


@dataclass
class _MatchedFiles:
    """Prediction and ground-truth files paired by case name, and the class names their folders give."""

    pred_files: dict[str, Path]
    truth_files: dict[str, Path]
    pred_names: dict[int, str]
    truth_names: dict[int, str]
    cases: list[str]
    unmatched_predictions: list[str]
    unmatched_truths: list[str]


def _match_files(predictions: Sequence[str | Path], truths: Sequence[str | Path]) -> _MatchedFiles:
    pred_files, pred_names = collect_label_files(predictions, role="prediction")
    truth_files, truth_names = collect_label_files(truths, role="ground truth")
    cases = sorted(set(pred_files) & set(truth_files))
    if not cases:
        raise InputError(
            f"no case names match between predictions ({', '.join(sorted(pred_files)[:5])}) and ground truth "
            f"({', '.join(sorted(truth_files)[:5])})",
            hint="files are matched by name, ignoring suffixes such as _label, _seg, _pred, _gt",
        )
    return _MatchedFiles(
        pred_files,
        truth_files,
        pred_names,
        truth_names,
        cases,
        unmatched_predictions=sorted(set(pred_files) - set(truth_files)),
        unmatched_truths=sorted(set(truth_files) - set(pred_files)),
    )


def _announce(
    sink: EventSink,
    matched: _MatchedFiles,
    predictions: Sequence[str | Path],
    truths: Sequence[str | Path],
    out: Path,
    label_values: Sequence[int] | None,
) -> None:
    """The 'started' event, then a warning for each side's cases that the other side lacks."""
    sink.emit(
        "started",
        job="evaluate",
        config={
            "predictions": [str(p) for p in predictions],
            "truths": [str(t) for t in truths],
            "out_dir": str(out),
            "label_values": list(label_values) if label_values else None,
        },
        device="cpu",
        device_reason="metrics are computed on the CPU",
        total=len(matched.cases),
    )
    renamed = [
        f"{value} is {matched.truth_names[value]!r} in the ground truth but {name!r} in the predictions"
        for value, name in sorted(matched.pred_names.items())
        if value in matched.truth_names and matched.truth_names[value] != name
    ]
    if renamed:
        sink.emit(
            "warning",
            message="the two sides name label values differently (the ground truth's classes.json, the "
            "model's classes): label value " + "; ".join(renamed[:10]) + ". Values are compared as they "
            "are: check that each value means the same structure on both sides",
            detail={"renamed": renamed},
        )
    unmatched_pred, unmatched_truth = matched.unmatched_predictions, matched.unmatched_truths
    if unmatched_pred:
        sink.emit(
            "warning",
            message=f"{len(unmatched_pred)} prediction(s) without ground truth, skipped: "
            + ", ".join(unmatched_pred[:10]),
        )
    if unmatched_truth:
        sink.emit(
            "warning",
            message=f"{len(unmatched_truth)} ground truth case(s) without prediction, skipped: "
            + ", ".join(unmatched_truth[:10]),
        )


class _CaseScorer:
    """Scores the matched cases one at a time, gathering the class names and label values met on the way.

    The class list is known only after the last case (a value may first appear there), so rows
    are completed to one per class and case at the end.
    """

    def __init__(self, matched: _MatchedFiles, label_values: Sequence[int] | None):
        self.matched = matched
        self.label_values = label_values
        self.names: dict[int, str] = {**matched.truth_names, **matched.pred_names}
        self.per_case: dict[str, list[ClassResult]] = {}
        self.seen: set[int] = set(label_values or ())
        self.present: set[int] = set()  # label values found in any file

    def score_all(self, sink: EventSink, should_stop: Callable[[], bool] | None) -> None:
        cases = self.matched.cases
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about empty masks; the rules above handle them
            for index, case in enumerate(cases, start=1):
                if should_stop is not None and should_stop():
                    raise Cancelled(f"cancelled after {index - 1} of {len(cases)} cases; nothing written")
                case_start = time.perf_counter()
                self.score_case(case)
                sink.emit(
                    "case",
                    index=index,
                    total=len(cases),
                    case=case,
                    outputs={},
                    seconds=time.perf_counter() - case_start,
                )

    def score_case(self, case: str) -> None:
        m = self.matched
        pred_array, truth_array, spacing, anchor = _load_pair(
            m.pred_files[case], m.truth_files[case], m.pred_names, m.truth_names
        )
        self.names.update(anchor)
        found = {int(v) for v in np.unique(truth_array) if v} | {int(v) for v in np.unique(pred_array) if v}
        self.present.update(found)
        values = sorted(self.label_values) if self.label_values else sorted(found)
        self.seen.update(values)
        self.per_case[case] = evaluate_arrays(
            case, pred_array, truth_array, spacing, [(v, self.names.get(v, f"label_{v}")) for v in values]
        )

    def classes(self) -> list[tuple[int, str]]:
        """(label value, name) of every class evaluated; refuses label values that no file has."""
        if not self.seen:
            raise InputError("no foreground labels in any prediction or ground truth file")
        absent = sorted(set(self.label_values or ()) - self.present)
        if absent:
            # Scores of a class that no file contains would be empty rows that look like results.
            raise InputError(
                f"label value(s) {', '.join(map(str, absent))} occur in no prediction and no ground truth "
                f"(values found: {', '.join(map(str, sorted(self.present))) or 'none'})",
                hint="--labels takes label values present in the files",
            )
        return [(v, self.names.get(v, f"label_{v}")) for v in sorted(self.seen)]

    def rows(self, classes: Sequence[tuple[int, str]]) -> list[ClassResult]:
        """One row per case and class, in case order, each class under its final name."""
        rows: list[ClassResult] = []
        for case in self.matched.cases:
            done = {r.label_value: r for r in self.per_case[case]}
            for value, name in classes:
                # A class seen only in other cases is absent from both masks here.
                row = done.get(value) or ClassResult(
                    case, name, value, *(float("nan"),) * len(METRICS), 0, 0, "both"
                )
                row.class_name = name
                rows.append(row)
        return rows


def format_summary(summary: dict[str, Any]) -> str:
    """A terminal table: one line per class and the mean over classes (Dice/Jaccard in %)."""

    def fmt(value: float, percent: bool = False) -> str:
        if not math.isfinite(value):
            return "-"
        return f"{100 * value:.2f}" if percent else f"{value:.2f}"

    header = f"{'class':<22}{'Dice %':>8}{'Jacc. %':>9}{'HD95 mm':>9}{'ASD mm':>8}{'HD95 vx':>9}{'ASD vx':>8}  empty p/t"
    lines = [header, "-" * len(header)]
    for name, c in summary["classes"].items():
        lines.append(
            f"{name[:21]:<22}{fmt(c['dice'], True):>8}{fmt(c['jaccard'], True):>9}{fmt(c['hd95_mm']):>9}"
            f"{fmt(c['asd_mm']):>8}{fmt(c['hd95_voxels']):>9}{fmt(c['asd_voxels']):>8}"
            f"  {c['empty_prediction']}/{c['empty_truth']}"
        )
    m = summary["mean"]
    lines.append("-" * len(header))
    lines.append(
        f"{'mean over classes':<22}{fmt(m['dice'], True):>8}{fmt(m['jaccard'], True):>9}{fmt(m['hd95_mm']):>9}"
        f"{fmt(m['asd_mm']):>8}{fmt(m['hd95_voxels']):>9}{fmt(m['asd_voxels']):>8}"
    )
    lines.append(
        f"{summary['cases']} case(s). Empty p/t = cases where the class is missing from the prediction "
        "(scored 0 on all four, published protocol) / from the truth (distances left out)."
    )
    return "\n".join(lines)
