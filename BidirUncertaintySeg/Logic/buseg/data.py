"""Training data: finding cases, reading and checking them, mapping labels to classes.

Sources (``DataConfig.source``):

* ``files`` - images and label maps as NIfTI/NRRD/MHA, labels also as Slicer ``.seg.nrrd``,
  given as folders (``images/`` + ``labels/``, optional ``classes.json`` naming label values)
  or a manifest (CSV or JSON; format in docs/data.md);
* ``acdc`` - the ACDC HDF5 layout (2D training slices, validation volumes), labeled subset
  = the slices of the first ``labeled_count`` patients of ``train_slices.list``;
* ``la`` - the LA HDF5 layout (3D volumes), labeled subset = the first ``labeled_count``
  cases of ``train.list``.

Everything ends in one :class:`TrainingData`: normalised images (numpy order z, y, x),
labels as class indices 0..C-1, the class table (name, label value, color), and the
validation cases. Bad input raises :class:`~buseg.errors.InputError` naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from buseg.checkpoint import class_name_problem
from buseg.config import TrainConfig
from buseg.errors import ConfigError, InputError
from buseg.io import (
    DEFAULT_COLORS,
    MAX_LABEL_VALUE,
    SEGMENTATION_SUFFIX,
    LabelVolume,
    Volume,
    case_name,
    image_suffix,
    is_image_file,
    label_values_array,
    read_image,
    read_image_header,
    read_json,
    read_label,
    regular_file_problem,
    resolved_path,
)
from buseg.memory import check_memory
from buseg.methods.catalog import method_entry
from buseg.preprocessing import normalize_intensity, resolve_normalization
from buseg.resample import (
    Grid,
    image_on_working_grid,
    label_on_working_grid,
    probabilities_to_grid,
    resample_array,
    resample_label_array,
    working_grid,
)

if TYPE_CHECKING:
    import torch

LABEL_NAME_SUFFIXES = ("_label", "_labels", "_seg", "_segmentation", "_mask", "-label", "-seg", ".seg")
MIN_SIZE_VOXELS = 8
# More distinct values than this in one label map means it is an image given as a label.
MAX_LABEL_VALUES = 255
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


@dataclass
class ValidationCase:
    """A labeled volume for model selection: normalised image and class-index labels."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, ...]
    # With a working spacing, ``image`` lies on the working grid and ``labels`` on the case's own
    # grid (``spacing_mm`` is its spacing): predictions are scored where the labels were drawn.
    image_grid: Grid | None = None
    label_grid: Grid | None = None

    def to_case_grid(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Class probabilities (C, *image.shape) on the labels' grid (resampled linearly if needed)."""
        if self.image_grid is None or self.label_grid is None:
            return probabilities
        import torch

        array = probabilities_to_grid(probabilities.numpy(), self.image_grid, self.label_grid)
        return torch.from_numpy(array)


@dataclass
class TrainingData:
    """Everything the training loop needs, in memory.

    2D: ``labeled_images`` is a list of 2D slices (H, W) at native size; 3D: a list of
    volumes (z, y, x). Labels are class indices (uint8/int32) of the same shapes.
    """

    dimension: str
    labeled_images: list[np.ndarray]
    labeled_labels: list[np.ndarray]
    unlabeled_images: list[np.ndarray]
    validation: list[ValidationCase]
    classes: list[dict[str, Any]]
    normalization: str
    spacing_mm: list[float]
    labeled_case_names: list[str] = field(default_factory=list)
    unlabeled_case_names: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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


# --------------------------------------------------------------------------------------
# Reading and checking


def estimate_bytes(paths: Sequence[Path]) -> int:
    """Memory the decoded float32 images will take, from the file headers alone (a path that is not
    a regular file - a FIFO would block the reader - is refused by name first)."""
    total = 0
    for path in paths:
        header = read_image_header(path)
        total += header.voxels * header.components * 4
    return total


def _check_image(volume: Volume, *, dimension: str) -> None:
    array = volume.array
    if array.ndim != 3:
        raise InputError(f"has {array.ndim} dimensions; a 3D volume is needed", path=volume.path)
    if dimension == "3d" and min(array.shape) < MIN_SIZE_VOXELS:
        raise InputError(
            f"is too small ({'x'.join(map(str, volume.size_xyz))} voxels); at least {MIN_SIZE_VOXELS} "
            "along each axis is needed for 3D training",
            path=volume.path,
        )
    if dimension == "2d" and min(array.shape[1:]) < MIN_SIZE_VOXELS and min(array.shape) < MIN_SIZE_VOXELS:
        raise InputError(f"is too small ({'x'.join(map(str, volume.size_xyz))} voxels)", path=volume.path)
    if float(array.max()) == float(array.min()):
        raise InputError(
            f"is constant (every voxel is {float(array.min()):g}); nothing to learn from", path=volume.path
        )


def _label_on_image_grid(label: LabelVolume, image: Volume, *, resample: bool) -> LabelVolume:
    difference = image.same_grid(label)
    if difference is None:
        return label
    if not resample:
        raise InputError(
            f"label does not lie on its image's voxel grid ({difference}; image {image.path})",
            path=label.path,
            hint="check the pairing, or pass --resample-labels-to-image to resample the label (nearest neighbour)",
        )
    import SimpleITK as sitk

    resampled = sitk.Resample(label.to_sitk(), image.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayFromImage(resampled).astype(label.array.dtype)
    return LabelVolume(
        array, image.spacing_mm, image.origin, image.direction, label.path, segments=label.segments
    )


class ClassTable:
    """Maps label files' values (or .seg.nrrd segment names) to consistent class indices."""

    def __init__(self, declared: list[dict[str, Any]] | None):
        self.declared = declared
        self.by_key: dict[Any, dict[str, Any]] = {}
        if declared:
            for entry in declared:
                self.by_key[("value", entry["value"])] = {
                    "name": entry["name"],
                    "color": entry["color"],
                    "label_value": entry["value"],
                }
                self.by_key[("name", entry["name"])] = self.by_key[("value", entry["value"])]
        self.kinds: set[str] = set()

    def observe(self, label: LabelVolume) -> None:
        values = [int(v) for v in np.unique(label.array) if v != 0]
        if not values:
            raise InputError(
                "label has no foreground voxels (empty segmentation)",
                path=label.path,
                hint="every labeled case needs at least one labeled structure",
            )
        if len(values) > MAX_LABEL_VALUES:
            raise InputError(
                f"label map has {len(values)} different values; a label map holds one value per structure "
                "(is this an image rather than a label map?)",
                path=label.path,
            )
        kind = "name" if label.segments else "value"
        self.kinds.add(kind)
        if len(self.kinds) > 1 and not self.declared:
            raise InputError(
                "mixes .seg.nrrd segmentations (classes by segment name) with label maps (classes by value)",
                path=label.path,
                hint="add a 'classes' list to a JSON manifest to say which value is which name",
            )
        for value in values:
            key = ("name", label.segments[value]["name"]) if kind == "name" else ("value", value)
            if key in self.by_key:
                continue
            if self.declared:
                raise InputError(
                    f"has label {key[1]!r}, which the manifest's 'classes' list does not declare",
                    path=label.path,
                )
            if kind == "name":
                segment = label.segments[value]
                self.by_key[key] = {
                    "name": segment["name"],
                    "color": segment.get("color"),
                    "label_value": None,
                }
            else:
                self.by_key[key] = {"name": f"label_{value}", "color": None, "label_value": value}

    def classes(self) -> list[dict[str, Any]]:
        """The class list: background first, then classes by label value (or first appearance)."""
        unique: list[dict[str, Any]] = []
        for entry in self.by_key.values():
            if not any(entry is u for u in unique):
                unique.append(entry)
        if all(u["label_value"] is not None for u in unique):
            unique.sort(key=lambda u: u["label_value"])
        table = [{"index": 0, "name": "background", "label_value": 0, "color": [0.0, 0.0, 0.0]}]
        for index, entry in enumerate(unique, start=1):
            if entry["label_value"] is None:
                entry["label_value"] = index
            table.append(
                {
                    "index": index,
                    "name": entry["name"],
                    "label_value": int(entry["label_value"]),
                    "color": entry["color"] or list(DEFAULT_COLORS[(index - 1) % len(DEFAULT_COLORS)]),
                }
            )
        return table

    def to_indices(self, label: LabelVolume, classes: list[dict[str, Any]]) -> np.ndarray:
        lookup = {}
        for value in (int(v) for v in np.unique(label.array) if v != 0):
            key = ("name", label.segments[value]["name"]) if label.segments else ("value", value)
            entry = self.by_key.get(key)
            if entry is None:
                raise InputError(f"has label {key[1]!r}, which no labeled training case has", path=label.path)
            lookup[value] = next(c["index"] for c in classes if c["name"] == entry["name"])
        out = np.zeros(label.array.shape, dtype=np.uint8 if len(classes) <= 255 else np.int32)
        for value, index in lookup.items():
            out[label.array == value] = index
        return out


def _slices(array: np.ndarray, numpy_axis: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(s) for s in np.moveaxis(array, numpy_axis, 0)]


def load_files(config: TrainConfig, log: Log = print) -> TrainingData:
    """Read, check and prepare the cases of a ``files`` run."""
    cases = discover_cases(config)
    loader = _FilesLoader(config, cases.declared_classes)
    every_image = [c.image for c in cases.labeled + cases.unlabeled + cases.validation]
    check_memory(estimate_bytes(every_image) * 2, f"the {len(every_image)} training images")
    labeled_pairs = [loader.read_pair(c) for c in cases.labeled]
    for image, _ in labeled_pairs:
        loader.check_unique(image, "labeled")
    classes = loader.class_list(labeled_pairs, source=cases.source)
    labeled_images, labeled_labels, names = loader.labeled(labeled_pairs, classes)
    unlabeled_images, unlabeled_names = loader.unlabeled(cases.unlabeled)
    validation = loader.validation(cases.validation, classes)
    spacing = loader.working or np.median(np.array([img.spacing_mm for img, _ in labeled_pairs]), axis=0)
    data = TrainingData(
        dimension=loader.dimension,
        labeled_images=labeled_images,
        labeled_labels=labeled_labels,
        unlabeled_images=unlabeled_images,
        validation=validation,
        classes=classes,
        normalization=loader.mode,
        spacing_mm=[float(s) for s in spacing],
        labeled_case_names=names,
        unlabeled_case_names=unlabeled_names,
        warnings=loader.warnings,
    )
    if method_entry(config.method.name).uses_unlabeled and not unlabeled_images:
        raise InputError(
            f"method {config.method.name} is semi-supervised but no unlabeled images were given",
            path=config.data.labeled,
            hint="add --unlabeled FOLDER, or use --method supervised",
        )
    log(
        f"{len(cases.labeled)} labeled, {len(cases.unlabeled)} unlabeled, {len(cases.validation)} validation "
        f"cases; classes: {', '.join(c['name'] for c in classes[1:])}"
    )
    return data


class _FilesLoader:
    """Reads the cases of a ``files`` run role by role, with what the roles share: the class table
    (built from the labeled cases) and the contents met so far (a copy under another name is warned of)."""

    def __init__(self, config: TrainConfig, declared_classes: list[dict[str, Any]] | None):
        self.config = config
        self.dimension = config.model.dimension
        self.mode = resolve_normalization(config.data.normalization, self.dimension)
        self.working = config.model.working_spacing_mm
        self.numpy_axis = 2 - config.model.slice_axis
        self.table = ClassTable(declared_classes)
        self.seen_content: dict[str, tuple[str, str]] = {}
        self.warnings: list[str] = []

    def read_image(self, path: Path) -> Volume:
        image = read_image(path)
        _check_image(image, dimension=self.dimension)
        return image

    def read_pair(self, case: CaseRef) -> tuple[Volume, LabelVolume]:
        image = self.read_image(case.image)
        label = read_label(case.label)
        if label.array.ndim != 3:
            raise InputError(f"label has {label.array.ndim} dimensions; 3D is needed", path=case.label)
        label = _label_on_image_grid(label, image, resample=self.config.data.resample_labels_to_image)
        return image, label

    def check_unique(self, volume: Volume, role: str) -> None:
        """The same voxels under two file names (a copy of an image) get a warning naming both: an
        unlabeled copy of a labeled image adds nothing to learn from, and a validation copy of a
        training image makes the validation score optimistic (a deliberate overfitting check
        does that, so it is not refused; the same *file* listed twice is refused above)."""
        digest = hashlib.blake2b(np.ascontiguousarray(volume.array).view(np.uint8), digest_size=16)
        digest.update(str(volume.array.shape).encode())
        key = digest.hexdigest()
        if key in self.seen_content:
            other, other_role = self.seen_content[key]
            effect = (
                "the validation score will be optimistic"
                if "validation" in (role, other_role)
                else "the copy adds nothing to learn from"
            )
            self.warnings.append(
                f"{volume.path} ({role}) has the same voxels as {other} ({other_role}): {effect}"
            )
            return
        self.seen_content[key] = (str(volume.path), role)

    def class_list(
        self, labeled_pairs: Sequence[tuple[Volume, LabelVolume]], *, source: str
    ) -> list[dict[str, Any]]:
        """The classes of the labeled cases; a declared class that none of them has is refused."""
        table = self.table
        for _, label in labeled_pairs:
            table.observe(label)
        classes = table.classes()
        if table.declared:
            seen = {c["name"] for c in classes}
            missing = [c["name"] for c in table.declared if c["name"] not in seen]
            if missing:
                raise InputError(
                    f"class(es) {', '.join(missing)} declared but absent from every labeled case",
                    path=source,
                )
        present = set()
        for _, label in labeled_pairs:
            present.update(int(v) for v in np.unique(table.to_indices(label, classes)))
        absent = [c["name"] for c in classes[1:] if c["index"] not in present]
        if absent:  # observed classes occur by definition: these are declared ones
            raise InputError(
                f"class(es) {', '.join(absent)} declared but absent from every labeled case",
                path=source,
                hint="remove them from 'classes', or add labeled cases that have them",
            )
        return classes

    def _samples(self, array: np.ndarray) -> list[np.ndarray]:
        """2D training takes a volume as its slices along the slice axis, 3D as a whole."""
        return _slices(array, self.numpy_axis) if self.dimension == "2d" else [array]

    def _normalized(self, image: Volume) -> np.ndarray:
        return normalize_intensity(image_on_working_grid(image, self.working).array, self.mode)

    def labeled(
        self, labeled_pairs: Sequence[tuple[Volume, LabelVolume]], classes: list[dict[str, Any]]
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
        """Normalised images, class-index labels (both on the working grid) and case names."""
        images: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        names: list[str] = []
        for image, label in labeled_pairs:
            images += self._samples(self._normalized(image))
            labels += self._samples(
                self.table.to_indices(label_on_working_grid(label, self.working), classes)
            )
            names.append(case_name(image.path))
        return images, labels, names

    def unlabeled(self, cases: Sequence[CaseRef]) -> tuple[list[np.ndarray], list[str]]:
        images: list[np.ndarray] = []
        names: list[str] = []
        for case in cases:
            image = self.read_image(case.image)
            self.check_unique(image, "unlabeled")
            images += self._samples(self._normalized(image))
            names.append(case.name)
        return images, names

    def validation(self, cases: Sequence[CaseRef], classes: list[dict[str, Any]]) -> list[ValidationCase]:
        """Validation cases: the image on the working grid, the labels on the case's own grid."""
        validation = []
        for case in cases:
            image, label = self.read_pair(case)
            self.check_unique(image, "validation")
            seen = image_on_working_grid(image, self.working)
            validation.append(
                ValidationCase(
                    case.name,
                    normalize_intensity(seen.array, self.mode),
                    self.table.to_indices(label, classes),
                    image.spacing_mm,
                    *((Grid.of(seen), Grid.of(image)) if seen is not image else ()),
                )
            )
        return validation


# --------------------------------------------------------------------------------------
# Benchmark layouts (HDF5)

ACDC_CLASSES = ("right ventricle", "myocardium", "left ventricle")
ACDC_COLORS = ((0.35, 0.55, 0.85), (0.85, 0.55, 0.30), (0.85, 0.30, 0.30))


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError("list file not found", path=path)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _h5(path: Path, *keys: str) -> list[np.ndarray]:
    import h5py

    if not path.is_file():
        raise InputError("file not found", path=path)
    try:
        with h5py.File(path, "r") as handle:
            return [np.asarray(handle[key]) for key in keys]
    except (OSError, KeyError) as exc:
        raise InputError(f"cannot read datasets {', '.join(keys)}: {exc}", path=path) from None


def _patient(name: str) -> str:
    match = re.match(r"(patient\d+)", name)
    return match.group(1) if match else name.split("_")[0]


def acdc_split(root: Path, labeled_patients: int) -> tuple[list[str], list[str]]:
    """The standard labeled/unlabeled split of ACDC training slices (first N patients labeled)."""
    slices = _read_list(root / "train_slices.list")
    patients: list[str] = []
    for name in slices:
        if _patient(name) not in patients:
            patients.append(_patient(name))
    if not 1 <= labeled_patients < len(patients):
        raise ConfigError(f"--labeled-count {labeled_patients}: ACDC has {len(patients)} training patients")
    chosen = set(patients[:labeled_patients])
    return [s for s in slices if _patient(s) in chosen], [s for s in slices if _patient(s) not in chosen]


def load_acdc(config: TrainConfig, log: Log = print) -> TrainingData:
    root = Path(config.data.data_root)
    labeled_names, unlabeled_names = acdc_split(root, config.data.labeled_count)
    if not method_entry(config.method.name).uses_unlabeled:
        unlabeled_names = []
    excluded = set(config.data.exclude_cases)
    labeled_images, labeled_labels = [], []
    for name in labeled_names:
        path = root / "data" / f"{name}.h5"
        image, label = _h5(path, "image", "label")
        labeled_images.append(image.astype(np.float32))
        labeled_labels.append(_class_indices(label, len(ACDC_CLASSES), path))
    unlabeled = [_h5(root / "data" / f"{n}.h5", "image")[0].astype(np.float32) for n in unlabeled_names]
    val_list = Path(config.data.validation) if config.data.validation else root / "val.list"
    validation = []
    for name in _read_list(val_list):
        if name in excluded:
            continue
        path = root / "data" / f"{name}.h5"
        image, label = _h5(path, "image", "label")
        validation.append(
            ValidationCase(
                name,
                image.astype(np.float32),
                _class_indices(label, len(ACDC_CLASSES), path),
                (1.0, 1.0, 1.0),
            )
        )
    classes = [{"index": 0, "name": "background", "label_value": 0, "color": [0.0, 0.0, 0.0]}] + [
        {"index": i, "name": n, "label_value": i, "color": list(c)}
        for i, (n, c) in enumerate(zip(ACDC_CLASSES, ACDC_COLORS, strict=True), start=1)
    ]
    log(
        f"ACDC: {config.data.labeled_count} labeled patients ({len(labeled_names)} slices), "
        f"{len(unlabeled_names)} unlabeled slices, {len(validation)} validation volumes"
    )
    return TrainingData(
        dimension="2d",
        labeled_images=labeled_images,
        labeled_labels=labeled_labels,
        unlabeled_images=unlabeled,
        validation=validation,
        classes=classes,
        normalization="minmax",
        spacing_mm=[1.0, 1.0, 1.0],
        labeled_case_names=sorted({_patient(n) for n in labeled_names}),
        unlabeled_case_names=sorted({_patient(n) for n in unlabeled_names}),
    )


def _la_volume(root: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    path = root / "volumes" / case / "mri_norm2.h5"
    image, label = _h5(path, "image", "label")
    # The HDF5 arrays are indexed (x, y, z); the engine uses numpy order (z, y, x). The stored values
    # were z-scored before the volumes were cropped (mean about 1.4, sd 1.5 now): z-score them again,
    # as the model file says and as prediction does, so that the network sees at training what it
    # will see in `buseg predict`.
    return (
        normalize_intensity(np.ascontiguousarray(image.transpose(2, 1, 0)), "zscore"),
        _class_indices(np.ascontiguousarray(label.transpose(2, 1, 0)), 1, path),
    )


def _class_indices(label: np.ndarray, foreground_classes: int, path: Path) -> np.ndarray:
    """A benchmark label array (values are class indices) checked in its stored type, as uint8."""
    values = label_values_array(label, path)
    if values.size and int(values.max()) > foreground_classes:
        raise InputError(
            f"label value {int(values.max())} is not a class of this data set (0..{foreground_classes})",
            path=path,
        )
    return values.astype(np.uint8)


LA_SPACING_MM = (0.625, 0.625, 0.625)


def _la_on_working_grid(
    image: np.ndarray, labels: np.ndarray | None, working: Sequence[float]
) -> tuple[np.ndarray, np.ndarray | None]:
    """An LA image (and labels) resampled from 0.625 mm to the working spacing (if one is set)."""
    if not working:
        return image, labels
    source = Grid.plain(image.shape, LA_SPACING_MM)
    target = working_grid(source, working)
    image = resample_array(image, source, target)
    return image, None if labels is None else resample_label_array(labels, source, target)


def _la_validation_case(
    name: str, image: np.ndarray, labels: np.ndarray, working: Sequence[float]
) -> ValidationCase:
    """An LA validation case: the image on the working grid, the labels on their own 0.625 mm grid."""
    if not working:
        return ValidationCase(name, image, labels, LA_SPACING_MM)
    source = Grid.plain(image.shape, LA_SPACING_MM)
    target = working_grid(source, working)
    return ValidationCase(
        name,
        resample_array(image, source, target),
        labels,
        LA_SPACING_MM,
        image_grid=target,
        label_grid=source,
    )


def load_la(config: TrainConfig, log: Log = print) -> TrainingData:
    root = Path(config.data.data_root)
    cases = _read_list(root / "train.list")
    excluded = set(config.data.exclude_cases)
    validation_names = _read_list(Path(config.data.validation)) if config.data.validation else []
    count = config.data.labeled_count
    if not 1 <= count < len(cases):
        raise ConfigError(f"--labeled-count {count}: the LA list has {len(cases)} cases")
    labeled = cases[:count]
    overlap = set(labeled) & (set(validation_names) | excluded)
    if overlap:
        raise ConfigError(f"LA cases {', '.join(sorted(overlap))} are labeled and also held out")
    unlabeled = [c for c in cases[count:] if c not in excluded and c not in validation_names]
    if not method_entry(config.method.name).uses_unlabeled:
        unlabeled = []
    elif not unlabeled:
        raise InputError(
            f"method {config.method.name} is semi-supervised but no unlabeled case remains after the "
            f"{count} labeled, the validation and the excluded cases",
            path=root / "train.list",
            hint="lower --labeled-count, hold out fewer cases, or use --method supervised",
        )
    working = config.model.working_spacing_mm
    labeled_data = [_la_on_working_grid(*_la_volume(root, c), working) for c in labeled]
    validation = [_la_validation_case(c, *_la_volume(root, c), working) for c in validation_names]
    log(f"LA: {len(labeled)} labeled, {len(unlabeled)} unlabeled, {len(validation)} validation cases")
    return TrainingData(
        dimension="3d",
        labeled_images=[v[0] for v in labeled_data],
        labeled_labels=[v[1] for v in labeled_data],
        unlabeled_images=[_la_on_working_grid(_la_volume(root, c)[0], None, working)[0] for c in unlabeled],
        validation=validation,
        classes=[
            {"index": 0, "name": "background", "label_value": 0, "color": [0.0, 0.0, 0.0]},
            {"index": 1, "name": "left atrium", "label_value": 1, "color": [0.85, 0.30, 0.30]},
        ],
        normalization="zscore",
        spacing_mm=[float(s) for s in working] if working else list(LA_SPACING_MM),
        labeled_case_names=labeled,
        unlabeled_case_names=unlabeled,
    )


def load_training_data(config: TrainConfig, log: Log = print) -> TrainingData:
    """Load the data a config describes (any source)."""
    source = config.data.source
    if source == "files":
        return load_files(config, log)
    if source == "acdc":
        if config.model.dimension != "2d":
            raise ConfigError("the ACDC layout is 2D training data: use --dimension 2d")
        return load_acdc(config, log)
    if source == "la":
        if config.model.dimension != "3d":
            raise ConfigError("the LA layout is 3D training data: use --dimension 3d")
        return load_la(config, log)
    raise ConfigError(f"unknown data source {source!r}")
