"""The module's parameter node: what the panel's settings are, where they are stored, what they mean.

Every setting lives in the module's ``vtkMRMLScriptedModuleNode`` (saved with the scene),
as text parameters and node references. ``@parameterNodeWrapper`` needs Qt (it is not part
of PyPI ``slicer-core``), so the node is used through its plain API here - one definition
that the widget binds generically and that tests reach without the GUI:

* :data:`PARAMETERS` - name, default, the widget that shows it (objectName and class in
  ``Resources/UI/BidirUncertaintySeg.ui``) and the field of the engine's config it fills;
* :data:`NODE_REFERENCES` / :data:`NODE_LISTS` - single nodes and lists of nodes
  (labeled cases: parallel lists of volumes and segmentations; unlabeled volumes);
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
    combo box, in the order of its items; ``choiceLabels`` are the item texts of the .ui.
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


METHOD_CHOICES = ("buarl", "bcp", "mean-teacher", "supervised")
METHOD_LABELS = (
    "BUARL (ours): copy-paste + uncertainty-aware region learning",
    "BCP: bidirectional copy-paste",
    "Mean teacher",
    "Supervised (labeled cases only)",
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
        ("entropy", "mc-dropout"),
        ("Entropy", "MC dropout"),
    ),
    Parameter("urlWeight", 1.0, "urlWeightSpinBox", "QDoubleSpinBox", "url.weight"),
    Parameter("urlQuantile", 0.8, "urlQuantileSpinBox", "QDoubleSpinBox", "url.quantile"),
    Parameter("crlQuantile", 0.8, "crlQuantileSpinBox", "QDoubleSpinBox", "crl.quantile"),
    Parameter("unlabeledWeight", 0.5, "unlabeledWeightSpinBox", "QDoubleSpinBox", "method.unlabeled_weight"),
    Parameter("holdOutValidation", False, "holdOutValidationCheckBox", "QCheckBox"),
    Parameter("validationInterval", 200, "validationIntervalSpinBox", "QSpinBox", "validation_interval"),
    # Segment
    Parameter("modelPath", "", "modelPathLineEdit", "ctkPathLineEdit"),
    Parameter(
        "segmentUncertainty",
        "entropy",
        "segmentUncertaintyComboBox",
        "QComboBox",
        "predict.uncertainty",
        ("entropy", "mc-dropout", "tta"),
        ("Entropy (one pass)", "MC dropout", "Test-time augmentation"),
    ),
    Parameter("regionThreshold", 0.5, "regionThresholdSpinBox", "QDoubleSpinBox", "predict.region_threshold"),
    Parameter("minRegionMm3", 10.0, "minRegionSpinBox", "QDoubleSpinBox", "predict.min_region_mm3"),
    # Review
    Parameter("overlayOpacity", 0.5, "overlayOpacitySlider", "ctkSliderWidget"),
    Parameter("overlayThreshold", 0.2, "overlayThresholdSlider", "ctkSliderWidget"),
    Parameter("showMarkups", True, "showMarkupsCheckBox", "QCheckBox"),
    # Not shown: the training folder that Resume continues.
    Parameter("lastRunFolder", ""),
)

# Defaults that differ from the engine's (TrainConfig / PredictConfig) on purpose.
PANEL_OVERRIDES = {
    "optim.iterations": "a training in the panel should end in minutes to an hour, not a day",
    "optim.pretrain_iterations": "scaled with the iterations",
    "optim.batch_size": "fits a laptop GPU (and the CPU) with 256x256 slices",
}

# Single node references: role -> (widget objectName or None, widget class).
NODE_REFERENCES: dict[str, tuple[str | None, str | None]] = {
    "InputVolume": ("inputVolumeSelector", "qMRMLNodeComboBox"),
    "LabeledVolumeCandidate": ("labeledVolumeSelector", "qMRMLNodeComboBox"),
    "LabeledSegmentationCandidate": ("labeledSegmentationSelector", "qMRMLNodeComboBox"),
    "UnlabeledVolumeCandidate": ("unlabeledVolumeSelector", "qMRMLNodeComboBox"),
    "OutputSegmentation": (None, None),
    "UncertaintyVolume": (None, None),
    "RegionsTable": (None, None),
    "RegionsMarkups": (None, None),
    "RankingTable": (None, None),
    "LossTable": (None, None),
    "ValidationTable": (None, None),
    "LossChart": (None, None),
}
# Lists of nodes (several references of one role).
LABELED_VOLUMES = "LabeledVolume"
LABELED_SEGMENTATIONS = "LabeledSegmentation"
UNLABELED_VOLUMES = "UnlabeledVolume"
NODE_LISTS = (LABELED_VOLUMES, LABELED_SEGMENTATIONS, UNLABELED_VOLUMES)

_BY_NAME = {p.name: p for p in PARAMETERS}


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

    def labeledCases(self) -> list[tuple[Any, Any]]:
        """(volume, segmentation) pairs; a pair whose node was deleted from the scene is left out."""
        volumes = self.nodeList(LABELED_VOLUMES)
        segmentations = self.nodeList(LABELED_SEGMENTATIONS)
        return [
            (v, s) for v, s in zip(volumes, segmentations, strict=False) if v is not None and s is not None
        ]

    def setLabeledCases(self, cases: Sequence[tuple[Any, Any]]) -> None:
        wasModifying = self.node.StartModify()
        self.setNodeList(LABELED_VOLUMES, [v for v, _ in cases])
        self.setNodeList(LABELED_SEGMENTATIONS, [s for _, s in cases])
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

    def trainProblem(self) -> str | None:
        """None if a training can start, else what is missing (shown in the button's tooltip)."""
        cases = self.labeledCases()
        if not cases:
            return "Add at least one labeled case (a volume and its segmentation)."
        if self.get("method") != "supervised" and not self.unlabeledVolumes():
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
) -> Any:
    """A validated ``buseg.config.TrainConfig`` from the parameter node, for one training run.

    The manifest (exported cases, class table) is the data source; the run writes to ``outDir``.
    ``overrides`` replace parameter values for this run only (parameter names, e.g.
    ``{"iterations": 200}`` - the console API's keyword arguments).
    """
    from .engine import ensureEngineImportable

    ensureEngineImportable()
    from buseg.config import TrainConfig, from_dict, to_dict
    from buseg.errors import ConfigError

    overrides = dict(overrides or {})
    unknown = [
        name
        for name in overrides
        if name not in _BY_NAME or not _BY_NAME[name].config or _BY_NAME[name].config.startswith("predict.")
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
    validation = store.get("holdOutValidation") if hasValidation is None else hasValidation
    if not validation:
        data["validation_interval"] = 0  # no validation data: nothing to validate on
    try:
        return from_dict(TrainConfig, data, where="panel settings").validate()
    except ConfigError as exc:
        raise ModuleError(str(exc)) from None
