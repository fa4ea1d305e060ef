"""Which case to label next: ranking unlabeled images by model uncertainty (``buseg rank``).

Active learning's "label the most uncertain first" loop, as MONAI Label scores images, but
each ranked image also comes with the regions to look at. Per image, with u the voxel
uncertainty (normalised entropy), F the number of voxels predicted as foreground (any
non-background class), and A the *attention* voxels (predicted foreground, or u above the
region threshold):

* ``dice-risk`` (**default**) = E / (2F + E) with E = sum of u over A (expected errors, in
  voxels). A Dice-like ratio of expected errors to the predicted structures: 0 when the model
  is sure of everything it segments, towards 1 when the uncertain volume dwarfs the
  structures, and 1 when the model finds nothing but doubts somewhere (it is lost). Errors
  weigh relative to structure size, as in Dice; certain background far from any structure
  does not count, so neither the field of view nor the voxel size matters.
* ``mean-uncertainty`` = mean of u over the whole image (MONAI Label's epistemic score).
  Grows with the image's share of uncertain voxels, so it favours images whose anatomy fills
  a larger part of the field of view.
* ``flagged-volume`` = sum of the chance of an error x voxel volume over the flagged voxels:
  u above the region threshold, or a shape flag's error rate (:mod:`buseg.prediction.shape_flags`; mm^3
  of expected errors a reviewer would be shown): favours large images with much to fix.

A model that finds nothing and doubts nothing gives 0 on every score. Ties are broken by
case name. Measured with a tiny 2D model (Testing/Python/test_rank.py): images with more noise than
the training images rank before the clean one with ``dice-risk`` and ``mean-uncertainty``
(between two very noisy images the model is unsure of almost everything); a plain mean of
u over A (without the 2F) ranked them *last*, because many moderately uncertain voxels
dilute such a mean.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from buseg import __version__
from buseg.config import PredictConfig, to_dict
from buseg.errors import InputError, OutputError
from buseg.events import EventSink
from buseg.files.safe_files import atomic_path, ensure_output_folder
from buseg.prediction.case import Prediction, backend_info, load_for_prediction
from buseg.prediction.predict_files import (
    CaseOutcome,
    collect_images,
    iter_predictions,
    json_safe,
    output_paths,
    output_suffix,
    write_prediction,
)

SCORES = ("dice-risk", "mean-uncertainty", "flagged-volume")
SCORE_FIELDS = {
    "dice-risk": "dice_risk",
    "mean-uncertainty": "mean_uncertainty",
    "flagged-volume": "flagged_volume_mm3",
}


def case_statistics(prediction: Prediction, threshold: float) -> dict[str, float]:
    """The per-image numbers every score is taken from (see the module docstring)."""
    uncertainty = prediction.uncertainty_map
    foreground = prediction.labels > 0
    attention = foreground | (uncertainty > threshold)
    expected_errors = float(uncertainty[attention].sum(dtype=np.float64))
    foreground_voxels = int(foreground.sum())
    denominator = 2 * foreground_voxels + expected_errors
    voxel_mm3 = prediction.reference.voxel_volume_mm3
    return {
        "dice_risk": expected_errors / denominator if denominator > 0 else 0.0,
        "mean_uncertainty": float(uncertainty.mean(dtype=np.float64)),
        "flagged_volume_mm3": float(prediction.regions.total_review_value),
        "expected_errors_mm3": expected_errors * voxel_mm3,
        "foreground_volume_mm3": foreground_voxels * voxel_mm3,
    }


def score(statistics: dict[str, float], name: str) -> float:
    if name not in SCORE_FIELDS:
        raise ValueError(f"unknown score {name!r} (choose {', '.join(SCORES)})")
    return float(statistics[SCORE_FIELDS[name]])


@dataclass
class RankResult:
    entries: list[dict[str, Any]]
    csv_path: Path
    json_path: Path


STAT_FIELDS = (
    "dice_risk",
    "mean_uncertainty",
    "flagged_volume_mm3",
    "expected_errors_mm3",
    "foreground_volume_mm3",
)
CSV_FIELDS = ("rank", "case", "score", *STAT_FIELDS, "regions", "top_region_ras", "top_region_mm3", "image")


def _csv(entries: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for e in entries:
        top = e["top_regions"][0] if e["top_regions"] else None
        writer.writerow(
            {
                **{k: e[k] for k in ("rank", "case", "score", "image")},
                **{k: e["statistics"][k] for k in STAT_FIELDS},
                "regions": e["regions"],
                "top_region_ras": " ".join(f"{v:.1f}" for v in top["centroid_ras"]) if top else "",
                "top_region_mm3": f"{top['volume_mm3']:.1f}" if top else "",
            }
        )
    return buffer.getvalue()


def rank_files(
    inputs: Sequence[str | Path],
    config: PredictConfig,
    *,
    score_name: str = "dice-risk",
    top_regions: int = 3,
    save_predictions: bool = False,
    save_first_prediction: bool = False,
    events: EventSink | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RankResult:
    """Predict every image, score it, write ``ranking.csv``/``ranking.json`` in ``config.out_dir``.

    With ``save_predictions`` each case's outputs are written as ``buseg predict`` writes
    them (``<out>/<case>/``), so the regions can be opened in Slicer. With
    ``save_first_prediction`` only the first-ranked case's are (what "label the next case"
    opens, without predicting it again): a case that scores higher than those before it
    replaces their outputs, so the disk holds one case's outputs at a time.
    """
    if score_name not in SCORES:
        raise InputError(f"unknown score {score_name!r}; choose one of {', '.join(SCORES)}")
    sink = events or EventSink()
    config.validate()
    images = collect_images(inputs)
    out_dir = Path(config.out_dir)
    csv_path, json_path = out_dir / "ranking.csv", out_dir / "ranking.json"
    planned = {
        case: output_paths(out_dir, case, output_suffix(path, config.output_format)) for case, path in images
    }
    saving = save_predictions or save_first_prediction
    if not config.overwrite:
        _refuse_existing(csv_path, json_path, planned if saving else {})
    model, device, reason = load_for_prediction(config)
    engine = backend_info(model, config, device)  # an ONNX export failure stops before any output
    ensure_output_folder(out_dir)  # before the first case is computed
    model_file = str(Path(config.model_path).resolve())
    sink.emit(
        "started",
        job="rank",
        config={**to_dict(config), "score": score_name},
        device=str(device),
        device_reason=reason,
        **engine,
        total=len(images),
        classes=[c["name"] for c in model.classes],
        buseg_version=__version__,
    )
    scorer = _ImageScorer(config, score_name, top_regions, planned if saving else None, model_file)
    scorer.first_only = save_first_prediction and not save_predictions
    for outcome in iter_predictions(images, model, config, sink=sink, should_stop=should_stop):
        scorer.add(outcome, sink, total=len(images))
    entries, failed = scorer.ranked(), scorer.failed
    document = {
        "schema": "buseg-ranking",
        "schema_version": 1,
        "buseg_version": __version__,
        "score": score_name,
        "model": model_file,
        "config": to_dict(config),
        "cases": entries,
        "failed": failed,
    }
    _write_ranking(csv_path, json_path, entries, document, overwrite=config.overwrite)
    if failed:
        raise _unranked_error(failed, len(images), csv_path, json_path)
    return RankResult(entries, csv_path, json_path)


def _refuse_existing(csv_path: Path, json_path: Path, planned: dict[str, dict[str, Path]]) -> None:
    """Refuse, before the model is loaded, to replace the ranking or the predictions it would save."""
    existing = [p for p in (csv_path, json_path) if p.exists()]
    existing += [p for paths in planned.values() for p in paths.values() if p.exists()]
    if existing:
        raise OutputError(
            "exists already; refusing to overwrite it",
            path=existing[0],
            hint="pass --overwrite to replace it, or choose another --out",
        )


def _write_ranking(
    csv_path: Path,
    json_path: Path,
    entries: list[dict[str, Any]],
    document: dict[str, Any],
    *,
    overwrite: bool,
) -> None:
    with atomic_path(csv_path, overwrite=overwrite) as temp:
        temp.write_text(_csv(entries))
    with atomic_path(json_path, overwrite=overwrite) as temp:
        temp.write_text(json.dumps(json_safe(document), indent=2) + "\n")


class _ImageScorer:
    """Collects one ranking entry per predicted image (writing its outputs if asked) and the failures."""

    def __init__(
        self,
        config: PredictConfig,
        score_name: str,
        top_regions: int,
        planned: dict[str, dict[str, Path]] | None,
        model_file: str,
    ):
        self.config = config
        self.score_name = score_name
        self.top_regions = top_regions
        self.planned = planned  # None: predictions are not saved
        self.model_file = model_file
        self.entries: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.first_only = False  # save the outputs of the best case so far only
        self._saved: dict[str, Any] | None = None  # that case's entry

    def add(self, outcome: CaseOutcome, sink: EventSink, *, total: int) -> None:
        if outcome.prediction is None:
            self.failed.append(
                {"case": outcome.case, "image": str(outcome.path), "error": str(outcome.error)}
            )
            return
        entry = self._entry(outcome, outcome.prediction)
        self.entries.append(entry)
        sink.emit(
            "case",
            index=outcome.index,
            total=total,
            case=outcome.case,
            outputs=entry["outputs"],
            seconds=entry["seconds"],
        )

    def _entry(self, outcome: CaseOutcome, prediction: Prediction) -> dict[str, Any]:
        stats = case_statistics(prediction, self.config.region_threshold)
        write_start = time.perf_counter()
        entry = {
            "case": outcome.case,
            "image": str(outcome.path),
            "score": score(stats, self.score_name),
            "statistics": stats,
            "regions": len(prediction.regions.regions),
            "top_regions": [r.to_dict() for r in prediction.regions.regions[: self.top_regions]],
            "outputs": {},
        }
        if self.planned is not None and (not self.first_only or self._ranks_before(entry, self._saved)):
            entry["outputs"] = write_prediction(
                prediction,
                self.planned[outcome.case],
                overwrite=self.config.overwrite,
                context={"case": outcome.case, "image": str(outcome.path), "model": self.model_file},
            )
            if self.first_only:
                self._forget_saved()
                self._saved = entry
        entry["seconds"] = outcome.seconds + (time.perf_counter() - write_start)
        return entry

    @staticmethod
    def _ranks_before(entry: dict[str, Any], other: dict[str, Any] | None) -> bool:
        """Whether ``entry`` is ranked before ``other`` (the order of :meth:`ranked`)."""
        return other is None or (-entry["score"], entry["case"]) < (-other["score"], other["case"])

    def _forget_saved(self) -> None:
        """Remove the outputs of the case saved so far (no longer the first): this run wrote them."""
        if self._saved is None:
            return
        for path in self._saved["outputs"].values():
            Path(path).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the case folder, when nothing else is in it
            Path(next(iter(self._saved["outputs"].values()))).parent.rmdir()
        self._saved["outputs"] = {}

    def ranked(self) -> list[dict[str, Any]]:
        """The entries, highest score first (ties by case name), each with its rank."""
        if not self.entries:
            raise InputError(
                "no image could be predicted; nothing to rank",
                hint="; ".join(f"{f['case']}: {f['error']}" for f in self.failed[:3]),
            )
        self.entries.sort(key=lambda e: (-e["score"], e["case"]))
        for rank, entry in enumerate(self.entries, start=1):
            entry["rank"] = rank
        return self.entries


def _unranked_error(failed: list[dict[str, Any]], total: int, csv_path: Path, json_path: Path) -> InputError:
    # The rule of ``buseg predict``: the others are ranked and written, then the job fails
    # naming every image left out (a ranking that silently lacks images would mislead).
    names = ", ".join(f["case"] for f in failed[:10]) + (" ..." if len(failed) > 10 else "")
    return InputError(
        f"{len(failed)} of {total} image(s) could not be predicted and are not ranked: {names} "
        f"(first: {failed[0]['error']})",
        path=failed[0]["image"],
        hint=f"the others are ranked in {csv_path}; the reasons are in the warnings and in {json_path}",
    )


def format_ranking(entries: Sequence[dict[str, Any]], score_name: str) -> str:
    """The ranking as a terminal table (label the first rows first)."""
    header = (
        f"{'rank':>4}  {'case':<28}{score_name:>18}{'flagged mm3':>13}{'regions':>9}  "
        "top region centroid (RAS mm)"
    )
    lines = [header, "-" * len(header)]
    for e in entries:
        top = e["top_regions"][0] if e["top_regions"] else None
        where = ", ".join(f"{v:.1f}" for v in top["centroid_ras"]) if top else "-"
        lines.append(
            f"{e['rank']:>4}  {e['case'][:27]:<28}{e['score']:>18.4f}"
            f"{e['statistics']['flagged_volume_mm3']:>13.1f}{e['regions']:>9}  {where}"
        )
    return "\n".join(lines)
