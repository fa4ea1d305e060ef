"""What the panel's buttons do, without Qt: start, follow, cancel and stop jobs; install packages;
add a corrected case and go to the next one; step through the regions to review.

The widget (``BidirUncertaintySeg.py``) binds Qt widgets and a QTimer to a
:class:`PanelController` and gives it the few things only the application has
(:class:`PanelHooks`: a confirmation dialog, the training plot ...). Everything that can go
wrong - a start that raises something else than :class:`~.errors.ModuleError` (a
PermissionError creating the runs folder), an import that fails unexpectedly, an installer
that crashes - ends in a readable message and an idle panel, never in a state without a way
out; tests drive it on PyPI ``slicer-core`` with real or stub workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import dependencies, engine, nodefiles, presenter, review
from .errors import ModuleError, PreviousTrainingError
from .workflow import INPUT_VOLUME_ROLE, Job, Workflow, readHistory, unexpectedMessage

# How long a job stopped by closing the module may take to save its checkpoint before it is killed.
SHUTDOWN_GRACE_SECONDS = 10.0


def _no(*args: Any, **kwargs: Any) -> Any:
    return None


@dataclass
class PanelHooks:
    """What only the application can do; every hook has a harmless default (tests, console)."""

    confirm: Callable[[str], bool] = lambda text: False  # a yes/no question
    info: Callable[[str], None] = _no
    startPolling: Callable[[], None] = _no  # start the timer that calls PanelController.poll
    trainingStarted: Callable[[Job], None] = _no  # show the live plot (PanelController.updateTrainingPlot)
    trainingEvent: Callable[[dict[str, Any]], None] = _no  # after the plot was updated from the event
    jobDone: Callable[[Job], None] = _no  # refresh the result views
    processEvents: Callable[[], None] = _no  # repaint before a blocking step
    installDependencies: Callable[[Any], None] = _no  # run an install plan
    pytorchExtensionAvailable: Callable[[], bool] = lambda: False
    restart: Callable[[], None] = _no


class JobRegistry:
    """The module's jobs, whoever started them: the panel or the console (``wait=False`` too).

    One registry per application (the module logic's): the panel follows every job added to
    it (progress, Cancel), and neither side starts a job while another one runs."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.listeners: list[Callable[[Job], None]] = []

    def running(self) -> Job | None:
        return next((job for job in self.jobs if not job.done), None)

    def ensureIdle(self) -> None:
        job = self.running()
        if job is not None:
            raise ModuleError(
                f"A {job.kind} job is running; wait for it to end or cancel it (Cancel in the "
                "module's panel, or job.cancel()) before starting another."
            )

    def add(self, job: Job) -> None:
        if job in self.jobs:
            return
        self.jobs = [j for j in self.jobs if not j.done] + [job]
        for listener in list(self.listeners):
            listener(job)


def waitProcessingEvents(job: Job, processEvents: Callable[[], None], intervalSeconds: float = 0.05) -> Any:
    """Block the caller (a console call with ``wait=True``) until the job is over, while the
    application goes on handling its events: the log, the progress and the panel keep
    flowing, and the panel's Cancel works. Returns the job's result."""
    while not job.poll():
        processEvents()
        if job.worker is not None:
            job.worker.wait(intervalSeconds)
    return job.result


def startConsoleJob(registry: JobRegistry, starter: Callable[[], Job]) -> Job:
    """A job started from the console: refused while another runs, then shown in the panel."""
    registry.ensureIdle()
    job = starter()
    registry.add(job)
    return job


@dataclass
class PanelController:
    """The panel's actions on one presenter and one workflow (made fresh for each action)."""

    workflowFactory: Callable[[], Workflow]
    presenter: presenter.Presenter = field(default_factory=presenter.Presenter)
    hooks: PanelHooks = field(default_factory=PanelHooks)
    job: Job | None = None
    dependenciesDeclined: bool = False
    # Run after the current job succeeded (the chained "add, then segment the next case").
    then: Callable[[Job], None] | None = None
    registry: JobRegistry = field(default_factory=JobRegistry)

    def __post_init__(self) -> None:
        self.registry.listeners.append(self._adopt)

    def _adopt(self, job: Job) -> None:
        """A job started elsewhere (the console): the panel shows it and its Cancel stops it."""
        if job is self.job or job.done or self.presenter.busy:
            return
        self.presenter.jobStarting(job.kind)
        self.follow(job)

    @property
    def workflow(self) -> Workflow:
        return self.workflowFactory()

    @property
    def store(self) -> Any:
        return self.workflow.store

    # -- jobs ------------------------------------------------------------------------

    def buttonClicked(self, kind: str) -> Job | None:
        """A job button was clicked: start, cancel or stop the job, as the presenter says."""
        action = self.presenter.buttonClicked(kind)
        if action == "cancel":
            self.cancel()
        elif action == "kill":
            self.kill()
        elif action == "start" and self.ensureDependencies():
            return self.start(kind, lambda: self._startFromPanel(kind))
        return None

    def start(self, kind: str, starter: Callable[[], Job | None], *, resume: bool = False) -> Job | None:
        """Start a job with ``starter``; whatever it raises ends as a message, the panel usable again."""
        self.presenter.jobStarting(kind, resume=resume)
        try:
            self.registry.ensureIdle()
            job = starter()
        except ModuleError as exc:
            self.presenter.startFailed(str(exc))
            return None
        except Exception as exc:
            self.presenter.startFailed(unexpectedMessage(exc, f"starting the {kind} job"))
            return None
        if job is None:
            self.presenter.startAborted("Training not started: the output folder holds a previous training.")
            return None
        self.follow(job)
        return job

    def _startFromPanel(self, kind: str) -> Job | None:
        workflow, store = self.workflow, self.store
        if kind == presenter.SEGMENT:
            return workflow.startSegmentation(store.nodeReference("InputVolume"), store.get("modelPath"))
        if kind == presenter.RANK:
            return workflow.startRanking(store.unlabeledVolumes(), store.get("modelPath"))
        outDir = store.get("outputFolder") or None
        try:
            return workflow.startTraining(store.labeledCases(), store.unlabeledVolumes(), outDir=outDir)
        except PreviousTrainingError as exc:
            if not self.hooks.confirm(
                f"{exc}\n\nReplace the previous training (its model files are deleted)?"
            ):
                return None
            return workflow.startTraining(
                store.labeledCases(), store.unlabeledVolumes(), outDir=outDir, overwrite=True
            )

    def resume(self, runFolder: str | None = None) -> Job | None:
        """Continue an interrupted training: in ``runFolder`` (one the user picked on disk, e.g.
        after a crash with an unsaved scene), by default the last run of the parameter node."""
        if self.presenter.busy or not self.ensureDependencies():
            return None
        runFolder = runFolder or self.store.get("lastRunFolder")

        def starter() -> Job:
            self.presenter.history.loadEngineHistory(readHistory(runFolder) if runFolder else {})
            return self.workflow.resumeTraining(runFolder)

        return self.start(presenter.TRAIN, starter, resume=True)

    def follow(self, job: Job) -> None:
        self.job = job
        self.registry.add(job)
        job.eventListeners.append(self.presenter.handleEvent)
        if job.kind == presenter.TRAIN:
            job.eventListeners.append(self._trainingEvent)
            self.hooks.trainingStarted(job)
        job.endListeners.append(self._workerEnded)
        job.doneListeners.append(self._jobDone)
        self.hooks.startPolling()

    def _trainingEvent(self, event: dict[str, Any]) -> None:
        if event.get("event") in ("progress", "validation"):
            self.updateTrainingPlot()
        self.hooks.trainingEvent(event)

    def updateTrainingPlot(self) -> Any:
        """The live loss and validation plot of the training, in the scene of now (a scene closed
        meanwhile gets new tables); returns the chart node."""
        store = self.store
        lossTable, validationTable, chart = review.updateTrainingPlot(
            self.workflow.scene,
            self.presenter.history,
            store.nodeReference("LossTable"),
            store.nodeReference("ValidationTable"),
            store.nodeReference("LossChart"),
        )
        if store.nodeReference("LossChart") is not chart:
            wasModifying = store.node.StartModify()
            store.setNodeReference("LossTable", lossTable)
            store.setNodeReference("ValidationTable", validationTable)
            store.setNodeReference("LossChart", chart)
            store.node.EndModify(wasModifying)
        return chart

    def sceneAboutToClose(self) -> str:
        """The user closes the scene while a job may run; what to tell them ('' when nothing runs).

        A training whose worker runs is followed on: its inputs are files, its model goes to
        the parameter node of the scene that follows, and no second job can start beside it.
        A job whose inputs or results are nodes of the closing scene (segmenting, ranking, a
        training still exporting its cases) is cancelled: its work has nowhere to go."""
        self.then = None
        job = self.job
        if job is None or job.done:
            return ""
        if job.kind == presenter.TRAIN and not job.preparing:
            return (
                "The training goes on in the background (see its progress in the module's panel); "
                "its model is set as the current model when it ends."
            )
        self.cancel()
        return f"The {presenter.RUNNING_VERBS[job.kind].lower()} was cancelled: its volumes were in the closed scene."

    def poll(self) -> bool:
        """One timer tick: True when there is nothing more to follow (stop the timer).

        A job that ends may start the next one (its ``then``: ranking, then segmenting the
        first-ranked volume); the answer is about the job followed *after* the tick, so the
        timer keeps running for it."""
        if self.job is None:
            return True
        try:
            self.job.poll()
        except Exception as exc:
            # A listener failed, so the job can no longer be shown: end it for good (its worker
            # stopped, the registry free) rather than leave it running where no tick follows it.
            message = unexpectedMessage(exc, "following the job")
            self.then = None
            self.job.abandon(message, SHUTDOWN_GRACE_SECONDS)
            if self.presenter.busy:
                self.presenter.workerEnded("failed", message=message)
            return True
        return self.job is None or self.job.done

    def cancel(self) -> None:
        if self.presenter.cancelRequested() and self.job is not None:
            self.job.cancel()

    def kill(self) -> None:
        """Stop the job at once (while cancelling: the worker takes too long to save)."""
        if self.job is not None and not self.job.done:
            self.job.kill()
        elif self.presenter.state == presenter.CANCELLING:  # nothing left to stop: never stuck cancelling
            self.presenter.workerEnded("cancelled")

    def mayQuit(self) -> bool:
        """The user closes Slicer's main window: True to let it close. While a job runs the user
        is asked first (declining keeps Slicer open and the job running); what agreeing does is
        :meth:`shutdown` (a training saves its checkpoint, so Resume continues it)."""
        job = self.registry.running()
        if job is None:
            return True
        if job.kind == presenter.TRAIN:
            question = (
                "A training is running. Quit anyway?\n\nIt stops after saving a checkpoint; "
                "Resume (or Resume from folder...) continues it the next time."
            )
        else:
            question = f"The {presenter.RUNNING_VERBS[job.kind].lower()} is still running. Quit anyway? It is stopped."
        return bool(self.hooks.confirm(question))

    def shutdown(self) -> Any:
        """The module is reloaded or closed, or Slicer quits: stop the job (checkpoint first, then
        kill) without blocking; returns the thread that finishes it (None: nothing ran)."""
        if self.job is not None and not self.job.done:
            return self.job.shutdown(SHUTDOWN_GRACE_SECONDS)
        return None

    def _workerEnded(self, job: Job) -> None:
        self.presenter.appendLog(job.log)
        result = job.result
        self.presenter.workerEnded(
            result.status,
            exitCode=result.exitCode,
            message=result.message,
            logTail=job.logTail(),
            importsResults=job.importsResults,
        )
        self.hooks.processEvents()  # show "Loading the results..." before the import blocks the GUI thread

    def _jobDone(self, job: Job) -> None:
        if job.result.status == "completed" and job.importsResults:
            self.presenter.importFinished(job.importError, self._summary(job))
        self.hooks.jobDone(job)
        then, self.then = self.then, None
        if then is not None and job.succeeded:
            then(job)

    @staticmethod
    def _summary(job: Job) -> str:
        if job.kind == presenter.SEGMENT and job.value is not None:
            return f"Segmented; {len(job.value.regions)} uncertain region(s) to review." + keptText(job.value)
        if job.kind == presenter.RANK and job.value:
            first = job.value[0]
            if first.segmentation is not None:
                return (
                    f"Most informative volume: {first.volumeNode.GetName()}, segmented; "
                    f"{len(first.segmentation.regions)} uncertain region(s) to review."
                ) + keptText(first.segmentation)
            return f"Most informative volume: {first.volumeNode.GetName()} (now the volume to segment)."
        if job.kind == presenter.TRAIN and job.value:
            return f"Model written: {job.value}"
        return ""

    # -- the loop: add the corrected case, segment the next one -------------------------

    def resultNodes(self) -> tuple[Any, Any]:
        """The segmentation to review and its volume."""
        segmentation = self.store.nodeReference("OutputSegmentation")
        volume = segmentation.GetNodeReference(INPUT_VOLUME_ROLE) if segmentation is not None else None
        return segmentation, volume or self.store.nodeReference("InputVolume")

    def addCorrectedCase(self) -> str:
        """Add the reviewed segmentation and its volume to the labeled cases; the sentence to show."""
        segmentation, volume = self.resultNodes()
        workflow = self.workflow
        workflow.addCorrectedCase(volume, segmentation)
        saved = workflow.savedCase
        renamed = (
            f" as '{saved.name}' (another volume of that name is saved there already)"
            if saved.name != nodefiles.safeFileName(volume.GetName())
            else ""
        )
        return (
            f"'{volume.GetName()}' is now a labeled case ({len(self.store.labeledCases())} in all), saved in "
            f"{workflow.context.labelsFolderPath}{renamed}; train again to use it."
        )

    def addAndSegmentNext(self) -> Job | None:
        """Add the corrected case, rank the unlabeled volumes, segment the first one (two jobs in a row)."""
        if self.presenter.busy:
            return None
        message = self.addCorrectedCase()
        if not self.store.unlabeledVolumes():
            self.hooks.info(message + " No unlabeled volume is left.")
            return None
        model = self.store.get("modelPath")

        def segmentFirst(rankJob: Job) -> None:
            best = rankJob.value[0]
            if best.segmentation is None:  # its score came from an earlier ranking: predict it now
                self.start(presenter.SEGMENT, lambda: self.workflow.startSegmentation(best.volumeNode, model))

        job = self.start(
            presenter.RANK,
            lambda: self.workflow.startRanking(self.store.unlabeledVolumes(), model, segmentFirst=True),
        )
        if job is not None:
            self.then = segmentFirst
        return job

    # -- review --------------------------------------------------------------------------

    def stepRegion(self, step: int, currentRow: int) -> int | None:
        """The row of the next (``step`` 1) or previous (-1) region, wrapping, with the views centred
        on it; None without regions."""
        table = self.store.nodeReference("RegionsTable")
        rows = table.GetNumberOfRows() if table is not None else 0
        if rows == 0:
            return None
        row = (currentRow + step) % rows if 0 <= currentRow < rows else (0 if step > 0 else rows - 1)
        self.workflow.jumpToRegionRow(row)
        return row

    def droppedCaseMessages(self) -> list[str]:
        """Remove labeled cases whose volume or segmentation was deleted; what to tell the user."""
        messages = self.store.dropIncompleteLabeledCases()
        for message in messages:
            self.presenter.warnings.append(message)
        return messages

    # -- dependencies ----------------------------------------------------------------

    def ensureDependencies(self, force: bool = False) -> bool:
        """True when the worker's packages are there; otherwise ask once and install them."""
        problems = dependencies.findProblems()
        plan = dependencies.planInstall(
            problems, pytorchExtensionAvailable=self.hooks.pytorchExtensionAvailable()
        )
        step = dependencies.nextStep(plan, declinedBefore=self.dependenciesDeclined, explicit=force)
        if step == dependencies.READY:
            if force:
                self.hooks.info("All Python packages the module needs are installed.")
            return True
        if step in (dependencies.BLOCKED, dependencies.DECLINED):
            self.presenter.installStarted("Python packages")
            self.presenter.installFinished(
                "\n".join(plan.blockers)
                if step == dependencies.BLOCKED
                else "Missing Python packages: "
                + "; ".join(p.text for p in problems)
                + ". Use 'Install Python packages' to install them."
            )
            return False
        if not self.hooks.confirm(plan.confirmationText()):
            self.dependenciesDeclined = True
            return False
        return self.install(plan)

    def install(self, plan: Any) -> bool:
        """Run an install plan; any failure ends the 'installing' state with its message."""
        self.presenter.installStarted(", ".join(step.distribution for step in plan.steps))
        self.hooks.processEvents()
        try:
            self.hooks.installDependencies(plan)
        except ModuleError as exc:
            self.presenter.installFinished(str(exc))
            return False
        except Exception as exc:
            self.presenter.installFinished(unexpectedMessage(exc, "installing the Python packages"))
            return False
        if plan.restartNeeded:
            self.presenter.installFinished(
                None, "Packages installed. Restart Slicer before using the module."
            )
            if self.hooks.confirm("Restart Slicer now to use the new packages?"):
                self.hooks.restart()
            return False
        self.presenter.installFinished(None, "Python packages installed.")
        return True

    def readiness(self) -> None:
        """Tell the presenter what each job's button needs (from the parameter node)."""
        workflow = self.workflow
        store = workflow.store
        try:
            onDisk = len(workflow.fileCases(store.labeledCases()).cases)
            trainProblem = store.trainProblem(onDisk)
        except ModuleError as exc:  # a damaged labels folder: said on the button
            trainProblem = str(exc)
        self.presenter.setInputsReady(presenter.TRAIN, trainProblem)
        self.presenter.setInputsReady(presenter.SEGMENT, store.segmentProblem())
        self.presenter.setInputsReady(presenter.RANK, store.rankProblem())
        self.presenter.setResumable(engine.resumable(store.get("lastRunFolder")))


def keptText(result: Any) -> str:
    """What to add to a segmentation's summary when the previous, edited result was kept."""
    if not result.keptEdited:
        return ""
    return (
        f" Your edited '{result.keptEdited}' is kept as it was; the new result is "
        f"'{result.segmentationNode.GetName()}'."
    )


class PollTimer(Protocol):
    """What :func:`timerTick` needs of a ``qt.QTimer``."""

    def stop(self) -> None: ...


def timerTick(controller: PanelController, timer: PollTimer) -> None:
    """The widget's timer handler: poll the panel's job; stop the timer when nothing is left to follow.

    Once stopped, nothing polls until a job is started again (``PanelHooks.startPolling``):
    this is the contract the widget's ``QTimer`` gives, and the one tests drive."""
    if controller.poll():
        timer.stop()


class ShownModuleBindings:
    """What is live only while the module is shown: the embedded Segment Editor's effects and
    keyboard shortcuts, and the review buttons' shortcuts (Alt+N/P/S).

    Done the way Slicer's own Segment Editor module does it on enter (install the editor's
    shortcuts) and on exit (no active effect - Paint would stay live in other modules -,
    uninstall its shortcuts, remove its view observations); on a scene close the editor lets
    go of its segmentation. ``makeShortcut(keys, callback)`` makes an application shortcut,
    ``removeShortcut`` removes one (in Slicer: a ``qt.QShortcut`` on the main window)."""

    def __init__(
        self,
        editor: Any,
        shortcuts: dict[str, Callable[[], Any]],
        makeShortcut: Callable[[str, Callable[[], Any]], Any],
        removeShortcut: Callable[[Any], None],
    ) -> None:
        self.editor = editor
        self.shortcuts = dict(shortcuts)
        self.makeShortcut = makeShortcut
        self.removeShortcut = removeShortcut
        self.installed: list[Any] = []

    def entered(self) -> None:
        self.editor.installKeyboardShortcuts()
        self.editor.updateWidgetFromMRML()
        if not self.installed:
            self.installed = [self.makeShortcut(keys, action) for keys, action in self.shortcuts.items()]

    def left(self) -> None:
        self.editor.setActiveEffect(None)
        self.editor.uninstallKeyboardShortcuts()
        self.editor.removeViewObservations()
        for shortcut in self.installed:
            self.removeShortcut(shortcut)
        self.installed = []

    def sceneClosing(self) -> None:
        self.editor.setSegmentationNode(None)
        self.editor.removeViewObservations()


def pollInBackground(job: Job, onDone: Callable[[Job], None]) -> bool:
    """One tick of the console API's follower: True when the timer can stop (the job is over, or
    following it failed - it is then reported instead of polled every tick forever)."""
    try:
        finished = job.poll()
    except Exception as exc:
        unexpectedMessage(exc, f"following the {job.kind} job")
        finished = True
    if finished:
        onDone(job)
    return finished
