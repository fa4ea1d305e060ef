"""MRML nodes to worker files and back, with the geometry kept.

The worker (``buseg``) reads and writes files; the scene holds nodes. This module is the
bridge, written with MRML storage nodes and the segmentations logic directly (what
``slicer.util.exportNode``/``loadSegmentation`` use inside), so that it runs the same in the
Slicer application and on PyPI ``slicer-core`` without the application object:

* volumes are written as NRRD by a fresh ``vtkMRMLVolumeArchetypeStorageNode`` - the node's
  own storage node (where the user saved it) is left alone, as ``exportNode`` does;
* segmentations are written as label maps **on the grid of their volume** (the engine refuses
  a label whose grid differs from its image's), with one value per class name; the class
  table goes into the manifest, so segment names become the model's class names;
* results come back as a segmentation node (segment names and colors from the ``.seg.nrrd``)
  whose reference geometry is the input volume, and a scalar volume for the uncertainty map;
  both under the input volume's parent transform, as the worker saw the volume in its local
  coordinates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModuleError

MANIFEST_NAME = "manifest.json"
IMAGES_FOLDER = "images"
LABELS_FOLDER = "labels"
IMAGE_SUFFIX = ".nrrd"
LABEL_SUFFIX = "_label.nrrd"


def _slicer():
    import slicer  # the application's module in Slicer, PyPI slicer-core in tests

    return slicer


# Device names of Windows: a file 'con.nrrd' or 'NUL_label.nrrd' cannot be written there.
WINDOWS_RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}


def safeFileName(name: str, fallback: str = "volume") -> str:
    """A file-name-safe version of a node name ('CT chest #2' -> 'CT_chest_2').

    Only letters, digits, '.', '_' and '-' remain (no path separators, no '..', no leading
    dot), at most 100 characters; Windows device names ('con', 'nul', 'com1' ...) get a '_'.
    The engine names its outputs the same way (buseg.files.images.safe_case_name)."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name or "")).strip("._-")[:100].strip("._-")
    if text.split(".")[0].lower() in WINDOWS_RESERVED:
        text = f"{text}_"
    return text or fallback


def uniqueNames(names: Sequence[str]) -> list[str]:
    """Make names unique by appending _2, _3... (case-insensitively: file systems may be)."""
    used: set[str] = set()
    result = []
    for name in names:
        candidate, number = name, 1
        while candidate.lower() in used:
            number += 1
            candidate = f"{name}_{number}"
        used.add(candidate.lower())
        result.append(candidate)
    return result


def removeNodes(scene: Any, *nodes: Any) -> None:
    """Remove nodes (and their display nodes) if they are in the scene."""
    for node in nodes:
        if node is None or not node.GetID() or scene.GetNodeByID(node.GetID()) is None:
            continue
        displays = (
            [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
            if hasattr(node, "GetNumberOfDisplayNodes")
            else []
        )
        scene.RemoveNode(node)
        for display in displays:
            if display is not None and display.GetID() and scene.GetNodeByID(display.GetID()) is not None:
                scene.RemoveNode(display)


@contextlib.contextmanager
def addedNodes(scene: Any) -> Iterator[list[Any]]:
    """The nodes added to the scene inside the block (the list is filled when the block ends).

    Only for a block that runs without returning to the event loop: across a ``yield`` (one
    export step per timer tick) the user's own new nodes would be counted too."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    added: list[Any] = []
    try:
        yield added
    finally:
        nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        added.extend(node for node in nodes if node is not None and node.GetID() not in before)


@contextlib.contextmanager
def scratchNodes(scene: Any, keep: Sequence[Any] = ()) -> Iterator[list[Any]]:
    """Remove every node added to the scene inside the block (temporary labelmaps, the color
    tables that conversions create for them ...), except the nodes appended to the yielded
    list or given in ``keep``. Never across a ``yield`` (see :func:`addedNodes`)."""
    kept: list[Any] = list(keep)
    added: list[Any] = []
    try:
        with addedNodes(scene) as added:
            yield kept
    finally:
        keepIds = {node.GetID() for node in kept if node is not None}
        for node in added:
            if node.GetID() not in keepIds and scene.GetNodeByID(node.GetID()) is not None:
                scene.RemoveNode(node)


# --------------------------------------------------------------------------------------
# Volumes


def checkScalarVolume(volumeNode: Any, role: str = "volume") -> None:
    """Refuse what the engine cannot use, naming the node: missing, empty, labelmap, RGB/vector."""
    if volumeNode is None:
        raise ModuleError(f"No {role} selected.")
    name = volumeNode.GetName()
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ModuleError(f"'{name}' is a label map; a grey-value image is needed as {role}.")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise ModuleError(
            f"'{name}' is a {volumeNode.GetClassName()}; a scalar (grey-value) volume is needed."
        )
    image = volumeNode.GetImageData()
    if image is None or min(image.GetDimensions()) < 1:
        raise ModuleError(f"'{name}' has no voxels (empty volume).")
    if image.GetNumberOfScalarComponents() != 1:
        raise ModuleError(
            f"'{name}' has {image.GetNumberOfScalarComponents()} components per voxel (RGB or "
            "vector image); a scalar (grey-value) volume is needed."
        )


def writeVolume(volumeNode: Any, path: str | Path, *, compress: bool = False) -> Path:
    """Write a volume node to ``path`` (.nrrd/.nii.gz) in its own (local) coordinates, geometry kept.

    Uncompressed by default: these files are for the worker, read once and thrown away, and
    compressing is what makes an export slow (a 31 MB CT: 0.59 s compressed, 0.02 s not).
    """
    slicer = _slicer()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(volumeNode) or not path.exists():
        raise ModuleError(
            f"'{volumeNode.GetName()}' could not be written to {path} (disk full or not writable?)."
        )
    return path


def exportVolume(volumeNode: Any, path: str | Path) -> Path:
    """Check and write an image volume for the worker."""
    checkScalarVolume(volumeNode)
    return writeVolume(volumeNode, path)


# Fingerprints of this session, by (node ID, node and voxel modification times): VTK's
# modification time is one counter for all objects, so an unchanged key means unchanged voxels
# and geometry, and the next training of the session hashes nothing.
_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def volumeFingerprint(volumeNode: Any) -> str:
    """A digest of a volume's voxels and geometry: equal digests, equal exported file."""
    image = volumeNode.GetImageData()
    key = (volumeNode.GetID(), volumeNode.GetMTime(), image.GetMTime() if image is not None else 0)
    if key not in _FINGERPRINTS:
        voxels = _slicer().util.arrayFromVolume(volumeNode)
        _FINGERPRINTS[key] = arrayFingerprint(voxels, np.round(ijkToRas(volumeNode), 6).tolist())
    return _FINGERPRINTS[key]


def arrayFingerprint(array: np.ndarray, *extra: Any) -> str:
    """A digest of an array (type, shape, values) and ``extra``. SHA-1 as a cache key, not for
    security: with the CPU's SHA instructions it hashes 31 MB in 0.07 s, faster than BLAKE2 (0.17 s)."""
    digest = hashlib.sha1(usedforsecurity=False)
    values = np.ascontiguousarray(array)
    digest.update(f"{values.dtype.str}{values.shape}".encode())
    digest.update(memoryview(values).cast("B"))
    for value in extra:
        digest.update(repr(value).encode())
    return digest.hexdigest()


def readVolume(
    scene: Any, path: str | Path, name: str, *, targetNode: Any = None, labelmap: bool = False
) -> Any:
    """Read an image file into a new (or the given) volume node with its geometry."""
    slicer = _slicer()
    path = Path(path)
    if not path.is_file():
        raise ModuleError(f"{path}: file not found.")
    node = targetNode
    if node is None:
        node = scene.AddNewNodeByClass(
            "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode",
            scene.GenerateUniqueName(name),
        )
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if labelmap:
        storage.SetCenterImage(0)
    if not storage.ReadData(node):
        if targetNode is None:
            removeNodes(scene, node)
        raise ModuleError(f"{path}: cannot be read as a volume.")
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def ijkToRas(volumeNode: Any) -> np.ndarray:
    """The volume's 4x4 voxel-index (i, j, k) to RAS matrix as numpy."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


# --------------------------------------------------------------------------------------
# Segmentations


def segmentsOf(segmentationNode: Any) -> list[tuple[str, str, tuple[float, float, float]]]:
    """(segment ID, name, color) of every segment, in order; refuses duplicate names."""
    segmentation = segmentationNode.GetSegmentation()
    result = []
    names = set()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        name = segment.GetName()
        if name in names:
            raise ModuleError(
                f"'{segmentationNode.GetName()}' has two segments named '{name}'; segment names "
                "are the class names, so they must differ."
            )
        names.add(name)
        result.append(
            (segmentation.GetNthSegmentID(index), name, tuple(float(c) for c in segment.GetColor()))
        )
    return result


def classTable(segmentationNodes: Sequence[Any]) -> list[dict[str, Any]]:
    """The classes of a training set: segment names in order of first appearance, values 1..N.

    Each entry is ``{"value", "name", "color"}`` - the manifest's ``classes`` format, which
    the engine reads (buseg.data.cases.cases_from_manifest). The same name in two segmentations
    is the same class.
    """
    classes: list[dict[str, Any]] = []
    for node in segmentationNodes:
        for _, name, color in segmentsOf(node):
            if not any(c["name"] == name for c in classes):
                classes.append(
                    {"value": len(classes) + 1, "name": name, "color": [round(c, 4) for c in color]}
                )
    return classes


def segmentLabelArray(
    scene: Any, segmentationNode: Any, referenceVolumeNode: Any, segmentIds: Sequence[str]
) -> np.ndarray:
    """A (k, j, i) label array on the reference volume's grid: segment n of ``segmentIds`` -> n + 1.

    Written with the segmentations logic (resampled onto the reference geometry); where
    segments overlap, the later one in ``segmentIds`` wins, as in Slicer's own export.
    """
    slicer = _slicer()
    import vtk

    ids = vtk.vtkStringArray()
    for segmentId in segmentIds:
        ids.InsertNextValue(segmentId)
    with scratchNodes(scene):
        labelmap = scene.AddNewNodeByClass(
            "vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("__buseg_export__")
        )
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelmap, referenceVolumeNode
        )
        if not ok or labelmap.GetImageData() is None:
            raise ModuleError(
                f"'{segmentationNode.GetName()}' could not be converted to a label map on the grid "
                f"of '{referenceVolumeNode.GetName()}'."
            )
        return np.array(slicer.util.arrayFromVolume(labelmap), copy=True)


def segmentationFingerprint(scene: Any, segmentationNode: Any, referenceVolumeNode: Any) -> str:
    """A digest of what a segmentation holds (its segments' names and voxels on the volume's
    grid): it changes when the user edits the segmentation. Colors are left out: Slicer may
    assign them when a segmentation is first displayed or exported."""
    segments = segmentsOf(segmentationNode)
    if not segments:
        return arrayFingerprint(np.zeros(0, np.uint8))
    labels = segmentLabelArray(scene, segmentationNode, referenceVolumeNode, [s[0] for s in segments])
    return arrayFingerprint(labels, [name for _, name, _ in segments])


def segmentationLabelValues(
    scene: Any, segmentationNode: Any, referenceVolumeNode: Any, classes: Sequence[dict[str, Any]]
) -> tuple[np.ndarray, dict[str, int]]:
    """A segmentation as a (k, j, i) label array on the volume's grid, values from ``classes`` (by
    name), and the voxel count per class name. A segmentation without any labeled voxel is
    refused (the engine could not learn from it, and it usually means the wrong node)."""
    segments = segmentsOf(segmentationNode)
    valueOf = {c["name"]: int(c["value"]) for c in classes}
    unknown = [name for _, name, _ in segments if name not in valueOf]
    if unknown:
        raise ModuleError(
            f"'{segmentationNode.GetName()}' has segment(s) {', '.join(unknown)} that are not "
            "classes of this model."
        )
    ordered = sorted(segments, key=lambda s: valueOf[s[1]])
    labels = segmentLabelArray(scene, segmentationNode, referenceVolumeNode, [s[0] for s in ordered])
    lookup = np.zeros(len(ordered) + 1, dtype=np.uint16)
    for position, (_, name, _) in enumerate(ordered, start=1):
        lookup[position] = valueOf[name]
    values = lookup[labels.astype(np.int64)]
    counts = {name: int((values == valueOf[name]).sum()) for _, name, _ in ordered}
    if not any(counts.values()):
        raise ModuleError(
            f"'{segmentationNode.GetName()}' has no labeled voxels inside '{referenceVolumeNode.GetName()}'."
        )
    dtype = np.uint8 if values.max(initial=0) < 256 else np.uint16
    return values.astype(dtype), counts


def writeLabelValues(scene: Any, values: np.ndarray, referenceVolumeNode: Any, path: str | Path) -> Path:
    """Write a label array on the reference volume's grid (geometry from the volume)."""
    slicer = _slicer()
    with scratchNodes(scene):
        labelmap = scene.AddNewNodeByClass(
            "vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("__buseg_label__")
        )
        labelmap.CopyOrientation(referenceVolumeNode)
        slicer.util.updateVolumeFromArray(labelmap, values)
        return writeVolume(labelmap, path)


def exportSegmentation(
    scene: Any,
    segmentationNode: Any,
    referenceVolumeNode: Any,
    path: str | Path,
    classes: Sequence[dict[str, Any]],
) -> dict[str, int]:
    """Write a segmentation as a label map on the volume's grid, values from ``classes`` (by name).
    Returns the voxel count per class name."""
    values, counts = segmentationLabelValues(scene, segmentationNode, referenceVolumeNode, classes)
    writeLabelValues(scene, values, referenceVolumeNode, path)
    return counts


def segmentationFromLabelmap(scene: Any, labelmapNode: Any) -> Any:
    """A (temporary) segmentation node from a label map node; segment names from its color table."""
    slicer = _slicer()
    segmentation = scene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", scene.GenerateUniqueName("__buseg_seg__")
    )
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        labelmapNode, segmentation
    ):
        removeNodes(scene, segmentation)
        raise ModuleError(f"Label map '{labelmapNode.GetName()}' could not be converted to segments.")
    return segmentation


# --------------------------------------------------------------------------------------
# Training export


@dataclass
class TrainingExport:
    """What :func:`exportTrainingData` wrote."""

    manifestPath: Path
    classes: list[dict[str, Any]]
    labeledCases: list[str] = field(default_factory=list)
    unlabeledCases: list[str] = field(default_factory=list)
    validationCases: list[str] = field(default_factory=list)
    voxelCounts: dict[str, dict[str, int]] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)  # cases whose files changed (the others were kept)


EXPORT_INDEX_NAME = "export-index.json"  # file -> fingerprint of what it holds (the export cache)


@dataclass
class ExportStep:
    """One case written (or found unchanged) by :func:`exportTrainingSteps`."""

    index: int  # 1-based
    total: int
    case: str
    written: bool


def checkTrainingCases(
    labeled: Sequence[tuple[Any, Any]], unlabeled: Sequence[Any], validationCount: int, fileCaseCount: int = 0
) -> None:
    """Refuse a training set the engine cannot use, naming the node (before anything is written).
    ``fileCaseCount``: labeled cases that are files of the labels folder (no nodes)."""
    if not labeled and not fileCaseCount:
        raise ModuleError("No labeled case: add at least one volume with its segmentation.")
    seen: set[str] = set()
    for volume, label in labeled:
        if volume is None or label is None:
            raise ModuleError("A labeled case needs both a volume and a segmentation.")
        checkScalarVolume(volume, "labeled volume")
        if volume.GetID() in seen:
            raise ModuleError(f"'{volume.GetName()}' is listed twice as a labeled case.")
        seen.add(volume.GetID())
    for volume in unlabeled:
        checkScalarVolume(volume, "unlabeled volume")
        if volume.GetID() in seen:
            raise ModuleError(f"'{volume.GetName()}' is listed twice (or both as labeled and unlabeled).")
        seen.add(volume.GetID())
    if validationCount and validationCount >= len(labeled):
        raise ModuleError(
            f"Holding out {validationCount} labeled case(s) for validation needs at least "
            f"{validationCount + 1} labeled cases."
        )


def trainingClasses(
    segmentations: Sequence[Any], volumes: Sequence[Any], split: int, classOrder: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The class table of the training cases (``classOrder`` first: a model's classes, for fine-tuning);
    a validation case may not bring a class that no training case has."""
    classes = classTable(segmentations[:split])
    if not classes:
        raise ModuleError("The labeled segmentations have no segments.")
    if classOrder:
        names = [c["name"] for c in classes]
        ordered = [n for n in classOrder if n in names] + [n for n in names if n not in classOrder]
        byName = {c["name"]: c for c in classes}
        classes = [{**byName[name], "value": value} for value, name in enumerate(ordered, start=1)]
    known = {c["name"] for c in classes}
    for volume, segmentation in zip(volumes[split:], segmentations[split:], strict=True):
        extra = [name for _, name, _ in segmentsOf(segmentation) if name not in known]
        if extra:
            raise ModuleError(
                f"Validation case '{volume.GetName()}' has segment(s) {', '.join(extra)} that no "
                "training case has; the model could not learn them."
            )
    return classes


def _withFileClasses(
    classes: list[dict[str, Any]], fileClasses: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The training's classes with those of the labels folder's files, whose label values are
    fixed: a class both have must have the same value in both, refused otherwise."""
    if not fileClasses:
        return classes
    if not classes:
        return [dict(c) for c in fileClasses]
    byName = {c["name"]: c for c in classes}
    for entry in fileClasses:
        known = byName.get(entry["name"])
        if known is None or int(known["value"]) != int(entry["value"]):
            raise ModuleError(
                f"The labels folder's class '{entry['name']}' has value {entry['value']}, but the "
                f"labeled cases in the scene give it {known['value'] if known else 'no value'}; "
                "the label files cannot be used with them (same class names, in the same order)."
            )
    return classes


class ExportCache:
    """Which files of an export folder already hold what would be written: ``export-index.json``
    maps each file to a fingerprint of its content (voxels, geometry, class values)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.previous: dict[str, str] = {}
        with contextlib.suppress(OSError, ValueError):
            index = json.loads((folder / EXPORT_INDEX_NAME).read_text())
            if isinstance(index, dict):
                self.previous = {str(k): str(v) for k, v in index.items()}
        self.index: dict[str, str] = {}

    def _unchanged(self, relative: str, fingerprint: str) -> bool:
        self.index[relative] = fingerprint
        return self.previous.get(relative) == fingerprint and (self.folder / relative).is_file()

    def image(self, volume: Any, relative: str) -> bool:
        """Write the volume unless the file holds it already; True if written."""
        if self._unchanged(relative, volumeFingerprint(volume)):
            return False
        writeVolume(volume, self.folder / relative)
        return True

    def label(self, scene: Any, values: np.ndarray, volume: Any, relative: str) -> bool:
        if self._unchanged(relative, arrayFingerprint(values, np.round(ijkToRas(volume), 6).tolist())):
            return False
        writeLabelValues(scene, values, volume, self.folder / relative)
        return True

    def finish(self) -> None:
        """Remove the files of cases no longer exported; record what the folder holds."""
        for relative in set(self.previous) - set(self.index):
            with contextlib.suppress(OSError):
                (self.folder / relative).unlink()
        writeJson(self.folder / EXPORT_INDEX_NAME, self.index)


def _segmentationsOf(scene: Any, pairs: Sequence[tuple[Any, Any]]) -> list[Any]:
    """The labels of the cases as segmentation nodes (label maps converted, inside scratchNodes)."""
    segmentations = []
    for _, label in pairs:
        if label.IsA("vtkMRMLLabelMapVolumeNode"):
            segmentations.append(segmentationFromLabelmap(scene, label))
        elif label.IsA("vtkMRMLSegmentationNode"):
            segmentations.append(label)
        else:
            raise ModuleError(
                f"'{label.GetName()}' is a {label.GetClassName()}, not a segmentation or label map."
            )
    return segmentations


def exportTrainingSteps(
    scene: Any,
    folder: str | Path,
    labeled: Sequence[tuple[Any, Any]],
    unlabeled: Sequence[Any] = (),
    *,
    validationCount: int = 0,
    classOrder: Sequence[str] = (),
    fileCases: Sequence[tuple[Path, Path]] = (),
    fileClasses: Sequence[dict[str, Any]] = (),
) -> Iterator[ExportStep]:
    """:func:`exportTrainingData` one case at a time (a generator: the GUI exports one case per
    timer tick, with progress and cancel); its return value is the :class:`TrainingExport`.

    ``fileCases`` (image, label map) are labeled cases that are files already (the labels
    folder, values from ``fileClasses``): listed in the manifest by their paths, not exported.

    A file whose content would be the same as the one already in ``folder`` (same voxels,
    geometry and class values, recorded in ``export-index.json``) is not written again, so a
    second training of the same cases exports nothing; files of cases no longer in the set
    are removed.
    """
    folder = Path(folder)
    pairs = list(labeled)
    checkTrainingCases(pairs, unlabeled, validationCount, len(fileCases))
    cache = ExportCache(folder)
    # Label maps are converted to temporary segmentations, removed when the export ends. Only
    # those: between two steps the user may load, edit and add nodes, which must stay.
    temporary: list[Any] = []
    try:
        with addedNodes(scene) as temporary:
            segmentations = _segmentationsOf(scene, pairs)
        split = len(pairs) - int(validationCount or 0)
        classes = _withFileClasses(
            trainingClasses(segmentations, [v for v, _ in pairs], split, classOrder) if pairs else [],
            fileClasses if fileCases else (),
        )
        names = uniqueNames(
            [safeFileName(v.GetName()) for v, _ in pairs] + [safeFileName(v.GetName()) for v in unlabeled]
        )
        labeledNames, unlabeledNames = names[: len(pairs)], names[len(pairs) :]
        for sub in (IMAGES_FOLDER, LABELS_FOLDER):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        result = TrainingExport(folder / MANIFEST_NAME, classes)
        total = len(pairs) + len(unlabeled)
        entries = []
        for number, ((volume, _), segmentation, name) in enumerate(
            zip(pairs, segmentations, labeledNames, strict=True), start=1
        ):
            image, label = f"{IMAGES_FOLDER}/{name}{IMAGE_SUFFIX}", f"{LABELS_FOLDER}/{name}{LABEL_SUFFIX}"
            values, result.voxelCounts[name] = segmentationLabelValues(scene, segmentation, volume, classes)
            written = cache.image(volume, image)
            written = cache.label(scene, values, volume, label) or written
            entries.append({"image": image, "label": label})
            yield ExportStep(number, total, name, written)
        unlabeledEntries = []
        for number, (volume, name) in enumerate(
            zip(unlabeled, unlabeledNames, strict=True), start=len(pairs) + 1
        ):
            image = f"{IMAGES_FOLDER}/{name}{IMAGE_SUFFIX}"
            written = cache.image(volume, image)
            unlabeledEntries.append({"image": image})
            yield ExportStep(number, total, name, written)
    finally:
        removeNodes(scene, *temporary)
    cache.finish()
    files = [{"image": str(image), "label": str(label)} for image, label in fileCases]
    manifest = {
        "labeled": entries[:split] + files,
        "unlabeled": unlabeledEntries,
        "validation": entries[split:],
    }
    writeJson(result.manifestPath, {**manifest, "classes": classes})
    result.labeledCases = labeledNames[:split]
    result.validationCases = labeledNames[split:]
    result.unlabeledCases = unlabeledNames
    return result


def exportTrainingData(
    scene: Any,
    folder: str | Path,
    labeled: Sequence[tuple[Any, Any]],
    unlabeled: Sequence[Any] = (),
    *,
    validationCount: int = 0,
    classOrder: Sequence[str] = (),
) -> TrainingExport:
    """Write labeled (volume, segmentation or label map) pairs and unlabeled volumes plus a manifest.

    Layout: ``folder/images/<case>.nrrd``, ``folder/labels/<case>_label.nrrd``,
    ``folder/manifest.json`` (paths relative to it; format of buseg.data.cases.cases_from_manifest).
    The last ``validationCount`` labeled cases are listed as validation instead of training.
    Unchanged files are kept (see :func:`exportTrainingSteps`); ``written`` lists the cases written.
    """
    steps = exportTrainingSteps(
        scene, folder, labeled, unlabeled, validationCount=validationCount, classOrder=classOrder
    )
    written = []
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            stop.value.written = written
            return stop.value
        if step.written:
            written.append(step.case)


def writeJson(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temp, path)


# --------------------------------------------------------------------------------------
# Results back into the scene


def _followTransform(node: Any, referenceNode: Any) -> None:
    if referenceNode is not None and hasattr(node, "SetAndObserveTransformNodeID"):
        node.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())


def loadSegmentation(
    scene: Any,
    segmentationsLogic: Any,
    path: str | Path,
    referenceVolumeNode: Any,
    *,
    name: str | None = None,
    targetNode: Any = None,
) -> Any:
    """Load a ``.seg.nrrd`` (segment names and colors kept) referencing the input volume's geometry.

    With ``targetNode`` its segments are replaced (the user's selected output node keeps its
    identity); otherwise a new node is created.
    """
    path = Path(path)
    if not path.is_file():
        raise ModuleError(f"{path}: the worker did not write this segmentation.")
    nodeName = name or (f"{referenceVolumeNode.GetName()} segmentation" if referenceVolumeNode else path.name)
    loaded = segmentationsLogic.LoadSegmentationFromFile(str(path), True, scene.GenerateUniqueName(nodeName))
    if loaded is None:
        raise ModuleError(f"{path}: cannot be loaded as a segmentation.")
    node = loaded
    if targetNode is not None and targetNode is not loaded:
        targetNode.GetSegmentation().DeepCopy(loaded.GetSegmentation())
        removeNodes(scene, loaded.GetStorageNode(), loaded)
        node = targetNode
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
    if referenceVolumeNode is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        _followTransform(node, referenceVolumeNode)
    return node


def loadUncertaintyVolume(
    scene: Any, path: str | Path, referenceVolumeNode: Any, *, name: str | None = None, targetNode: Any = None
) -> Any:
    """Load the uncertainty map (float, 0..1) as a scalar volume under the input's transform."""
    nodeName = name or (
        f"{referenceVolumeNode.GetName()} uncertainty" if referenceVolumeNode else Path(path).name
    )
    node = readVolume(scene, path, nodeName, targetNode=targetNode)
    _followTransform(node, referenceVolumeNode)
    return node
