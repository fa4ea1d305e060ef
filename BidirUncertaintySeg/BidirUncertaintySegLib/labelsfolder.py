"""The labels folder: labeled cases kept as files on disk, beside the runs folder.

Two uses, as MONAI Label's users expect them:

* **a correction is saved at once** ("Submit"): adding a corrected case writes its image and
  its label map here (NRRD, the volume's geometry) the moment the user adds it, so a crash
  or an unsaved scene loses nothing; the next training reads it from here;
* **labeled cases that are only files**: cases of a study on disk (60 CTs need not sit in
  the scene) are listed here by their paths, not copied, and every training includes them.

The folder is a manifest the engine reads as it is (``buseg.data.cases.cases_from_manifest``)::

    labels/manifest.json        {"labeled": [{"image", "label", "name", "fingerprint"}], "classes": [...]}
    labels/images/<case>.nrrd   saved corrections (listed cases may point anywhere)
    labels/labels/<case>_label.nrrd

A case is one image, not one name: a saved correction carries the fingerprint of its volume's
voxels and geometry, so correcting the same volume again replaces its case, while another
volume of the same name ('Image', 'CT', two series of one patient) gets a case of its own
('Image_2') and never overwrites the first one's files. Listed files are known by their
paths. Every file is written under a temporary name and renamed, the manifest last: a crash
leaves the previous state or the new one, never a half-written case.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import nodefiles
from .errors import ModuleError


@dataclass
class FileCase:
    """One labeled case of the folder: its name (unique in the folder, case-insensitively), its
    two files, and for a saved correction the fingerprint of its volume ('' for listed files)."""

    name: str
    image: Path
    label: Path
    fingerprint: str = ""


@dataclass
class LabelsFolder:
    """What the folder holds: its cases and its class table (``{"value", "name", "color"}``).

    ``leftOut``: after :func:`casesBesideScene`, the cases not used because the scene holds the
    same volume as a labeled case (``(case, scene volume name)``): say them to the user."""

    folder: Path
    cases: list[FileCase] = field(default_factory=list)
    classes: list[dict[str, Any]] = field(default_factory=list)
    leftOut: list[tuple[FileCase, str]] = field(default_factory=list)

    def names(self) -> set[str]:
        return {case.name.lower() for case in self.cases}


def caseName(image: str | Path) -> str:
    name = Path(image).name
    for suffix in (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read(folder: str | Path) -> LabelsFolder:
    """The folder's cases (none when it does not exist yet). A case whose file is gone is refused,
    naming the file and the manifest."""
    folder = Path(folder)
    manifest = folder / nodefiles.MANIFEST_NAME
    if not manifest.is_file():
        return LabelsFolder(folder)
    try:
        data = json.loads(manifest.read_text())
        entries = data.get("labeled") or []
        classes = [dict(c) for c in data.get("classes") or []]
        cases = []
        for entry in entries:
            image, label = (Path(entry[key]) for key in ("image", "label"))
            image, label = (p if p.is_absolute() else folder / p for p in (image, label))
            for path in (image, label):
                if not path.is_file():
                    raise ModuleError(f"{manifest}: the labeled case file {path} is missing.")
            name = str(entry.get("name") or caseName(image))
            cases.append(FileCase(name, image, label, str(entry.get("fingerprint") or "")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModuleError(f"{manifest}: cannot be read as a labels folder manifest ({exc}).") from None
    return LabelsFolder(folder, cases, classes)


def _write(labels: LabelsFolder) -> None:
    entries = []
    for case in labels.cases:
        image, label = (_relative(labels.folder, p) for p in (case.image, case.label))
        entry = {"image": image, "label": label, "name": case.name}
        if case.fingerprint:
            entry["fingerprint"] = case.fingerprint
        entries.append(entry)
    nodefiles.writeJson(
        labels.folder / nodefiles.MANIFEST_NAME, {"labeled": entries, "classes": labels.classes}
    )


def _relative(folder: Path, path: Path) -> str:
    with contextlib.suppress(ValueError):
        return path.relative_to(folder).as_posix()
    return str(path)


def mergedClasses(
    existing: Sequence[dict[str, Any]], added: Sequence[dict[str, Any]], where: str
) -> list[dict[str, Any]]:
    """The folder's classes with those of a new case: a known name keeps its value, a new name
    gets the next one. ``added`` must use the values of ``existing`` for known names (the label
    files are written with them), refused naming ``where`` otherwise."""
    classes = [dict(c) for c in existing]
    byName = {c["name"]: c for c in classes}
    for entry in added:
        known = byName.get(entry["name"])
        if known is None:
            entry = {**entry, "value": max((c["value"] for c in classes), default=0) + 1}
            classes.append(entry)
            byName[entry["name"]] = entry
        elif int(known["value"]) != int(entry["value"]):
            raise ModuleError(
                f"{where}: class '{entry['name']}' has value {entry['value']} there but "
                f"{known['value']} in the labels folder."
            )
    return classes


def uniqueName(name: str, taken: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``... : the first not in ``taken`` (lower-case names:
    file systems may ignore case)."""
    candidate, number = name, 1
    while candidate.lower() in taken:
        number += 1
        candidate = f"{name}_{number}"
    return candidate


def _savedCaseName(labels: LabelsFolder, volumeNode: Any, fingerprint: str) -> tuple[str, FileCase | None]:
    """The name a correction of this volume is saved under, and the case it replaces (None: a
    new case). The same volume corrected again keeps its case; a different volume gets a name
    no case and no file of the folder has."""
    for case in labels.cases:
        if case.fingerprint == fingerprint:
            return case.name, case
    taken = labels.names()
    for subfolder in (nodefiles.IMAGES_FOLDER, nodefiles.LABELS_FOLDER):
        with contextlib.suppress(OSError):  # files no case lists (a crash before the manifest) stay too
            taken |= {
                caseName(p).removesuffix("_label").lower() for p in (labels.folder / subfolder).iterdir()
            }
    return uniqueName(nodefiles.safeFileName(volumeNode.GetName()), taken), None


def saveCase(scene: Any, folder: str | Path, volumeNode: Any, segmentationNode: Any) -> FileCase:
    """Write a (corrected) case into the folder now: the volume and its segmentation as a label
    map on the volume's grid, values from the folder's class table (new segment names added).

    Returns the case; its name differs from the volume's when another volume of that name
    was saved before (see the module's docstring)."""
    labels = read(folder)
    fingerprint = nodefiles.volumeFingerprint(volumeNode)
    name, replaced = _savedCaseName(labels, volumeNode, fingerprint)
    segments = [
        {"name": name, "color": [round(c, 4) for c in color]}
        for _, name, color in nodefiles.segmentsOf(segmentationNode)
    ]
    byName = {c["name"]: c for c in labels.classes}
    nextValue = max((int(c["value"]) for c in labels.classes), default=0)
    classes = [dict(c) for c in labels.classes]
    for segment in segments:
        if segment["name"] not in byName:
            nextValue += 1
            byName[segment["name"]] = {"value": nextValue, **segment}
            classes.append(byName[segment["name"]])
    values, _ = nodefiles.segmentationLabelValues(scene, segmentationNode, volumeNode, classes)
    image = labels.folder / nodefiles.IMAGES_FOLDER / f"{name}{nodefiles.IMAGE_SUFFIX}"
    label = labels.folder / nodefiles.LABELS_FOLDER / f"{name}{nodefiles.LABEL_SUFFIX}"
    _atomically(image, lambda path: nodefiles.writeVolume(volumeNode, path))
    _atomically(label, lambda path: nodefiles.writeLabelValues(scene, values, volumeNode, path))
    case = FileCase(name, image, label, fingerprint)
    labels.cases = [c for c in labels.cases if c is not replaced] + [case]
    labels.classes = classes
    _write(labels)
    return case


def _atomically(path: Path, write: Any) -> None:
    temp = path.with_name(f".{path.name[: -len(nodefiles.IMAGE_SUFFIX)]}.partial{nodefiles.IMAGE_SUFFIX}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def addFiles(
    folder: str | Path, pairs: Sequence[tuple[str | Path, str | Path]], classes: Sequence[dict[str, Any]]
) -> list[FileCase]:
    """List labeled cases that are files on disk (image, label map) in the folder, by their paths
    (nothing is copied). ``classes``: their label values and names (``{"value", "name"}``).

    An image listed already keeps its case (its label file is the new one); an image whose
    file name is a case's name already (a saved correction, or 'image.nii.gz' of another
    folder) gets a case name of its own: no case of the folder is dropped. Returns the cases
    added or updated, with their names."""
    labels = read(folder)
    resolved = [(Path(image).resolve(), Path(label).resolve()) for image, label in pairs]
    for image, label in resolved:
        for path in (image, label):
            if not path.is_file():
                raise ModuleError(f"Labeled case file not found: {path}")
    images = [image for image, _ in resolved]
    if len(set(images)) != len(images):
        twice = sorted({str(p) for p in images if images.count(p) > 1})
        raise ModuleError(f"An image is listed twice among the labeled files: {', '.join(twice)}.")
    labels.classes = mergedClasses(
        labels.classes,
        [{"color": [0.5, 0.5, 0.5], **dict(c)} for c in classes],
        "the given classes",
    )
    byImage = {case.image.resolve(): case for case in labels.cases}
    added = []
    for image, label in resolved:
        known = byImage.get(image)
        if known is not None:
            known.label, known.fingerprint = label, ""
            added.append(known)
            continue
        case = FileCase(uniqueName(caseName(image), labels.names()), image, label)
        labels.cases.append(case)
        added.append(case)
    _write(labels)
    return added


def casesBesideScene(labels: LabelsFolder, sceneVolumes: Sequence[Any]) -> LabelsFolder:
    """The folder's cases that a training adds to the scene's labeled cases: all but those
    saved from a volume the scene lists as labeled (same fingerprint: the scene's version,
    maybe corrected further, is used). Those left out are in ``leftOut``; a different volume
    that only shares a name is kept."""
    inScene = {
        nodefiles.volumeFingerprint(volume): volume.GetName() for volume in sceneVolumes if volume is not None
    }
    kept, leftOut = [], []
    for case in labels.cases:
        if case.fingerprint and case.fingerprint in inScene:
            leftOut.append((case, inScene[case.fingerprint]))
        else:
            kept.append(case)
    return LabelsFolder(labels.folder, kept, labels.classes, leftOut)
