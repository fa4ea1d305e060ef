"""Finding the user's cases: folders of images and labels, or a manifest.

A folder holds ``images/`` and ``labels/`` (a label found by its image's name, with the usual
suffixes such as ``_seg``) and optionally ``classes.json``; a manifest is CSV or JSON listing
image/label pairs, unlabeled and validation images and the classes (docs/data.md). The result
is a :class:`CaseList` of paths: nothing is read here but the manifest itself. Bad input raises
:class:`~buseg.errors.InputError` naming the file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buseg.config import TrainConfig
from buseg.errors import InputError
from buseg.files.images import (
    MAX_LABEL_VALUE,
    SEGMENTATION_SUFFIX,
    case_name,
    image_suffix,
    is_image_file,
    read_json,
    regular_file_problem,
    resolved_path,
)
from buseg.model.checkpoint import class_name_problem

LABEL_NAME_SUFFIXES = ("_label", "_labels", "_seg", "_segmentation", "_mask", "-label", "-seg", ".seg")
Log = Callable[[str], None]


@dataclass
class CaseRef:
    """One case as given by the user: an image and, if labeled, its label file."""

    image: Path
    label: Path | None = None

    @property
    def name(self) -> str:
        return case_name(self.image)


@dataclass
class CaseList:
    labeled: list[CaseRef] = field(default_factory=list)
    unlabeled: list[CaseRef] = field(default_factory=list)
    validation: list[CaseRef] = field(default_factory=list)
    declared_classes: list[dict[str, Any]] | None = None
    source: str = ""


# --------------------------------------------------------------------------------------
# Finding cases


def _find_label_for(image: Path, label_dir: Path) -> Path | None:
    name = case_name(image)
    candidates = [p for p in sorted(label_dir.iterdir()) if is_image_file(p)]
    exact = [p for p in candidates if case_name(p) == name]
    if exact:
        return exact[0]
    for suffix in LABEL_NAME_SUFFIXES:
        matches = [
            p
            for p in candidates
            if case_name(p) == name + suffix or p.name.lower() == (name + SEGMENTATION_SUFFIX).lower()
        ]
        if matches:
            return matches[0]
    return None


def _images_in(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if is_image_file(p)]


def cases_from_folder(folder: Path, *, labeled: bool) -> list[CaseRef]:
    """A labeled folder has ``images/`` and ``labels/``; an unlabeled folder holds images."""
    if not folder.is_dir():
        raise InputError(_not_a_folder(folder, labeled=labeled), path=folder)
    if labeled:
        image_dir, label_dir = folder / "images", folder / "labels"
        if not image_dir.is_dir() or not label_dir.is_dir():
            raise InputError(
                "a labeled folder needs an 'images' and a 'labels' sub-folder (or give a manifest)",
                path=folder,
            )
        images = _images_in(image_dir)
        if not images:
            raise InputError("no images (.nii.gz, .nii, .nrrd, .mha, .mhd) found", path=image_dir)
        cases = []
        for image in images:
            label = _find_label_for(image, label_dir)
            if label is None:
                raise InputError(
                    f"no label file for this image in {label_dir}",
                    path=image,
                    hint="name the label like the image (optionally with _label or .seg.nrrd)",
                )
            cases.append(CaseRef(image, label))
        _refuse_labels_without_images(label_dir, images)
        return cases
    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    images = _images_in(images_dir)
    if not images:
        raise InputError("no images (.nii.gz, .nii, .nrrd, .mha, .mhd) found", path=images_dir)
    return [CaseRef(p) for p in images]


def _not_a_folder(path: Path, *, labeled: bool) -> str:
    """What ``path`` is instead of the folder expected there (an image given as --labeled ...)."""
    expected = (
        "a folder with 'images' and 'labels' sub-folders, or a .csv/.json manifest"
        if labeled
        else "a folder of images, or a .csv/.json manifest"
    )
    if not os.path.lexists(path):
        return f"not found (expected {expected})"
    what = (
        "an image file"
        if image_suffix(path)
        else (regular_file_problem(path) or "a file").removeprefix("is ")
    )
    return f"is {what}, not a folder (expected {expected})"


def _refuse_labels_without_images(label_dir: Path, images: list[Path]) -> None:
    """A label file that no image is named for is refused, as an image without a label is: a
    misspelt name would otherwise leave a labeled case out of training without a word."""
    names = {case_name(image) for image in images}
    named = names | {name + suffix for name in names for suffix in LABEL_NAME_SUFFIXES}
    for label in _images_in(label_dir):
        if case_name(label) not in named:
            raise InputError(
                f"no image for this label file in {images[0].parent}",
                path=label,
                hint="name the image like the label (the label may add _label or .seg.nrrd), or move the label away",
            )


def _resolve(base: Path, value: Any, where: str, manifest: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: missing or empty path", path=manifest)
    path = Path(value.strip())
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise InputError(f"{where}: file not found: {path}", path=manifest)
    return path


def cases_from_manifest(manifest: Path) -> CaseList:
    """Read a CSV or JSON manifest (paths relative to the manifest's folder).

    CSV: header with ``image`` and ``label`` (empty for unlabeled) and optional ``split``
    (``labeled``, ``unlabeled``, ``validation``; default: labeled if a label is given).
    JSON: ``{"labeled": [{"image": ..., "label": ...}], "unlabeled": [{"image": ...} or
    "path"], "validation": [...], "classes": [{"value": 1, "name": "liver", "color": [r, g, b]}]}``.
    """
    problem = regular_file_problem(manifest)
    if problem is not None:
        raise InputError("manifest not found" if problem == "file not found" else problem, path=manifest)
    base = manifest.parent
    result = CaseList(source=str(manifest))
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        try:
            # utf-8-sig: spreadsheet programs begin a CSV with a byte-order mark, read as part of 'image'.
            with open(manifest, newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"cannot be read as CSV: {exc}", path=manifest) from None
        if not rows or "image" not in rows[0]:
            raise InputError(
                "CSV manifest needs a header row with an 'image' column (and 'label', 'split')", path=manifest
            )
        for number, row in enumerate(rows, start=2):
            where = f"line {number}"
            image = _resolve(base, row.get("image"), where, manifest)
            label_text = (row.get("label") or "").strip()
            split = (row.get("split") or "").strip().lower() or ("labeled" if label_text else "unlabeled")
            label = _resolve(base, label_text, where, manifest) if label_text else None
            _add_case(result, split, CaseRef(image, label), where, manifest)
    elif suffix == ".json":
        data = read_json(manifest, what="JSON manifest")
        if not isinstance(data, dict):
            raise InputError(
                "JSON manifest must be an object with 'labeled'/'unlabeled'/'validation' lists", path=manifest
            )
        unknown = set(data) - {"labeled", "unlabeled", "validation", "classes"}
        if unknown:
            raise InputError(f"unknown manifest key(s): {', '.join(sorted(unknown))}", path=manifest)
        for split in ("labeled", "unlabeled", "validation"):
            entries = data.get(split, [])
            if not isinstance(entries, list):
                raise InputError(f"'{split}' must be a list", path=manifest)
            for number, entry in enumerate(entries):
                where = f"{split}[{number}]"
                if isinstance(entry, str):
                    entry = {"image": entry}
                if not isinstance(entry, dict):
                    raise InputError(f"{where}: expected an object with 'image' (and 'label')", path=manifest)
                image = _resolve(base, entry.get("image"), where, manifest)
                label = _resolve(base, entry.get("label"), where, manifest) if entry.get("label") else None
                _add_case(result, split, CaseRef(image, label), where, manifest)
        if "classes" in data:
            result.declared_classes = _parse_declared_classes(data["classes"], manifest)
    else:
        raise InputError("manifest must be a .csv or .json file", path=manifest)
    return result


def _parse_declared_classes(entries: Any, manifest: Path) -> list[dict[str, Any]]:
    if not isinstance(entries, list) or not entries:
        raise InputError("'classes' must be a non-empty list of {value, name[, color]}", path=manifest)
    classes = []
    for entry in entries:
        value = entry.get("value") if isinstance(entry, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_LABEL_VALUE:
            raise InputError(
                f"class entry {str(entry)[:200]}: needs an integer 'value' in 1..{MAX_LABEL_VALUE} and a 'name'",
                path=manifest,
            )
        name = entry.get("name")
        if name is None or name == "":
            name = f"label_{value}"
        if not isinstance(name, str):
            raise InputError(
                f"class {value}: the name {str(name)[:80]} is not text (a {type(name).__name__})",
                path=manifest,
            )
        problem = class_name_problem(name)
        if name == "background":
            problem = "is the name of label value 0 (every model file has it); name this class otherwise"
        if problem:
            raise InputError(f"class name {name[:80]!r} {problem}", path=manifest)
        color = entry.get("color")
        if color is not None and not _is_color(color):
            raise InputError(
                f"class {name!r}: 'color' {str(color)[:80]} must be [r, g, b], three numbers in 0..1",
                path=manifest,
            )
        classes.append(
            {"value": value, "name": name, "color": None if color is None else list(map(float, color))}
        )
    values = [c["value"] for c in classes]
    if len(set(values)) != len(values):
        raise InputError("'classes' lists a value twice", path=manifest)
    names = [c["name"] for c in classes]
    if len(set(names)) != len(names):
        raise InputError("'classes' lists a name twice", path=manifest)
    return classes


def _is_color(color: Any) -> bool:
    """Whether ``color`` is what a model file and Slicer take as a colour: [r, g, b] in 0..1."""
    return (
        isinstance(color, list)
        and len(color) == 3
        and all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in color)
    )


def _add_case(result: CaseList, split: str, case: CaseRef, where: str, manifest: Path) -> None:
    if split == "labeled":
        if case.label is None:
            raise InputError(f"{where}: labeled case without a label", path=manifest)
        result.labeled.append(case)
    elif split == "unlabeled":
        if case.label is not None:
            raise InputError(f"{where}: an unlabeled case must not have a label", path=manifest)
        result.unlabeled.append(case)
    elif split == "validation":
        if case.label is None:
            raise InputError(f"{where}: a validation case needs a label", path=manifest)
        result.validation.append(case)
    else:
        raise InputError(
            f"{where}: unknown split {split!r} (labeled, unlabeled or validation)", path=manifest
        )


def classes_from_file(path: Path) -> list[dict[str, Any]]:
    """A ``classes.json``: ``{"1": "liver", "2": "tumor"}`` or a list of {value, name[, color]}."""
    data = read_json(path, what="classes file")
    if isinstance(data, dict):
        try:
            data = [{"value": int(k), "name": v} for k, v in data.items()]
        except ValueError:
            raise InputError('keys must be label values, e.g. {"1": "liver"}', path=path) from None
    return _parse_declared_classes(data, path)


def _from_path(path_text: str, *, labeled: bool) -> CaseList:
    path = Path(path_text)
    if path.suffix.lower() in (".csv", ".json") and not path.is_dir():
        return cases_from_manifest(path)  # refuses, by name, what is not a readable file
    if not path.exists():
        raise InputError("not found (expected a folder or a .csv/.json manifest)", path=path)
    cases = cases_from_folder(path, labeled=labeled)
    if not labeled:
        return CaseList(unlabeled=cases, source=str(path))
    declared = classes_from_file(path / "classes.json") if (path / "classes.json").is_file() else None
    return CaseList(labeled=cases, source=str(path), declared_classes=declared)


def discover_cases(config: TrainConfig) -> CaseList:
    """All cases of a ``files`` run, merged from --labeled, --unlabeled and --validation, checked."""
    d = config.data
    cases = _from_path(d.labeled, labeled=True)
    if d.unlabeled:
        extra = _from_path(d.unlabeled, labeled=False)
        if extra.labeled:
            raise InputError("--unlabeled lists labeled cases; give them with --labeled", path=d.unlabeled)
        cases.unlabeled += extra.unlabeled
    if d.validation:
        extra = _from_path(d.validation, labeled=True)
        cases.validation += extra.labeled + extra.validation
    _check_case_list(cases)
    return cases


def _check_case_list(cases: CaseList) -> None:
    if not cases.labeled:
        raise InputError("no labeled cases given", path=cases.source or None)
    seen: dict[Path, str] = {}
    for role, group in (
        ("labeled", cases.labeled),
        ("unlabeled", cases.unlabeled),
        ("validation", cases.validation),
    ):
        for case in group:
            key = resolved_path(case.image)
            if key in seen:
                if seen[key] == role:
                    raise InputError(f"listed twice as {role}", path=case.image)
                raise InputError(
                    f"listed both as {seen[key]} and as {role}",
                    path=case.image,
                    hint="an image is either labeled, unlabeled or for validation",
                )
            seen[key] = role
    labels_seen: dict[Path, Path] = {}
    for case in cases.labeled + cases.validation:
        key = resolved_path(case.label)
        if key in labels_seen:
            raise InputError(
                f"used as the label of two images ({labels_seen[key]} and {case.image})", path=case.label
            )
        labels_seen[key] = case.image
        if key == resolved_path(case.image):
            raise InputError("image and label are the same file", path=case.image)
