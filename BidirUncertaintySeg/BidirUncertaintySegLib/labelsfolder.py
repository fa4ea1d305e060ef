"""The labels folder: labeled cases kept as files on disk, beside the runs folder.

Two uses, as MONAI Label's users expect them:

* **a correction is saved at once** ("Submit"): adding a corrected case writes its image and
  its label map here (NRRD, the volume's geometry) the moment the user adds it, so a crash
  or an unsaved scene loses nothing; the next training reads it from here;
* **labeled cases that are only files**: cases of a study on disk (60 CTs need not sit in
  the scene) are listed here by their paths, not copied, and every training includes them.

The folder is a manifest the engine reads as it is (``buseg.data.cases_from_manifest``)::

    labels/manifest.json        {"labeled": [{"image": ..., "label": ...}], "classes": [...]}
    labels/images/<case>.nrrd   saved corrections (listed cases may point anywhere)
    labels/labels/<case>_label.nrrd

Every file is written under a temporary name and renamed, the manifest last: a crash leaves
the previous state or the new one, never a half-written case.
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
    """One labeled case of the folder: its name (the image file's stem) and its two files."""

    name: str
    image: Path
    label: Path


@dataclass
class LabelsFolder:
    """What the folder holds: its cases and its class table (``{"value", "name", "color"}``)."""

    folder: Path
    cases: list[FileCase] = field(default_factory=list)
    classes: list[dict[str, Any]] = field(default_factory=list)


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
            cases.append(FileCase(caseName(image), image, label))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModuleError(f"{manifest}: cannot be read as a labels folder manifest ({exc}).") from None
    return LabelsFolder(folder, cases, classes)


def _write(labels: LabelsFolder) -> None:
    entries = []
    for case in labels.cases:
        image, label = (_relative(labels.folder, p) for p in (case.image, case.label))
        entries.append({"image": image, "label": label})
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


def saveCase(scene: Any, folder: str | Path, volumeNode: Any, segmentationNode: Any) -> FileCase:
    """Write a (corrected) case into the folder now: the volume and its segmentation as a label
    map on the volume's grid, values from the folder's class table (new segment names added)."""
    labels = read(folder)
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
    name = nodefiles.safeFileName(volumeNode.GetName())
    image = labels.folder / nodefiles.IMAGES_FOLDER / f"{name}{nodefiles.IMAGE_SUFFIX}"
    label = labels.folder / nodefiles.LABELS_FOLDER / f"{name}{nodefiles.LABEL_SUFFIX}"
    _atomically(image, lambda path: nodefiles.writeVolume(volumeNode, path))
    _atomically(label, lambda path: nodefiles.writeLabelValues(scene, values, volumeNode, path))
    case = FileCase(name, image, label)
    labels.cases = [c for c in labels.cases if c.name != name] + [case]
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
    (nothing is copied). ``classes``: their label values and names (``{"value", "name"}``)."""
    labels = read(folder)
    added = []
    for image, label in pairs:
        image, label = Path(image).resolve(), Path(label).resolve()
        for path in (image, label):
            if not path.is_file():
                raise ModuleError(f"Labeled case file not found: {path}")
        added.append(FileCase(caseName(image), image, label))
    names = [case.name for case in added]
    if len(set(names)) != len(names):
        raise ModuleError(f"Two labeled files have the same case name: {', '.join(names)}.")
    labels.classes = mergedClasses(
        labels.classes,
        [{"color": [0.5, 0.5, 0.5], **dict(c)} for c in classes],
        "the given classes",
    )
    labels.cases = [c for c in labels.cases if c.name not in set(names)] + added
    _write(labels)
    return added
