"""BidirUncertaintySeg: semi-supervised segmentation with voxel uncertainty and regions to review.

The Slicer module: train a model from a few labeled and many unlabeled volumes, segment a
volume with an uncertainty heat map and a ranked list of uncertain regions, correct them in
the Segment Editor, add the corrected case to the labeled set, rank the unlabeled volumes
to pick the next one - and the same from the Python console (``BidirUncertaintySegLogic``).

Four classes, as Slicer's scripted-module template has them. The widget is a binding layer:
what the panel shows comes from ``BidirUncertaintySegLib.presenter`` (a Qt-free state
machine), what the buttons do from ``BidirUncertaintySegLib.workflow`` (MRML glue and the
background worker), the settings from ``BidirUncertaintySegLib.parameters`` (the parameter
node). The heavy work runs in a separate process (``PythonSlicer -m buseg ...``), polled
from a QTimer, so the GUI stays responsive; no custom Qt signals are used (they crash
PythonQt), only plain Python callbacks.
"""

import logging
import os
import shutil
import sys
from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from BidirUncertaintySegLib import dependencies, engine, labelsfolder, nodefiles, panel, presenter, review
from BidirUncertaintySegLib.errors import ModuleError
from BidirUncertaintySegLib.parameters import (
    DISPLAY_PARAMETERS,
    NODE_REFERENCES,
    PARAMETERS,
    WIDGET_BINDINGS,
    ParameterStore,
    fillChoiceItems,
    parameter,
    settingsEnabled,
    setWidgetValue,
    writeEditedSetting,
    writeSelectedNode,
)
from BidirUncertaintySegLib.workflow import INPUT_VOLUME_ROLE, SlicerContext, Workflow, defaultInputVolume

POLL_INTERVAL_MS = 250
# Submodules of the library, reloaded by "Reload" (developer mode) before the module itself.
LIBRARY_MODULES = (
    "errors",
    "presenter",
    "engine",
    "parameters",
    "dependencies",
    "nodefiles",
    "review",
    "labelsfolder",
    "workflow",
    "panel",
)


#
# Module
#


class BidirUncertaintySeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BidirUncertaintySeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["BidirUncertaintySeg developers"]
        self.parent.helpText = """
Train a segmentation model from a few labeled and many unlabeled volumes (semi-supervised:
bidirectional copy-paste with uncertainty-aware region learning), segment a volume with a
voxel-wise uncertainty heat map and a ranked list of uncertain regions, correct them and add
the corrected case for the next training. Training and segmentation run in a background
process; the same operations are available from the Python console
(<code>slicer.util.getModuleLogic("BidirUncertaintySeg")</code>).
See the <a href="https://github.com/bidiruncertaintyseg/BidirUncertaintySeg/blob/main/docs/slicer.md">documentation</a>.
"""
        problem = slicerVersionProblem()
        if problem:  # said when Slicer loads the module; the panel shows it too
            logging.error(problem)
            self.parent.helpText = f"<p><b>{problem}</b></p>" + self.parent.helpText
        self.parent.acknowledgementText = """
Built on 3D Slicer, PyTorch and MONAI. The semi-supervised method extends bidirectional
copy-paste (BCP, Bai et al., CVPR 2023) with uncertainty-aware and certainty-aware region
learning. The module follows the conventions of Slicer's scripted-module template and of the
SlicerMONAIAuto3DSeg, SlicerNNUnet and SlicerPyTorch extensions.
"""


#
# Widget
#


class _CloseEventFilter(qt.QWidget):
    """An event filter on Slicer's main window: a close (quit) goes on only if ``mayClose()``."""

    def __init__(self, mayClose):
        super().__init__()
        self.mayClose = mayClose

    def eventFilter(self, watched, event):
        if event.type() == qt.QEvent.Close and not self.mayClose():
            event.ignore()
            return True  # Slicer stays open, the job goes on
        return False


class BidirUncertaintySegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the .ui widgets to the parameter node and to the panel controller; decides nothing.

    What the buttons do is ``BidirUncertaintySegLib.panel.PanelController`` (Qt-free, tested on
    slicer-core); what the panel shows is the presenter's view state.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.store = None
        self.controller = None
        self._updatingGUI = False
        self._timer = None
        self._jobButtons = {}
        self._shown = None  # panel.ShownModuleBindings, made in setup
        self._quitFilter = None  # asks before Slicer quits while a job runs
        self._sceneCloseMessage = ""

    @property
    def presenter(self):
        return self.controller.presenter

    @property
    def job(self):
        return self.controller.job if self.controller is not None else None

    # -- setup ---------------------------------------------------------------------

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        problem = slicerVersionProblem()
        if problem:  # the panel says what to install instead of failing later with a traceback
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BidirUncertaintySeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BidirUncertaintySegLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollJob)
        self.controller = panel.PanelController(
            lambda: self.logic.workflow,
            registry=self.logic.registry,
            hooks=panel.PanelHooks(
                confirm=lambda text: slicer.util.confirmYesNoDisplay(text, windowTitle="BidirUncertaintySeg"),
                info=slicer.util.infoDisplay,
                startPolling=self._timer.start,
                trainingStarted=lambda job: self._showTrainingPlot(),
                jobDone=lambda job: self._refresh(),
                processEvents=slicer.app.processEvents,
                installDependencies=self._installDependencies,
                pytorchExtensionAvailable=pytorchExtensionAvailable,
                restart=slicer.util.restart,
            ),
        )
        self._bindParameters()
        self._connectButtons()
        self._setupReview()

        self.presenter.addListener(self.applyViewState)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)
        self.initializeParameterNode()
        self.applyViewState(self.presenter.view)

    def _bindParameters(self):
        """Settings <-> parameter node, generically from the parameter definitions; an edit writes
        only the setting edited (see onSettingEdited)."""
        for p in PARAMETERS:
            if p.widget:
                _, signal = WIDGET_BINDINGS[p.widgetClass]
                if p.widgetClass == "QComboBox":
                    fillChoiceItems(getattr(self.ui, p.widget), p)
                getattr(self.ui, p.widget).connect(
                    signal, lambda value=None, name=p.name: self.onSettingEdited(name)
                )
        for role, (widgetName, widgetClass) in NODE_REFERENCES.items():
            if widgetName:
                _, signal = WIDGET_BINDINGS[widgetClass]
                getattr(self.ui, widgetName).connect(
                    signal, lambda node=None, role=role: self.onNodeSelected(role)
                )

    def _connectButtons(self):
        self._jobButtons = {
            presenter.TRAIN: self.ui.trainButton,
            presenter.SEGMENT: self.ui.segmentButton,
            presenter.RANK: self.ui.rankButton,
        }
        for kind, button in self._jobButtons.items():
            button.connect("clicked(bool)", lambda checked=False, kind=kind: self.onJobButton(kind))
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.resumeFromFolderButton.connect("clicked(bool)", self.onResumeFromFolder)
        self.ui.addLabeledButton.connect("clicked(bool)", self.onAddLabeled)
        self.ui.removeLabeledButton.connect("clicked(bool)", self.onRemoveLabeled)
        self.ui.addUnlabeledButton.connect("clicked(bool)", self.onAddUnlabeled)
        self.ui.addAllUnlabeledButton.connect("clicked(bool)", self.onAddAllUnlabeled)
        self.ui.removeUnlabeledButton.connect("clicked(bool)", self.onRemoveUnlabeled)
        self.ui.addCorrectedCaseButton.connect("clicked(bool)", self.onAddCorrectedCase)
        self.ui.addAndNextButton.connect("clicked(bool)", self.onAddAndNext)
        self.ui.editSegmentationButton.connect("clicked(bool)", self.onEditSegmentation)
        self.ui.previousRegionButton.connect("clicked(bool)", lambda: self.onStepRegion(-1))
        self.ui.nextRegionButton.connect("clicked(bool)", lambda: self.onStepRegion(1))
        self.ui.nextSliceButton.connect("clicked(bool)", self.onNextSlice)
        self.ui.showLogButton.connect("clicked(bool)", self.onShowLog)
        self.ui.installDependenciesButton.connect(
            "clicked(bool)", lambda: self.controller.ensureDependencies(force=True)
        )
        self.ui.regionsTableView.connect("clicked(QModelIndex)", self.onRegionClicked)
        self.ui.labeledTableWidget.setHorizontalHeaderLabels(["Volume", "Segmentation"])
        self.ui.labeledTableWidget.horizontalHeader().setStretchLastSection(True)

    def _setupReview(self):
        """The Segment Editor inside the Review section (as MONAI Label's module has it); its effects
        and shortcuts, and those of the review buttons, are live only while the module is shown."""
        editorNode = slicer.mrmlScene.GetSingletonNode("BidirUncertaintySeg", "vtkMRMLSegmentEditorNode")
        if editorNode is None:
            editorNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            editorNode.UnRegister(None)
            editorNode.SetSingletonTag("BidirUncertaintySeg")
            editorNode = slicer.mrmlScene.AddNode(editorNode)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(editorNode)

        def makeShortcut(keys, callback):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow())
            shortcut.connect("activated()", callback)
            return shortcut

        # Slicer's module clean-up cannot be cancelled, so the question comes before it: on the
        # main window's close event, as Slicer-based applications (GeoSlicer) ask theirs.
        self._quitFilter = _CloseEventFilter(self.controller.mayQuit)
        slicer.util.mainWindow().installEventFilter(self._quitFilter)

        self._shown = panel.ShownModuleBindings(
            self.ui.segmentEditorWidget,
            {
                "Alt+N": lambda: self.onStepRegion(1),
                "Alt+P": lambda: self.onStepRegion(-1),
                "Alt+S": self.onNextSlice,
            },
            makeShortcut,
            lambda shortcut: shortcut.setParent(None),
        )

    def cleanup(self):
        # A running job is stopped: asked first (a training writes its checkpoint, so Resume
        # continues it), killed after a grace period by a background thread - nobody polls once
        # the module is gone, and a reload or quit must not wait for the worker.
        if self.controller is not None and self.controller.shutdown() is not None:
            logging.warning(
                "BidirUncertaintySeg: the running job was asked to stop (a training saves a "
                "checkpoint; Resume continues it)."
            )
        if self._timer is not None:
            self._timer.stop()
        if self._quitFilter is not None:
            slicer.util.mainWindow().removeEventFilter(self._quitFilter)
        if self._shown is not None:
            self._shown.left()
        self.removeObservers()

    def enter(self):
        if self.controller is None:  # Slicer too old: only the message is shown
            return
        self.initializeParameterNode()
        self._shown.entered()

    def exit(self):
        if self.controller is None:
            return
        self._shown.left()
        if self.store is not None:
            self.removeObserver(
                self.store.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )

    def onSceneStartClose(self, caller, event):
        # A running training is followed on (its model goes to the next scene's parameter node);
        # a job whose nodes are in the closing scene is cancelled. Said in the status line.
        self._sceneCloseMessage = self.controller.sceneAboutToClose()
        self._shown.sceneClosing()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        # Also when the module is not shown, while a job runs: its events need the parameter node.
        if self.parent.isEntered or self.presenter.busy:
            self.initializeParameterNode()
        if self._sceneCloseMessage:
            self.ui.statusLabel.text = self._sceneCloseMessage
            self._sceneCloseMessage = ""

    def onNodeRemoved(self, caller, event):
        # After the removal has finished: a labeled case whose volume or segmentation went is
        # dropped as a whole, and the user is told which.
        qt.QTimer.singleShot(0, self._dropIncompleteCases)

    def _dropIncompleteCases(self):
        if self.store is None:
            return
        messages = self.controller.droppedCaseMessages()
        if messages:
            slicer.util.warningDisplay("\n".join(messages), windowTitle="BidirUncertaintySeg")
            self.applyViewState(self.presenter.view)

    def onReload(self):
        """Reload the library's submodules too (developer mode), then the module."""
        import importlib

        for name in LIBRARY_MODULES:
            module = sys.modules.get(f"BidirUncertaintySegLib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)

    # -- parameter node ---------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if self.store.nodeReference("InputVolume") is None:
            first = defaultInputVolume(slicer.mrmlScene)
            if first is not None:
                self.store.setNodeReference("InputVolume", first)

    def setParameterNode(self, node):
        if self.store is not None:
            self.removeObserver(
                self.store.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
            )
        self.store = ParameterStore(node) if node is not None else None
        if self.store is not None:
            self.store.setDefaults()
            self.logic.store = self.store
            self.addObserver(self.store.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self.store is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            for p in PARAMETERS:
                if p.widget:
                    setWidgetValue(getattr(self.ui, p.widget), p, self.store.get(p.name))
            for role, (widgetName, _) in NODE_REFERENCES.items():
                if widgetName:
                    getattr(self.ui, widgetName).setCurrentNode(self.store.nodeReference(role))
            self._updateCaseLists()
            self._refresh()
        finally:
            self._updatingGUI = False

    def _takesEdits(self):
        # Only the user's edits reach the node: not the GUI's own updates, and nothing while the
        # module is not shown (its widgets are stale then; a node deleted meanwhile changes a
        # selector, which is no edit).
        return self.store is not None and not self._updatingGUI and self.parent.isEntered

    def onSettingEdited(self, name):
        if not self._takesEdits():
            return
        try:
            writeEditedSetting(self.store, name, getattr(self.ui, parameter(name).widget))
        except ModuleError as exc:
            self.ui.statusLabel.text = str(exc)
        if name in DISPLAY_PARAMETERS:
            self._applyDisplaySettings()

    def onNodeSelected(self, role):
        if self._takesEdits():
            writeSelectedNode(self.store, role, getattr(self.ui, NODE_REFERENCES[role][0]))

    # -- data lists ----------------------------------------------------------------

    def _updateCaseLists(self):
        cases = self.store.labeledCases()
        table = self.ui.labeledTableWidget
        table.setRowCount(len(cases))
        for row, (volume, segmentation) in enumerate(cases):
            table.setItem(row, 0, qt.QTableWidgetItem(volume.GetName()))
            table.setItem(row, 1, qt.QTableWidgetItem(segmentation.GetName()))
        self.ui.unlabeledListWidget.clear()
        for volume in self.store.unlabeledVolumes():
            self.ui.unlabeledListWidget.addItem(volume.GetName())
        try:
            segmentations = [s for _, s in cases if s.IsA("vtkMRMLSegmentationNode")]
            names = [c["name"] for c in nodefiles.classTable(segmentations)]
            self.ui.classesLabel.text = "Classes: " + (", ".join(names) if names else "-")
        except ModuleError as exc:
            self.ui.classesLabel.text = f"Classes: {exc}"

    def onAddLabeled(self):
        with slicer.util.tryWithErrorDisplay("Cannot add the labeled case.", waitCursor=False):
            self.store.addLabeledCase(
                self.ui.labeledVolumeSelector.currentNode(), self.ui.labeledSegmentationSelector.currentNode()
            )

    def onRemoveLabeled(self):
        self.store.removeLabeledCase(self.ui.labeledTableWidget.currentRow())

    def onAddUnlabeled(self):
        self.store.addUnlabeledVolume(self.ui.unlabeledVolumeSelector.currentNode())

    def onAddAllUnlabeled(self):
        for volume in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if (
                not volume.IsA("vtkMRMLLabelMapVolumeNode")
                and volume.GetNodeReference(INPUT_VOLUME_ROLE) is None
            ):
                self.store.addUnlabeledVolume(volume)

    def onRemoveUnlabeled(self):
        self.store.removeUnlabeledVolume(self.ui.unlabeledListWidget.currentRow)

    # -- presenter -> widgets ----------------------------------------------------------

    def applyViewState(self, view):
        for job, button in self._jobButtons.items():
            button.text = view.buttonLabels[job]
            button.enabled = view.buttonEnabled[job]
            button.toolTip = view.buttonToolTips.get(job, "")
        self.ui.resumeButton.enabled = view.resumeEnabled
        self.ui.resumeFromFolderButton.enabled = view.inputsEnabled
        self._applySettingsEnabled()
        for name in (
            "addLabeledButton",
            "removeLabeledButton",
            "addUnlabeledButton",
            "addAllUnlabeledButton",
            "removeUnlabeledButton",
            "installDependenciesButton",
            "labeledVolumeSelector",
            "labeledSegmentationSelector",
            "unlabeledVolumeSelector",
            "inputVolumeSelector",
            "outputSegmentationSelector",
        ):
            getattr(self.ui, name).enabled = view.inputsEnabled
        self.ui.progressBar.visible = view.progressVisible
        self.ui.progressBar.maximum = view.progressMaximum
        self.ui.progressBar.value = view.progressValue
        self.ui.progressLabel.text = view.progressText
        self.ui.warningLabel.text = view.warningText
        self.ui.warningLabel.visible = bool(view.warningText)
        self.ui.statusLabel.text = view.statusText + (
            "\nWarnings: " + "; ".join(view.warnings[-3:]) if view.warnings else ""
        )
        self.ui.errorLabel.text = view.errorText
        self.ui.errorLabel.visible = bool(view.errorText)
        self.ui.showLogButton.enabled = view.showLogEnabled
        if self.store is not None:
            self._updateResultViews()

    # -- jobs ------------------------------------------------------------------------

    def onJobButton(self, kind):
        # No wait cursor: a start may ask a question (install packages, replace a training), and
        # the exports run one volume per timer tick.
        self.controller.buttonClicked(kind)

    def onResume(self):
        self.controller.resume()

    def onResumeFromFolder(self):
        start = self.store.get("lastRunFolder") if self.store is not None else ""
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(),
            "Training folder to resume",
            start or str(self.logic.context().runsFolder),
        )
        if folder:
            self.controller.resume(folder)

    def onPollJob(self):
        panel.timerTick(self.controller, self._timer)

    def _installDependencies(self, plan):
        # The panel says "Installing ... (this can take several minutes)"; no wait cursor over
        # minutes of pip output in the Python console.
        self.logic.installDependencies(plan)

    # -- plot, results ----------------------------------------------------------------

    def _showTrainingPlot(self):
        # The layout switches to the plot once, when the plot is made; a later Train updates it
        # in whatever layout the user has chosen since.
        existing = self.store.nodeReference("LossChart") if self.store is not None else None
        chart = self.controller.updateTrainingPlot()
        if existing is None:
            slicer.modules.plots.logic().ShowChartInLayout(chart)

    def _refresh(self):
        if self.store is None:
            return
        self._updateResultViews()
        self._applySettingsEnabled()
        self.controller.readiness()

    def _applySettingsEnabled(self):
        """Locked while a job runs; otherwise the settings the chosen method ignores are off."""
        values = self.store.values() if self.store is not None else {}
        for name, enabled in settingsEnabled(values, self.presenter.busy).items():
            getattr(self.ui, parameter(name).widget).enabled = enabled

    def _updateResultViews(self):
        self.ui.regionsTableView.setMRMLTableNode(self.store.nodeReference("RegionsTable"))
        self.ui.rankingTableView.setMRMLTableNode(self.store.nodeReference("RankingTable"))
        hasResult = self.store.nodeReference("OutputSegmentation") is not None
        self.ui.editSegmentationButton.enabled = hasResult
        self.ui.addCorrectedCaseButton.enabled = hasResult and not self.presenter.busy
        self.ui.addAndNextButton.enabled = hasResult and not self.presenter.busy
        table = self.store.nodeReference("RegionsTable")
        hasRegions = table is not None and table.GetNumberOfRows() > 0
        self.ui.previousRegionButton.enabled = hasRegions
        self.ui.nextRegionButton.enabled = hasRegions
        self.ui.nextSliceButton.enabled = bool(self.store.get("sliceReview"))  # no slice order: off

    def _applyDisplaySettings(self):
        uncertainty = self.store.nodeReference("UncertaintyVolume")
        if uncertainty is not None and uncertainty.GetDisplayNode() is not None:
            review.setOverlayOpacity(slicer.mrmlScene, uncertainty, self.store.get("overlayOpacity"))
            review.setOverlayThreshold(uncertainty, self.store.get("overlayThreshold"))
        markups = self.store.nodeReference("RegionsMarkups")
        if markups is not None and markups.GetDisplayNode() is not None:
            markups.GetDisplayNode().SetVisibility(self.store.get("showMarkups"))

    # -- review --------------------------------------------------------------------------

    def onRegionClicked(self, index):
        self.logic.workflow.jumpToRegionRow(index.row(), viewRow=True)

    def onStepRegion(self, step):
        current = self.ui.regionsTableView.currentIndex()
        row = self.controller.stepRegion(step, current.row() if current.isValid() else -1)
        if row is not None:
            self.ui.regionsTableView.selectRow(row)

    def onNextSlice(self):
        with slicer.util.tryWithErrorDisplay("Cannot read the slice review order.", waitCursor=False):
            found = self.logic.workflow.jumpToNextSlice()
            if found is not None:
                number, chosen = found
                self.ui.statusLabel.text = (
                    f"Slice {chosen.index} ({number} to check): about "
                    f"{chosen.expectedErrorVoxels:.0f} voxels expected wrong."
                )

    def onEditSegmentation(self):
        """Correct the result in the Segment Editor embedded under the regions table."""
        segmentation, volume = self.controller.resultNodes()
        if segmentation is None:
            return
        editor = self.ui.segmentEditorWidget
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)
        self.ui.reviewCollapsibleButton.collapsed = False

    def onAddCorrectedCase(self):
        with slicer.util.tryWithErrorDisplay("Cannot add the corrected case.", waitCursor=False):
            self.ui.statusLabel.text = self.controller.addCorrectedCase()

    def onAddAndNext(self):
        with slicer.util.tryWithErrorDisplay("Cannot add the case and go to the next one.", waitCursor=False):
            self.controller.addAndSegmentNext()

    def onShowLog(self):
        text = self.job.log if self.job is not None else "\n".join(self.presenter.log)
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle("BidirUncertaintySeg worker log")
        box.setText(self.presenter.view.errorText or "The worker's log:")
        box.setDetailedText(text or "(empty)")
        if self.job is not None:
            box.setInformativeText(f"Also in {self.job.outDir / 'worker.log'}")
        box.exec_()

    def ensureDependencies(self, force=False):
        """True when the worker's packages are there; otherwise ask once and install them."""
        return self.controller.ensureDependencies(force)


def slicerVersionProblem():
    """Why this Slicer cannot run the module (None: it can); see dependencies.MINIMUM_SLICER."""
    return dependencies.slicerVersionProblem(
        (slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info[:2]
    )


def pytorchExtensionAvailable():
    try:
        import PyTorchUtils  # noqa: F401 - the PyTorch extension's module
    except ImportError:
        return False
    return True


def workerPython():
    """PythonSlicer: Slicer's Python interpreter as a separate program (the worker)."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    raise ModuleError("PythonSlicer (Slicer's Python interpreter) was not found next to the application.")


#
# Logic
#


class BidirUncertaintySegLogic(ScriptedLoadableModuleLogic):
    """The console batch API (also what the widget uses). Usable without the GUI::

        logic = slicer.util.getModuleLogic("BidirUncertaintySeg")
        model = logic.train(labeled=[(ct1, seg1), (ct2, seg2)], unlabeled=[ct3, ct4], iterations=500)
        segmentation, uncertainty, regions = logic.segment(ct3, model)

    With ``wait=False`` the methods return a running job (``job.done``, ``job.cancel()``,
    ``job.value``) that a timer follows; ``wait=True`` returns when it is over, Slicer handling
    its events meanwhile. Either way the module's panel shows the job and its Cancel stops it;
    no second job starts while one runs.
    """

    # One per application, shared by every logic instance and the panel: the panel shows console
    # jobs (and cancels them), and no job starts while another one runs.
    registry = panel.JobRegistry()

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        problem = slicerVersionProblem()
        if problem:
            raise ModuleError(problem)
        engine.ensureEngineImportable()
        self.store = None
        self._jobs = []

    def getParameterStore(self):
        if self.store is None or self.store.node.GetScene() is not slicer.mrmlScene:
            self.store = ParameterStore(self.getParameterNode())
            self.store.setDefaults()
        return self.store

    def context(self):
        return SlicerContext(
            scene=slicer.mrmlScene,
            segmentationsLogic=slicer.modules.segmentations.logic(),
            markupsLogic=slicer.modules.markups.logic(),
            python=workerPython,  # looked up when a worker starts
            env=slicer.util.startupEnvironment(),
            runsFolder=Path(slicer.app.defaultScenePath) / "BidirUncertaintySeg" / "runs",
            workFolder=Path(slicer.app.temporaryPath) / "BidirUncertaintySeg",
            newWorkFolder=lambda prefix: Path(slicer.util.tempDirectory(f"BidirUncertaintySeg-{prefix}")),
        )

    @property
    def workflow(self):
        return Workflow(self.context(), self.getParameterStore())

    def _run(self, starter, wait):
        """Start a job (refused while another runs; the panel shows it); with ``wait``, its value."""
        job = panel.startConsoleJob(self.registry, starter)
        if not wait:
            self._followInBackground(job)
            return job
        panel.waitProcessingEvents(job, slicer.app.processEvents)
        job.raiseForFailure()
        return job.value

    def _followInBackground(self, job):
        timer = qt.QTimer()
        timer.setInterval(POLL_INTERVAL_MS)

        def done(job):
            timer.stop()
            self._jobs.remove((job, timer))
            if not job.succeeded:
                logging.error(f"BidirUncertaintySeg {job.kind} did not succeed: {job.failureMessage()}")

        timer.connect("timeout()", lambda: panel.pollInBackground(job, done))
        self._jobs.append((job, timer))
        timer.start()

    # -- console API -------------------------------------------------------------------

    def train(
        self, labeled=None, unlabeled=None, *, outputFolder=None, overwrite=False, wait=True, **options
    ):
        """Train a model. ``labeled``: (volume, segmentation or label map) pairs; ``unlabeled``: volumes
        (default: the lists in the parameter node). ``options``: panel settings for this run, e.g.
        ``method="bcp", iterations=500, device="cpu"``. Returns the model path (or the job)."""
        store = self.getParameterStore()
        labeled = store.labeledCases() if labeled is None else list(labeled)
        unlabeled = store.unlabeledVolumes() if unlabeled is None else list(unlabeled)
        return self._run(
            lambda: self.workflow.startTraining(
                labeled, unlabeled, outDir=outputFolder, overwrite=overwrite, overrides=options
            ),
            wait,
        )

    def resumeTraining(self, outputFolder=None, *, wait=True):
        """Continue an interrupted training (default: the last one). Returns the model path (or the job)."""
        return self._run(lambda: self.workflow.resumeTraining(outputFolder), wait)

    def segment(self, volumeNode, modelPath=None, uncertainty="entropy", *, wait=True, **options):
        """Segment a volume. Returns (segmentationNode, uncertaintyVolumeNode, regions) (or the job);
        ``options``: PredictConfig fields, e.g. ``region_threshold=0.4, samples=8``."""
        modelPath = modelPath or self.getParameterStore().get("modelPath")
        result = self._run(
            lambda: self.workflow.startSegmentation(
                volumeNode, modelPath, uncertainty=uncertainty, options=options
            ),
            wait,
        )
        if not wait:
            return result
        return result.segmentationNode, result.uncertaintyNode, result.regions

    def segmentFiles(
        self,
        inputFolder,
        outputFolder,
        modelPath=None,
        uncertainty="entropy",
        *,
        wait=True,
        overwrite=False,
        **options,
    ):
        """Segment every image of a folder (or a list of files) into ``outputFolder``; nothing is loaded.
        Returns {case: outputs} (or the job)."""
        modelPath = modelPath or self.getParameterStore().get("modelPath")
        return self._run(
            lambda: self.workflow.segmentFiles(
                inputFolder,
                outputFolder,
                modelPath,
                uncertainty=uncertainty,
                options=options,
                overwrite=overwrite,
            ),
            wait,
        )

    def rankUnlabeled(self, volumeNodes=None, modelPath=None, uncertainty="entropy", *, wait=True):
        """Rank unlabeled volumes (default: the parameter node's list), most informative first.
        Returns [(volumeNode, score), ...] (or the job); the first becomes the volume to segment."""
        store = self.getParameterStore()
        volumeNodes = store.unlabeledVolumes() if volumeNodes is None else list(volumeNodes)
        result = self._run(
            lambda: self.workflow.startRanking(
                volumeNodes, modelPath or store.get("modelPath"), uncertainty=uncertainty
            ),
            wait,
        )
        if not wait:
            return result
        return [(entry.volumeNode, entry.score) for entry in result]

    def addCorrectedCase(self, volumeNode, segmentationNode):
        """Add a (corrected) segmentation and its volume to the labeled cases for the next training;
        both are saved in the labels folder at once."""
        return self.workflow.addCorrectedCase(volumeNode, segmentationNode)

    def addLabeledFiles(self, pairs, classes):
        """Labeled cases that are files on disk, used by every training without loading them:
        ``pairs`` of (image file, label map file), ``classes`` their label values and names,
        e.g. ``[{"value": 1, "name": "liver"}]``. Listed in the labels folder, not copied."""
        return labelsfolder.addFiles(self.context().labelsFolderPath, pairs, classes)

    def jumpToRegion(self, region):
        """Center the slice views on a region (a Region from segment(), or a row of the regions table)."""
        if isinstance(region, int):
            return self.workflow.jumpToRegionRow(region)
        review.jumpToRegion(slicer.mrmlScene, region, slicer.modules.markups.logic())
        return region.centroidRas

    def showRegionBoxes(self, regions, maxCount=10):
        """One ROI node (the region's bounding box in RAS) per region, for the first ``maxCount``."""
        return review.regionsToRois(slicer.mrmlScene, regions, maxCount=maxCount)

    def missingDependencies(self):
        """What the worker needs and Slicer's Python lacks (empty list: ready)."""
        return dependencies.findProblems()

    def installDependencies(self, plan=None, *, askConfirmation=False):
        """Install the missing packages (torch through the PyTorch extension when present)."""
        if plan is None:
            plan = dependencies.planInstall(
                dependencies.findProblems(), pytorchExtensionAvailable=pytorchExtensionAvailable()
            )
        if plan.nothingToDo:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(plan.confirmationText()):
            return False

        def installTorch(specifier):
            import PyTorchUtils

            return PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=specifier
            )

        dependencies.runPlan(
            plan,
            installTorch=installTorch,
            pipInstall=slicer.util.pip_install,
            constraintsFolder=slicer.app.temporaryPath,
            log=logging.info,
        )
        return True


#
# Test
#


class BidirUncertaintySegTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer on small generated volumes: train, segment, review, add, rank.

    Runs the real worker (PythonSlicer -m buseg) on the CPU for a few iterations (a minute or
    two). Skipped, with the reason, if the Python packages are not installed.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_TrainSegmentReview()

    def _addVolume(self, volume, name, className="vtkMRMLScalarVolumeNode"):
        import numpy as np

        node = slicer.mrmlScene.AddNewNodeByClass(className, name)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(volume.ijk_to_ras()))
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array))
        node.CreateDefaultDisplayNodes()
        return node

    def _addSegmentation(self, labelVolume, referenceNode, names):
        import numpy as np

        segmentation = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", f"{referenceNode.GetName()} seg"
        )
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(referenceNode)
        for value, name in enumerate(names, start=1):
            segmentId = segmentation.GetSegmentation().AddEmptySegment("", name)
            slicer.util.updateSegmentBinaryLabelmapFromArray(
                (labelVolume.array == value).astype(np.uint8), segmentation, segmentId, referenceNode
            )
        return segmentation

    def test_TrainSegmentReview(self):
        import tempfile

        import numpy as np

        self.delayDisplay("Checking the Python packages")
        missing = dependencies.findProblems()
        if missing:
            # Not a skip: "Reload and Test" shows a skipped test as a failure. The reason is shown instead.
            self.delayDisplay(
                "Test not run - missing Python packages: "
                + "; ".join(p.text for p in missing)
                + " (install them with the module's 'Install Python packages' button)",
                msec=3000,
            )
            return
        engine.ensureEngineImportable()
        from buseg.data.synthetic import CLASS_NAMES, make_case, rotation_direction

        self.delayDisplay("Generating small volumes")
        rng = np.random.default_rng(3)
        cases = [
            make_case(rng, (12, 48, 48), spacing_mm=(1.1, 1.1, 2.5), direction=rotation_direction(15 * i))
            for i in range(5)
        ]
        volumes = [self._addVolume(c.image, f"Case {i}") for i, c in enumerate(cases)]
        segmentations = [self._addSegmentation(cases[i].label, volumes[i], CLASS_NAMES) for i in range(2)]

        logic = BidirUncertaintySegLogic()
        store = logic.getParameterStore()
        folder = Path(tempfile.mkdtemp(prefix="BidirUncertaintySegTest-"))

        self.delayDisplay("Training (a few iterations on the CPU)")
        model = logic.train(
            labeled=list(zip(volumes[:2], segmentations, strict=True)),
            unlabeled=volumes[2:4],
            outputFolder=folder / "run",
            method="buarl",
            iterations=20,
            pretrainIterations=10,
            batchSize=4,
            patchSize="48 48",
            device="cpu",
            dimension="2d",
        )
        self.assertTrue(Path(model).is_file())
        self.assertEqual(store.get("modelPath"), str(model))

        self.delayDisplay("Segmenting with uncertainty")
        segmentation, uncertainty, regions = logic.segment(volumes[4], model, "entropy")
        names = [
            segmentation.GetSegmentation().GetNthSegment(i).GetName()
            for i in range(segmentation.GetSegmentation().GetNumberOfSegments())
        ]
        self.assertEqual(names, list(CLASS_NAMES))
        reference = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
        self.assertIs(reference, volumes[4])
        self.assertTrue(
            np.allclose(nodefiles.ijkToRas(uncertainty), nodefiles.ijkToRas(volumes[4]), atol=1e-4)
        )
        values = slicer.util.arrayFromVolume(uncertainty)
        self.assertGreaterEqual(float(values.min()), 0.0)
        self.assertLessEqual(float(values.max()), 1.0 + 1e-6)
        display = uncertainty.GetDisplayNode()
        self.assertEqual(display.GetColorNodeID(), review.heatColorNode(slicer.mrmlScene).GetID())
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), uncertainty.GetID())
        self.assertEqual(composite.GetBackgroundVolumeID(), volumes[4].GetID())

        self.delayDisplay(f"Reviewing {len(regions)} flagged region(s)")
        table = store.nodeReference("RegionsTable")
        self.assertEqual(table.GetNumberOfRows(), len(regions))
        if regions:
            logic.jumpToRegion(0)
            sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            offset = [sliceNode.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
            self.assertTrue(np.allclose(offset, regions[0].centroidRas, atol=1e-3))
            markups = store.nodeReference("RegionsMarkups")
            self.assertEqual(markups.GetNumberOfControlPoints(), len(regions))

        self.delayDisplay("Adding the (corrected) case to the labeled set")
        logic.addCorrectedCase(volumes[4], segmentation)
        self.assertIn(volumes[4], [v for v, _ in store.labeledCases()])

        self.delayDisplay("Ranking the unlabeled volumes")
        ranking = logic.rankUnlabeled(volumes[2:4], model)
        self.assertEqual(sorted(v.GetID() for v, _ in ranking), sorted(v.GetID() for v in volumes[2:4]))
        self.assertIs(store.nodeReference("InputVolume"), ranking[0][0])

        self.delayDisplay("Widget: the Train button becomes Cancel while a job runs")
        widget = slicer.util.getModuleWidget("BidirUncertaintySeg")
        widget.presenter.setInputsReady(presenter.TRAIN, None)
        widget.presenter.jobStarting(presenter.TRAIN)
        self.assertEqual(widget.ui.trainButton.text, presenter.CANCEL_LABEL)
        widget.presenter.workerEnded("cancelled")
        self.assertEqual(widget.ui.trainButton.text, presenter.BUTTON_LABELS[presenter.TRAIN])
        self.delayDisplay("Test passed")
