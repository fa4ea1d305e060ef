"""Images in, files out: ``buseg predict``.

:func:`predict_files` finds the images, refuses outputs that would overwrite the user's files,
predicts each case (:func:`buseg.prediction.case.predict_case`), writes its label map,
``.seg.nrrd``, uncertainty map and ``regions.json`` atomically, and a ``summary.json`` of the
run; progress goes to an :class:`~buseg.events.EventSink`. One failing case is reported and the
others go on.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from buseg import __version__
from buseg.config import PredictConfig, to_dict
from buseg.errors import BusegError, InputError, OutputError, ResourceError
from buseg.events import EventSink
from buseg.files.images import (
    SEGMENTATION_SUFFIX,
    case_name,
    image_suffix,
    is_image_file,
    read_image,
    read_image_header,
    resolved_path,
    safe_case_name,
    write_image,
    write_segmentation,
)
from buseg.files.safe_files import atomic_path, ensure_output_folder, write_json_atomic
from buseg.memory import check_memory
from buseg.model.checkpoint import LoadedModel
from buseg.prediction.case import (
    Prediction,
    backend_info,
    load_for_prediction,
    network_device,
    predict_case,
    prediction_memory_bytes,
)
from buseg.prediction.regions import RegionSet, regions_document
from buseg.prediction.windows import check_stop, release_freed_memory

SUMMARY_SCHEMA = "buseg-predict-summary"

# Output format for each input format (.mhd/.nhdr would need a second data file: not atomic).
OUTPUT_SUFFIX = {
    ".nii.gz": ".nii.gz",
    ".nii": ".nii",
    ".nrrd": ".nrrd",
    ".nhdr": ".nrrd",
    ".mha": ".mha",
    ".mhd": ".mha",
}


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(case name, path) of every image given: files, or the image files in folders (sorted).

    A folder without images of its own but with an ``images/`` sub-folder is read from there.
    Segmentations (.seg.nrrd) are not images. Case names are made safe as file names
    (:func:`~buseg.files.images.safe_case_name`) and must be unique (they name the output folders).
    """
    found: list[tuple[str, Path]] = []
    if not inputs:
        raise InputError("no input images given")
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise InputError("input not found", path=path)
        if not path.is_dir():  # a FIFO or device too: refused by name when read, as an unreadable file
            if image_suffix(path) in ("", SEGMENTATION_SUFFIX):
                raise InputError("not an image file (NIfTI, NRRD or MetaImage expected)", path=path)
            found.append((case_name(path), path))
            continue

        def images_in(folder: Path) -> list[Path]:
            return sorted(
                p for p in folder.iterdir() if is_image_file(p) and image_suffix(p) != SEGMENTATION_SUFFIX
            )

        files = images_in(path)
        if not files and (path / "images").is_dir():
            files = images_in(path / "images")
        if not files:
            raise InputError("no image files (NIfTI, NRRD, MHA) in this folder", path=path)
        found += [(case_name(f), f) for f in files]
    # Absolute paths: the outputs name their inputs. Safe case names: they name output folders and
    # files, so a name such as '..' or 'con' must not lead outside the output folder or to a device.
    found = [(safe_case_name(case), resolved_path(path)) for case, path in found]
    seen: dict[str, Path] = {}
    for case, path in found:
        if case.lower() in seen:  # case-insensitively: so are the file systems of Windows and macOS
            raise InputError(
                f"two inputs have the case name {case!r}: {seen[case.lower()]} and {path}",
                path=path,
                hint="case names name the output folders; rename one of them",
            )
        seen[case.lower()] = path
    return found


def output_suffix(input_path: Path, output_format: str) -> str:
    if output_format != "auto":
        return "." + output_format.lstrip(".")
    return OUTPUT_SUFFIX.get(image_suffix(input_path), ".nii.gz")


def output_paths(out_dir: Path, case: str, suffix: str) -> dict[str, Path]:
    """Where the outputs of one case go: ``out_dir/<case>/...``."""
    folder = out_dir / case
    return {
        "label": folder / f"{case}_label{suffix}",
        "segmentation": folder / f"{case}{SEGMENTATION_SUFFIX}",
        "uncertainty": folder / f"{case}_uncertainty{suffix}",
        "regions": folder / "regions.json",
    }


def write_prediction(
    prediction: Prediction,
    paths: dict[str, Path],
    *,
    overwrite: bool = False,
    context: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write a case's four outputs all-or-nothing: temporary files first, renamed only when all are written."""
    reference = prediction.reference
    foreground = [c for c in prediction.classes if c["index"] > 0]
    document = regions_document(
        prediction.regions,
        reference,
        **(context or {}),
        uncertainty={"method": prediction.method, "passes": prediction.passes},
        statistics=prediction.statistics(),
        outputs={k: p.name for k, p in paths.items() if k != "regions"},
    )

    @contextlib.contextmanager
    def naming(kind: str) -> Iterator[None]:
        """An error while writing a temporary file names the output it was to become."""
        try:
            yield
        except OutputError as exc:
            raise OutputError(exc.message, path=paths[kind], hint=exc.hint) from None

    with contextlib.ExitStack() as stack:
        temps = {
            kind: stack.enter_context(atomic_path(path, overwrite=overwrite)) for kind, path in paths.items()
        }
        # Largest first, and the allocator's free memory handed back in between: writers copy
        # their array (the float32 map of a 512x512x300 CT is 300 MB).
        with naming("uncertainty"):
            write_image(
                reference,
                temps["uncertainty"],
                array=prediction.uncertainty_map.astype(np.float32, copy=False),
                overwrite=True,
            )
        release_freed_memory()
        with naming("label"):
            write_image(reference, temps["label"], array=prediction.label_values(), overwrite=True)
        release_freed_memory()
        with naming("segmentation"):
            write_segmentation(
                prediction.labels, reference, foreground, temps["segmentation"], overwrite=True
            )
        with naming("regions"):
            write_json_atomic(temps["regions"], json_safe(document), overwrite=True)
    return {kind: str(path) for kind, path in paths.items()}


SUMMARY_SLICES = 3  # slices to check first, per case in summary.json


def review_summary(region_set: RegionSet) -> dict[str, Any]:
    """What summary.json says per case about where to look: the slice axis and the first slices."""
    review = region_set.slice_review or {"axis_ijk": None, "slices": []}
    return {
        "slice_axis_ijk": review["axis_ijk"],
        "slices_to_check": review["slices"][:SUMMARY_SLICES],
        "first_region_reason": region_set.regions[0].reason if region_set.regions else None,
    }


def json_safe(value: Any) -> Any:
    """``value`` with NaN/infinity replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass
class CaseOutcome:
    index: int
    case: str
    path: Path
    prediction: Prediction | None
    error: BusegError | None
    seconds: float


def iter_predictions(
    images: Sequence[tuple[str, Path]],
    model: LoadedModel,
    config: PredictConfig,
    *,
    sink: EventSink,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[CaseOutcome]:
    """Predict the images one by one; an unreadable image, or one too large for the memory, is
    reported (warning) and skipped, not fatal. The memory an image needs is estimated from its
    header before its voxels are read."""
    device = network_device(model.network)
    for index, (case, path) in enumerate(images, start=1):
        check_stop(should_stop)
        start = time.perf_counter()
        try:
            header = read_image_header(path)
            check_memory(
                prediction_memory_bytes(header.size_xyz, model, config, device),
                f"predicting {path.name} ({'x'.join(map(str, header.size_xyz))} voxels)",
            )
            volume = read_image(path)
            prediction = predict_case(
                model,
                volume,
                config,
                should_stop=should_stop,
                warn=lambda m, case=case: sink.emit("warning", message=f"{case}: {m}"),
            )
            del volume  # not needed for writing the outputs
        except (InputError, ResourceError) as exc:
            sink.emit("warning", message=f"{case}: skipped: {exc}", detail={"case": case, "path": str(path)})
            yield CaseOutcome(index, case, path, None, exc, time.perf_counter() - start)
            continue
        yield CaseOutcome(index, case, path, prediction, None, time.perf_counter() - start)


@dataclass
class PredictResult:
    out_dir: Path
    summary_path: Path
    cases: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.cases if c["status"] != "ok"]


def _refuse_existing_outputs(planned: dict[str, dict[str, Path]], summary_path: Path, out_dir: Path) -> None:
    """An OutputError naming the first output an earlier run left, if any (nothing is replaced)."""
    existing = [p for paths in planned.values() for p in paths.values() if p.exists()]
    existing += [summary_path] if summary_path.exists() else []
    if existing:
        raise OutputError(
            f"exists already ({len(existing)} output file(s) of an earlier run in {out_dir}); refusing to "
            "overwrite",
            path=existing[0],
            hint="pass --overwrite to replace them, or choose another --out",
        )


def _case_entry(
    outcome: Any, paths: dict[str, Path], out_dir: Path, config: PredictConfig, model_file: str
) -> tuple[dict[str, Any], Any]:
    """Write one predicted case's outputs; returns its summary entry and the 'case' event's outputs."""
    prediction = outcome.prediction
    write_start = time.perf_counter()
    outputs = write_prediction(
        prediction,
        paths,
        overwrite=config.overwrite,
        context={"case": outcome.case, "image": str(outcome.path), "model": model_file},
    )
    entry = {
        "case": outcome.case,
        "input": str(outcome.path),
        "status": "ok",
        "outputs": {k: str(p.relative_to(out_dir)) for k, p in paths.items()},
        "seconds": outcome.seconds + (time.perf_counter() - write_start),
        "model_seconds": prediction.model_seconds,
        **prediction.statistics(),
        "flagged_volume_mm3": prediction.regions.flagged_volume_mm3,
        "regions_listed": len(prediction.regions.regions),
        **review_summary(prediction.regions),
        "warnings": prediction.warnings,
    }
    return entry, outputs


def _raise_for_failures(result: PredictResult, errors: list[BusegError], total: int) -> None:
    """The job's error when cases failed: the case's own error for one input, else a list of them."""
    if not result.failed:
        return
    if total == 1:
        raise errors[0]  # the one case's own error (and exit code: a ResourceError is 3)
    names = ", ".join(c["case"] for c in result.failed[:10])
    raise InputError(
        f"{len(result.failed)} of {total} case(s) could not be predicted: {names} "
        f"(first: {errors[0].message})",
        path=result.failed[0]["input"],
        hint=f"details in the warnings and in {result.summary_path}",
    )


def predict_files(
    inputs: Sequence[str | Path],
    config: PredictConfig,
    *,
    events: EventSink | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PredictResult:
    """``buseg predict``: segment every input image and write its outputs under ``config.out_dir``.

    Per case ``<out>/<case>/``: ``<case>_label.<ext>`` (label values), ``<case>.seg.nrrd``
    (named, colored segments), ``<case>_uncertainty.<ext>`` (float32, 0..1), ``regions.json``;
    plus ``<out>/summary.json``. Nothing existing is replaced unless ``config.overwrite``.
    An unreadable image is skipped with a warning and the job fails at the end (after the
    other cases) with an error listing it.
    """
    sink = events or EventSink()
    config.validate()
    images = collect_images(inputs)
    out_dir = Path(config.out_dir)
    planned = {
        case: output_paths(out_dir, case, output_suffix(path, config.output_format)) for case, path in images
    }
    summary_path = out_dir / "summary.json"
    if not config.overwrite:
        _refuse_existing_outputs(planned, summary_path, out_dir)
    model, device, reason = load_for_prediction(config)
    engine = backend_info(model, config, device)
    ensure_output_folder(out_dir)  # before the first case is computed
    classes = [c["name"] for c in model.classes]
    sink.emit(
        "started",
        job="predict",
        config=to_dict(config),
        device=str(device),
        device_reason=reason,
        **engine,
        total=len(images),
        classes=classes,
        buseg_version=__version__,
    )
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA,
        "schema_version": 1,
        "buseg_version": __version__,
        "model": str(Path(config.model_path).resolve()),
        "device": str(device),
        **engine,
        "config": to_dict(config),
        "classes": model.classes,
        "cases": [],
    }
    errors: list[BusegError] = []
    for outcome in iter_predictions(images, model, config, sink=sink, should_stop=should_stop):
        if outcome.prediction is None:
            entry = {
                "case": outcome.case,
                "input": str(outcome.path),
                "status": "failed",
                "error": str(outcome.error),
            }
            errors.append(outcome.error)
        else:
            paths = planned[outcome.case]
            entry, outputs = _case_entry(outcome, paths, out_dir, config, summary["model"])
            sink.emit(
                "case",
                index=outcome.index,
                total=len(images),
                case=outcome.case,
                outputs=outputs,
                seconds=entry["seconds"],
            )
        summary["cases"].append(entry)
        # Rewritten after every case, so an interrupted run leaves a consistent summary.
        write_json_atomic(summary_path, json_safe(summary), overwrite=True)
    result = PredictResult(out_dir, summary_path, summary["cases"])
    _raise_for_failures(result, errors, len(images))
    return result
