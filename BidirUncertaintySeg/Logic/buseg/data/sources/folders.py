"""The generic data source: the user's images and label maps, read, checked and mapped to classes.

Images and labels as NIfTI/NRRD/MHA, labels also as Slicer ``.seg.nrrd``, found by
:mod:`buseg.data.cases` (folders or a manifest). Each image is checked (size, finite values,
dimension), each label map is put on its image's grid (or refused when it does not fit), and
the label values of all files are mapped to one class table (names from ``classes.json``, the
manifest or the ``.seg.nrrd`` segment names). Bad input raises
:class:`~buseg.errors.InputError` naming the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from buseg.catalogs.methods import method_entry
from buseg.config import TrainConfig
from buseg.data.cases import CaseRef, discover_cases
from buseg.data.preprocessing import normalize_intensity, resolve_normalization
from buseg.data.resample import (
    Grid,
    image_on_working_grid,
    label_on_working_grid,
)
from buseg.data.training_data import Log, TrainingData, ValidationCase
from buseg.errors import InputError
from buseg.files.images import (
    DEFAULT_COLORS,
    LabelVolume,
    Volume,
    case_name,
    read_image,
    read_image_header,
    read_label,
)
from buseg.memory import check_memory

MIN_SIZE_VOXELS = 8
# More distinct values than this in one label map means it is an image given as a label.
MAX_LABEL_VALUES = 255


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
