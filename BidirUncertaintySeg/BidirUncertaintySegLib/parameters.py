"""The module's parameter node: what the panel's settings are, where they are stored, what they mean.

Every setting lives in the module's ``vtkMRMLScriptedModuleNode`` (saved with the scene),
as text parameters and node references. ``@parameterNodeWrapper`` needs Qt (it is not part
of PyPI ``slicer-core``), so the node is used through its plain API here - one definition
that the widget binds generically and that tests reach without the GUI:

* :data:`PARAMETERS` - name, default, the widget that shows it (objectName and class in
  ``Resources/UI/BidirUncertaintySeg.ui``) and the field of the engine's config it fills;
* :data:`NODE_REFERENCES` / :data:`NODE_LISTS` - single nodes and lists of nodes (unlabeled
  volumes); labeled cases are (volume, segmentation) units (:meth:`ParameterStore.labeledCases`);
* :class:`ParameterStore` - typed get/set over the node;
* :func:`buildTrainConfig` - the parameter node's values put into ``buseg.config.TrainConfig``,
  the one configuration of a training run (the worker receives it as JSON with ``--config``).

The panel's defaults are the engine's defaults except where interactive use needs other
values (:data:`PANEL_OVERRIDES`, e.g. a training that ends in minutes, not hours).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModuleError

MODULE_NAME = "BidirUncertaintySeg"

# Widget classes the parameters use: the property that holds the value and the signal that
# says it changed (Qt names; the widget binds them generically).
WIDGET_BINDINGS: dict[str, tuple[str, str]] = {
    "QComboBox": ("currentIndex", "currentIndexChanged(int)"),
    "QSpinBox": ("value", "valueChanged(int)"),
    "QDoubleSpinBox": ("value", "valueChanged(double)"),
    "ctkSliderWidget": ("value", "valueChanged(double)"),
    "QCheckBox": ("checked", "toggled(bool)"),
    "QLineEdit": ("text", "textChanged(QString)"),
    "ctkPathLineEdit": ("currentPath", "currentPathChanged(QString)"),
    "qMRMLNodeComboBox": ("currentNodeID", "currentNodeChanged(vtkMRMLNode*)"),
}


@dataclass(frozen=True)
class Parameter:
    """One setting of the panel.

    ``config``: dotted field of TrainConfig ("optim.iterations") or, prefixed "predict.", of
    PredictConfig; None for display-only settings. ``choices`` are the stored values of a
    combo box, in the order of its items; ``choiceLabels`` are the item texts (as the .ui lists
    them; the method's come from the engine's catalog and :func:`fillChoiceItems` adds them).
    """

    name: str
    default: Any
    widget: str | None = None
    widgetClass: str | None = None
    config: str | None = None
    choices: tuple[str, ...] = ()
    choiceLabels: tuple[str, ...] = ()

    @property
    def kind(self) -> type:
        return type(self.default)


def _methodCatalog() -> Any:
    """The engine's method catalog (:mod:`buseg.catalogs.methods`: torch-free)."""
    from .engine import ensureEngineImportable

    ensureEngineImportable()
    from buseg.catalogs import methods as catalog

    return catalog


class _CatalogColumn(Sequence):
    """One attribute of every method of the engine's catalog ("name", "label"), read when asked:
    the method combo box lists what the catalog holds then, a method registered later included."""

    def __init__(self, attribute: str):
        self.attribute = attribute

    def _values(self) -> tuple[str, ...]:
        return tuple(getattr(entry, self.attribute) for entry in _methodCatalog().CATALOG.values())

    def __getitem__(self, index: Any) -> Any:
        return self._values()[index]

    def __len__(self) -> int:
        return len(self._values())

    def __repr__(self) -> str:
        return repr(self._values())


def _measureCatalog() -> Any:
    """The engine's catalog of uncertainty measures (:mod:`buseg.catalogs.measures`: torch-free)."""
    from .engine import ensureEngineImportable

    ensureEngineImportable()
    from buseg.catalogs import measures

    return measures


class _MeasureColumn(_CatalogColumn):
    """One attribute ("name", "label") of every uncertainty measure of the engine's catalog, read when
    asked; with ``training``, of those training offers (the training combo box)."""

    def __init__(self, attribute: str, *, training: bool = False):
        super().__init__(attribute)
        self.training = training

    def _values(self) -> tuple[str, ...]:
        measures = _measureCatalog()
        names = measures.measure_names(training=self.training)
        return tuple(getattr(measures.MEASURES[name], self.attribute) for name in names)


METHOD_CHOICES = _CatalogColumn("name")
METHOD_LABELS = _CatalogColumn("label")
CRL_WEIGHTING_CHOICES = ("discard", "concentration", "foreground", "negative")
CRL_WEIGHTING_LABELS = (
    "Discard uncertain pseudo-labels",
    "Keep all, extra weight on certain ones",
    "Foreground only, shrinking over training",
    "Discard, and learn 'not this class' on uncertain ones",
)
DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")
DEVICE_LABELS = ("Automatic (GPU if available)", "NVIDIA GPU (CUDA)", "CPU", "Apple GPU (MPS)")

PARAMETERS: tuple[Parameter, ...] = (
    # Training
    Parameter("method", "buarl", "methodComboBox", "QComboBox", "method.name", METHOD_CHOICES, METHOD_LABELS),
    Parameter("iterations", 3000, "iterationsSpinBox", "QSpinBox", "optim.iterations"),
    Parameter(
        "pretrainIterations", 1000, "pretrainIterationsSpinBox", "QSpinBox", "optim.pretrain_iterations"
    ),
    Parameter("batchSize", 8, "batchSizeSpinBox", "QSpinBox", "optim.batch_size"),
    Parameter("device", "auto", "deviceComboBox", "QComboBox", "device", DEVICE_CHOICES, DEVICE_LABELS),
    Parameter(
        "dimension",
        "2d",
        "dimensionComboBox",
        "QComboBox",
        "model.dimension",
        ("2d", "3d"),
        ("2D (slice by slice)", "3D (patches)"),
    ),
    Parameter("patchSize", "256 256", "patchSizeLineEdit", "QLineEdit", "model.patch_size"),
    Parameter("outputFolder", "", "outputFolderPathLineEdit", "ctkPathLineEdit"),
    # Training, advanced
    Parameter("learningRate", 0.01, "learningRateSpinBox", "QDoubleSpinBox", "optim.lr"),
    Parameter(
        "trainUncertainty",
        "entropy",
        "trainUncertaintyComboBox",
        "QComboBox",
        "uncertainty.method",
        _MeasureColumn("name", training=True),
        _MeasureColumn("label", training=True),
    ),
    # Ours' two parts, each switchable (the ablation's `--no-url` / `--no-crl`), and what CRL does.
    Parameter("urlEnabled", True, "urlEnabledCheckBox", "QCheckBox", "url.enabled"),
    Parameter("urlWeight", 1.0, "urlWeightSpinBox", "QDoubleSpinBox", "url.weight"),
    Parameter("urlQuantile", 0.8, "urlQuantileSpinBox", "QDoubleSpinBox", "url.quantile"),
    Parameter("crlEnabled", False, "crlEnabledCheckBox", "QCheckBox", "crl.enabled"),
    Parameter(
        "crlWeighting",
        "concentration",
        "crlWeightingComboBox",
        "QComboBox",
        "crl.weighting",
        CRL_WEIGHTING_CHOICES,
        CRL_WEIGHTING_LABELS,
    ),
    Parameter("crlQuantile", 0.8, "crlQuantileSpinBox", "QDoubleSpinBox", "crl.quantile"),
    Parameter("unlabeledWeight", 0.5, "unlabeledWeightSpinBox", "QDoubleSpinBox", "method.unlabeled_weight"),
    Parameter("holdOutValidation", False, "holdOutValidationCheckBox", "QCheckBox"),
    # Training after corrections: start from the current model with a short schedule (fine-tune);
    # unchecked, or without a model, a training starts from scratch with the full schedule.
    Parameter("fineTune", True, "fineTuneCheckBox", "QCheckBox"),
    Parameter("fineTuneIterations", 500, "fineTuneIterationsSpinBox", "QSpinBox"),
    Parameter("validationInterval", 200, "validationIntervalSpinBox", "QSpinBox", "validation_interval"),
    # Segment
    Parameter("modelPath", "", "modelPathLineEdit", "ctkPathLineEdit"),
    Parameter(
        "segmentUncertainty",
        "entropy",
        "segmentUncertaintyComboBox",
        "QComboBox",
        "predict.uncertainty",
        _MeasureColumn("name"),
        _MeasureColumn("label"),
    ),
    Parameter("regionThreshold", 0.5, "regionThresholdSpinBox", "QDoubleSpinBox", "predict.region_threshold"),
    Parameter("minRegionMm3", 10.0, "minRegionSpinBox", "QDoubleSpinBox", "predict.min_region_mm3"),
    # Review
    Parameter("overlayOpacity", 0.5, "overlayOpacitySlider", "ctkSliderWidget"),
    Parameter("overlayThreshold", 0.2, "overlayThresholdSlider", "ctkSliderWidget"),
    Parameter("showMarkups", True, "showMarkupsCheckBox", "QCheckBox"),
    # Not shown: the training folder that Resume continues; the current result's slice review
    # order (regions.json's slice_review as JSON, "" when the engine wrote none) and the next one.
    Parameter("lastRunFolder", ""),
    Parameter("sliceReview", ""),
    Parameter("sliceReviewNext", 0),
)

# Defaults that differ from the engine's (TrainConfig / PredictConfig) on purpose.
PANEL_OVERRIDES = {
    "optim.iterations": "a training in the panel should end in minutes to an hour, not a day",
    "optim.pretrain_iterations": "scaled with the iterations",
    "optim.batch_size": "fits a laptop GPU (and the CPU) with 256x256 slices",
}

# Options of a training that fill no config field directly (they choose fine-tuning).
FINE_TUNE_OPTIONS = ("fineTune", "fineTuneIterations")

# Single node references: role -> (widget objectName or None, widget class).
NODE_REFERENCES: dict[str, tuple[str | None, str | None]] = {
    "InputVolume": ("inputVolumeSelector", "qMRMLNodeComboBox"),
    "LabeledVolumeCandidate": ("labeledVolumeSelector", "qMRMLNodeComboBox"),
    "LabeledSegmentationCandidate": ("labeledSegmentationSelector", "qMRMLNodeComboBox"),
    "UnlabeledVolumeCandidate": ("unlabeledVolumeSelector", "qMRMLNodeComboBox"),
    "OutputSegmentation": ("outputSegmentationSelector", "qMRMLNodeComboBox"),
    "UncertaintyVolume": (None, None),
    "RegionsTable": (None, None),
    "RegionsMarkups": (None, None),
    "RankingTable": (None, None),
    "LossTable": (None, None),
    "ValidationTable": (None, None),
    "LossChart": (None, None),
}
# Lists of nodes (several references of one role).
UNLABELED_VOLUMES = "UnlabeledVolume"
NODE_LISTS = (UNLABELED_VOLUMES,)
# Labeled cases: the order of their keys, and each case's names (see ParameterStore.labeledCases).
LABELED_CASE_KEYS = "labeledCaseKeys"
LABELED_CASE_NAMES = "labeledCaseNames"
# Before cases were units: two parallel lists (read once, then converted).
LEGACY_LABELED_VOLUMES = "LabeledVolume"
LEGACY_LABELED_SEGMENTATIONS = "LabeledSegmentation"

_BY_NAME = {p.name: p for p in PARAMETERS}


# Settings that only some methods read (each method's catalog entry says which it reads): the
# panel greys them out where they would do nothing.
METHOD_DEPENDENT_PARAMETERS = (
    "urlEnabled",
    "urlWeight",
    "urlQuantile",
    "crlEnabled",
    "crlWeighting",
    "crlQuantile",
    "trainUncertainty",
    "unlabeledWeight",
)


def inactiveParameters(values: dict[str, Any]) -> set[str]:
    """Which of :data:`METHOD_DEPENDENT_PARAMETERS` the chosen method and switches ignore.

    ``values``: parameter name -> value (:meth:`ParameterStore.values`). A setting belongs to
    the methods whose catalog entry reads its config option (URL and CRL: ours, ``buarl``;
    the pseudo-label weight: the copy-paste methods); each part's own settings also to its switch.
    """
    entry = _methodCatalog().CATALOG.get(values.get("method"))

    def read(name: str) -> bool:
        return entry is not None and entry.reads(parameter(name).config)

    urlOn = read("urlEnabled") and bool(values.get("urlEnabled"))
    crlOn = read("crlEnabled") and bool(values.get("crlEnabled"))
    inactive = {name for name in ("urlEnabled", "crlEnabled") if not read(name)}
    if not urlOn:
        inactive |= {"urlWeight", "urlQuantile"}
    if not crlOn:
        inactive |= {"crlWeighting", "crlQuantile"}
    if not (urlOn or crlOn):
        inactive.add("trainUncertainty")
    if not read("unlabeledWeight"):
        inactive.add("unlabeledWeight")
    return inactive


def widgetValue(widget: Any, p: Parameter) -> Any:
    """A setting's value as its widget holds it (a choice's index becomes the choice)."""
    prop, _ = WIDGET_BINDINGS[p.widgetClass]
    value = getattr(widget, prop)
    if p.choices:
        return p.choices[value] if 0 <= value < len(p.choices) else p.default
    return value


def setWidgetValue(widget: Any, p: Parameter, value: Any) -> None:
    if p.choices:
        widget.currentIndex = p.choices.index(value)
    else:
        setattr(widget, WIDGET_BINDINGS[p.widgetClass][0], value)


def fillChoiceItems(widget: Any, p: Parameter) -> None:
    """Give a combo box that the .ui leaves empty the items of ``p``, showing its default.

    The method combo box is empty in the .ui: its items come from the engine's method
    catalog, so a new method needs no .ui edit. Other combo boxes list their items in the .ui."""
    if p.choices and widget.count == 0:
        for label in p.choiceLabels:
            widget.addItem(label)
        widget.currentIndex = p.choices.index(p.default)


def writeEditedSetting(store: ParameterStore, name: str, widget: Any) -> None:
    """The user edited one setting: its value, and nothing else, goes to the parameter node.

    The other widgets may be stale (while the module is not shown the GUI does not follow the
    node, and a background job may have set e.g. the model path meanwhile)."""
    store.set(name, widgetValue(widget, parameter(name)))


def writeSelectedNode(store: ParameterStore, role: str, selector: Any) -> None:
    """The user chose a node in one selector: that reference, and nothing else, is set."""
    store.setNodeReference(role, selector.currentNode())


# Settings of what is shown, not of a job: they stay usable while a job runs.
DISPLAY_PARAMETERS = ("overlayOpacity", "overlayThreshold", "showMarkups")


def settingsEnabled(values: dict[str, Any], busy: bool) -> dict[str, bool]:
    """Per parameter shown in a widget: whether the widget takes input now.

    While a job runs every job setting is locked (a parameter change must not unlock them,
    whatever the method); the display settings stay usable. Otherwise a setting the chosen
    method ignores (:func:`inactiveParameters`) is off."""
    inactive = inactiveParameters(values)
    return {
        p.name: p.name in DISPLAY_PARAMETERS or (not busy and p.name not in inactive)
        for p in PARAMETERS
        if p.widget
    }


def parameter(name: str) -> Parameter:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown parameter {name!r}") from None


def toText(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def fromText(text: str, kind: type, name: str) -> Any:
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ModuleError(f"Parameter '{name}': '{text}' is not true/false.")
    try:
        return kind(text)
    except ValueError:
        raise ModuleError(f"Parameter '{name}': '{text}' is not a valid {kind.__name__}.") from None


def parseIntegers(text: str, name: str) -> list[int]:
    """'256 256', '112, 112, 80' or '256x256' -> the whole numbers; anything else is refused."""
    if not re.fullmatch(r"\s*\d+(\s*[,x×]?\s*\d+)*\s*", str(text)):
        raise ModuleError(f"{name}: '{text}' must be whole numbers separated by spaces (e.g. 256 256).")
    return [int(number) for number in re.findall(r"\d+", str(text))]


class ParameterStore:
    """Typed access to the module's parameter node (a ``vtkMRMLScriptedModuleNode``)."""

    def __init__(self, node: Any) -> None:
        if node is None:
            raise ModuleError("No parameter node.")
        self.node = node

    # -- values --------------------------------------------------------------------

    def get(self, name: str) -> Any:
        p = parameter(name)
        text = self.node.GetParameter(name)
        if not text:
            return p.default
        value = fromText(text, p.kind, name)
        if p.choices and value not in p.choices:
            return p.default
        return value

    def set(self, name: str, value: Any) -> None:
        p = parameter(name)
        if p.choices and value not in p.choices:
            raise ModuleError(f"Parameter '{name}': '{value}' is not one of {', '.join(p.choices)}.")
        if (
            p.kind is not str
            and not isinstance(value, p.kind)
            and not (p.kind is float and isinstance(value, int))
        ):
            value = fromText(str(value), p.kind, name)
        self.node.SetParameter(name, toText(p.kind(value)))

    def setDefaults(self) -> None:
        """Fill every parameter that is not set yet (a new scene, or a scene from an older version)."""
        wasModifying = self.node.StartModify()
        for p in PARAMETERS:
            if not self.node.GetParameter(p.name):
                self.node.SetParameter(p.name, toText(p.default))
        self.migrateParallelLists()
        self.node.EndModify(wasModifying)

    def values(self) -> dict[str, Any]:
        return {p.name: self.get(p.name) for p in PARAMETERS}

    # -- nodes ---------------------------------------------------------------------

    def nodeReference(self, role: str) -> Any:
        return self.node.GetNodeReference(role)

    def setNodeReference(self, role: str, node: Any) -> None:
        self.node.SetNodeReferenceID(role, node.GetID() if node is not None else None)

    def nodeList(self, role: str) -> list[Any]:
        return [
            self.node.GetNthNodeReference(role, i) for i in range(self.node.GetNumberOfNodeReferences(role))
        ]

    def setNodeList(self, role: str, nodes: Sequence[Any]) -> None:
        wasModifying = self.node.StartModify()
        self.node.RemoveNodeReferenceIDs(role)
        for node in nodes:
            self.node.AddNodeReferenceID(role, node.GetID() if node is not None else "")
        self.node.EndModify(wasModifying)

    # A labeled case is one unit: its volume and segmentation are two references of roles
    # that only this case uses ("LabeledCase<key>Volume"/"...Segmentation"), the keys in
    # order in one parameter. MRML removes a deleted node's reference from its role; with
    # two parallel lists that shifted every later entry of one list (volume C paired with
    # B's segmentation); here the case just becomes incomplete and is dropped as a whole.

    def _caseKeys(self) -> list[str]:
        return self.node.GetParameter(LABELED_CASE_KEYS).split()

    @staticmethod
    def _caseRoles(key: str) -> tuple[str, str]:
        return f"LabeledCase{key}Volume", f"LabeledCase{key}Segmentation"

    def _caseNodes(self, key: str) -> tuple[Any, Any]:
        volumeRole, segmentationRole = self._caseRoles(key)
        return self.node.GetNodeReference(volumeRole), self.node.GetNodeReference(segmentationRole)

    def labeledCases(self) -> list[tuple[Any, Any]]:
        """(volume, segmentation) pairs; a case whose volume or segmentation left the scene is left out
        (:meth:`dropIncompleteLabeledCases` removes it and says which)."""
        cases = [self._caseNodes(key) for key in self._caseKeys()]
        return [(v, s) for v, s in cases if v is not None and s is not None]

    def setLabeledCases(self, cases: Sequence[tuple[Any, Any]]) -> None:
        wasModifying = self.node.StartModify()
        for key in self._caseKeys():
            for role in self._caseRoles(key):
                self.node.RemoveNodeReferenceIDs(role)
            self.node.UnsetParameter(f"{LABELED_CASE_NAMES}{key}")
        keys = []
        for key, (volume, segmentation) in enumerate(cases):
            volumeRole, segmentationRole = self._caseRoles(str(key))
            self.node.SetNodeReferenceID(volumeRole, volume.GetID())
            self.node.SetNodeReferenceID(segmentationRole, segmentation.GetID())
            # The names, for the message when one of the two is deleted (its name is gone with it).
            self.node.SetParameter(
                f"{LABELED_CASE_NAMES}{key}", f"{volume.GetName()}\n{segmentation.GetName()}"
            )
            keys.append(str(key))
        self.node.SetParameter(LABELED_CASE_KEYS, " ".join(keys))
        self.node.EndModify(wasModifying)

    def dropIncompleteLabeledCases(self) -> list[str]:
        """Remove the cases whose volume or segmentation was deleted; one sentence per removed case."""
        messages = []
        for key in self._caseKeys():
            volume, segmentation = self._caseNodes(key)
            if volume is not None and segmentation is not None:
                continue
            names = self.node.GetParameter(f"{LABELED_CASE_NAMES}{key}").split("\n")
            volumeName, segmentationName = [*names, "?", "?"][:2]
            gone = volumeName if volume is None else segmentationName
            messages.append(
                f"Labeled case '{volumeName}' / '{segmentationName}' removed from the training set: "
                f"'{gone}' was deleted from the scene."
            )
        if messages:
            self.setLabeledCases(self.labeledCases())
        return messages

    def migrateParallelLists(self) -> None:
        """Scenes saved by earlier versions kept the cases as two parallel lists: make them units."""
        volumes = self.nodeList(LEGACY_LABELED_VOLUMES)
        segmentations = self.nodeList(LEGACY_LABELED_SEGMENTATIONS)
        if not volumes and not segmentations:
            return
        wasModifying = self.node.StartModify()
        legacy = [
            (v, s) for v, s in zip(volumes, segmentations, strict=False) if v is not None and s is not None
        ]
        self.setLabeledCases(self.labeledCases() + legacy)
        self.node.RemoveNodeReferenceIDs(LEGACY_LABELED_VOLUMES)
        self.node.RemoveNodeReferenceIDs(LEGACY_LABELED_SEGMENTATIONS)
        self.node.EndModify(wasModifying)

    def addLabeledCase(self, volumeNode: Any, segmentationNode: Any) -> bool:
        """Add (or update) the case of ``volumeNode``; it leaves the unlabeled list. False if unchanged."""
        if volumeNode is None or segmentationNode is None:
            raise ModuleError("A labeled case needs a volume and a segmentation.")
        cases = self.labeledCases()
        for index, (volume, segmentation) in enumerate(cases):
            if volume.GetID() == volumeNode.GetID():
                if segmentation.GetID() == segmentationNode.GetID():
                    changed = False
                    break
                cases[index] = (volumeNode, segmentationNode)
                changed = True
                break
        else:
            cases.append((volumeNode, segmentationNode))
            changed = True
        wasModifying = self.node.StartModify()
        self.setLabeledCases(cases)
        unlabeled = self.unlabeledVolumes()
        remaining = [v for v in unlabeled if v.GetID() != volumeNode.GetID()]
        if len(remaining) != len(unlabeled):
            self.setNodeList(UNLABELED_VOLUMES, remaining)
            changed = True
        self.node.EndModify(wasModifying)
        return changed

    def removeLabeledCase(self, index: int) -> None:
        cases = self.labeledCases()
        if 0 <= index < len(cases):
            del cases[index]
            self.setLabeledCases(cases)

    def unlabeledVolumes(self) -> list[Any]:
        return [v for v in self.nodeList(UNLABELED_VOLUMES) if v is not None]

    def addUnlabeledVolume(self, volumeNode: Any) -> bool:
        """Add a volume to the unlabeled list (not if it is labeled or listed already)."""
        if volumeNode is None:
            return False
        ids = {v.GetID() for v in self.unlabeledVolumes()} | {v.GetID() for v, _ in self.labeledCases()}
        if volumeNode.GetID() in ids:
            return False
        self.setNodeList(UNLABELED_VOLUMES, [*self.unlabeledVolumes(), volumeNode])
        return True

    def removeUnlabeledVolume(self, index: int) -> None:
        volumes = self.unlabeledVolumes()
        if 0 <= index < len(volumes):
            del volumes[index]
            self.setNodeList(UNLABELED_VOLUMES, volumes)

    # -- readiness (what each job's button needs) ---------------------------------

    def _methodUsesUnlabeled(self) -> bool:
        entry = _methodCatalog().CATALOG.get(self.get("method"))
        return entry is None or entry.uses_unlabeled

    def trainProblem(self, fileCaseCount: int = 0) -> str | None:
        """None if a training can start, else what is missing (shown in the button's tooltip).
        ``fileCaseCount``: labeled cases of the labels folder that are not in the scene."""
        cases = self.labeledCases()
        if not cases and not fileCaseCount:
            return "Add at least one labeled case (a volume and its segmentation)."
        if self._methodUsesUnlabeled() and not self.unlabeledVolumes():
            return "Add unlabeled volumes, or choose the supervised method."
        if self.get("holdOutValidation") and len(cases) < 2:
            return "Holding out a validation case needs at least two labeled cases."
        return None

    def segmentProblem(self) -> str | None:
        if self.nodeReference("InputVolume") is None:
            return "Select the volume to segment."
        model = self.get("modelPath")
        if not model:
            return "Choose a model file (train one, or pick a model.pt)."
        if not Path(model).is_file():
            return f"Model file not found: {model}"
        return None

    def rankProblem(self) -> str | None:
        if not self.unlabeledVolumes():
            return "Add unlabeled volumes to rank."
        model = self.get("modelPath")
        if not model or not Path(model).is_file():
            return "Choose a model file first (train one, or pick a model.pt)."
        return None

    def predictOptions(self) -> dict[str, Any]:
        """PredictConfig fields (without the 'predict.' prefix) from the Segment settings."""
        options = {}
        for p in PARAMETERS:
            if p.config and p.config.startswith("predict.") and p.config != "predict.uncertainty":
                options[p.config.split(".", 1)[1]] = self.get(p.name)
        return options


def buildTrainConfig(
    store: ParameterStore,
    manifestPath: str | Path,
    outDir: str | Path,
    *,
    hasValidation: bool | None = None,
    overrides: dict[str, Any] | None = None,
    initWeights: str | Path | None = None,
) -> Any:
    """A validated ``buseg.config.TrainConfig`` from the parameter node, for one training run.

    The manifest (exported cases, class table) is the data source; the run writes to ``outDir``.
    ``overrides`` replace parameter values for this run only (parameter names, e.g.
    ``{"iterations": 200}`` - the console API's keyword arguments). ``initWeights``: fine-tune
    from that model file with ``fineTuneIterations`` and no pre-training.
    """
    from .engine import ensureEngineImportable

    ensureEngineImportable()
    from buseg.config import TrainConfig, from_dict, to_dict
    from buseg.errors import ConfigError

    overrides = dict(overrides or {})
    unknown = [
        name
        for name in overrides
        if name not in FINE_TUNE_OPTIONS
        and (
            name not in _BY_NAME or not _BY_NAME[name].config or _BY_NAME[name].config.startswith("predict.")
        )
    ]
    if unknown:
        trainable = [p.name for p in PARAMETERS if p.config and not p.config.startswith("predict.")]
        raise ModuleError(f"Unknown training option(s) {', '.join(unknown)}; known: {', '.join(trainable)}.")
    data = to_dict(TrainConfig())
    for p in PARAMETERS:
        if not p.config or p.config.startswith("predict."):
            continue
        value = overrides[p.name] if p.name in overrides else store.get(p.name)
        if p.choices and value not in p.choices:
            raise ModuleError(f"{p.name}: '{value}' is not one of {', '.join(p.choices)}.")
        if p.config == "model.patch_size" and isinstance(value, str):
            value = parseIntegers(value, "Patch size")
        section, _, key = p.config.rpartition(".")
        (data[section] if section else data)[key] = value
    data["data"]["source"] = "files"
    data["data"]["labeled"] = str(manifestPath)
    data["data"]["unlabeled"] = None
    data["data"]["validation"] = None
    data["out_dir"] = str(outDir)
    if initWeights:
        # Fine-tuning: the current model's weights and the short schedule, no pre-training
        # (bcp/buarl self-train from the model directly; the engine's init_weights contract).
        data["init_weights"] = str(initWeights)
        data["optim"]["iterations"] = int(
            overrides.get("fineTuneIterations", store.get("fineTuneIterations"))
        )
        data["optim"]["pretrain_iterations"] = 0
    validation = store.get("holdOutValidation") if hasValidation is None else hasValidation
    if not validation:
        data["validation_interval"] = 0  # no validation data: nothing to validate on
    try:
        return from_dict(TrainConfig, data, where="panel settings").validate()
    except ConfigError as exc:
        raise ModuleError(str(exc)) from None
