"""The module's one door to the engine (``buseg``): where it is, how it is launched, what it writes.

Everything the module knows about the engine is here, so that a change of the engine's
command line, worker client or output names is a one-place edit:

* **where**: the engine ships inside the extension, in ``BidirUncertaintySeg/Logic/buseg``
  (listed in the module's CMakeLists, so the built extension has it at the same place
  relative to this file). :func:`ensureEngineImportable` puts that folder on ``sys.path``
  of Slicer's Python (and refuses a different ``buseg`` already imported), and
  :func:`workerEnvironment` first on the worker's ``PYTHONPATH``, so the worker runs the
  bundled engine even if another ``buseg`` is installed;
* **how**: the worker is ``<python> -m buseg train|predict|rank ... --progress jsonl`` (in
  Slicer, ``python`` is ``PythonSlicer``), run through :class:`buseg.client.WorkerClient`
  behind :class:`WorkerJob`;
* **what**: the training folder's files, the per-case outputs of ``buseg predict`` (listed in
  its ``summary.json``), ``regions.json`` and ``buseg rank``'s ``ranking.json``
  (:class:`PredictOutputs`, :func:`readRegions`, :func:`readRanking`).

Slicer's own process only imports the engine's pure-Python parts (config, client); the
worker imports torch, MONAI and the rest.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModuleError

MODULE_DIR = Path(__file__).resolve().parent.parent
LOGIC_DIR = MODULE_DIR / "Logic"
ENGINE_PACKAGE = "buseg"

# Files of a training output folder (buseg.training.loop): resumable state, the model to use.
LAST_CHECKPOINT = "last.pt"
MODEL_FILE = "model.pt"
RUN_CONFIG = "config.json"


def ensureEngineImportable() -> Path:
    """Make ``import buseg`` load the engine bundled with this module; returns its folder."""
    logic = str(LOGIC_DIR)
    if not (LOGIC_DIR / ENGINE_PACKAGE / "__init__.py").is_file():
        raise ModuleError(
            f"The engine is missing from the module folder ({LOGIC_DIR / ENGINE_PACKAGE}); "
            "reinstall the extension."
        )
    if logic not in sys.path:
        sys.path.insert(0, logic)
    loaded = sys.modules.get(ENGINE_PACKAGE)
    if (
        loaded is not None
        and getattr(loaded, "__file__", None)
        and Path(loaded.__file__).resolve().parent != (LOGIC_DIR / ENGINE_PACKAGE).resolve()
    ):
        raise ModuleError(
            f"Another '{ENGINE_PACKAGE}' ({loaded.__file__}) is already imported; restart Slicer "
            "so that the module's own engine is used."
        )
    return LOGIC_DIR


def workerEnvironment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: ``base`` (default: this process's) with the engine first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    paths = [str(LOGIC_DIR)] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(LOGIC_DIR)
    ]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# --------------------------------------------------------------------------------------
# Command lines: [sub-command, *arguments] after `python -m buseg` (the worker client appends
# `--progress jsonl`).


def trainCommand(configPath: str | Path, outDir: str | Path, *, overwrite: bool = False) -> list[str]:
    """A new training from a TrainConfig JSON file (the parameter node's values)."""
    args = ["train", "--config", str(configPath), "--out", str(outDir)]
    if overwrite:
        args.append("--overwrite")
    return args


def resumeCommand(outDir: str | Path) -> list[str]:
    """Continue an interrupted training in ``outDir`` from its last checkpoint.

    The run's own config.json is passed too, so the worker does not report every default
    that differs from the stored configuration as 'ignored'.
    """
    outDir = Path(outDir)
    args = ["train", "--resume", "--out", str(outDir)]
    if (outDir / RUN_CONFIG).is_file():
        args[1:1] = ["--config", str(outDir / RUN_CONFIG)]
    return args


def predictCommand(
    inputs: Sequence[str | Path],
    modelPath: str | Path,
    outDir: str | Path,
    options: dict[str, Any] | None = None,
    *,
    overwrite: bool = True,
) -> list[str]:
    """Segment ``inputs`` (files or folders): label map, .seg.nrrd, uncertainty map, regions.json per case.

    ``options`` maps PredictConfig field names to values (``uncertainty``,
    ``region_threshold`` ...); they become the flags buseg.config generates for them.
    """
    args = ["predict", *[str(p) for p in inputs], "--model", str(modelPath), "--out", str(outDir)]
    for name, value in (options or {}).items():
        args += predictFlag(name, value)
    if overwrite:
        args.append("--overwrite")
    return args


def rankCommand(
    inputs: Sequence[str | Path],
    modelPath: str | Path,
    outDir: str | Path,
    options: dict[str, Any] | None = None,
    *,
    score: str | None = None,
    savePredictions: bool = False,
    saveFirstPrediction: bool = False,
) -> list[str]:
    """Rank unlabeled images by the model's uncertainty (most informative first): ranking.json in
    ``outDir``. ``score``: one of the engine's ranking scores (default: the engine's default).
    ``saveFirstPrediction``: the first-ranked case's predict outputs too, in ``outDir/<case>/``."""
    args = ["rank", *[str(p) for p in inputs], "--model", str(modelPath), "--out", str(outDir), "--overwrite"]
    if score:
        args += ["--score", score]
    for name, value in (options or {}).items():
        args += predictFlag(name, value)
    if savePredictions:
        args.append("--save-predictions")
    if saveFirstPrediction:
        args.append("--save-first-prediction")
    return args


def predictFlag(name: str, value: Any) -> list[str]:
    """The command-line flag of a PredictConfig field (as buseg.config.add_dataclass_arguments makes it)."""
    ensureEngineImportable()
    import dataclasses

    from buseg.config import PredictConfig

    fields = {f.name: f for f in dataclasses.fields(PredictConfig)}
    if name not in fields or name in ("model_path", "out_dir", "overwrite"):
        raise ModuleError(f"Unknown prediction option '{name}'.")
    flag = fields[name].metadata.get("flag") or "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, (list, tuple)):
        return [flag, *[str(v) for v in value]]
    return [flag, str(value)]


def resumable(outDir: str | Path | None) -> bool:
    """Whether ``outDir`` holds an interrupted training (a checkpoint newer than any final model)."""
    if not outDir:
        return False
    last, model = Path(outDir) / LAST_CHECKPOINT, Path(outDir) / MODEL_FILE
    if not last.is_file():
        return False
    return not model.is_file() or model.stat().st_mtime < last.stat().st_mtime


# --------------------------------------------------------------------------------------
# Outputs of `buseg predict`


@dataclass
class PredictOutputs:
    """The files ``buseg predict`` wrote for one case (``outDir/<case>/...``)."""

    case: str
    folder: Path
    label: Path
    segmentation: Path
    uncertainty: Path
    regions: Path

    @classmethod
    def forCase(
        cls, outDir: str | Path, case: str, outputs: dict[str, Any] | None = None, suffix: str = ".nrrd"
    ) -> PredictOutputs:
        """The case's files as the worker listed them (paths relative to ``outDir`` or absolute);
        without a list, the engine's naming for an input of type ``suffix``."""
        outDir = Path(outDir)
        folder = outDir / case
        outputs = outputs or {}

        def pick(key: str, default: Path) -> Path:
            value = outputs.get(key)
            return outDir / value if isinstance(value, str) and value else default

        return cls(
            case=case,
            folder=folder,
            label=pick("label", folder / f"{case}_label{suffix}"),
            segmentation=pick("segmentation", folder / f"{case}.seg.nrrd"),
            uncertainty=pick("uncertainty", folder / f"{case}_uncertainty{suffix}"),
            regions=pick("regions", folder / "regions.json"),
        )

    def missing(self) -> list[Path]:
        return [p for p in (self.segmentation, self.uncertainty, self.regions) if not p.is_file()]


def readPredictSummary(outDir: str | Path) -> dict[str, PredictOutputs]:
    """The predicted cases of a ``buseg predict`` output folder (its summary.json), by case name."""
    path = Path(outDir) / "summary.json"
    data = _readJson(path, "buseg-predict-summary", "prediction summary")
    cases = {}
    for entry in data.get("cases") or []:
        if entry.get("status") == "ok":
            cases[str(entry["case"])] = PredictOutputs.forCase(
                outDir, str(entry["case"]), entry.get("outputs")
            )
    return cases


def readRanking(outDir: str | Path) -> list[dict[str, Any]]:
    """The ranked cases of ``buseg rank`` (ranking.json), best first: case, image, score, statistics, rank."""
    data = _readJson(Path(outDir) / "ranking.json", "buseg-ranking", "ranking")
    return sorted(data.get("cases") or [], key=lambda c: int(c.get("rank", 0)))


def _readJson(path: Path, schema: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModuleError(f"{path}: the worker did not write the {what}.") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModuleError(f"{path}: cannot be read: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != schema:
        raise ModuleError(f"{path}: not a buseg {what} file.")
    if int(data.get("schema_version", 0)) > 1:
        raise ModuleError(
            f"{path}: made by a newer engine ({schema} version {data.get('schema_version')}); "
            "update the extension."
        )
    return data


def caseName(path: str | Path) -> str:
    """The case name the engine gives an input file (its output folder's name)."""
    ensureEngineImportable()
    from buseg.files.images import case_name, safe_case_name

    return safe_case_name(case_name(path))


# --------------------------------------------------------------------------------------
# regions.json


@dataclass
class Region:
    """One flagged region of ``regions.json``; ``rank`` 1 is the one to review first."""

    rank: int
    voxelCount: int
    volumeMm3: float
    meanUncertainty: float
    maxUncertainty: float
    reviewValue: float
    classes: list[str]
    centroidRas: tuple[float, float, float]
    boundsRasMin: tuple[float, float, float]
    boundsRasMax: tuple[float, float, float]
    reason: str = ""  # why it was flagged (uncertainty, shape flag ...), when the engine says

    @property
    def mainClass(self) -> str:
        return self.classes[0] if self.classes else "background"

    @property
    def sizeRas(self) -> tuple[float, float, float]:
        return tuple(hi - lo for lo, hi in zip(self.boundsRasMin, self.boundsRasMax, strict=True))

    @property
    def centerRas(self) -> tuple[float, float, float]:
        return tuple((lo + hi) / 2 for lo, hi in zip(self.boundsRasMin, self.boundsRasMax, strict=True))


@dataclass
class ReviewSlice:
    """One slice of the review order: its IJK index, the errors expected in it, its centre (RAS)."""

    index: int
    expectedErrorVoxels: float
    centerRas: tuple[float, float, float]


@dataclass
class SliceReview:
    """regions.json's ``slice_review``: the slices to check, best first, along one IJK axis."""

    axisIjk: int
    slices: list[ReviewSlice]

    def toJson(self) -> dict[str, Any]:
        return {
            "axis_ijk": self.axisIjk,
            "slices": [
                {
                    "index": s.index,
                    "expected_error_voxels": s.expectedErrorVoxels,
                    "center_ras": list(s.centerRas),
                }
                for s in self.slices
            ],
        }


@dataclass
class RegionsDocument:
    regions: list[Region]
    summary: dict[str, Any] = field(default_factory=dict)
    geometry: dict[str, Any] = field(default_factory=dict)
    sliceReview: SliceReview | None = None  # None: the engine wrote no slice order


def _triple(value: Any, where: str, path: Path) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ModuleError(f"{path}: {where} is not three numbers.")
    return tuple(float(v) for v in value)


def readRegions(path: str | Path) -> RegionsDocument:
    """Parse ``regions.json`` (schema 'buseg-regions' version 1) into :class:`Region` objects."""
    path = Path(path)
    data = _readJson(path, "buseg-regions", "regions")
    regions = []
    for index, entry in enumerate(data.get("regions") or []):
        where = f"regions[{index}]"
        try:
            regions.append(
                Region(
                    rank=int(entry["id"]),
                    voxelCount=int(entry["voxel_count"]),
                    volumeMm3=float(entry["volume_mm3"]),
                    meanUncertainty=float(entry["mean_uncertainty"]),
                    maxUncertainty=float(entry["max_uncertainty"]),
                    reviewValue=float(entry.get("review_value", 0.0)),
                    classes=[str(c) for c in entry.get("classes") or []],
                    centroidRas=_triple(entry["centroid_ras"], f"{where}.centroid_ras", path),
                    boundsRasMin=_triple(entry["bbox_ras_min"], f"{where}.bbox_ras_min", path),
                    boundsRasMax=_triple(entry["bbox_ras_max"], f"{where}.bbox_ras_max", path),
                    reason=str(entry.get("reason") or ""),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModuleError(f"{path}: {where} is incomplete ({exc}).") from None
    regions.sort(key=lambda r: r.rank)
    review = readSliceReview(data["slice_review"], path) if data.get("slice_review") is not None else None
    return RegionsDocument(regions, data.get("summary") or {}, data.get("geometry") or {}, review)


def readSliceReview(data: Any, path: str | Path = "regions.json") -> SliceReview:
    """``slice_review`` of regions.json: {"axis_ijk": 0..2, "slices": [{"index", "expected_error_voxels",
    "center_ras"}, ...] best first}. Refused with the file and the problem named."""
    if not isinstance(data, dict):
        raise ModuleError(f"{path}: slice_review is not an object.")
    axis = data.get("axis_ijk")
    if not isinstance(axis, int) or isinstance(axis, bool) or axis not in (0, 1, 2):
        raise ModuleError(f"{path}: slice_review.axis_ijk must be 0, 1 or 2 (got {axis!r}).")
    entries = data.get("slices")
    if not isinstance(entries, list):
        raise ModuleError(f"{path}: slice_review.slices is not a list.")
    slices = []
    for number, entry in enumerate(entries):
        where = f"slice_review.slices[{number}]"
        try:
            slices.append(
                ReviewSlice(
                    int(entry["index"]),
                    float(entry["expected_error_voxels"]),
                    _triple(entry["center_ras"], f"{where}.center_ras", Path(path)),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModuleError(f"{path}: {where} is incomplete ({exc}).") from None
    return SliceReview(axis, slices)


# --------------------------------------------------------------------------------------
# The worker


@dataclass
class JobResult:
    """How a worker run ended, in the module's words."""

    status: str  # completed | cancelled | failed
    outputs: dict[str, Any] = field(default_factory=dict)
    message: str = ""  # for a person (error message and hint, or why the worker died)
    exitCode: int | None = None


WORKER_DONE_STATES = ("finished", "cancelled", "failed")


class WorkerJob:
    """A ``python -m buseg <command> ...`` worker process: the only user of ``buseg.client.WorkerClient``.

    ``poll()`` never blocks (call it from a timer on the GUI thread); ``wait()`` blocks
    (console/batch use). ``cancel()`` asks the worker to stop (a training writes a
    checkpoint first); a second ``cancel()`` kills it at once.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        python: str | None = None,
        env: dict[str, str] | None = None,
        workDir: str | Path | None = None,
        logPath: str | Path | None = None,
    ) -> None:
        ensureEngineImportable()
        from buseg.client import WorkerClient

        if not command:
            raise ValueError("empty worker command")
        self.command = [str(a) for a in command]
        self._client = WorkerClient(
            self.command[0],
            self.command[1:],
            python=python or sys.executable,
            env=workerEnvironment(env),
            cwd=str(workDir) if workDir else None,
            log_path=str(logPath) if logPath else None,
        )

    @property
    def argv(self) -> list[str]:
        return list(self._client.argv)

    def start(self) -> None:
        self._client.start()

    def poll(self) -> list[dict[str, Any]]:
        return list(self._client.poll())

    @property
    def state(self) -> str:
        """idle, starting, running, cancelling, finished, cancelled or failed."""
        return str(self._client.state)

    @property
    def done(self) -> bool:
        return self.state in WORKER_DONE_STATES

    def cancel(self) -> bool:
        return bool(self._client.cancel())

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker ended (True) or ``timeout`` seconds passed (False).
        Events that arrived meanwhile are returned by the next :meth:`poll`."""
        try:
            self._client.wait(timeout)
        except TimeoutError:
            return False
        return True

    @property
    def result(self) -> JobResult | None:
        result = self._client.result
        if result is None:
            return None
        message = result.message or ""
        hint = (result.error or {}).get("hint")
        if hint and hint not in message:
            message = f"{message}\nHint: {hint}"
        return JobResult(
            status=str(result.status),
            outputs=dict(result.outputs or {}),
            message=message,
            exitCode=result.exit_code,
        )

    @property
    def log(self) -> str:
        return self._client.log_text()

    def logTail(self, lines: int = 20) -> list[str]:
        return self.log.splitlines()[-lines:]

    def close(self) -> None:
        """Kill the worker if it still runs (the module is reloaded, Slicer quits)."""
        self._client.close()
