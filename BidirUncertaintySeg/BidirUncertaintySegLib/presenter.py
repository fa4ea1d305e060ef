"""The module panel's state machine, without Qt: what every button says and allows, and why.

The widget (``BidirUncertaintySeg.py``) only copies a :class:`ViewState` onto its widgets;
everything that decides - which job may start, what the Train button says while training
runs, how a worker event becomes a progress text, when a failure becomes a readable message
with the log one click away - lives here, so that plain tests can drive it with the same
event dictionaries the worker prints (``buseg ... --progress jsonl``).

States::

    idle --start--> starting (export events) --started event--> running --finished(completed)--> importing --> idle
                        |                          |--cancel--> cancelling --finished(cancelled)/stop now--> idle
                        |                          |--finished(failed) / process died--> failed
                        +--------------------------+
    failed --start--> starting (a new job clears the error)
    idle --installDependencies--> installing --> idle | failed

One job runs at a time (training, segmentation or ranking): the worker uses the GPU and the
user edits the same nodes, so parallel jobs would only compete.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

IDLE = "idle"
INSTALLING = "installing"
STARTING = "starting"
RUNNING = "running"
CANCELLING = "cancelling"
IMPORTING = "importing"
FAILED = "failed"
STATES = (IDLE, INSTALLING, STARTING, RUNNING, CANCELLING, IMPORTING, FAILED)
BUSY_STATES = (INSTALLING, STARTING, RUNNING, CANCELLING, IMPORTING)

TRAIN = "train"
SEGMENT = "segment"
RANK = "rank"
JOB_KINDS = (TRAIN, SEGMENT, RANK)

# What each job's button says when it can start, and while that job runs.
BUTTON_LABELS = {TRAIN: "Train", SEGMENT: "Segment", RANK: "Rank unlabeled volumes"}
RUNNING_VERBS = {TRAIN: "Training", SEGMENT: "Segmenting", RANK: "Ranking"}
CANCEL_LABEL = "Cancel"
# While cancelling, the button kills the worker at once (a training then keeps its last checkpoint).
KILL_LABEL = "Stop now"
# How many log lines a failure without an error event shows (a crash: the end of the log says why).
LOG_TAIL_LINES = 6


def formatDuration(seconds: float | None) -> str:
    """'45 s', '4 min 10 s', '2 h 05 min' - or '' when unknown (no ETA before the first speed)."""
    if seconds is None or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return ""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


def readableError(event: dict[str, Any]) -> str:
    """The message of an ``error`` event for a person: the message and its hint, never a traceback."""
    message = str(event.get("message") or "unknown error").strip()
    hint = event.get("hint")
    if not hint:
        # Older workers put the hint in 'detail'; a traceback there is for developers (it stays in the log).
        detail = event.get("detail")
        hint = detail if isinstance(detail, str) and "Traceback" not in detail else None
    if isinstance(hint, str) and hint.strip() and hint.strip() not in message:
        message += f"\nHint: {hint.strip()}"
    return message


@dataclass
class TrainingHistory:
    """Losses and validation metrics seen so far, for the live plot (one row per progress event)."""

    lossIterations: list[int] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)
    validationIterations: list[int] = field(default_factory=list)
    validation: dict[str, list[float]] = field(default_factory=dict)

    def addLosses(self, iteration: int, values: dict[str, Any]) -> None:
        numeric = {k: float(v) for k, v in (values or {}).items() if isinstance(v, (int, float))}
        if not numeric:
            return
        if self.lossIterations and iteration <= self.lossIterations[-1]:
            # A resumed training repeats from its checkpoint: keep the curve monotonic.
            self._truncate(self.lossIterations, self.losses, iteration)
        row = len(self.lossIterations)
        self.lossIterations.append(int(iteration))
        for key in set(self.losses) | set(numeric):
            column = self.losses.setdefault(key, [math.nan] * row)
            column.append(numeric.get(key, math.nan))

    def addValidation(self, iteration: int, metrics: dict[str, Any]) -> None:
        numeric = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        if not numeric:
            return
        if self.validationIterations and iteration <= self.validationIterations[-1]:
            self._truncate(self.validationIterations, self.validation, iteration)
        row = len(self.validationIterations)
        self.validationIterations.append(int(iteration))
        for key in set(self.validation) | set(numeric):
            column = self.validation.setdefault(key, [math.nan] * row)
            column.append(numeric.get(key, math.nan))

    @staticmethod
    def _truncate(iterations: list[int], columns: dict[str, list[float]], iteration: int) -> None:
        keep = sum(1 for i in iterations if i < iteration)
        del iterations[keep:]
        for column in columns.values():
            del column[keep:]

    def loadEngineHistory(self, history: dict[str, Any]) -> None:
        """Replace the curves with a training folder's history.json (a resumed training's past)."""
        self.clear()
        for row in history.get("losses") or []:
            values = {k: v for k, v in row.items() if k not in ("iteration", "stage")}
            self.addLosses(int(row.get("iteration") or 0), values)
        for row in history.get("validation") or []:
            values = {k: v for k, v in row.items() if k not in ("iteration", "stage")}
            self.addValidation(int(row.get("iteration") or 0), values)

    def clear(self) -> None:
        self.lossIterations.clear()
        self.losses.clear()
        self.validationIterations.clear()
        self.validation.clear()


@dataclass(frozen=True)
class ViewState:
    """Everything the panel shows that depends on the state. The widget copies it verbatim."""

    state: str = IDLE
    job: str | None = None
    buttonLabels: dict[str, str] = field(default_factory=lambda: dict(BUTTON_LABELS))
    buttonEnabled: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(JOB_KINDS, False))
    buttonToolTips: dict[str, str] = field(default_factory=dict)
    resumeEnabled: bool = False
    inputsEnabled: bool = True
    progressVisible: bool = False
    progressValue: int = 0  # 0..100
    progressMaximum: int = 100  # 0 = busy indicator (no known total)
    progressText: str = ""
    statusText: str = ""
    errorText: str = ""
    showLogEnabled: bool = False
    warnings: tuple[str, ...] = ()
    # A warning the user must see (not only a status line): a training that fell back to the CPU.
    warningText: str = ""


class Presenter:
    """Turns user actions and worker events into :class:`ViewState` updates.

    Listeners (plain Python callables, never Qt signals) get the new ViewState after every
    change. ``inputsReady`` says, per job, whether its inputs are complete (the widget asks
    the parameter node); a reason string explains a disabled button in its tooltip.
    """

    def __init__(self) -> None:
        self.state = IDLE
        self.job: str | None = None
        self.history = TrainingHistory()
        self.log: list[str] = []
        self.warnings: list[str] = []
        self._ready: dict[str, str | None] = dict.fromkeys(JOB_KINDS, "inputs not set")
        self._resumable = False
        self._iteration = 0
        self._total = 0
        self._stage = ""
        self._progressText = ""
        self._status = ""
        self._error = ""
        self._errorEventSeen = False
        self._finishedStatus: str | None = None
        self._deviceWarning = ""
        self._listeners: list[Callable[[ViewState], None]] = []
        self.view = self._compute()

    # -- listeners -----------------------------------------------------------------

    def addListener(self, callback: Callable[[ViewState], None]) -> None:
        self._listeners.append(callback)

    def removeListener(self, callback: Callable[[ViewState], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _changed(self) -> None:
        self.view = self._compute()
        for callback in list(self._listeners):
            callback(self.view)

    # -- inputs --------------------------------------------------------------------

    def setInputsReady(self, job: str, problem: str | None) -> None:
        """``problem`` None = the job can start; otherwise a sentence saying what is missing."""
        if job not in JOB_KINDS:
            raise ValueError(f"unknown job {job!r}")
        if self._ready.get(job, "") != problem:
            self._ready[job] = problem
            self._changed()

    def setResumable(self, resumable: bool) -> None:
        if self._resumable != bool(resumable):
            self._resumable = bool(resumable)
            self._changed()

    @property
    def busy(self) -> bool:
        return self.state in BUSY_STATES

    def canStart(self, job: str) -> bool:
        return not self.busy and self._ready.get(job) is None

    # -- user actions --------------------------------------------------------------

    def jobStarting(self, job: str, *, resume: bool = False) -> None:
        """The user pressed a job button (or Resume); the worker is being launched."""
        if job not in JOB_KINDS:
            raise ValueError(f"unknown job {job!r}")
        if self.busy:
            raise RuntimeError(f"cannot start {job}: {self.job} is {self.state}")
        self.state, self.job = STARTING, job
        self._iteration, self._total, self._stage = 0, 0, ""
        self._error, self._errorEventSeen, self._finishedStatus = "", False, None
        self._deviceWarning = ""
        self.warnings.clear()
        self.log.clear()
        if job == TRAIN and not resume:
            self.history.clear()
        self._progressText = "Resuming..." if resume else "Starting the worker..."
        self._status = ""
        self._changed()

    def startFailed(self, message: str) -> None:
        """The job could not even be launched (export failed, worker not found...)."""
        self.state = FAILED
        self._error = message
        self._status = f"{BUTTON_LABELS.get(self.job or '', 'Job')} could not start."
        self._changed()

    def startAborted(self, status: str = "") -> None:
        """The user changed their mind before the worker started (e.g. declined to overwrite a folder)."""
        if self.state == STARTING:
            self._finish(IDLE, status)

    def cancelRequested(self) -> bool:
        """The user pressed Cancel. Returns whether the worker should be told to stop."""
        if self.state not in (STARTING, RUNNING):
            return False
        self.state = CANCELLING
        self._progressText = (
            "Cancelling: finishing the current step..." if self.job == TRAIN else "Cancelling..."
        )
        self._changed()
        return True

    def buttonClicked(self, job: str) -> str:
        """What a click on ``job``'s button means now: 'start', 'cancel', 'kill' or 'ignore'."""
        if self.busy:
            if job == self.job and self.state == CANCELLING:
                return "kill"
            return "cancel" if job == self.job and self.state in (STARTING, RUNNING) else "ignore"
        return "start" if self.canStart(job) else "ignore"

    # -- worker ----------------------------------------------------------------------

    def appendLog(self, text: str) -> None:
        """Raw worker output (stderr lines, non-event stdout); shown by 'Show log'."""
        self.log.extend(line for line in str(text).splitlines())

    def handleEvent(self, event: dict[str, Any]) -> None:
        """One event from the worker (a dict parsed from a JSON line)."""
        kind = event.get("event")
        if kind == "started":
            if self.state == STARTING:
                self.state = RUNNING
            self._total = int(event.get("total") or 0)
            self._iteration = int(event.get("start_iteration") or 0)
            device = event.get("device")
            reason = event.get("device_reason")
            self._status = f"Running on {device}" + (f" ({reason})" if reason else "") if device else ""
            if self.job == TRAIN and str(device or "").startswith("cpu") and str(reason or "") != "requested":
                self._deviceWarning = (
                    f"Training runs on the CPU ({reason or 'no GPU'}): expect hours instead of minutes. "
                    "Install the PyTorch extension's CUDA build (PyTorch Utils), or cancel and choose a GPU."
                )
            self._progressText = f"{RUNNING_VERBS.get(self.job or '', 'Running')}..."
        elif kind == "progress":
            if self.state == STARTING:
                self.state = RUNNING
            self._iteration = int(event.get("iteration") or 0)
            self._total = int(event.get("total") or self._total or 0)
            self._stage = str(event.get("stage") or "")
            losses = event.get("losses") or {}
            self.history.addLosses(self._iteration, losses)
            if self.state != CANCELLING:
                self._progressText = self._trainingProgressText(losses, event.get("eta_seconds"))
        elif kind == "validation":
            metrics = event.get("metrics") or {}
            self.history.addValidation(int(event.get("iteration") or 0), metrics)
            dice = metrics.get("dice")
            if isinstance(dice, (int, float)):
                best = event.get("best")
                self._status = f"Validation Dice {dice:.3f}" + (
                    f" (best {best:.3f})" if isinstance(best, (int, float)) else ""
                )
        elif kind == "case":
            if self.state == STARTING:
                self.state = RUNNING
            self._iteration = int(event.get("index") or 0)
            self._total = int(event.get("total") or self._total or 0)
            if self.state != CANCELLING:
                self._progressText = (
                    f"{RUNNING_VERBS.get(self.job or '', 'Running')}: "
                    f"case {self._iteration} of {self._total} ({event.get('case', '')}) done"
                )
        elif kind == "export":
            index, total = int(event.get("index") or 0), int(event.get("total") or 0)
            self._progressText = f"Exporting case {index} of {total} ({event.get('case', '')})" + (
                "" if event.get("written", True) else ", unchanged"
            )
        elif kind == "warning":
            message = str(event.get("message") or "").strip()
            if message:
                self.warnings.append(message)
        elif kind == "error":
            self._errorEventSeen = True
            self._error = readableError(event)
        elif kind == "finished":
            self._finishedStatus = str(event.get("status") or "")
        else:
            return  # checkpoint and unknown events change nothing visible
        self._changed()

    def _trainingProgressText(self, losses: dict[str, Any], eta: Any) -> str:
        verb = RUNNING_VERBS.get(self.job or "", "Running")
        if self.job != TRAIN:
            return f"{verb}: {self._iteration} of {self._total}" if self._total else f"{verb}..."
        parts = [f"Iteration {self._iteration} / {self._total}"]
        if self._stage == "pretrain":
            parts[0] += " (pre-training)"
        total = losses.get("total") if isinstance(losses, dict) else None
        if isinstance(total, (int, float)):
            parts.append(f"loss {total:.3f}")
        eta_text = formatDuration(eta)
        if eta_text:
            parts.append(f"{eta_text} left")
        return " - ".join(parts)

    def workerEnded(
        self,
        status: str,
        *,
        exitCode: int | None = None,
        message: str = "",
        logTail: list[str] | None = None,
        importsResults: bool = False,
    ) -> None:
        """The worker process is gone. ``status`` is the client's view (completed/cancelled/failed).

        If the job completed and has results to load (segmentation), the state becomes
        ``importing`` until :meth:`importFinished`; otherwise the job is over.
        """
        status = self._finishedStatus or status
        if status == "completed":
            if importsResults:
                self.state = IMPORTING
                self._progressText = "Loading the results into the scene..."
                self._changed()
                return
            self._finish(IDLE, f"{BUTTON_LABELS.get(self.job or '', 'Job')} finished.")
            return
        if status == "cancelled":
            resume = " Resume continues from the last checkpoint." if self.job == TRAIN else ""
            where = (
                f" at iteration {self._iteration} of {self._total}"
                if self.job == TRAIN and self._total
                else ""
            )
            self._finish(IDLE, f"{RUNNING_VERBS.get(self.job or '', 'Job')} cancelled{where}.{resume}")
            return
        if not self._error:
            tail = [line for line in (logTail or []) if line.strip()][-LOG_TAIL_LINES:]
            reason = message or (
                f"the worker stopped unexpectedly (exit code {exitCode})"
                if exitCode is not None
                else "the worker stopped unexpectedly"
            )
            self._error = reason[0].upper() + reason[1:] + (":\n" + "\n".join(tail) if tail else "")
        self._finish(FAILED, f"{BUTTON_LABELS.get(self.job or '', 'Job')} failed.")

    def importFinished(self, error: str | None = None, summary: str = "") -> None:
        """Loading results into the scene ended (``error`` None = success)."""
        if error:
            self._error = f"The results could not be loaded: {error}"
            self._finish(FAILED, f"{BUTTON_LABELS.get(self.job or '', 'Job')} failed while loading results.")
        else:
            self._finish(IDLE, summary or f"{BUTTON_LABELS.get(self.job or '', 'Job')} finished.")

    def _finish(self, state: str, status: str) -> None:
        self.state = state
        self._status = status
        self._progressText = ""
        self._changed()

    # -- dependencies ------------------------------------------------------------

    def installStarted(self, what: str) -> None:
        if self.busy:
            raise RuntimeError(f"cannot install while {self.job} is {self.state}")
        self.state, self.job = INSTALLING, None
        self._error = ""
        self._progressText = f"Installing {what}... (this can take several minutes)"
        self._changed()

    def installFinished(self, error: str | None = None, message: str = "") -> None:
        if error:
            self._error = error
            self._finish(FAILED, "Installing the Python packages failed.")
        else:
            self._finish(IDLE, message or "Python packages installed.")

    def dismissError(self) -> None:
        if self.state == FAILED:
            self.state = IDLE
            self._error = ""
            self._changed()

    # -- view --------------------------------------------------------------------

    def _compute(self) -> ViewState:
        busy = self.busy
        labels = dict(BUTTON_LABELS)
        enabled = {}
        tips = {}
        for job in JOB_KINDS:
            if busy and job == self.job and self.state in (STARTING, RUNNING):
                labels[job] = CANCEL_LABEL
                enabled[job] = True
                tips[job] = f"Stop {RUNNING_VERBS[job].lower()}" + (
                    " (a checkpoint is written; Resume continues from it)" if job == TRAIN else ""
                )
            elif busy and job == self.job and self.state == CANCELLING:
                labels[job] = KILL_LABEL
                enabled[job] = True
                tips[job] = "Waiting for the worker to stop; click to stop it at once" + (
                    " (the last checkpoint is kept)" if job == TRAIN else ""
                )
            elif busy:
                enabled[job] = False
                tips[job] = "Another job is running" if self.job else "Installing packages"
            else:
                problem = self._ready.get(job)
                enabled[job] = problem is None
                tips[job] = problem or f"Start {RUNNING_VERBS[job].lower()}"
        indeterminate = busy and (self.state in (STARTING, IMPORTING, INSTALLING) or not self._total)
        value = 0 if not self._total else round(100 * min(self._iteration, self._total) / self._total)
        return ViewState(
            state=self.state,
            job=self.job,
            buttonLabels=labels,
            buttonEnabled=enabled,
            buttonToolTips=tips,
            resumeEnabled=not busy and self._resumable,
            inputsEnabled=not busy,
            progressVisible=busy,
            progressValue=value,
            progressMaximum=0 if indeterminate else 100,
            progressText=self._progressText if busy else "",
            statusText=self._status,
            errorText=self._error if self.state == FAILED else "",
            showLogEnabled=bool(self.log) or self.state == FAILED or (busy and self.job is not None),
            warnings=tuple(self.warnings),
            warningText=self._deviceWarning if busy else "",
        )
