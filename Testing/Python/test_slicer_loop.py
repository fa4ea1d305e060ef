"""The clinician's loop in the panel, on Slicer's real MRML (PyPI slicer-core) with stub workers.

Labeled cases stay paired when a node is deleted; a start, an import or an install that fails
with something else than the module's own error ends in a message and a usable panel; closing
the module kills a worker that ignores the cancel; fine-tuning reaches the engine's config;
a second training exports nothing unchanged; work folders go after the import; "add, then
segment the next case" chains ranking and segmentation; the slice review order of
regions.json drives "Next slice to check". The stub workers are small programs that speak
the worker's event protocol and copy prepared output files, so these tests take seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "BidirUncertaintySeg"))

slicer = pytest.importorskip("slicer", reason="needs PyPI slicer-core (Slicer's MRML in plain Python)")
from slicer_app import create_slicer_app  # noqa: E402
from test_slicer_files import add_segmentation, add_volume, synthetic, write_predict_outputs  # noqa: E402

from BidirUncertaintySegLib import (  # noqa: E402
    engine,
    labelsfolder,
    nodefiles,
    panel,
    parameters,
    presenter,
    workflow,
)
from BidirUncertaintySegLib.errors import ModuleError  # noqa: E402
from buseg.data.synthetic import CLASS_NAMES  # noqa: E402

pytestmark = pytest.mark.slicer
CLASSES = [{"index": i + 1, "name": n, "color": (0.5, 0.5, 0.5)} for i, n in enumerate(CLASS_NAMES)]

STUB_WORKER = """#!{python}
# A stand-in for `python -m buseg <command> ... --progress jsonl`: the protocol's events, and the
# files of STUB_OUTPUTS (prepared by the test) copied into --out.
import json, os, shutil, signal, sys, time

args = sys.argv[1:]
command, out = args[2], args[args.index("--out") + 1]
if os.environ.get("STUB_ARGV_FILE"):
    open(os.environ["STUB_ARGV_FILE"], "w").write("\\n".join(args))
print(json.dumps({{"event": "started", "schema": 1, "job": command, "device": "cpu", "total": 1}}), flush=True)
if os.environ.get("STUB_MODE") == "hang":  # ignores the cancel: only a kill stops it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.environ["STUB_PID_FILE"], "w").write(str(os.getpid()))
    time.sleep(300)
for iteration in range(1, int(os.environ.get("STUB_PROGRESS", "0")) + 1):  # a training's progress
    time.sleep(0.1)
    loss = {{"total": 1.0 / iteration}}
    print(json.dumps({{"event": "progress", "schema": 1, "iteration": iteration, "total": 9, "losses": loss}}), flush=True)
if command == "train" and os.environ.get("STUB_PROGRESS"):
    open(os.path.join(out, "model.pt"), "w").write("model")
source = os.environ.get("STUB_OUTPUTS_" + command.upper())
if source:
    shutil.copytree(source, out, dirs_exist_ok=True)
print(json.dumps({{"event": "finished", "schema": 1, "status": "completed", "outputs": {{}}}}), flush=True)
"""


@pytest.fixture()
def app():
    return create_slicer_app()


@pytest.fixture()
def store(app):
    node = app.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "BidirUncertaintySeg")
    result = parameters.ParameterStore(node)
    result.setDefaults()
    return result


def stub_flow(app, store, tmp_path, **env) -> workflow.Workflow:
    stub = tmp_path / "stub-python"
    stub.write_text(STUB_WORKER.format(python=sys.executable))
    stub.chmod(0o755)
    context = workflow.SlicerContext(
        app.scene,
        app.segmentations_logic,
        app.markups_logic,
        python=str(stub),
        env={**os.environ, **{k: str(v) for k, v in env.items()}},
        runsFolder=tmp_path / "runs",
        workFolder=tmp_path / "work",
    )
    return workflow.Workflow(context, store)


class FakeTimer:
    """The widget's ``qt.QTimer`` as it behaves: ``start`` and ``stop`` are honoured, and a tick
    calls the handler only while the timer runs (once the handler stops it, nothing polls
    until a job starts it again)."""

    def __init__(self) -> None:
        self.active = False
        self.handler = None
        self.ticks = 0

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def tick(self) -> None:
        if self.active:
            self.ticks += 1
            self.handler()


def controller_for(flow, **hooks) -> panel.PanelController:
    """A panel controller wired as the widget wires it: its polling is a (fake) timer."""
    timer = FakeTimer()
    controller = panel.PanelController(
        lambda: flow, hooks=panel.PanelHooks(startPolling=timer.start, **hooks)
    )
    timer.handler = lambda: panel.timerTick(controller, timer)  # the widget's onPollJob
    controller.timer = timer
    for kind in presenter.JOB_KINDS:
        controller.presenter.setInputsReady(kind, None)
    return controller


def run_until_done(controller, seconds=60.0, between_ticks=None):
    """Tick the controller's timer until it stops (as the event loop would), with the user's
    ``between_ticks`` actions between ticks; the panel must then be out of its busy states."""
    timer = controller.timer
    deadline = time.monotonic() + seconds
    while timer.active:
        timer.tick()
        if between_ticks is not None:
            between_ticks()
        assert time.monotonic() < deadline, f"still {controller.presenter.state}"
        time.sleep(0.02)
    assert not controller.presenter.busy, (
        f"the timer stopped while the panel is '{controller.presenter.state}': nothing polls the job any more"
    )


def predict_outputs(folder, name, case, uncertainty=None, slice_review=None):
    """What `buseg predict` writes for one case (summary.json and the case folder)."""
    if uncertainty is None:
        uncertainty = np.zeros(case.image.array.shape)
        uncertainty[2:5, 3:9, 4:12] = 0.9
    outputs = write_predict_outputs(folder, name, case.image, case.label.array, uncertainty, CLASSES)
    if slice_review is not None:
        document = json.loads(outputs.regions.read_text())
        document["slice_review"] = slice_review
        outputs.regions.write_text(json.dumps(document))
    summary = {
        "schema": "buseg-predict-summary",
        "schema_version": 1,
        "cases": [{"case": name, "status": "ok", "outputs": {}}],
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return outputs


# --------------------------------------------------------------------------------------
# Bug: deleting a node re-paired the labeled cases


def test_deleting_a_volume_drops_its_case_and_never_re_pairs_the_others(app, store):
    volumes = [app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", n) for n in "ABC"]
    segmentations = [app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"seg{n}") for n in "ABC"]
    store.setLabeledCases(list(zip(volumes, segmentations, strict=True)))

    app.scene.RemoveNode(volumes[1])
    assert [(v.GetName(), s.GetName()) for v, s in store.labeledCases()] == [("A", "segA"), ("C", "segC")]
    messages = store.dropIncompleteLabeledCases()
    assert messages == [
        "Labeled case 'B' / 'segB' removed from the training set: 'B' was deleted from the scene."
    ]
    app.scene.RemoveNode(segmentations[0])  # the segmentation of a case goes: the case goes
    assert "'segA' was deleted" in store.dropIncompleteLabeledCases()[0]
    assert [(v.GetName(), s.GetName()) for v, s in store.labeledCases()] == [("C", "segC")]
    assert store.dropIncompleteLabeledCases() == []


def test_scenes_with_the_old_parallel_lists_become_pairs(app, store):
    volumes = [app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", n) for n in "AB"]
    segmentations = [app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"seg{n}") for n in "AB"]
    store.setNodeList(parameters.LEGACY_LABELED_VOLUMES, volumes)
    store.setNodeList(parameters.LEGACY_LABELED_SEGMENTATIONS, segmentations)
    store.setDefaults()
    assert store.labeledCases() == list(zip(volumes, segmentations, strict=True))
    assert store.nodeList(parameters.LEGACY_LABELED_VOLUMES) == []


# --------------------------------------------------------------------------------------
# Bugs: unexpected errors while importing, starting, installing


def test_an_unexpected_import_error_ends_the_job_instead_of_importing_forever(app, store, tmp_path):
    flow = stub_flow(app, store, tmp_path)
    worker = flow._worker(["predict", "x", "--out", str(tmp_path / "out")], tmp_path)
    calls = []

    def broken_import(result):
        calls.append(result)
        raise KeyError("regions")

    job = workflow.Job("segment", worker, outDir=tmp_path, onCompleted=broken_import).start()
    controller = controller_for(flow)
    controller.presenter.jobStarting(presenter.SEGMENT)
    controller.follow(job)
    run_until_done(controller)
    for _ in range(3):
        assert controller.poll() is True  # done: later ticks do nothing
    assert len(calls) == 1 and job.done and not job.succeeded
    assert "Unexpected error while loading the results: KeyError" in job.failureMessage()
    assert controller.presenter.state == presenter.FAILED
    assert "KeyError" in controller.presenter.view.errorText

    # The console API's follower stops too (its timer polled every 250 ms forever).
    job = workflow.Job("segment", flow._worker(["predict", "--out", "o"], tmp_path), outDir=tmp_path)
    job.onCompleted = broken_import
    job.start()
    finished = []
    deadline = time.monotonic() + 60
    while not panel.pollInBackground(job, finished.append):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert finished == [job] and job.importError


def test_an_unexpected_error_while_starting_leaves_a_message_and_a_usable_panel(app, store, tmp_path):
    (tmp_path / "not-a-folder").write_text("a file where the runs folder should go")
    flow = stub_flow(app, store, tmp_path)
    flow.context.runsFolder = tmp_path / "not-a-folder" / "runs"  # mkdir raises an OSError
    case = synthetic()
    volume = add_volume(app.scene, case.image, "V")
    store.setLabeledCases([(volume, add_segmentation(app.scene, case.label.array, volume, CLASS_NAMES))])
    store.set("method", "supervised")
    controller = controller_for(flow)

    assert controller.buttonClicked(presenter.TRAIN) is None
    view = controller.presenter.view
    assert (
        view.state == presenter.FAILED and "Unexpected error while starting the train job" in view.errorText
    )
    assert view.buttonLabels[presenter.TRAIN] == "Train" and view.buttonEnabled[presenter.TRAIN]
    assert controller.presenter.buttonClicked(presenter.TRAIN) == "start"  # no 'cancelling' without a way out
    # Even a presenter left cancelling without a job (nothing to stop) gets out with "Stop now".
    controller.presenter.jobStarting(presenter.TRAIN)
    controller.buttonClicked(presenter.TRAIN)
    assert controller.presenter.state == presenter.CANCELLING
    controller.buttonClicked(presenter.TRAIN)
    assert controller.presenter.state == presenter.IDLE


def test_an_installer_that_crashes_ends_the_installing_state(app, store, tmp_path):
    from BidirUncertaintySegLib import dependencies

    controller = controller_for(stub_flow(app, store, tmp_path))

    def crash(plan):
        raise OSError("no space left on device")

    controller.hooks.installDependencies = crash
    plan = dependencies.InstallPlan(
        steps=[dependencies.InstallStep(dependencies.PIP, "monai>=1.4,<2", "monai")]
    )
    assert controller.install(plan) is False
    view = controller.presenter.view
    assert view.state == presenter.FAILED and "no space left on device" in view.errorText
    assert view.buttonEnabled[presenter.TRAIN]


def test_closing_the_module_kills_a_worker_that_ignores_the_cancel_without_blocking(
    app, store, tmp_path, monkeypatch
):
    pid_file = tmp_path / "pid"
    flow = stub_flow(app, store, tmp_path, STUB_MODE="hang", STUB_PID_FILE=pid_file)
    job = workflow.Job("train", flow._worker(["train", "--out", str(tmp_path)], tmp_path), outDir=tmp_path)
    controller = controller_for(flow)
    controller.presenter.jobStarting(presenter.TRAIN)
    controller.follow(job.start())
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        controller.timer.tick()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    monkeypatch.setattr(panel, "SHUTDOWN_GRACE_SECONDS", 1.0)
    started = time.monotonic()
    finishing = controller.shutdown()
    assert time.monotonic() - started < 1.0  # a reload or quit does not wait for the worker
    finishing.join(timeout=15)
    assert not finishing.is_alive()
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert job.worker.done and job.worker.result.status in ("cancelled", "failed")


def test_a_listener_that_raises_ends_the_job_for_good_and_the_next_start_is_taken(
    app, store, tmp_path, monkeypatch
):
    pid_file = tmp_path / "pid"
    flow = stub_flow(app, store, tmp_path, STUB_MODE="hang", STUB_PID_FILE=pid_file)
    monkeypatch.setattr(panel, "SHUTDOWN_GRACE_SECONDS", 1.0)
    controller = controller_for(flow)

    def broken_listener(event):
        raise RuntimeError("the plot could not be drawn")

    def starter():
        job = workflow.Job(
            "train", flow._worker(["train", "--out", str(tmp_path)], tmp_path), outDir=tmp_path
        )
        job.eventListeners.append(broken_listener)
        return job.start()

    job = controller.start(presenter.TRAIN, starter)
    run_until_done(controller, seconds=30)  # the timer stops, and the panel is not left busy
    assert controller.presenter.state == presenter.FAILED
    assert "RuntimeError: the plot could not be drawn" in controller.presenter.view.errorText
    # The job is over for the registry too: it used to stay 'running', refusing every later start.
    assert job.done and job.result.status == "failed" and controller.registry.running() is None
    controller.registry.ensureIdle()
    deadline = time.monotonic() + 30  # its worker (which ignores the cancel) is killed after the grace
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the worker of the abandoned job still runs"
        time.sleep(0.1)

    quick = stub_flow(app, store, tmp_path)  # a worker that finishes
    again = controller.start(
        presenter.SEGMENT,
        lambda: workflow.Job(
            "segment", quick._worker(["predict", "--out", str(tmp_path / "o")], tmp_path), outDir=tmp_path
        ).start(),
    )
    assert again is not None and again is not job
    run_until_done(controller)
    assert again.succeeded and controller.presenter.state == presenter.IDLE


def test_quitting_slicer_while_a_job_runs_asks_first_and_declining_keeps_it_running(app, store, tmp_path):
    pid_file = tmp_path / "pid"
    flow = stub_flow(app, store, tmp_path, STUB_MODE="hang", STUB_PID_FILE=pid_file)
    answers, questions = [], []

    def confirm(text):
        questions.append(text)
        return answers.pop(0)

    controller = controller_for(flow, confirm=confirm)
    assert controller.mayQuit() and not questions  # nothing runs: nothing to ask
    job = controller.start(
        presenter.TRAIN,
        lambda: workflow.Job(
            "train", flow._worker(["train", "--out", str(tmp_path)], tmp_path), outDir=tmp_path
        ).start(),
    )
    controller.timer.tick()
    answers.append(False)
    assert controller.mayQuit() is False  # the main window's close event is ignored
    assert "A training is running. Quit anyway?" in questions[-1] and "checkpoint" in questions[-1]
    controller.timer.tick()
    assert not job.done and controller.presenter.busy and controller.timer.active
    answers.append(True)
    assert controller.mayQuit() is True  # then the module's clean-up stops it (tested above)
    job.kill()
    run_until_done(controller)

    # The widget asks on the main window's close event, before Slicer's module clean-up.
    widget = module_class_source("BidirUncertaintySegWidget")
    assert "_CloseEventFilter(self.controller.mayQuit)" in widget
    assert "installEventFilter(self._quitFilter)" in widget
    assert "removeEventFilter(self._quitFilter)" in widget[widget.index("def cleanup(") :]
    event_filter = module_class_source("_CloseEventFilter")
    assert "qt.QEvent.Close" in event_filter and "event.ignore()" in event_filter


def test_kill_while_cancelling_stops_the_worker_at_once(app, store, tmp_path):
    pid_file = tmp_path / "pid"
    flow = stub_flow(app, store, tmp_path, STUB_MODE="hang", STUB_PID_FILE=pid_file)
    controller = controller_for(flow)
    job = controller.start(
        presenter.TRAIN,
        lambda: workflow.Job(
            "train", flow._worker(["train", "--out", str(tmp_path)], tmp_path), outDir=tmp_path
        ).start(),
    )
    while not pid_file.exists() or not pid_file.read_text():
        controller.timer.tick()
        time.sleep(0.05)
    controller.buttonClicked(presenter.TRAIN)  # Cancel: the stub ignores it
    assert controller.presenter.state == presenter.CANCELLING
    assert controller.presenter.view.buttonLabels[presenter.TRAIN] == presenter.KILL_LABEL
    controller.buttonClicked(presenter.TRAIN)  # Stop now
    run_until_done(controller, seconds=10)
    assert job.done and controller.presenter.state != presenter.CANCELLING


# --------------------------------------------------------------------------------------
# Console jobs and panel jobs: one registry


def test_a_console_job_shows_in_the_panel_which_cancels_it_and_starts_nothing_beside_it(app, store, tmp_path):
    volume = add_volume(app.scene, synthetic().image, "Case")
    (tmp_path / "model.pt").write_bytes(b"m")
    pid_file = tmp_path / "pid"
    flow = stub_flow(app, store, tmp_path, STUB_MODE="hang", STUB_PID_FILE=pid_file)
    controller = controller_for(flow)

    def console_segment():  # logic.segment(volume, wait=False)
        return panel.startConsoleJob(
            controller.registry, lambda: flow.startSegmentation(volume, tmp_path / "model.pt")
        )

    job = console_segment()
    assert controller.job is job and controller.timer.active
    assert controller.presenter.state == presenter.STARTING
    assert controller.presenter.view.buttonLabels[presenter.SEGMENT] == presenter.CANCEL_LABEL
    assert controller.buttonClicked(presenter.TRAIN) is None and controller.job is job  # nothing beside it
    with pytest.raises(ModuleError, match="A segment job is running"):
        console_segment()
    while not pid_file.exists():
        controller.timer.tick()
        time.sleep(0.02)
    controller.buttonClicked(presenter.SEGMENT)  # Cancel (the stub ignores it) ...
    controller.buttonClicked(presenter.SEGMENT)  # ... Stop now
    run_until_done(controller, seconds=20)
    assert job.done and job.result.status == "cancelled"
    controller.registry.ensureIdle()  # over: the next job may start


def test_a_console_call_that_waits_lets_the_application_handle_its_events(app, store, tmp_path):
    labeled_scene(app, store)
    flow = stub_flow(app, store, tmp_path, STUB_PROGRESS=3)
    controller = controller_for(flow)
    ticks = []
    job = panel.startConsoleJob(
        controller.registry, lambda: flow.startTraining(store.labeledCases(), store.unlabeledVolumes())
    )
    # Slicer's processEvents runs the panel's timer among the other events.
    result = panel.waitProcessingEvents(job, lambda: ticks.append(1) or controller.timer.tick())
    assert result.status == "completed" and job.succeeded, job.failureMessage()
    assert len(ticks) >= 3 and controller.presenter.state == presenter.IDLE
    assert controller.presenter.history.lossIterations == [1, 2, 3]  # the panel followed the progress


# --------------------------------------------------------------------------------------
# Closing the scene while a job runs (the module may not even be shown)


def test_closing_the_scene_keeps_following_a_running_training_and_cancels_a_segmentation(app, tmp_path):
    # The parameter node as Slicer's ScriptedLoadableModuleLogic makes it: a singleton, kept (and
    # reset) when the scene is closed.
    node = app.scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
    node.UnRegister(None)
    node.SetSingletonTag("BidirUncertaintySeg")
    store = parameters.ParameterStore(app.scene.AddNode(node))
    store.setDefaults()
    labeled_scene(app, store)
    flow = stub_flow(app, store, tmp_path, STUB_PROGRESS=9)
    controller = controller_for(flow)
    job = controller.start(
        presenter.TRAIN, lambda: flow.startTraining(store.labeledCases(), store.unlabeledVolumes())
    )
    messages = []

    def close_the_scene_mid_training():
        if not messages and any(e["event"] == "progress" for e in job.events):
            messages.append(controller.sceneAboutToClose())  # the widget's StartCloseEvent
            app.scene.Clear(0)
            store.setDefaults()  # the widget's EndCloseEvent (module shown or not: a job runs)
            assert controller.presenter.buttonClicked(presenter.SEGMENT) == "ignore"  # nothing beside it

    run_until_done(controller, between_ticks=close_the_scene_mid_training)
    assert "goes on in the background" in messages[0]
    assert job.succeeded, job.failureMessage()
    assert controller.presenter.state == presenter.IDLE and job.events[-1]["event"] == "finished"
    assert store.get("modelPath") == str(job.outDir / engine.MODEL_FILE)  # known in the new scene
    chart = store.nodeReference("LossChart")  # the plot went on in the new scene
    assert chart is not None and app.scene.GetNodeByID(chart.GetID()) is chart
    assert store.nodeReference("LossTable").GetNumberOfRows() == 9

    # A segmentation's volume goes with the scene: its job is cancelled, nothing is imported.
    case = synthetic()
    volume = add_volume(app.scene, case.image, "Case")
    store.set("modelPath", str(tmp_path / "model.pt"))
    (tmp_path / "model.pt").write_bytes(b"m")
    flow.context.env["STUB_MODE"] = "hang"
    flow.context.env["STUB_PID_FILE"] = str(tmp_path / "pid")
    segment = controller.start(
        presenter.SEGMENT, lambda: flow.startSegmentation(volume, store.get("modelPath"))
    )
    assert "was cancelled" in controller.sceneAboutToClose()
    app.scene.Clear(0)
    controller.buttonClicked(presenter.SEGMENT)  # "Stop now": the stub ignores the cancel
    run_until_done(controller, seconds=20)
    assert segment.result.status == "cancelled" and segment.value is None and not segment.importError


# --------------------------------------------------------------------------------------
# Cancel through Slicer's launcher: PythonSlicer is CTK's AppLauncher, the worker its child

LAUNCHER = """#!{python}
# A stand-in for PythonSlicer (CTK's AppLauncher): starts the real interpreter as its child
# (same process group, the pipes inherited) and forwards no signal. 'ignore': it ignores
# signals and waits for its child; 'die': a signal ends it at once, the child runs on.
import os, signal, subprocess, sys

if os.environ["LAUNCHER_MODE"] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, os.environ["LAUNCHED_WORKER"], *sys.argv[1:]])
sys.exit(child.wait())
"""

SAVING_WORKER = """
# A training worker that stops only on a signal (no cancel file), then takes a while to save.
import json, os, signal, sys, time

stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
signal.signal(signal.SIGINT, signal.SIG_DFL)
out = sys.argv[sys.argv.index("--out") + 1]
open(os.path.join(out, "worker.pid"), "w").write(str(os.getpid()))
print(json.dumps({"event": "started", "schema": 1, "job": "train", "device": "cpu", "total": 100}), flush=True)
while not stop:
    time.sleep(0.05)
time.sleep(1.5)  # writing the checkpoint
with open(os.path.join(out, "last.pt.tmp"), "w") as f:
    f.write("checkpoint")
os.replace(os.path.join(out, "last.pt.tmp"), os.path.join(out, "last.pt"))
print(json.dumps({"event": "finished", "schema": 1, "status": "cancelled", "outputs": {}}), flush=True)
sys.exit(130)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups; Windows kills the tree")
@pytest.mark.parametrize("mode", ["ignore", "die"])
def test_cancel_reaches_the_worker_behind_slicers_launcher_and_ends_only_when_it_has(
    app, store, tmp_path, mode
):
    import psutil

    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(LAUNCHER.format(python=sys.executable))
    launcher.chmod(0o755)
    (tmp_path / "worker.py").write_text(SAVING_WORKER)
    out = tmp_path / "run"
    out.mkdir()
    flow = stub_flow(app, store, tmp_path, LAUNCHER_MODE=mode, LAUNCHED_WORKER=tmp_path / "worker.py")
    flow.context.python = str(launcher)
    controller = controller_for(flow)
    job = controller.start(
        presenter.TRAIN,
        lambda: workflow.Job("train", flow._worker(["train", "--out", str(out)], out), outDir=out).start(),
    )
    deadline = time.monotonic() + 30
    while controller.presenter.state != presenter.RUNNING or not (out / "worker.pid").exists():
        controller.timer.tick()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    worker = psutil.Process(int((out / "worker.pid").read_text()))
    assert worker.ppid() == job.worker._client.pid  # the worker is the launcher's child

    controller.buttonClicked(presenter.TRAIN)  # Cancel
    states = []
    try:
        run_until_done(
            controller, seconds=20, between_ticks=lambda: states.append(controller.presenter.state)
        )
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE  # gone before "cancelled"
    finally:
        with contextlib.suppress(psutil.Error):
            worker.kill()
    assert (out / "last.pt").read_text() == "checkpoint"  # it heard the cancel and saved
    assert job.result.status == "cancelled" and "before it could save" not in job.result.message
    assert set(states[:-1]) == {presenter.CANCELLING}  # "Stop now" offered while it saved
    assert "cancelled" in controller.presenter.view.statusText


# --------------------------------------------------------------------------------------
# Fine-tuning, export cache, work folders


def labeled_scene(app, store, count=3):
    cases = [synthetic(seed=i) for i in range(count)]
    volumes = [add_volume(app.scene, c.image, f"Case {i}") for i, c in enumerate(cases)]
    segmentations = [add_segmentation(app.scene, cases[0].label.array, volumes[0], CLASS_NAMES)]
    store.setLabeledCases([(volumes[0], segmentations[0])])
    for volume in volumes[1:]:
        store.addUnlabeledVolume(volume)
    return cases, volumes


def test_a_second_training_exports_nothing_unchanged_and_fine_tunes_the_current_model(app, store, tmp_path):
    cases, volumes = labeled_scene(app, store)
    flow = stub_flow(app, store, tmp_path)
    store.set("fineTune", True)
    outDir, _, config = flow.prepareTraining(store.labeledCases(), store.unlabeledVolumes())
    assert config.init_weights is None and config.optim.iterations == store.get("iterations")  # no model yet
    inputs = outDir / workflow.INPUTS_FOLDER
    files = sorted(p for p in inputs.rglob("*.nrrd"))
    assert len(files) == 4  # image + label of the labeled case, two unlabeled images
    stamps = {p: p.stat().st_mtime_ns for p in files}
    (outDir / engine.MODEL_FILE).write_bytes(b"the first round's model")
    store.set("modelPath", str(outDir / engine.MODEL_FILE))
    store.set("lastRunFolder", str(outDir))

    # A second round after a correction: the same run folder, from the current model, short schedule.
    plan = flow.planTraining(store.labeledCases(), store.unlabeledVolumes())
    assert plan.outDir == outDir and plan.overwrite and plan.fineTuneFrom == outDir / engine.MODEL_FILE
    steps = list(flow.trainingSteps(plan))
    assert [s.written for s in steps] == [False, False, False]  # nothing changed: nothing written
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert plan.config.init_weights == str(outDir / workflow.PREVIOUS_MODEL)
    assert (outDir / workflow.PREVIOUS_MODEL).read_bytes() == b"the first round's model"
    assert plan.config.optim.iterations == store.get("fineTuneIterations")
    assert plan.config.optim.pretrain_iterations == 0
    written = json.loads(plan.configPath.read_text())  # what the worker reads
    assert written["init_weights"] == str(outDir / workflow.PREVIOUS_MODEL)
    assert written["optim"]["iterations"] == store.get("fineTuneIterations")
    command = engine.trainCommand(plan.configPath, plan.outDir, overwrite=plan.overwrite)
    assert "--overwrite" in command

    # One corrected volume: only its files are written again.
    slicer.util.updateVolumeFromArray(volumes[1], cases[1].image.array[::-1].copy())
    steps = list(flow.trainingSteps(flow.planTraining(store.labeledCases(), store.unlabeledVolumes())))
    assert [(s.case, s.written) for s in steps] == [("Case_0", False), ("Case_1", True), ("Case_2", False)]

    # From scratch stays available: a new folder, the full schedule, no initial weights.
    plan = flow.planTraining(store.labeledCases(), store.unlabeledVolumes(), overrides={"fineTune": False})
    assert plan.outDir != outDir and plan.config.init_weights is None
    assert plan.config.optim.pretrain_iterations == store.get("pretrainIterations")


def scene_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_a_training_export_removes_its_own_nodes_only_not_those_the_user_adds_between_ticks(
    app, store, tmp_path
):
    cases = [synthetic(seed=i) for i in range(3)]
    volumes = [add_volume(app.scene, c.image, f"Case {i}") for i, c in enumerate(cases)]
    labelmap = add_volume(app.scene, cases[0].label, "Case 0 label", "vtkMRMLLabelMapVolumeNode")
    store.setLabeledCases([(volumes[0], labelmap)])  # converted to a temporary segmentation
    for volume in volumes[1:]:
        store.addUnlabeledVolume(volume)
    flow = stub_flow(app, store, tmp_path)
    controller = controller_for(flow)
    before = scene_ids(app.scene)
    users, usersIds = [], set()

    def user_adds_nodes():  # while the export is half-way: a markup and a segmentation of their own
        if controller.job.preparing and controller.job.events and not users:
            existing = scene_ids(app.scene)
            users.append(app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my points"))
            users.append(app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation"))
            usersIds.update(scene_ids(app.scene) - existing)  # with the markup's display node

    job = controller.start(
        presenter.TRAIN, lambda: flow.startTraining(store.labeledCases(), store.unlabeledVolumes())
    )
    run_until_done(controller, between_ticks=user_adds_nodes)
    assert users and job.worker is not None  # the export ran to its end, the worker started
    for node in users:
        assert app.scene.GetNodeByID(node.GetID()) is node, f"'{node.GetName()}' was removed"
    assert scene_ids(app.scene) == before | usersIds  # and the export's temporary nodes went


def test_resume_continues_a_run_folder_picked_on_disk_when_the_scene_does_not_know_it(app, store, tmp_path):
    # Slicer crashed during a training and the scene was never saved: the parameter node has no
    # run folder, the one on disk has a checkpoint newer than any model.
    run = tmp_path / "runs" / "run-1"
    run.mkdir(parents=True)
    (run / engine.RUN_CONFIG).write_text("{}")
    (run / engine.LAST_CHECKPOINT).write_bytes(b"checkpoint")
    assert store.get("lastRunFolder") == ""
    controller = controller_for(stub_flow(app, store, tmp_path, STUB_PROGRESS=2))
    job = controller.resume(str(run))
    assert job is not None, controller.presenter.view.errorText
    argv = job.worker.argv
    assert "--resume" in argv and argv[argv.index("--out") + 1] == str(run)
    run_until_done(controller)
    assert job.succeeded, job.failureMessage()
    assert store.get("lastRunFolder") == str(run) and store.get("modelPath") == str(run / engine.MODEL_FILE)


def test_refused_inputs_leave_no_empty_run_folder(app, store, tmp_path):
    flow = stub_flow(app, store, tmp_path)
    volume = add_volume(app.scene, synthetic().image, "V")
    store.set("patchSize", "64 x 64 x")
    with pytest.raises(ModuleError, match="whole numbers"):
        flow.prepareTraining(
            [(volume, add_segmentation(app.scene, synthetic().label.array, volume, CLASS_NAMES))]
        )
    with pytest.raises(ModuleError, match="No labeled case"):
        flow.prepareTraining([])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_fine_tuning_refuses_classes_the_current_model_does_not_know(app, store, tmp_path):
    cases, volumes = labeled_scene(app, store)
    flow = stub_flow(app, store, tmp_path)
    outDir, _, _ = flow.prepareTraining(store.labeledCases(), store.unlabeledVolumes())
    (outDir / engine.MODEL_FILE).write_bytes(b"model")
    store.set("modelPath", str(outDir / engine.MODEL_FILE))
    other = add_segmentation(app.scene, cases[1].label.array, volumes[1], ["shell", "core", "lesion"])
    store.addLabeledCase(volumes[1], other)
    with pytest.raises(ModuleError, match="Fine-tuning needs the current model's classes"):
        flow.prepareTraining(store.labeledCases(), store.unlabeledVolumes())


def test_training_exports_one_case_per_poll_and_can_be_cancelled_meanwhile(app, store, tmp_path):
    labeled_scene(app, store)
    flow = stub_flow(app, store, tmp_path)
    job = flow.startTraining(store.labeledCases(), store.unlabeledVolumes())
    assert job.preparing and job.worker is None
    job.poll()
    assert [e["event"] for e in job.events] == ["export"] and job.events[0]["total"] == 3
    assert job.cancel() is True
    job.poll()
    assert job.done and job.result.status == "cancelled" and job.worker is None


def test_the_work_folder_goes_after_the_import_and_the_slice_order_drives_next_slice(app, store, tmp_path):
    case = synthetic()
    volume = add_volume(app.scene, case.image, "Case")
    review = {
        "axis_ijk": 2,
        "slices": [
            {"index": 4, "expected_error_voxels": 31.5, "center_ras": [1.0, 2.0, 3.0]},
            {"index": 7, "expected_error_voxels": 12.0, "center_ras": [1.5, 2.5, 9.0]},
        ],
    }
    prepared = tmp_path / "prepared"
    caseName = engine.caseName(f"{nodefiles.safeFileName('Case')}{nodefiles.IMAGE_SUFFIX}")
    predict_outputs(prepared, caseName, case, slice_review=review)
    flow = stub_flow(app, store, tmp_path, STUB_OUTPUTS_PREDICT=prepared)
    (tmp_path / "model.pt").write_bytes(b"m")
    store.setNodeReference("InputVolume", volume)
    store.set("modelPath", str(tmp_path / "model.pt"))
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1"), "CT study")
    sh.CreateItem(study, volume)  # in Slicer the Data module's plugins make the items
    controller = controller_for(flow)
    job = controller.buttonClicked(presenter.SEGMENT)
    run_until_done(controller)
    assert job.succeeded, job.failureMessage()
    assert not job.outDir.exists() and job.outDir.parent == tmp_path / "work"
    # The results sit under the input's study in the subject hierarchy, next to the volume.
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    for node in (job.value.segmentationNode, job.value.uncertaintyNode, job.value.regionsTable):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study

    assert flow.sliceReview().axisIjk == 2
    number, first = flow.jumpToNextSlice()
    assert number == 1 and first.index == 4 and first.expectedErrorVoxels == 31.5
    origin = [app.slice_node("Red").GetSliceToRAS().GetElement(r, 3) for r in range(3)]
    assert origin == pytest.approx([1.0, 2.0, 3.0])
    assert flow.jumpToNextSlice()[1].index == 7
    assert flow.jumpToNextSlice()[0] == 1  # wraps around

    store.set("sliceReview", "")  # a result without the key: the control is off
    assert flow.sliceReview() is None and flow.jumpToNextSlice() is None


def test_each_segmented_case_keeps_its_own_regions_table_and_points(app, store, tmp_path):
    cases = [synthetic(seed=i) for i in range(2)]
    volumes = [add_volume(app.scene, c.image, f"Case {n}") for n, c in zip("AB", cases, strict=True)]
    flow = stub_flow(app, store, tmp_path)
    (tmp_path / "model.pt").write_bytes(b"m")
    controller = controller_for(flow)

    def segment(volume, case):
        prepared = tmp_path / f"prepared-{volume.GetName()}"
        name = engine.caseName(f"{nodefiles.safeFileName(volume.GetName())}{nodefiles.IMAGE_SUFFIX}")
        if not prepared.exists():
            predict_outputs(prepared, name, case)
        flow.context.env["STUB_OUTPUTS_PREDICT"] = str(prepared)
        job = controller.start(
            presenter.SEGMENT, lambda: flow.startSegmentation(volume, tmp_path / "model.pt")
        )
        run_until_done(controller)
        assert job.succeeded, job.failureMessage()
        return job.value

    first = segment(volumes[0], cases[0])
    points = first.regionsMarkups.GetNumberOfControlPoints()
    assert points > 0 and first.regionsTable.GetNumberOfRows() == points
    again = segment(volumes[0], cases[0])  # re-segmenting A replaces A's own nodes
    assert again.regionsTable is first.regionsTable and again.regionsMarkups is first.regionsMarkups
    second = segment(volumes[1], cases[1])
    assert second.regionsTable is not first.regionsTable and second.regionsMarkups is not first.regionsMarkups
    assert first.regionsTable.GetName() == "Case A uncertain regions"  # not renamed after case B
    assert first.regionsMarkups.GetNumberOfControlPoints() == points  # A's markers stay
    assert second.regionsTable.GetName() == "Case B uncertain regions"
    assert store.nodeReference("RegionsTable") is second.regionsTable  # the panel shows the latest

    # The user corrects B's segmentation in the Segment Editor, then segments B again (another
    # model, a click too many): the edits are not overwritten; the new result gets new nodes.
    edited = second.segmentationNode
    truth = cases[1].label.array.copy()
    truth[truth == 2] = 0  # a segment cleared by hand
    correct(app, edited, volumes[1], truth)
    before = nodefiles.segmentationFingerprint(app.scene, edited, volumes[1])
    third = segment(volumes[1], cases[1])
    assert third.segmentationNode is not edited and third.regionsTable is not second.regionsTable
    assert nodefiles.segmentationFingerprint(app.scene, edited, volumes[1]) == before
    assert third.keptEdited == edited.GetName()
    assert f"Your edited '{edited.GetName()}' is kept as it was" in controller.presenter.view.statusText
    assert store.nodeReference("OutputSegmentation") is third.segmentationNode
    fourth = segment(volumes[1], cases[1])  # the new, unedited result is replaced as before
    assert fourth.segmentationNode is third.segmentationNode and not fourth.keptEdited


def test_cancelled_and_failed_work_folders_do_not_stay_in_the_temporary_folder(app, store, tmp_path):
    volume = add_volume(app.scene, synthetic().image, "Case")
    (tmp_path / "model.pt").write_bytes(b"m")
    pid_file = tmp_path / "pid"
    flow = stub_flow(app, store, tmp_path, STUB_MODE="hang", STUB_PID_FILE=pid_file)
    controller = controller_for(flow)
    cancelled = controller.start(
        presenter.SEGMENT, lambda: flow.startSegmentation(volume, tmp_path / "model.pt")
    )
    while not pid_file.exists():
        controller.timer.tick()
        time.sleep(0.02)
    controller.buttonClicked(presenter.SEGMENT)  # Cancel ...
    controller.buttonClicked(presenter.SEGMENT)  # ... Stop now
    run_until_done(controller, seconds=20)
    assert cancelled.result.status == "cancelled" and not cancelled.outDir.exists()

    del flow.context.env["STUB_MODE"]  # completes without writing any result: the import fails
    failed = controller.start(
        presenter.SEGMENT, lambda: flow.startSegmentation(volume, tmp_path / "model.pt")
    )
    run_until_done(controller)
    assert not failed.succeeded and failed.importError
    assert [p.name for p in failed.outDir.iterdir()] == [workflow.WORKER_LOG]  # only what 'Show log' names


def test_the_default_volume_to_segment_is_an_input_not_an_uncertainty_map(app):
    case = synthetic()
    add_volume(app.scene, case.label, "labels", "vtkMRMLLabelMapVolumeNode")
    heat = add_volume(app.scene, case.image, "CT uncertainty")  # first in the scene
    assert workflow.defaultInputVolume(app.scene) is heat  # nothing says what it is yet
    source = add_volume(app.scene, case.image, "CT")
    heat.SetNodeReferenceID(workflow.INPUT_VOLUME_ROLE, source.GetID())  # as a segmentation leaves it
    assert workflow.defaultInputVolume(app.scene) is source


def test_slice_review_is_read_from_a_hand_written_regions_json(tmp_path):
    path = tmp_path / "regions.json"
    document = {
        "schema": "buseg-regions",
        "schema_version": 1,
        "regions": [
            {
                "id": 1,
                "voxel_count": 10,
                "volume_mm3": 12.5,
                "mean_uncertainty": 0.7,
                "max_uncertainty": 0.9,
                "classes": ["core"],
                "centroid_ras": [0, 0, 0],
                "bbox_ras_min": [-1, -1, -1],
                "bbox_ras_max": [1, 1, 1],
                "reason": "shape flag: hole in the core",
            }
        ],
        "slice_review": {
            "axis_ijk": 0,
            "slices": [{"index": 3, "expected_error_voxels": 5.25, "center_ras": [4, 5, 6]}],
        },
    }
    path.write_text(json.dumps(document))
    read = engine.readRegions(path)
    assert read.regions[0].reason == "shape flag: hole in the core"
    assert read.sliceReview.axisIjk == 0
    assert read.sliceReview.slices == [engine.ReviewSlice(3, 5.25, (4.0, 5.0, 6.0))]
    del document["slice_review"]
    path.write_text(json.dumps(document))
    assert engine.readRegions(path).sliceReview is None
    document["slice_review"] = {"axis_ijk": 3, "slices": []}
    path.write_text(json.dumps(document))
    with pytest.raises(ModuleError, match=r"regions.json: slice_review.axis_ijk must be 0, 1 or 2"):
        engine.readRegions(path)
    document["slice_review"] = {"axis_ijk": 1, "slices": [{"index": 2}]}
    path.write_text(json.dumps(document))
    with pytest.raises(ModuleError, match=r"slice_review.slices\[0\] is incomplete"):
        engine.readRegions(path)


# --------------------------------------------------------------------------------------
# The labels folder: corrections saved at once, labeled cases that are only files


def test_an_added_correction_is_on_disk_at_once_and_the_next_training_reads_it_after_a_crash(
    app, store, tmp_path
):
    from buseg.data.cases import cases_from_manifest
    from buseg.files.images import read_label

    cases = [synthetic(seed=i) for i in range(2)]
    volumes = [add_volume(app.scene, c.image, f"Case {n}") for n, c in zip("AB", cases, strict=True)]
    result = add_segmentation(app.scene, cases[0].label.array, volumes[0], CLASS_NAMES)
    result.SetNodeReferenceID(workflow.INPUT_VOLUME_ROLE, volumes[0].GetID())
    store.setNodeReference("OutputSegmentation", result)
    controller = controller_for(stub_flow(app, store, tmp_path))
    message = controller.addCorrectedCase()
    labels = tmp_path / "labels"  # beside the runs folder
    assert str(labels) in message
    image, label = labels / "images" / "Case_A.nrrd", labels / "labels" / "Case_A_label.nrrd"
    assert image.is_file() and label.is_file()
    assert not list(labels.rglob(".*partial*"))  # written under a temporary name, then renamed
    assert np.array_equal(read_label(label).array, cases[0].label.array)  # the class values 1..3
    saved = cases_from_manifest(labels / nodefiles.MANIFEST_NAME)  # the engine reads the folder as it is
    assert [c.image for c in saved.labeled] == [image]

    # Slicer crashed, the scene was never saved: a new scene knows only case B.
    other = create_slicer_app()
    node = other.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "BidirUncertaintySeg")
    newStore = parameters.ParameterStore(node)
    newStore.setDefaults()
    newStore.set("method", "supervised")
    volumeB = add_volume(other.scene, cases[1].image, "Case B")
    newStore.setLabeledCases(
        [(volumeB, add_segmentation(other.scene, cases[1].label.array, volumeB, CLASS_NAMES))]
    )
    flow = stub_flow(other, newStore, tmp_path)
    plan = flow.planTraining(newStore.labeledCases())
    list(flow.trainingSteps(plan))
    training = cases_from_manifest(plan.outDir / workflow.INPUTS_FOLDER / nodefiles.MANIFEST_NAME)
    assert sorted(Path(c.image).name for c in training.labeled) == ["Case_A.nrrd", "Case_B.nrrd"]


def test_labeled_cases_that_are_only_files_are_trained_on_without_being_loaded(app, store, tmp_path):
    from buseg.data.cases import cases_from_manifest
    from buseg.files.images import write_image

    study = tmp_path / "study"
    pairs = []
    for number in range(2):
        case = synthetic(seed=number)
        image, label = study / f"ct{number}.nii.gz", study / f"ct{number}_seg.nii.gz"
        study.mkdir(exist_ok=True)
        write_image(case.image, image)
        write_image(case.label, label)
        pairs.append((image, label))
    classes = [{"value": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
    flow = stub_flow(app, store, tmp_path)
    added = labelsfolder.addFiles(flow.context.labelsFolderPath, pairs, classes)
    assert [c.name for c in added] == ["ct0", "ct1"]
    assert not (flow.context.labelsFolderPath / "images").exists()  # listed, not copied
    store.set("method", "supervised")
    assert store.trainProblem() is not None and store.trainProblem(fileCaseCount=2) is None
    controller = controller_for(flow)
    controller.readiness()
    assert controller.presenter.canStart(presenter.TRAIN)  # no labeled case in the scene at all

    plan = flow.planTraining([])
    list(flow.trainingSteps(plan))
    training = cases_from_manifest(plan.outDir / workflow.INPUTS_FOLDER / nodefiles.MANIFEST_NAME)
    assert [c.image for c in training.labeled] == [p.resolve() for p, _ in pairs]
    assert [c["name"] for c in plan.fileClasses] == list(CLASS_NAMES)
    (study / "ct1.nii.gz").unlink()  # a listed file that went: said, with the file
    with pytest.raises(ModuleError, match=r"ct1.nii.gz is missing"):
        flow.planTraining([])


def test_a_different_volume_of_the_same_name_gets_its_own_case_and_loses_nobodys_correction(
    app, store, tmp_path
):
    from buseg.data.cases import cases_from_manifest
    from buseg.files.images import read_label

    cases = [synthetic(seed=i) for i in range(3)]
    flow = stub_flow(app, store, tmp_path)
    labels = flow.context.labelsFolderPath
    first = add_volume(app.scene, cases[0].image, "Image")  # two series that Slicer names alike
    second = add_volume(app.scene, cases[1].image, "Image")
    for volume, case in ((first, cases[0]), (second, cases[1])):
        result = add_segmentation(app.scene, case.label.array, volume, CLASS_NAMES)
        result.SetNodeReferenceID(workflow.INPUT_VOLUME_ROLE, volume.GetID())
        store.setNodeReference("OutputSegmentation", result)
        message = controller_for(flow).addCorrectedCase()
    assert "as 'Image_2' (another volume of that name is saved there already)" in message
    saved = {c.name: c for c in labelsfolder.read(labels).cases}
    assert sorted(saved) == ["Image", "Image_2"]
    for name, case in (("Image", cases[0]), ("Image_2", cases[1])):  # the first one was overwritten
        assert np.array_equal(read_label(saved[name].label).array, case.label.array)

    # The same volume corrected again replaces its own case, not the other one's.
    corrected = cases[0].label.array.copy()
    corrected[corrected == 3] = 0
    again = add_segmentation(app.scene, corrected, first, CLASS_NAMES)
    assert flow.addCorrectedCase(first, again)
    saved = {c.name: c for c in labelsfolder.read(labels).cases}
    assert sorted(saved) == ["Image", "Image_2"] and flow.savedCase.name == "Image"
    assert np.array_equal(read_label(saved["Image"].label).array, corrected)
    assert np.array_equal(read_label(saved["Image_2"].label).array, cases[1].label.array)

    # Files listed by path whose names are taken get names of their own; none is dropped.
    study = tmp_path / "study"
    study.mkdir()
    image, label = study / "Image.nrrd", study / "Image_seg.nrrd"
    for source, target in ((saved["Image_2"].image, image), (saved["Image_2"].label, label)):
        target.write_bytes(source.read_bytes())
    classes = [{"value": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
    assert [c.name for c in labelsfolder.addFiles(labels, [(image, label)], classes)] == ["Image_3"]
    assert [c.name for c in labelsfolder.addFiles(labels, [(image, label)], classes)] == ["Image_3"]
    assert sorted(c.name for c in labelsfolder.read(labels).cases) == ["Image", "Image_2", "Image_3"]
    with pytest.raises(ModuleError, match=r"listed twice.*Image.nrrd"):
        labelsfolder.addFiles(labels, [(image, label), (image, label)], classes)

    # A training with 'Image' (the first volume) labeled in the scene: that saved case is left
    # out, and said; the other volume named 'Image' is not the same image, so it stays.
    store.set("method", "supervised")
    store.setLabeledCases([(first, again)])
    plan = flow.planTraining(store.labeledCases())
    assert sorted(p.name for p, _ in plan.fileCases) == ["Image.nrrd", "Image_2.nrrd"]
    assert plan.fileCases[0][0].parent != plan.fileCases[1][0].parent  # the study's and the folder's
    assert plan.notes == [
        "Labels folder case 'Image' is left out: the labeled volume 'Image' of the scene is the "
        "same image, and its segmentation in the scene is used."
    ]
    controller = controller_for(flow)
    job = controller.start(
        presenter.TRAIN, lambda: flow.startTraining(store.labeledCases(), outDir=tmp_path / "run")
    )
    controller.timer.tick()
    assert plan.notes[0] in controller.presenter.warnings
    controller.buttonClicked(presenter.TRAIN)  # cancel the export
    run_until_done(controller)
    assert job.done
    training = cases_from_manifest(labels / nodefiles.MANIFEST_NAME)
    assert len(training.labeled) == 3  # the folder itself lists every case for the engine


# --------------------------------------------------------------------------------------
# Add, then segment the next case


def test_add_and_segment_next_loads_the_rankings_own_prediction_of_the_first_volume(app, store, tmp_path):
    cases = [synthetic(seed=i) for i in range(3)]
    volumes = [add_volume(app.scene, c.image, f"Case {i}") for i, c in enumerate(cases)]
    result = add_segmentation(app.scene, cases[0].label.array, volumes[0], CLASS_NAMES)
    result.SetNodeReferenceID(workflow.INPUT_VOLUME_ROLE, volumes[0].GetID())
    for volume in volumes:
        store.addUnlabeledVolume(volume)
    store.setNodeReference("OutputSegmentation", result)
    (tmp_path / "model.pt").write_bytes(b"m")
    store.set("modelPath", str(tmp_path / "model.pt"))
    ranking = tmp_path / "ranking"  # what `buseg rank --save-first-prediction` writes
    outputs = predict_outputs(ranking, "Case_2", cases[2])
    (ranking / "summary.json").unlink()
    relative = {
        key: str(getattr(outputs, key).relative_to(ranking))
        for key in ("label", "segmentation", "uncertainty", "regions")
    }
    entries = [
        {"case": "Case_2", "rank": 1, "score": 0.9, "statistics": {}, "outputs": relative},
        {"case": "Case_1", "rank": 2, "score": 0.4, "statistics": {}, "outputs": {}},
    ]
    (ranking / "ranking.json").write_text(
        json.dumps({"schema": "buseg-ranking", "schema_version": 1, "cases": entries})
    )
    argv_file = tmp_path / "argv"
    flow = stub_flow(app, store, tmp_path, STUB_OUTPUTS_RANK=ranking, STUB_ARGV_FILE=argv_file)
    controller = controller_for(flow)

    rank = controller.addAndSegmentNext()
    assert store.labeledCases() == [(volumes[0], result)]
    assert store.unlabeledVolumes() == volumes[1:]
    assert rank is not None and rank.kind == presenter.RANK
    run_until_done(controller)
    # No second prediction: the ranking kept the first volume's and it is loaded.
    assert controller.job is rank and rank.succeeded, rank.failureMessage()
    assert "--save-first-prediction" in argv_file.read_text().split("\n")
    first = rank.value[0]
    assert first.volumeNode is volumes[2] and first.segmentation is not None
    assert store.nodeReference("InputVolume") is volumes[2]
    assert store.nodeReference("OutputSegmentation") is first.segmentation.segmentationNode
    assert first.segmentation.segmentationNode.GetNodeReference(workflow.INPUT_VOLUME_ROLE) is volumes[2]
    assert controller.presenter.state == presenter.IDLE
    assert "Case 2, segmented" in controller.presenter.view.statusText


def test_add_and_segment_next_predicts_the_first_volume_when_its_score_was_known(app, store, tmp_path):
    # One timer for both jobs: the segmentation the ranking starts is polled by the same timer
    # (the ranking's end used to stop it, leaving the panel 'starting' for good).
    cases = [synthetic(seed=i) for i in range(3)]
    volumes = [add_volume(app.scene, c.image, f"Case {i}") for i, c in enumerate(cases)]
    for volume in volumes[1:]:
        store.addUnlabeledVolume(volume)
    (tmp_path / "model.pt").write_bytes(b"m")
    store.set("modelPath", str(tmp_path / "model.pt"))
    ranking = tmp_path / "ranking"
    ranking.mkdir()
    entries = [
        {"case": "Case_2", "rank": 1, "score": 0.9, "statistics": {}, "outputs": {}},
        {"case": "Case_1", "rank": 2, "score": 0.4, "statistics": {}, "outputs": {}},
    ]
    (ranking / "ranking.json").write_text(
        json.dumps({"schema": "buseg-ranking", "schema_version": 1, "cases": entries})
    )
    prepared = tmp_path / "prepared"
    predict_outputs(prepared, "Case_2", cases[2])
    flow = stub_flow(app, store, tmp_path, STUB_OUTPUTS_RANK=ranking, STUB_OUTPUTS_PREDICT=prepared)
    controller = controller_for(flow)
    controller.start(
        presenter.RANK, lambda: flow.startRanking(store.unlabeledVolumes(), tmp_path / "model.pt")
    )
    run_until_done(controller)  # a first ranking: every score is known now, no prediction kept

    result = add_segmentation(app.scene, cases[0].label.array, volumes[0], CLASS_NAMES)
    result.SetNodeReferenceID(workflow.INPUT_VOLUME_ROLE, volumes[0].GetID())
    store.setNodeReference("OutputSegmentation", result)
    rank = controller.addAndSegmentNext()
    run_until_done(controller)
    assert rank.succeeded and rank.worker is None  # nothing changed: no worker for the ranking
    assert rank.value[0].segmentation is None
    segment = controller.job
    assert segment is not rank and segment.kind == presenter.SEGMENT
    assert segment.succeeded, segment.failureMessage()
    assert store.nodeReference("InputVolume") is volumes[2]
    reference = segment.value.segmentationNode.GetNodeReference(workflow.INPUT_VOLUME_ROLE)
    assert reference is volumes[2] and controller.presenter.state == presenter.IDLE


def test_ranking_exports_one_volume_per_tick_and_predicts_only_what_changed(app, store, tmp_path):
    cases = [synthetic(seed=i) for i in range(3)]
    volumes = [add_volume(app.scene, c.image, f"Case {i}") for i, c in enumerate(cases)]
    model = tmp_path / "model.pt"
    model.write_bytes(b"m")
    ranking = tmp_path / "ranking"
    ranking.mkdir()
    scores = {"Case_0": 0.9, "Case_1": 0.5, "Case_2": 0.7}

    def worker_ranks(scores):  # what the stub worker writes as ranking.json
        entries = [{"case": c, "rank": 0, "score": v, "statistics": {}} for c, v in scores.items()]
        (ranking / "ranking.json").write_text(
            json.dumps({"schema": "buseg-ranking", "schema_version": 1, "cases": entries})
        )

    flow = stub_flow(app, store, tmp_path, STUB_OUTPUTS_RANK=ranking)
    controller = controller_for(flow)

    def rank():
        job = controller.start(presenter.RANK, lambda: flow.startRanking(volumes, model))
        controller.timer.tick()  # one tick exports one volume: the GUI never waits for all of them
        assert job.preparing and [e["event"] for e in job.events] == ["export"]
        run_until_done(controller)
        assert job.succeeded, job.failureMessage()
        predicted = [Path(a).stem for a in job.worker.argv if a.endswith(".nrrd")] if job.worker else []
        order = [r.volumeNode.GetName() for r in job.value]
        return [e["written"] for e in job.events if e["event"] == "export"], predicted, order

    worker_ranks(scores)
    assert rank() == ([True, True, True], ["Case_0", "Case_1", "Case_2"], ["Case 0", "Case 2", "Case 1"])
    # Same model, same volumes: nothing written, nothing predicted again, the same ranking.
    assert rank() == ([False, False, False], [], ["Case 0", "Case 2", "Case 1"])
    # One volume changed: only it is written and predicted; the others' scores are reused.
    slicer.util.updateVolumeFromArray(volumes[1], cases[1].image.array[::-1].copy())
    worker_ranks({"Case_1": 0.95})
    assert rank() == ([False, True, False], ["Case_1"], ["Case 1", "Case 0", "Case 2"])
    # A new model: everything is predicted again.
    model.write_bytes(b"a retrained model")
    worker_ranks(scores)
    assert rank()[1] == ["Case_0", "Case_1", "Case_2"]
    assert store.nodeReference("InputVolume") is volumes[0]


def test_the_overlay_uses_slicers_set_slice_viewer_layers_on_the_applications_scene(app, monkeypatch):
    from BidirUncertaintySegLib import review

    case = synthetic()
    volume = add_volume(app.scene, case.image, "Case")
    heat = add_volume(app.scene, case.image, "heat")
    calls = []
    original = slicer.util.setSliceViewerLayers
    monkeypatch.setattr(slicer, "mrmlScene", app.scene, raising=False)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kw: calls.append(kw) or original(**kw))
    review.showUncertaintyOverlay(app.scene, heat, volume, opacity=0.4)
    assert calls and calls[0]["foreground"] is heat and calls[0]["foregroundOpacity"] == 0.4
    for view in ("Red", "Yellow", "Green"):
        composite = app.slice_composite_node(view)
        assert composite.GetForegroundVolumeID() == heat.GetID()
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)


# --------------------------------------------------------------------------------------
# The module file (needs the Slicer application to run; checked as source here)


def module_class_source(name: str) -> str:
    import ast

    source = (ROOT / "BidirUncertaintySeg" / "BidirUncertaintySeg.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return ast.get_source_segment(source, node)
    raise AssertionError(f"no class {name}")


def test_the_self_test_never_raises_skip_test_and_cleanup_stops_the_worker_for_good():
    # "Reload and Test" shows a SkipTest as a failure: without the packages the test says why and passes.
    test_class = module_class_source("BidirUncertaintySegTest")
    assert "skipTest(" not in test_class and "SkipTest" not in test_class
    widget = module_class_source("BidirUncertaintySegWidget")
    cleanup = widget[widget.index("def cleanup(") : widget.index("def enter(")]
    assert "self.controller.shutdown()" in cleanup  # cancel, grace period, kill (tested above)
    # Only the edited setting is written, and only while the module is shown (stale widgets
    # wrote every value back when a selector changed after exit()).
    assert "updateParameterNodeFromGUI" not in widget
    takesEdits = widget[widget.index("def _takesEdits(") : widget.index("def onSettingEdited(")]
    assert "self.parent.isEntered" in takesEdits
    # The editor and the review shortcuts follow enter/exit (panel.ShownModuleBindings, tested).
    assert "self._shown.entered()" in widget[widget.index("def enter(") : widget.index("def exit(")]
    assert "self._shown.left()" in widget[widget.index("def exit(") : widget.index("def onSceneStartClose(")]
    assert "self._shown.sceneClosing()" in widget[widget.index("def onSceneStartClose(") :]
    # No wait cursor over a confirmation dialog or minutes of pip; the layout switches to the
    # training plot only when the plot is made, not on every Train.
    assert "WaitCursor" not in widget
    plot = widget[widget.index("def _showTrainingPlot(") : widget.index("def _refresh(")]
    assert "if existing is None:" in plot and "ShowChartInLayout" in plot


# --------------------------------------------------------------------------------------
# The whole loop through the real worker


def mean_dice(app, segmentation, volume, truth: np.ndarray) -> float:
    """Mean foreground Dice of a segmentation node against a truth label array (class values 1..N)."""
    classes = [{"value": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
    try:
        values, _ = nodefiles.segmentationLabelValues(app.scene, segmentation, volume, classes)
    except ModuleError:  # nothing segmented at all
        values = np.zeros_like(truth)
    scores = []
    for value in range(1, len(CLASS_NAMES) + 1):
        a, b = values == value, truth == value
        if a.sum() + b.sum():
            scores.append(2 * float((a & b).sum()) / float(a.sum() + b.sum()))
    return float(np.mean(scores))


def correct(app, segmentation, volume, truth: np.ndarray) -> None:
    """What a reviewer does in the Segment Editor: each segment painted to the truth."""
    import vtk

    labelmap = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "stroke")
    labelmap.CopyOrientation(volume)
    for index, name in enumerate(CLASS_NAMES, start=1):
        slicer.util.updateVolumeFromArray(labelmap, (truth == index).astype(np.uint8))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentation.GetSegmentation().GetSegmentIdBySegmentName(name))
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap, segmentation, ids
        )
    nodefiles.removeNodes(app.scene, labelmap)


@pytest.mark.slow
def test_walk_through_segment_review_correct_add_fine_tune_resegment(app, store, tmp_path):
    """The clinician's loop on generated volumes: the corrected case is in the next training's
    labeled set, that training fine-tunes the current model, and the model's Dice on the case rose."""
    from buseg.data.synthetic import make_case, rotation_direction

    rng = np.random.default_rng(11)
    cases = [
        make_case(rng, (6, 32, 32), spacing_mm=(2.4, 2.4, 3.0), direction=rotation_direction(10 * i))
        for i in range(3)
    ]
    volumes = [add_volume(app.scene, c.image, f"Case {i}") for i, c in enumerate(cases)]
    labeled = add_segmentation(app.scene, cases[0].label.array, volumes[0], CLASS_NAMES)
    store.setLabeledCases([(volumes[0], labeled)])
    for volume in volumes[1:]:
        store.addUnlabeledVolume(volume)
    for name, value in (
        ("device", "cpu"),
        ("batchSize", 4),
        ("patchSize", "32 32"),
        ("method", "supervised"),
    ):
        store.set(name, value)
    context = workflow.SlicerContext(
        app.scene,
        app.segmentations_logic,
        app.markups_logic,
        runsFolder=tmp_path / "runs",
        workFolder=tmp_path / "w",
    )
    flow = workflow.Workflow(context, store)
    controller = controller_for(flow)

    def run(kind, starter):
        controller.readiness()
        job = controller.start(kind, starter)
        assert job is not None, controller.presenter.view.errorText
        run_until_done(controller, seconds=240)
        assert job.succeeded, job.failureMessage() + job.log[-2000:]
        return job

    # A first model from one labeled case (short: it is meant to be imperfect).
    run(presenter.TRAIN, lambda: flow.startTraining(store.labeledCases(), [], overrides={"iterations": 20}))
    firstModel = Path(store.get("modelPath"))
    # Segment the next case: the segmentation, the heat map and the regions to review come back.
    result = run(presenter.SEGMENT, lambda: flow.startSegmentation(volumes[1], firstModel)).value
    assert store.nodeReference("RegionsTable").GetNumberOfRows() == len(result.regions)
    if result.regions:
        assert controller.stepRegion(1, -1) == 0
    order = flow.sliceReview()  # the engine's slice review order came with the result
    assert order is not None and order.axisIjk in (0, 1, 2)
    if order.slices:
        assert flow.jumpToNextSlice()[1] == order.slices[0]
    before = mean_dice(app, result.segmentationNode, volumes[1], cases[1].label.array)
    # Correct it (as in the Segment Editor) and add it to the labeled cases.
    correct(app, result.segmentationNode, volumes[1], cases[1].label.array)
    controller.addCorrectedCase()
    assert (volumes[1], result.segmentationNode) in store.labeledCases()

    # Fine-tune: same run folder, from the current model, the short schedule; the corrected case is in.
    store.set("fineTuneIterations", 200)
    job = run(presenter.TRAIN, lambda: flow.startTraining(store.labeledCases(), []))
    assert Path(job.value).parent == firstModel.parent
    config = json.loads((job.outDir / workflow.INPUTS_FOLDER / workflow.CONFIG_NAME).read_text())
    assert config["init_weights"] == str(job.outDir / workflow.PREVIOUS_MODEL)
    assert config["optim"]["iterations"] == 200 and config["optim"]["pretrain_iterations"] == 0
    manifest = json.loads((job.outDir / workflow.INPUTS_FOLDER / nodefiles.MANIFEST_NAME).read_text())
    assert [entry["image"] for entry in manifest["labeled"]] == ["images/Case_0.nrrd", "images/Case_1.nrrd"]
    exports = [e for e in job.events if e["event"] == "export"]
    assert [e["written"] for e in exports] == [False, True]  # Case 0 unchanged: not exported again

    # Re-segment the corrected case with the fine-tuned model: the Dice rose.
    again = run(presenter.SEGMENT, lambda: flow.startSegmentation(volumes[1], store.get("modelPath"))).value
    after = mean_dice(app, again.segmentationNode, volumes[1], cases[1].label.array)
    assert after > before + 0.1, (before, after)  # measured: 0.00 -> 0.39

    # "Label the next case" through the real worker: the ranking keeps the first volume's
    # prediction (--save-first-prediction) and it is loaded without a second prediction.
    rank = run(
        presenter.RANK, lambda: flow.startRanking([volumes[2]], store.get("modelPath"), segmentFirst=True)
    )
    first = rank.value[0]
    assert first.volumeNode is volumes[2] and first.segmentation is not None
    assert first.segmentation.segmentationNode.GetNodeReference(workflow.INPUT_VOLUME_ROLE) is volumes[2]
    assert store.nodeReference("OutputSegmentation") is first.segmentation.segmentationNode
    assert not rank.workFolder.exists()  # loaded, then the temporary files went
