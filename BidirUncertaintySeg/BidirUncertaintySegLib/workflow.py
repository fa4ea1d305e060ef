"""Train, segment, review, rank, add a corrected case - on a scene given explicitly, without Qt.

This is the module logic's body. ``BidirUncertaintySegLogic`` (in ``BidirUncertaintySeg.py``)
builds a :class:`SlicerContext` from the running application and delegates here; tests
build one from PyPI ``slicer-core``. Long work runs in a worker process (:class:`Job`): the
GUI polls it from a timer, the console waits for it; nothing here blocks unless asked to.

A job's life: export nodes to files -> start the worker -> events (progress, warnings ...)
-> the worker ends -> if it completed, load its results into the scene (the *import*) ->
done. Listeners are plain callables (no Qt signals).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import engine, labelsfolder, nodefiles, review
from .engine import JobResult, PredictOutputs, Region, ReviewSlice, SliceReview, WorkerJob
from .errors import ModuleError, PreviousTrainingError
from .parameters import ParameterStore, buildTrainConfig

INPUTS_FOLDER = "inputs"  # inside a training folder: the exported cases and the run's config
CONFIG_NAME = "train_config.json"
WORKER_LOG = "worker.log"
# Node reference from a result node (segmentation, uncertainty map) to the volume it was computed from.
INPUT_VOLUME_ROLE = "BidirUncertaintySegInputVolume"


@dataclass
class SlicerContext:
    """The scene, the logics the glue needs, and where the worker runs and writes."""

    scene: Any
    segmentationsLogic: Any
    markupsLogic: Any = None
    # The worker's Python (PythonSlicer in Slicer; a function is called when a worker starts); default: this one.
    python: str | Callable[[], str] | None = None
    env: dict[str, str] | None = None  # the worker's base environment; default: this process's
    runsFolder: Path = field(default_factory=lambda: Path.home() / "BidirUncertaintySeg" / "runs")
    workFolder: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "BidirUncertaintySeg")
    # Makes a new work folder for a job (Slicer: slicer.util.tempDirectory); default: under workFolder.
    newWorkFolder: Callable[[str], Path] | None = None
    # Labeled cases on disk (labelsfolder): corrections saved at once, cases that are only files.
    # Default: "labels" beside the runs folder.
    labelsFolder: Path | None = None

    @property
    def labelsFolderPath(self) -> Path:
        return Path(self.labelsFolder) if self.labelsFolder else Path(self.runsFolder).parent / "labels"


def unexpectedMessage(exc: BaseException, doing: str) -> str:
    """A one-line message for an error that is not a :class:`ModuleError` (a bug, a full disk ...);
    the traceback goes to the log."""
    logging.getLogger(__name__).error("Unexpected error while %s", doing, exc_info=exc)
    return f"Unexpected error while {doing}: {type(exc).__name__}: {exc}"


def timestampedFolder(parent: str | Path, prefix: str) -> Path:
    """A new, empty folder ``parent/<prefix>-YYYYmmdd-HHMMSS[-N]``."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    for number in range(1, 1000):
        folder = parent / (base if number == 1 else f"{base}-{number}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ModuleError(f"Cannot create a new folder in {parent}.")


# In the work folder: the volumes of the last ranking, kept so that unchanged ones are not exported again.
RANK_INPUTS_FOLDER = "rank-inputs"
PREVIOUS_MODEL = "previous-model.pt"  # in a run folder: the model a fine-tuning round started from


def isRunFolder(folder: str | Path) -> bool:
    """Whether ``folder`` is a training folder this module wrote (its exported cases and manifest)."""
    return (Path(folder) / INPUTS_FOLDER / nodefiles.MANIFEST_NAME).is_file()


def modelClasses(modelPath: str | Path) -> list[str]:
    """The class names of a model this module trained, in order (from its run folder's manifest);
    [] when unknown (the engine then checks them when it loads the weights)."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        manifest = json.loads((Path(modelPath).parent / INPUTS_FOLDER / nodefiles.MANIFEST_NAME).read_text())
        return [str(c["name"]) for c in manifest["classes"]]
    return []


@dataclass
class TrainingPlan:
    """A training settled by :meth:`Workflow.planTraining`, before its cases are exported."""

    outDir: Path
    configPath: Path
    config: Any
    labeled: list[tuple[Any, Any]]
    unlabeled: list[Any]
    validationCount: int
    overwrite: bool
    fineTuneFrom: Path | None = None  # the model this run starts from (None: from scratch)
    classOrder: list[str] = field(default_factory=list)  # that model's classes
    # Labeled cases of the labels folder that are not in the scene's list: (image, label) files.
    fileCases: list[tuple[Path, Path]] = field(default_factory=list)
    fileClasses: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the user, shown as the job's warnings


# --------------------------------------------------------------------------------------
# Jobs


class Job:
    """A worker job and what happens when it ends.

    ``kind``: 'train', 'segment' or 'rank'. A job may first *prepare* (export the cases, one
    per :meth:`poll`, so that a GUI timer never blocks for long; each step is delivered as an
    ``export`` event), then ``launch`` gives the worker, which is started at once.
    Listeners: ``eventListeners`` get every event (a dict), ``endListeners`` the job when the
    worker has exited (before the import), ``doneListeners`` the job when everything is over.
    After that: ``result`` (the worker's :class:`~.engine.JobResult`), ``value`` (what the
    import produced: a :class:`SegmentationResult`, a ranking...), ``importError`` (a
    message, or None). ``workFolder`` (temporary files) is removed once the import succeeded.
    """

    def __init__(
        self,
        kind: str,
        worker: WorkerJob | None = None,
        *,
        outDir: Path,
        onCompleted: Callable[[JobResult], Any] | None = None,
        preparation: Iterator[Any] | None = None,
        launch: Callable[[Any], WorkerJob | None] | None = None,
        workFolder: Path | None = None,
    ) -> None:
        if worker is None and (preparation is None or launch is None):
            raise ValueError("a job needs a worker, or a preparation and a launch")
        self.kind = kind
        self.worker = worker
        self.outDir = Path(outDir)
        self.onCompleted = onCompleted
        self.preparation = preparation
        self.launch = launch
        self.workFolder = Path(workFolder) if workFolder else None
        self.eventListeners: list[Callable[[dict[str, Any]], None]] = []
        self.endListeners: list[Callable[[Job], None]] = []
        self.doneListeners: list[Callable[[Job], None]] = []
        self.events: list[dict[str, Any]] = []
        self.result: JobResult | None = None
        self.value: Any = None
        self.importError: str | None = None
        self.done = False
        self._notes: list[dict[str, Any]] = []
        self._cancelBeforeLaunch = False
        self._ended = False

    def start(self) -> Job:
        if self.worker is not None:
            self.worker.start()
        return self

    @property
    def preparing(self) -> bool:
        return self.worker is None and not self.done

    def cancel(self) -> bool:
        """Ask the job to stop (a training writes a checkpoint); a second call kills the worker."""
        if self.done:
            return False
        if self.worker is None:
            self._cancelBeforeLaunch = True
            return True
        return self.worker.cancel()

    def kill(self) -> None:
        """Stop now: the worker's whole process tree is killed (no checkpoint)."""
        if self.worker is None:
            self._cancelBeforeLaunch = True
        elif not self.worker.done:
            self.worker.close()

    def shutdown(
        self, graceSeconds: float = 10.0, afterwards: Callable[[], None] | None = None
    ) -> threading.Thread | None:
        """Stop for good (the module is reloaded or closed, Slicer quits) without blocking the
        application: ask the worker to stop (a training writes its checkpoint), and a background
        thread kills what is left after ``graceSeconds``. Nobody polls after this, so the
        client's own deadline for the kill would never come. Returns that thread (None when no
        worker runs); ``afterwards`` runs once the worker is gone (at once when none ran). A
        worker whose Slicer has quit also stops on its own (it watches Slicer)."""
        if self.done:
            return None
        self.cancel()
        if self.worker is None:
            if self.preparation is not None:
                self.preparation.close()  # its temporary nodes go now
            if afterwards is not None:
                afterwards()
            return None
        worker = self.worker

        def stopForGood() -> None:
            if not worker.wait(graceSeconds):
                worker.close()
            if afterwards is not None:
                afterwards()

        thread = threading.Thread(target=stopForGood, name="BidirUncertaintySeg-shutdown", daemon=True)
        thread.start()
        return thread

    def abandon(self, message: str, graceSeconds: float = 10.0) -> threading.Thread | None:
        """End the job as failed because nobody can follow it any more (a listener of its
        events raised): its worker is stopped as :meth:`shutdown` stops it, and the job is done
        at once, so that the registry takes the next job instead of refusing every start.
        Nothing is imported; the work folder goes once the worker has. Returns the stopping
        thread (None when no worker ran)."""
        if self.done:
            return None
        self._ended = True
        self.result = JobResult("failed", message=message)  # before the work folder's clean-up reads it
        stopping = self.shutdown(graceSeconds, afterwards=self._removeWorkFolder)
        self.done = True
        return stopping

    @property
    def importsResults(self) -> bool:
        return self.onCompleted is not None

    @property
    def log(self) -> str:
        return self.worker.log if self.worker is not None else ""

    def logTail(self, lines: int = 20) -> list[str]:
        return self.worker.logTail(lines) if self.worker is not None else []

    def note(self, message: str) -> None:
        """Tell the user something about the job: a ``warning`` event at the next :meth:`poll`
        (when the panel or the console follows it already)."""
        self._notes.append({"event": "warning", "message": message})

    def poll(self) -> bool:
        """Deliver new events; when the worker has ended, run the import once. True when all is over."""
        if self.done:
            return True
        while self._notes:
            self._deliver(self._notes.pop(0))
        if self.worker is None:
            self._prepareStep()
            return self.done
        for event in self.worker.poll():
            self._deliver(event)
        if self.worker.done:
            self._end(self.worker.result or JobResult("failed", message="the worker ended without a result"))
        return self.done

    def _deliver(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for listener in list(self.eventListeners):
            listener(event)

    def _prepareStep(self) -> None:
        """One step of the preparation; after the last one, launch the worker."""
        assert self.preparation is not None and self.launch is not None
        if self._cancelBeforeLaunch:
            self.preparation.close()
            self._end(JobResult("cancelled", message="cancelled before the worker started"))
            return
        try:
            step = next(self.preparation)
        except StopIteration as stop:
            try:
                self.worker = self.launch(stop.value)
                if self.worker is None:  # nothing left for a worker: every result was known already
                    self._end(JobResult("completed"))
                    return
                self.worker.start()
            except Exception as exc:
                self._end(JobResult("failed", message=unexpectedMessage(exc, "starting the worker")))
            return
        except Exception as exc:
            self._end(JobResult("failed", message=unexpectedMessage(exc, "exporting the cases")))
            return
        self._deliver(
            {
                "event": "export",
                "index": step.index,
                "total": step.total,
                "case": step.case,
                "written": step.written,
            }
        )

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> JobResult:
        """Block until the job is over (console, scripts, tests). Raises TimeoutError after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the {self.kind} job is still running after {timeout} s")
            if self.worker is not None:
                self.worker.wait(interval)
        assert self.result is not None
        return self.result

    def _end(self, result: JobResult) -> None:
        """The worker is gone: import its results (once, whatever goes wrong in it), then done."""
        if self._ended:
            return
        self._ended = True
        self.result = result
        try:
            for listener in list(self.endListeners):
                listener(self)
            if self.result.status == "completed" and self.onCompleted is not None:
                self.value = self.onCompleted(self.result)
        except ModuleError as exc:
            self.importError = str(exc)
        except Exception as exc:  # a bug or a broken file must not leave the job importing forever
            self.importError = unexpectedMessage(exc, "loading the results")
        finally:
            self.done = True
        self._removeWorkFolder()
        for listener in list(self.doneListeners):
            listener(self)

    def _removeWorkFolder(self) -> None:
        """The temporary files go with the job: all of them once it succeeded or was cancelled;
        after a failure all but the worker's log (what 'Show log' points to)."""
        if self.workFolder is None or not self.workFolder.is_dir():
            return
        if self.succeeded or self.result.status == "cancelled":
            shutil.rmtree(self.workFolder, ignore_errors=True)
            return
        for entry in self.workFolder.iterdir():
            if entry.name == WORKER_LOG:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()

    @property
    def succeeded(self) -> bool:
        return (
            self.done
            and self.result is not None
            and self.result.status == "completed"
            and not self.importError
        )

    def failureMessage(self) -> str:
        """Why the job did not succeed, for a person ('' if it did)."""
        if self.importError:
            return f"The results could not be loaded: {self.importError}"
        if self.result is None or self.result.status == "completed":
            return ""
        return self.result.message or f"the worker {self.result.status} (exit code {self.result.exitCode})"

    def raiseForFailure(self) -> None:
        if not self.succeeded:
            raise ModuleError(
                f"{self.kind.capitalize()} did not succeed: {self.failureMessage()}\n"
                f"Log: {self.outDir / WORKER_LOG}"
            )


# Set on a result's segmentation node: the digest of what the model gave (see _reusableResultNodes).
RESULT_FINGERPRINT_ATTRIBUTE = "BidirUncertaintySeg.ResultFingerprint"


@dataclass
class SegmentationResult:
    """What a segmentation brings into the scene."""

    segmentationNode: Any
    uncertaintyNode: Any
    regions: list[Region]
    regionsTable: Any = None
    regionsMarkups: Any = None
    outputs: PredictOutputs | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    # The previous result of this volume, kept because the user had edited its segmentation.
    keptEdited: str = ""


@dataclass
class RankedVolume:
    rank: int
    volumeNode: Any
    score: float
    statistics: dict[str, Any]
    regions: int = 0
    # The first-ranked volume's prediction, loaded when the ranking was asked to keep it.
    segmentation: SegmentationResult | None = None


class RankingCache:
    """Per-case ranking entries of earlier rankings (``rank-cache.json`` in the rank inputs folder),
    keyed by what a case's score depends on: the model file, the image's content and the
    prediction options. A case with a known key is not predicted again."""

    FILE_NAME = "rank-cache.json"

    def __init__(self, folder: Path, modelPath: str | Path, options: dict[str, Any]) -> None:
        self.path = Path(folder) / self.FILE_NAME
        model = Path(modelPath).resolve()
        stat = model.stat()
        self.modelKey = json.dumps(
            [str(model), stat.st_mtime_ns, stat.st_size, options], sort_keys=True, default=str
        )
        self.previous: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.previous = {str(k): dict(v) for k, v in json.loads(self.path.read_text()).items()}
        self.keys: dict[str, str] = {}  # case -> its key in this ranking
        self.reused: list[dict[str, Any]] = []

    def use(self, case: str, imageFingerprint: str) -> bool:
        """Whether ``case`` has a known entry (then reused); remembers its key either way."""
        key = hashlib.sha1(f"{self.modelKey}|{imageFingerprint}".encode()).hexdigest()
        self.keys[case] = key
        entry = self.previous.get(key)
        if entry is not None:
            self.reused.append({**entry, "case": case})
        return entry is not None

    def merged(self, fresh: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The reused entries and the worker's ``fresh`` ones, ranked again (best score first);
        the cache then holds exactly this ranking's entries."""
        entries = sorted([*self.reused, *fresh], key=lambda e: (-float(e["score"]), str(e["case"])))
        for rank, entry in enumerate(entries, start=1):
            entry["rank"] = rank
        nodefiles.writeJson(
            self.path, {self.keys[str(e["case"])]: e for e in entries if str(e["case"]) in self.keys}
        )
        return entries


def rankedVolumes(entries: Sequence[dict[str, Any]], byCase: dict[str, Any]) -> list[RankedVolume]:
    """Ranking entries (``buseg rank``'s) as :class:`RankedVolume` of the volumes they name."""
    ranked = [
        RankedVolume(
            int(entry["rank"]),
            byCase[str(entry.get("case"))],
            float(entry["score"]),
            dict(entry.get("statistics") or {}),
            int(entry.get("regions") or 0),
        )
        for entry in entries
        if str(entry.get("case")) in byCase
    ]
    if not ranked:
        raise ModuleError("the ranking lists none of the volumes")
    return ranked


# --------------------------------------------------------------------------------------
# The workflow


class Workflow:
    """The module's operations on one scene. ``store`` (the parameter node) is optional for
    the console API; the GUI passes it so that settings and result nodes persist."""

    def __init__(self, context: SlicerContext, store: ParameterStore | None = None) -> None:
        self.context = context
        self.store = store
        self.savedCase: labelsfolder.FileCase | None = None  # the labels folder's case of the last addition

    @property
    def scene(self) -> Any:
        return self.context.scene

    def _newWorkFolder(self, prefix: str) -> Path:
        """A new, empty folder for one segmentation or ranking (removed once its results are loaded)."""
        if self.context.newWorkFolder is not None:
            return Path(self.context.newWorkFolder(prefix))
        return timestampedFolder(self.context.workFolder, prefix)

    def _worker(self, command: Sequence[str], folder: Path) -> WorkerJob:
        python = self.context.python() if callable(self.context.python) else self.context.python
        return WorkerJob(
            command, python=python, env=self.context.env, workDir=folder, logPath=folder / WORKER_LOG
        )

    # -- training ------------------------------------------------------------------

    def planTraining(
        self,
        labeled: Sequence[tuple[Any, Any]],
        unlabeled: Sequence[Any] = (),
        *,
        outDir: str | Path | None = None,
        overwrite: bool = False,
        validationCount: int | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> TrainingPlan:
        """Check the inputs and settle the run (folder, fine-tuning, config) without writing a case.

        Fine-tuning (the ``fineTune`` setting, when there is a current model): the run starts
        from the current model with the short schedule and, without an explicit ``outDir``,
        reuses the current model's run folder (its exported cases are kept: unchanged volumes
        are not written again). Otherwise a new ``run-<date>`` folder and the full schedule.
        """
        store = self.store or ParameterStore(self._scratchParameterNode())
        overrides = dict(overrides or {})
        fineTuneFrom = self._fineTuneModel(store, overrides)
        if validationCount is None:
            validationCount = 1 if store.get("holdOutValidation") else 0
        requested = outDir
        outDir, overwrite = self._runFolder(outDir, overwrite, fineTuneFrom)
        inputs = outDir / INPUTS_FOLDER
        try:
            onDisk = self.fileCases(labeled)
            nodefiles.checkTrainingCases(list(labeled), list(unlabeled), validationCount, len(onDisk.cases))
            config = buildTrainConfig(
                store,
                inputs / nodefiles.MANIFEST_NAME,
                outDir,
                hasValidation=bool(validationCount),
                overrides=overrides,
                initWeights=outDir / PREVIOUS_MODEL if fineTuneFrom is not None else None,
            )
            if config.method.name != "supervised" and not unlabeled:
                raise ModuleError(
                    f"Method '{config.method.name}' learns from unlabeled volumes too: add some, "
                    "or choose the supervised method."
                )
        except ModuleError:
            if requested is None and not overwrite:  # the new run-<date> folder: nothing left behind
                with contextlib.suppress(OSError):
                    outDir.rmdir()
            raise
        return TrainingPlan(
            outDir,
            inputs / CONFIG_NAME,
            config,
            list(labeled),
            list(unlabeled),
            validationCount,
            overwrite,
            fineTuneFrom,
            modelClasses(fineTuneFrom) if fineTuneFrom is not None else [],
            [(case.image, case.label) for case in onDisk.cases],
            onDisk.classes,
            [
                f"Labels folder case '{case.name}' is left out: the labeled volume '{volume}' of the "
                "scene is the same image, and its segmentation in the scene is used."
                for case, volume in onDisk.leftOut
            ],
        )

    def fileCases(self, labeled: Sequence[tuple[Any, Any]] = ()) -> labelsfolder.LabelsFolder:
        """The labels folder's cases that a training adds to ``labeled``: all but those saved
        from a volume in ``labeled`` (the scene's version of a case is the one used; they are
        in ``leftOut``)."""
        onDisk = labelsfolder.read(self.context.labelsFolderPath)
        return labelsfolder.casesBesideScene(onDisk, [volume for volume, _ in labeled])

    def _runFolder(
        self, outDir: str | Path | None, overwrite: bool, fineTuneFrom: Path | None
    ) -> tuple[Path, bool]:
        """The training's folder and whether it may replace a previous training there."""
        if outDir is None and fineTuneFrom is not None and isRunFolder(fineTuneFrom.parent):
            return fineTuneFrom.parent, True  # the loop's own folder: this round replaces its model
        outDir = Path(outDir) if outDir else timestampedFolder(self.context.runsFolder, "run")
        previous = [
            name
            for name in (engine.LAST_CHECKPOINT, engine.MODEL_FILE, engine.RUN_CONFIG)
            if (outDir / name).exists()
        ]
        if previous and not overwrite:
            raise PreviousTrainingError(
                f"{outDir} holds a previous training ({', '.join(previous)}). Resume it, choose "
                "another output folder, or allow overwriting it."
            )
        inputs = outDir / INPUTS_FOLDER
        if inputs.exists() and not (inputs / nodefiles.MANIFEST_NAME).exists():
            raise ModuleError(
                f"{inputs} exists and was not written by this module; choose another output folder."
            )
        return outDir, overwrite

    @staticmethod
    def _fineTuneModel(store: ParameterStore, overrides: dict[str, Any]) -> Path | None:
        """The model a training fine-tunes (None: from scratch)."""
        fineTune = overrides.get("fineTune", store.get("fineTune"))
        model = store.get("modelPath")
        if fineTune and model and Path(model).is_file():
            return Path(model)
        return None

    def trainingSteps(self, plan: TrainingPlan) -> Iterator[nodefiles.ExportStep]:
        """Export the cases one per step (a generator; its value is the plan), then the run's config."""
        if plan.fineTuneFrom is not None:
            # The engine's --overwrite removes model.pt when it starts: fine-tune from a copy.
            target = plan.outDir / PREVIOUS_MODEL
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{target.name}.tmp")
            shutil.copy2(plan.fineTuneFrom, temp)
            temp.replace(target)
        exported = yield from nodefiles.exportTrainingSteps(
            self.scene,
            plan.outDir / INPUTS_FOLDER,
            plan.labeled,
            plan.unlabeled,
            validationCount=plan.validationCount,
            classOrder=plan.classOrder,
            fileCases=plan.fileCases,
            fileClasses=plan.fileClasses,
        )
        names = [c["name"] for c in exported.classes]
        if plan.classOrder and names != plan.classOrder:
            raise ModuleError(
                f"Fine-tuning needs the current model's classes ({', '.join(plan.classOrder)}); the labeled "
                f"cases have {', '.join(names)}. Train from scratch (uncheck 'Fine-tune the current model')."
            )
        engine.ensureEngineImportable()
        from buseg.config import to_dict

        nodefiles.writeJson(plan.configPath, to_dict(plan.config))
        return plan

    def prepareTraining(
        self,
        labeled: Sequence[tuple[Any, Any]],
        unlabeled: Sequence[Any] = (),
        *,
        outDir: str | Path | None = None,
        overwrite: bool = False,
        validationCount: int | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> tuple[Path, Path, Any]:
        """Export the cases and write the run's TrainConfig at once; returns (outDir, config JSON path, config)."""
        plan = self.planTraining(
            labeled,
            unlabeled,
            outDir=outDir,
            overwrite=overwrite,
            validationCount=validationCount,
            overrides=overrides,
        )
        for _ in self.trainingSteps(plan):
            pass
        return plan.outDir, plan.configPath, plan.config

    def startTraining(
        self,
        labeled: Sequence[tuple[Any, Any]],
        unlabeled: Sequence[Any] = (),
        *,
        outDir: str | Path | None = None,
        overwrite: bool = False,
        validationCount: int | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> Job:
        """Check the inputs now; export (one case per :meth:`Job.poll`), then launch ``buseg train``
        in the background. The job's value is the model path."""
        plan = self.planTraining(
            labeled,
            unlabeled,
            outDir=outDir,
            overwrite=overwrite,
            validationCount=validationCount,
            overrides=overrides,
        )

        def launch(plan: TrainingPlan) -> WorkerJob:
            command = engine.trainCommand(plan.configPath, plan.outDir, overwrite=plan.overwrite)
            return self._worker(command, plan.outDir)

        job = self._trainingJob(plan.outDir, preparation=self.trainingSteps(plan), launch=launch)
        for note in plan.notes:
            job.note(note)
        return job.start()

    def resumeTraining(self, outDir: str | Path | None = None) -> Job:
        """Continue the interrupted training in ``outDir`` (default: the last one of the parameter node)."""
        folder = outDir or (self.store.get("lastRunFolder") if self.store else "")
        if not folder:
            raise ModuleError("No training to resume: give its output folder.")
        if not engine.resumable(folder):
            raise ModuleError(
                f"No interrupted training to resume in {folder} (no checkpoint newer than its model)."
            )
        folder = Path(folder)
        return self._trainingJob(folder, worker=self._worker(engine.resumeCommand(folder), folder)).start()

    def _trainingJob(self, outDir: Path, **how: Any) -> Job:
        if self.store is not None:
            self.store.set("lastRunFolder", str(outDir))

        def completed(result: JobResult) -> str:
            model = result.outputs.get("model") or str(outDir / engine.MODEL_FILE)
            if not Path(model).is_file():
                raise ModuleError(f"the training finished but its model file is missing: {model}")
            if self.store is not None:
                self.store.set("modelPath", str(model))
            return str(model)

        return Job("train", outDir=outDir, onCompleted=completed, **how)

    # -- segmentation --------------------------------------------------------------

    def predictOptions(
        self, uncertainty: str | None = None, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        merged = dict(self.store.predictOptions()) if self.store is not None else {}
        if self.store is not None:
            merged["uncertainty"] = self.store.get("segmentUncertainty")
            device = self.store.get("device")
            merged["device"] = device
        if uncertainty:
            merged["uncertainty"] = uncertainty
        merged.update(options or {})
        return merged

    def startSegmentation(
        self,
        volumeNode: Any,
        modelPath: str | Path,
        *,
        uncertainty: str | None = None,
        options: dict[str, Any] | None = None,
        show: bool = True,
    ) -> Job:
        """Export ``volumeNode``, launch ``buseg predict``; the job's value is a :class:`SegmentationResult`."""
        nodefiles.checkScalarVolume(volumeNode, "volume to segment")
        modelPath = Path(modelPath)
        if not modelPath.is_file():
            raise ModuleError(f"Model file not found: {modelPath}")
        folder = self._newWorkFolder("segment")
        case = nodefiles.safeFileName(volumeNode.GetName())
        image = nodefiles.exportVolume(volumeNode, folder / "input" / f"{case}{nodefiles.IMAGE_SUFFIX}")
        outDir = folder / "output"
        command = engine.predictCommand([image], modelPath, outDir, self.predictOptions(uncertainty, options))
        caseName = engine.caseName(image)

        def completed(result: JobResult) -> SegmentationResult:
            outputs = engine.readPredictSummary(outDir).get(caseName)
            if outputs is None:
                raise ModuleError(
                    f"the worker wrote no result for '{volumeNode.GetName()}' (see {outDir / 'summary.json'})"
                )
            return self.importSegmentation(outputs, volumeNode, show=show)

        return Job(
            "segment", self._worker(command, folder), outDir=folder, onCompleted=completed, workFolder=folder
        ).start()

    def importSegmentation(
        self, outputs: PredictOutputs, volumeNode: Any, *, show: bool = True
    ) -> SegmentationResult:
        """Load a case's predict outputs: segmentation, uncertainty overlay, regions table and markups."""
        missing = outputs.missing()
        if missing:
            raise ModuleError(f"the worker did not write {', '.join(str(p) for p in missing)}")
        previous = self.store.nodeReference("OutputSegmentation") if self.store else None
        targetSegmentation, targetUncertainty, targetTable, targetMarkups = self._reusableResultNodes(
            volumeNode
        )
        keptEdited = (
            previous.GetName()
            if previous is not None
            and targetSegmentation is None
            and previous.GetNodeReference(INPUT_VOLUME_ROLE) is volumeNode
            and not self._isLabeled(previous)
            else ""
        )
        segmentation = nodefiles.loadSegmentation(
            self.scene,
            self.context.segmentationsLogic,
            outputs.segmentation,
            volumeNode,
            targetNode=targetSegmentation,
        )
        # What the model gave, to tell the user's edits apart from it when re-segmenting.
        segmentation.SetAttribute(
            RESULT_FINGERPRINT_ATTRIBUTE,
            nodefiles.segmentationFingerprint(self.scene, segmentation, volumeNode),
        )
        uncertainty = nodefiles.loadUncertaintyVolume(
            self.scene, outputs.uncertainty, volumeNode, targetNode=targetUncertainty
        )
        document = engine.readRegions(outputs.regions)
        store = self.store
        # Each result keeps its own table and points (named by its case): segmenting another
        # volume makes new ones, re-segmenting the same volume replaces its own.
        table = review.regionsToTable(
            self.scene, document.regions, targetTable, name=f"{volumeNode.GetName()} uncertain regions"
        )
        showMarkups = store.get("showMarkups") if store else True
        markups = targetMarkups
        if showMarkups:
            markups = review.regionsToMarkups(
                self.scene, document.regions, markups, name=f"{volumeNode.GetName()} regions"
            )
        elif markups is not None:
            markups.RemoveAllControlPoints()
        for node in (segmentation, uncertainty, table, markups):
            if node is not None:
                node.SetNodeReferenceID(INPUT_VOLUME_ROLE, volumeNode.GetID())
        review.placeUnderStudy(self.scene, volumeNode, segmentation, uncertainty, table, markups)
        if show:
            review.showUncertaintyOverlay(
                self.scene,
                uncertainty,
                volumeNode,
                opacity=store.get("overlayOpacity") if store else 0.5,
                threshold=store.get("overlayThreshold") if store else 0.2,
            )
        if store is not None:
            wasModifying = store.node.StartModify()
            order = document.sliceReview
            store.set("sliceReview", json.dumps(order.toJson()) if order is not None else "")
            store.set("sliceReviewNext", 0)
            store.setNodeReference("OutputSegmentation", segmentation)
            store.setNodeReference("UncertaintyVolume", uncertainty)
            store.setNodeReference("RegionsTable", table)
            store.setNodeReference("RegionsMarkups", markups)
            store.node.EndModify(wasModifying)
        return SegmentationResult(
            segmentation, uncertainty, document.regions, table, markups, outputs, document.summary, keptEdited
        )

    def _reusableResultNodes(self, volumeNode: Any) -> tuple[Any, Any, Any, Any]:
        """The previous result nodes (segmentation, uncertainty map, regions table, points) when they
        belong to the same volume and are not a labeled case (re-segmenting replaces them; a
        corrected, labeled segmentation is never overwritten, another volume's results stay).

        A segmentation the user has edited since the model gave it (not yet added as a labeled
        case) is not overwritten either: the whole previous result stays, the new one gets new
        nodes (the result's ``keptEdited`` says so)."""
        if self.store is None:
            return None, None, None, None
        nodes = []
        for role in ("OutputSegmentation", "UncertaintyVolume", "RegionsTable", "RegionsMarkups"):
            node = self.store.nodeReference(role)
            if node is not None and (
                self._isLabeled(node) or node.GetNodeReference(INPUT_VOLUME_ROLE) is not volumeNode
            ):
                node = None
            nodes.append(node)
        segmentation = nodes[0]
        if segmentation is not None and self._editedSinceSegmented(segmentation, volumeNode):
            return None, None, None, None
        return tuple(nodes)

    def _isLabeled(self, node: Any) -> bool:
        return self.store is not None and any(s is node for _, s in self.store.labeledCases())

    def _editedSinceSegmented(self, segmentationNode: Any, volumeNode: Any) -> bool:
        """Whether the segmentation holds something else than the model's result (a node that
        never held one counts as edited when it has segments: it may be the user's)."""
        given = segmentationNode.GetAttribute(RESULT_FINGERPRINT_ATTRIBUTE)
        if not given:
            return segmentationNode.GetSegmentation().GetNumberOfSegments() > 0
        return nodefiles.segmentationFingerprint(self.scene, segmentationNode, volumeNode) != given

    def segmentFiles(
        self,
        inputs: Sequence[str | Path] | str | Path,
        outputFolder: str | Path,
        modelPath: str | Path,
        *,
        uncertainty: str | None = None,
        options: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Job:
        """``buseg predict`` on files or folders, outputs in ``outputFolder``; nothing is loaded.
        The job's value maps case names to :class:`~.engine.PredictOutputs`. Existing outputs
        (the user's files) are replaced only with ``overwrite``."""
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        outDir = Path(outputFolder)
        outDir.mkdir(parents=True, exist_ok=True)
        command = engine.predictCommand(
            list(inputs), modelPath, outDir, self.predictOptions(uncertainty, options), overwrite=overwrite
        )
        return Job(
            "segment",
            self._worker(command, outDir),
            outDir=outDir,
            onCompleted=lambda result: engine.readPredictSummary(outDir),
        ).start()

    # -- next case -----------------------------------------------------------------

    def startRanking(
        self,
        volumeNodes: Sequence[Any],
        modelPath: str | Path,
        *,
        uncertainty: str | None = None,
        options: dict[str, Any] | None = None,
        segmentFirst: bool = False,
    ) -> Job:
        """Rank unlabeled volumes by uncertainty; the job's value is a list of :class:`RankedVolume`, best first.

        ``segmentFirst``: the worker keeps the first-ranked volume's prediction and it is
        loaded as a segmentation is (the first :class:`RankedVolume`'s ``segmentation``), so
        "label the next case" needs no second prediction; None when the first volume's score
        came from an earlier ranking (nothing was predicted for it).

        The volumes are exported one per :meth:`Job.poll` (a GUI timer never blocks for long),
        into a folder kept between rankings: a volume unchanged since the last ranking is not
        written again, and not predicted again either while the model and the options are the
        same (its score is reused, :class:`RankingCache`)."""
        if not volumeNodes:
            raise ModuleError("No unlabeled volumes to rank.")
        if not Path(modelPath).is_file():
            raise ModuleError(f"Model file not found: {modelPath}")
        for volume in volumeNodes:
            nodefiles.checkScalarVolume(volume, "unlabeled volume")
        folder = self._newWorkFolder("rank")
        inputs = self.context.workFolder / RANK_INPUTS_FOLDER
        names = nodefiles.uniqueNames([nodefiles.safeFileName(v.GetName()) for v in volumeNodes])
        outDir = folder / "output"
        predict = self.predictOptions(uncertainty, options)
        known = RankingCache(inputs, modelPath, predict)
        byCase: dict[str, Any] = {}
        toPredict: list[Path] = []

        def exportSteps() -> Iterator[nodefiles.ExportStep]:
            export = nodefiles.ExportCache(inputs)
            for number, (volume, name) in enumerate(zip(volumeNodes, names, strict=True), start=1):
                relative = f"{name}{nodefiles.IMAGE_SUFFIX}"
                written = export.image(volume, relative)
                case = engine.caseName(inputs / relative)
                byCase[case] = volume
                if not known.use(case, export.index[relative]):
                    toPredict.append(inputs / relative)
                yield nodefiles.ExportStep(number, len(volumeNodes), name, written)
            export.finish()  # the files of volumes no longer ranked go

        def launch(_: Any) -> WorkerJob | None:
            if not toPredict:
                return None
            command = engine.rankCommand(
                toPredict, modelPath, outDir, predict, saveFirstPrediction=segmentFirst
            )
            return self._worker(command, folder)

        def completed(result: JobResult) -> list[RankedVolume]:
            predicted = {engine.caseName(path) for path in toPredict}
            fresh = (
                [e for e in engine.readRanking(outDir) if str(e.get("case")) in predicted]
                if predicted
                else []
            )
            ranked = rankedVolumes(known.merged(fresh), byCase)
            self.showRanking(ranked)
            first = next((e for e in fresh if e.get("outputs") and str(e.get("case")) in byCase), None)
            if segmentFirst and first is not None and byCase[str(first["case"])] is ranked[0].volumeNode:
                outputs = PredictOutputs.forCase(outDir, str(first["case"]), first["outputs"])
                ranked[0].segmentation = self.importSegmentation(outputs, ranked[0].volumeNode)
            return ranked

        return Job(
            "rank",
            outDir=folder,
            onCompleted=completed,
            preparation=exportSteps(),
            launch=launch,
            workFolder=folder,
        ).start()

    def showRanking(self, ranked: Sequence[RankedVolume]) -> Any:
        """The ranking as a table node; the best volume becomes the one to segment next."""
        rows = [
            {
                "rank": r.rank,
                "volume": r.volumeNode.GetName(),
                "score": r.score,
                "meanUncertainty": r.statistics.get("mean_uncertainty"),
                "flaggedMm3": r.statistics.get("flagged_volume_mm3"),
            }
            for r in ranked
        ]
        table = review.rankingToTable(
            self.scene, rows, self.store.nodeReference("RankingTable") if self.store else None
        )
        if self.store is not None and ranked:
            wasModifying = self.store.node.StartModify()
            self.store.setNodeReference("RankingTable", table)
            self.store.setNodeReference("InputVolume", ranked[0].volumeNode)
            self.store.node.EndModify(wasModifying)
        return table

    # -- review --------------------------------------------------------------------

    def addCorrectedCase(self, volumeNode: Any, segmentationNode: Any) -> bool:
        """Add the (corrected) segmentation and its volume to the labeled set for the next training.

        The volume leaves the unlabeled list; the segmentation stops being the node that the
        next segmentation run would replace.
        """
        if self.store is None:
            raise ModuleError("No parameter node: the labeled set lives in the module's parameter node.")
        nodefiles.checkScalarVolume(volumeNode, "volume")
        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise ModuleError("Select the corrected segmentation.")
        if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            raise ModuleError(f"'{segmentationNode.GetName()}' has no segments.")
        changed = self.store.addLabeledCase(volumeNode, segmentationNode)
        if self.store.nodeReference("OutputSegmentation") is segmentationNode:
            self.store.setNodeReference("OutputSegmentation", None)
        self.savedCase = self.saveLabeledCase(volumeNode, segmentationNode)
        return changed

    def saveLabeledCase(self, volumeNode: Any, segmentationNode: Any) -> labelsfolder.FileCase:
        """Write a labeled case into the labels folder now (a crash or an unsaved scene loses
        nothing); the next training reads it from there."""
        folder = self.context.labelsFolderPath
        try:
            return labelsfolder.saveCase(self.scene, folder, volumeNode, segmentationNode)
        except (ModuleError, OSError) as exc:
            raise ModuleError(
                f"'{volumeNode.GetName()}' is a labeled case now, but it could not be saved to {folder}: {exc}"
            ) from None

    def jumpToRegionRow(
        self, row: int, tableNode: Any = None, *, viewRow: bool = False
    ) -> tuple[float, float, float] | None:
        """Center the slice views on the region of a table row (``viewRow``: a row index of a table
        view showing it); returns the position (None: no such row)."""
        table = tableNode or (self.store.nodeReference("RegionsTable") if self.store else None)
        if viewRow:
            row = review.tableRowOfViewRow(table, row)
        position = review.regionPositionFromTable(table, row)
        if position is not None:
            review.jumpToPosition(self.scene, position, self.context.markupsLogic)
        return position

    def sliceReview(self) -> SliceReview | None:
        """The current result's slice review order (None: the engine wrote none; the control is off)."""
        text = self.store.get("sliceReview") if self.store is not None else ""
        return (
            engine.readSliceReview(json.loads(text), "slice review of the parameter node") if text else None
        )

    def jumpToNextSlice(self) -> tuple[int, ReviewSlice] | None:
        """Centre the views on the next slice to check (best first, wrapping); returns (its number
        from 1, the slice), or None when there is no slice order."""
        order = self.sliceReview()
        if order is None or not order.slices:
            return None
        number = self.store.get("sliceReviewNext") % len(order.slices)
        chosen = order.slices[number]
        review.jumpToPosition(self.scene, chosen.centerRas, self.context.markupsLogic)
        self.store.set("sliceReviewNext", number + 1)
        return number + 1, chosen

    # -- helpers -------------------------------------------------------------------

    def _scratchParameterNode(self) -> Any:
        """A parameter node with the defaults, for console calls without the module's node."""
        import slicer

        node = slicer.vtkMRMLScriptedModuleNode()
        store = ParameterStore(node)
        store.setDefaults()
        return node


def defaultInputVolume(scene: Any) -> Any:
    """The volume to segment when none is chosen: the first scalar volume that is an input, not
    a label map and not a result of this module (an uncertainty map); None if there is none."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode") and node.GetNodeReference(INPUT_VOLUME_ROLE) is None:
            return node
    return None


def readHistory(outDir: str | Path) -> dict[str, Any]:
    """A training folder's history.json (losses and validation so far), {} if there is none."""
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads((Path(outDir) / "history.json").read_text())
    return {}
