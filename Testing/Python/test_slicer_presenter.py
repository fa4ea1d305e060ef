"""The Slicer module's panel logic without Qt: the state machine, event handling, dependency decisions.

The presenter is driven here with worker event dictionaries (hand-written sequences that
follow the event schema, and the events of a real training run); the dependency logic with
version tables. Neither needs Slicer.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "BidirUncertaintySeg"))

from BidirUncertaintySegLib import dependencies, presenter  # noqa: E402
from BidirUncertaintySegLib.errors import ModuleError  # noqa: E402
from BidirUncertaintySegLib.presenter import (  # noqa: E402
    CANCEL_LABEL,
    CANCELLING,
    FAILED,
    IDLE,
    IMPORTING,
    RANK,
    RUNNING,
    SEGMENT,
    STARTING,
    TRAIN,
    Presenter,
    TrainingHistory,
    formatDuration,
    readableError,
)


def ready_presenter() -> Presenter:
    p = Presenter()
    for job in (TRAIN, SEGMENT, RANK):
        p.setInputsReady(job, None)
    return p


def started(total=100, start=0):
    return {
        "event": "started",
        "job": "train",
        "device": "cpu",
        "device_reason": "auto: no GPU",
        "total": total,
        "start_iteration": start,
    }


def progress(iteration, total=100, loss=0.5, eta=250.0, stage="train", **losses):
    return {
        "event": "progress",
        "iteration": iteration,
        "total": total,
        "stage": stage,
        "losses": {"total": loss, **losses},
        "eta_seconds": eta,
    }


def test_train_button_turns_into_cancel_while_training_and_back():
    p = ready_presenter()
    views = []
    p.addListener(views.append)
    assert p.view.buttonLabels[TRAIN] == "Train" and p.view.buttonEnabled[TRAIN]
    assert p.buttonClicked(TRAIN) == "start"

    p.jobStarting(TRAIN)
    v = p.view
    assert v.state == STARTING
    assert v.buttonLabels[TRAIN] == CANCEL_LABEL and v.buttonEnabled[TRAIN]
    assert not v.buttonEnabled[SEGMENT] and not v.buttonEnabled[RANK]  # one job at a time
    assert (
        not v.inputsEnabled and v.progressVisible and v.progressMaximum == 0
    )  # busy indicator until a total
    assert p.buttonClicked(SEGMENT) == "ignore" and p.buttonClicked(TRAIN) == "cancel"

    p.handleEvent(started())
    p.handleEvent(progress(20, eta=250))
    v = p.view
    assert v.state == RUNNING
    assert v.progressMaximum == 100 and v.progressValue == 20
    assert "Iteration 20 / 100" in v.progressText and "loss 0.500" in v.progressText
    assert "4 min 10 s left" in v.progressText
    assert "cpu" in v.statusText

    p.handleEvent({"event": "finished", "status": "completed", "outputs": {"model": "m.pt"}})
    p.workerEnded("completed", exitCode=0, importsResults=True)
    assert (
        p.view.state == IMPORTING
        and p.view.buttonLabels[TRAIN] == "Train"
        and not p.view.buttonEnabled[TRAIN]
    )
    p.importFinished(None, "Model written: m.pt")
    v = p.view
    assert v.state == IDLE and v.buttonLabels[TRAIN] == "Train" and v.buttonEnabled[TRAIN]
    assert v.inputsEnabled and not v.progressVisible and v.statusText == "Model written: m.pt"
    assert len(views) >= 5  # every change reached the listener


def test_cancel_goes_through_cancelling_and_offers_resume():
    p = ready_presenter()
    p.jobStarting(TRAIN)
    p.handleEvent(started(total=200))
    p.handleEvent(progress(60, total=200))
    assert p.cancelRequested() is True
    v = p.view
    assert v.state == CANCELLING
    # While the worker saves its checkpoint the button offers to stop it at once.
    assert v.buttonLabels[TRAIN] == presenter.KILL_LABEL and v.buttonEnabled[TRAIN]
    assert p.buttonClicked(TRAIN) == "kill"
    assert p.cancelRequested() is False  # a second click does not cancel twice
    p.handleEvent(progress(70, total=200))  # the last step finishing
    assert "Cancelling" in p.view.progressText
    p.handleEvent({"event": "finished", "status": "cancelled", "outputs": {"last": "last.pt"}})
    p.workerEnded("cancelled", exitCode=130)
    p.setResumable(True)
    v = p.view
    assert v.state == IDLE and v.resumeEnabled
    assert "cancelled at iteration 70 of 200" in v.statusText and "Resume" in v.statusText


def test_worker_error_becomes_a_readable_message_with_the_log_one_click_away():
    p = ready_presenter()
    p.jobStarting(SEGMENT)
    p.handleEvent(
        {"event": "started", "job": "predict", "device": "cpu", "device_reason": "requested", "total": 1}
    )
    p.appendLog("loading model\nTraceback (most recent call last):\n  ...")
    p.handleEvent(
        {
            "event": "error",
            "kind": "ModelFileError",
            "message": "m.pt: not a buseg model file",
            "hint": "choose the model.pt of a training",
            "detail": "Traceback (most recent call last): ...",
        }
    )
    p.handleEvent({"event": "finished", "status": "failed", "outputs": {}})
    p.workerEnded("failed", exitCode=2, importsResults=True)
    v = p.view
    assert v.state == FAILED
    assert v.errorText == "m.pt: not a buseg model file\nHint: choose the model.pt of a training"
    assert "Traceback" not in v.errorText
    assert v.showLogEnabled and v.buttonEnabled[SEGMENT] and v.buttonLabels[SEGMENT] == "Segment"
    p.jobStarting(SEGMENT)  # a new job clears the error
    assert p.view.errorText == "" and p.view.state == STARTING


def test_worker_that_dies_silently_shows_its_exit_code_and_last_log_lines():
    p = ready_presenter()
    p.jobStarting(TRAIN)
    p.workerEnded("failed", exitCode=-9, logTail=["", "epoch 1", "Killed"])
    assert p.view.state == FAILED
    assert "exit code -9" in p.view.errorText and p.view.errorText.endswith("epoch 1\nKilled")


def test_disabled_buttons_say_why_and_jobs_cannot_overlap():
    p = Presenter()
    p.setInputsReady(SEGMENT, "Select the volume to segment.")
    p.setInputsReady(TRAIN, None)
    assert not p.view.buttonEnabled[SEGMENT]
    assert p.view.buttonToolTips[SEGMENT] == "Select the volume to segment."
    assert p.buttonClicked(SEGMENT) == "ignore"
    p.jobStarting(TRAIN)
    assert p.view.showLogEnabled  # the live log of a running job is one click away
    with pytest.raises(RuntimeError):
        p.jobStarting(SEGMENT)
    p.startAborted("Training not started: the output folder holds a previous training.")
    assert p.view.state == IDLE and p.view.buttonLabels[TRAIN] == "Train" and not p.view.errorText
    assert p.view.statusText.startswith("Training not started")
    with pytest.raises(ValueError):
        p.setInputsReady("paint", None)


def test_prediction_case_events_drive_the_progress_of_segment_and_rank():
    p = ready_presenter()
    p.jobStarting(RANK)
    p.handleEvent({"event": "started", "job": "rank", "device": "cpu", "device_reason": "x", "total": 4})
    p.handleEvent({"event": "case", "index": 3, "total": 4, "case": "ct_7", "outputs": {}, "seconds": 2.0})
    v = p.view
    assert v.progressValue == 75 and "case 3 of 4 (ct_7)" in v.progressText
    p.handleEvent({"event": "warning", "message": "ct_9: skipped: unreadable"})
    assert p.view.warnings == ("ct_9: skipped: unreadable",)


def test_installing_dependencies_blocks_jobs_and_reports_failure():
    p = ready_presenter()
    p.installStarted("torch, monai")
    assert p.view.progressVisible and not any(p.view.buttonEnabled.values())
    p.installFinished("Installing monai>=1.4,<2 failed: network unreachable")
    assert p.view.state == FAILED and "network unreachable" in p.view.errorText
    p.dismissError()
    assert p.view.state == IDLE and p.view.buttonEnabled[TRAIN]


def test_history_keeps_columns_aligned_and_restarts_on_resume():
    h = TrainingHistory()
    h.addLosses(10, {"total": 1.0, "supervised": 0.8})
    h.addLosses(20, {"total": 0.9, "supervised": 0.7, "url": 0.1})  # a loss that appears later
    h.addLosses(30, {"total": 0.8, "url": 0.05, "note": "text is ignored"})
    assert h.lossIterations == [10, 20, 30]
    assert h.losses["total"] == [1.0, 0.9, 0.8]
    assert math.isnan(h.losses["url"][0]) and h.losses["url"][1:] == [0.1, 0.05]
    assert math.isnan(h.losses["supervised"][2])
    assert "note" not in h.losses
    h.addLosses(20, {"total": 0.95})  # resumed from the checkpoint at 10: the curve restarts there
    assert h.lossIterations == [10, 20] and h.losses["total"] == [1.0, 0.95]
    h.loadEngineHistory(
        {
            "losses": [{"iteration": 5, "stage": "pretrain", "total": 2.0}],
            "validation": [{"iteration": 5, "stage": "pretrain", "dice": 0.3, "dice/core": 0.2}],
        }
    )
    assert h.lossIterations == [5] and h.losses == {"total": [2.0]}
    assert h.validation == {"dice": [0.3], "dice/core": [0.2]}


def test_duration_and_error_formatting():
    assert formatDuration(45) == "45 s"
    assert formatDuration(250) == "4 min 10 s"
    assert formatDuration(7500) == "2 h 05 min"
    assert formatDuration(None) == "" and formatDuration(float("nan")) == "" and formatDuration(-1) == ""
    assert readableError({"message": "bad", "detail": "use --device cpu"}) == "bad\nHint: use --device cpu"
    assert readableError({"message": "bug", "detail": "Traceback (most recent call last):\n..."}) == "bug"


def test_presenter_follows_the_events_of_a_real_training(tmp_path):
    """The engine's own event stream (in-process training, 12 iterations) drives the presenter."""
    from buseg.config import TrainConfig
    from buseg.data.synthetic import write_dataset
    from buseg.events import ListSink
    from buseg.training.loop import train

    folders = write_dataset(tmp_path / "data", labeled=2, unlabeled=2, test=0, shape_zyx=(8, 32, 32), seed=1)
    config = TrainConfig()
    config.method.name = "buarl"
    config.data.labeled = str(folders["labeled"])
    config.data.unlabeled = str(folders["unlabeled"])
    config.model.patch_size = [32, 32]
    config.optim.iterations, config.optim.pretrain_iterations, config.optim.batch_size = 8, 4, 4
    config.log_interval, config.validation_interval, config.device = 2, 0, "cpu"
    config.out_dir = str(tmp_path / "run")
    sink = ListSink()
    train(config, events=sink)

    p = ready_presenter()
    p.jobStarting(TRAIN)
    for event in sink.events:
        p.handleEvent(event)
    assert p.view.state == RUNNING and p.view.progressValue == 100
    assert p.history.lossIterations == [2, 4, 6, 8, 10, 12]
    assert "total" in p.history.losses and all(math.isfinite(v) for v in p.history.losses["total"])
    p.workerEnded("completed", exitCode=0)
    assert p.view.state == IDLE and p.view.statusText == "Train finished."


# --------------------------------------------------------------------------------------
# Dependencies


def versions(**installed):
    table = {
        "torch": "2.4.1+cu121",
        "monai": "1.4.0",
        "scipy": "1.13.0",
        "slicerio": "1.1.2",
        "psutil": "5.9.8",
        "numpy": "1.26.4",
        "SimpleITK": "2.4.0",
        "vtk": None,
    }
    table.update(installed)
    return lambda name: table.get(name)


def test_version_parsing_and_requirement_checks():
    assert dependencies.versionKey("2.13.0+cu121") == (2, 13, 0)
    assert dependencies.versionKey("1.4rc1") == (1, 4)
    torch = dependencies.REQUIREMENTS[0]
    assert torch.distribution == "torch"
    assert dependencies.satisfies("2.2.0", torch) and not dependencies.satisfies("2.1.2", torch)
    assert not dependencies.satisfies("3.0.0", torch)
    assert dependencies.findProblems(versionOf=versions()) == []
    problems = dependencies.findProblems(versionOf=versions(monai="0.9.0", slicerio=None))
    assert [(p.requirement.distribution, p.installed) for p in problems] == [
        ("monai", "0.9.0"),
        ("slicerio", None),
    ]
    assert "monai 0.9.0 does not satisfy >=1.4,<2" in problems[0].text


def test_requirements_match_the_engine_package_minimums():
    """The module installs what pyproject.toml says the engine needs (same minimum versions)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, flags=re.S | re.M).group(1)
    minimums = {}
    for spec in re.findall(r'"([^"]+)"', block):
        name, _, rest = spec.partition(">=")
        minimums[name.strip().lower()] = rest.split(",")[0].strip()
    for requirement in dependencies.REQUIREMENTS:
        assert minimums[requirement.distribution.lower()] == requirement.minimum, requirement


def test_install_plan_uses_the_pytorch_extension_and_never_touches_slicer_packages():
    problems = dependencies.findProblems(versionOf=versions(torch=None, monai=None, psutil="5.0"))
    plan = dependencies.planInstall(
        problems, pytorchExtensionAvailable=True, versionOf=versions(torch=None), loadedModules=["psutil"]
    )
    assert [(s.installer, s.requirement) for s in plan.steps] == [
        ("pytorch", "torch>=2.2,<3"),
        ("pip", "monai>=1.4,<2"),
        ("pip", "psutil>=5.9"),
    ]
    assert plan.restartNeeded  # psutil is upgraded while imported
    assert plan.constraints == {"numpy": "1.26.4", "SimpleITK": "2.4.0"}
    assert plan.constraintsText() == "SimpleITK==2.4.0\nnumpy==1.26.4\n"
    text = plan.confirmationText()
    assert "torch>=2.2,<3 with the PyTorch extension" in text and "monai>=1.4,<2 with pip" in text
    assert "restarted" in text

    without = dependencies.planInstall(problems[:1], pytorchExtensionAvailable=False, versionOf=versions())
    assert [(s.installer, s.requirement) for s in without.steps] == [("pip", "torch>=2.2,<3")]
    assert "PyTorch extension is not installed" in without.confirmationText()


def test_slicer_own_packages_block_instead_of_being_installed():
    problems = dependencies.findProblems(versionOf=versions(SimpleITK="2.1.0", monai=None))
    plan = dependencies.planInstall(problems, pytorchExtensionAvailable=True, versionOf=versions())
    assert [s.distribution for s in plan.steps] == ["monai"]
    assert len(plan.blockers) == 1 and "SimpleITK 2.1.0" in plan.blockers[0] and "Slicer" in plan.blockers[0]
    with pytest.raises(ModuleError, match="SimpleITK"):
        dependencies.runPlan(
            plan, installTorch=lambda s: True, pipInstall=lambda a: None, constraintsFolder="/tmp"
        )


def test_the_user_is_asked_once_per_session_unless_they_ask_to_install():
    missing = dependencies.planInstall(
        dependencies.findProblems(versionOf=versions(monai=None)),
        pytorchExtensionAvailable=True,
        versionOf=versions(),
    )
    assert dependencies.nextStep(missing, declinedBefore=False, explicit=False) == dependencies.ASK
    assert dependencies.nextStep(missing, declinedBefore=True, explicit=False) == dependencies.DECLINED
    assert dependencies.nextStep(missing, declinedBefore=True, explicit=True) == dependencies.ASK
    nothing = dependencies.planInstall([], pytorchExtensionAvailable=False, versionOf=versions())
    assert dependencies.nextStep(nothing, declinedBefore=True, explicit=True) == dependencies.READY
    old_slicer = dependencies.planInstall(
        dependencies.findProblems(versionOf=versions(numpy="1.20")),
        pytorchExtensionAvailable=True,
        versionOf=versions(),
    )
    assert dependencies.nextStep(old_slicer, declinedBefore=False, explicit=True) == dependencies.BLOCKED


def test_run_plan_installs_in_order_with_constraints_and_names_the_failing_step(tmp_path):
    problems = dependencies.findProblems(versionOf=versions(torch=None, monai=None, scipy=None))
    plan = dependencies.planInstall(problems, pytorchExtensionAvailable=True, versionOf=versions(torch=None))
    calls = []
    dependencies.runPlan(
        plan,
        installTorch=lambda spec: calls.append(("torch", spec)) or object(),
        pipInstall=lambda args: calls.append(("pip", args)),
        constraintsFolder=tmp_path,
        log=lambda text: None,
    )
    constraints = tmp_path / "bidiruncertaintyseg-constraints.txt"
    assert calls == [
        ("torch", ">=2.2,<3"),
        ("pip", ["monai>=1.4,<2", "--constraint", str(constraints)]),
        ("pip", ["scipy>=1.10", "--constraint", str(constraints)]),
    ]
    assert constraints.read_text() == "SimpleITK==2.4.0\nnumpy==1.26.4\n"

    with pytest.raises(ModuleError, match=r"torch>=2\.2,<3 failed: the PyTorch extension did not install"):
        dependencies.runPlan(
            plan,
            installTorch=lambda spec: None,
            pipInstall=lambda a: None,
            constraintsFolder=tmp_path,
            log=lambda text: None,
        )

    def broken_pip(args):
        raise OSError("network unreachable")

    with pytest.raises(ModuleError, match=r"monai>=1.4,<2 failed: network unreachable"):
        dependencies.runPlan(
            plan,
            installTorch=lambda spec: True,
            pipInstall=broken_pip,
            constraintsFolder=tmp_path,
            log=lambda text: None,
        )


def test_this_environment_has_everything_the_worker_needs():
    """The test environment runs the worker too: the dependency check must find nothing missing."""
    assert dependencies.findProblems() == []
    assert presenter.BUTTON_LABELS[TRAIN] == "Train"


def test_a_training_that_falls_back_to_the_cpu_shows_a_visible_warning():
    p = ready_presenter()
    p.jobStarting(TRAIN)
    p.handleEvent({"event": "export", "index": 2, "total": 5, "case": "CT_2", "written": False})
    assert p.view.progressText == "Exporting case 2 of 5 (CT_2), unchanged"
    p.handleEvent(started())  # device cpu, reason "auto: no GPU"
    assert "Training runs on the CPU (auto: no GPU)" in p.view.warningText
    p.workerEnded("cancelled")
    assert p.view.warningText == ""  # shown while it matters: the training can still be stopped

    p.jobStarting(TRAIN)
    p.handleEvent({**started(), "device_reason": "requested"})  # the user chose the CPU: no warning
    assert p.view.warningText == ""
    p.workerEnded("cancelled")
    p.jobStarting(SEGMENT)
    p.handleEvent(started())  # segmenting on the CPU is normal
    assert p.view.warningText == ""


def test_the_editor_and_the_review_shortcuts_are_live_only_while_the_module_is_shown():
    from BidirUncertaintySegLib import panel

    calls, live = [], []

    class Editor:  # the calls Slicer's own Segment Editor module makes on its editor
        def __getattr__(self, name):
            return lambda *args: calls.append((name, *args))

    def make(keys, action):
        live.append(keys)
        return keys

    shown = panel.ShownModuleBindings(
        Editor(), {"Alt+N": print, "Alt+P": print, "Alt+S": print}, make, live.remove
    )
    shown.entered()
    shown.entered()  # entering twice (a reload) binds nothing twice
    assert sorted(live) == ["Alt+N", "Alt+P", "Alt+S"]
    assert ("installKeyboardShortcuts",) in calls
    calls.clear()
    shown.left()
    assert live == []  # Alt+N/P/S do nothing in other modules
    assert calls == [("setActiveEffect", None), ("uninstallKeyboardShortcuts",), ("removeViewObservations",)]
    calls.clear()
    shown.sceneClosing()
    assert calls == [("setSegmentationNode", None), ("removeViewObservations",)]
