"""The ACDC benchmark layout: HDF5 training slices (2D) and validation volumes under ``--data-root``.

The labeled subset is the slices of the first ``labeled_count`` patients of
``train_slices.list`` (the published split); the other training patients are unlabeled;
validation volumes come from ``val.list`` or ``--validation``. Images are min-max normalised.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from buseg.catalogs.methods import method_entry
from buseg.config import TrainConfig
from buseg.data.sources.hdf5 import class_indices, read_h5, read_list
from buseg.data.training_data import Log, TrainingData, ValidationCase
from buseg.errors import ConfigError

ACDC_CLASSES = ("right ventricle", "myocardium", "left ventricle")
ACDC_COLORS = ((0.35, 0.55, 0.85), (0.85, 0.55, 0.30), (0.85, 0.30, 0.30))


def _patient(name: str) -> str:
    match = re.match(r"(patient\d+)", name)
    return match.group(1) if match else name.split("_")[0]


def acdc_split(root: Path, labeled_patients: int) -> tuple[list[str], list[str]]:
    """The standard labeled/unlabeled split of ACDC training slices (first N patients labeled)."""
    slices = read_list(root / "train_slices.list")
    patients: list[str] = []
    for name in slices:
        if _patient(name) not in patients:
            patients.append(_patient(name))
    if not 1 <= labeled_patients < len(patients):
        raise ConfigError(f"--labeled-count {labeled_patients}: ACDC has {len(patients)} training patients")
    chosen = set(patients[:labeled_patients])
    return [s for s in slices if _patient(s) in chosen], [s for s in slices if _patient(s) not in chosen]


def load_acdc(config: TrainConfig, log: Log = print) -> TrainingData:
    """The ACDC data of ``config``: labeled and unlabeled slices, validation volumes (catalog reader)."""
    root = Path(config.data.data_root)
    labeled_names, unlabeled_names = acdc_split(root, config.data.labeled_count)
    if not method_entry(config.method.name).uses_unlabeled:
        unlabeled_names = []
    excluded = set(config.data.exclude_cases)
    labeled_images, labeled_labels = [], []
    for name in labeled_names:
        path = root / "data" / f"{name}.h5"
        image, label = read_h5(path, "image", "label")
        labeled_images.append(image.astype(np.float32))
        labeled_labels.append(class_indices(label, len(ACDC_CLASSES), path))
    unlabeled = [read_h5(root / "data" / f"{n}.h5", "image")[0].astype(np.float32) for n in unlabeled_names]
    val_list = Path(config.data.validation) if config.data.validation else root / "val.list"
    validation = []
    for name in read_list(val_list):
        if name in excluded:
            continue
        path = root / "data" / f"{name}.h5"
        image, label = read_h5(path, "image", "label")
        validation.append(
            ValidationCase(
                name,
                image.astype(np.float32),
                class_indices(label, len(ACDC_CLASSES), path),
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
