"""The LA (left atrium) benchmark layout: HDF5 volumes (3D) under ``--data-root``.

The labeled subset is the first ``labeled_count`` cases of ``train.list``; the rest are
unlabeled unless held out (``--validation`` list, ``--exclude-cases``). Volumes are 0.625 mm
isotropic, z-scored, and resampled to ``--working-spacing-mm`` when one is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from buseg.catalogs.methods import method_entry
from buseg.config import TrainConfig
from buseg.data.preprocessing import normalize_intensity
from buseg.data.resample import (
    Grid,
    resample_array,
    resample_label_array,
    working_grid,
)
from buseg.data.sources.hdf5 import class_indices, read_h5, read_list
from buseg.data.training_data import Log, TrainingData, ValidationCase
from buseg.errors import ConfigError, InputError

LA_SPACING_MM = (0.625, 0.625, 0.625)


def read_la_volume(root: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    path = root / "volumes" / case / "mri_norm2.h5"
    image, label = read_h5(path, "image", "label")
    # The HDF5 arrays are indexed (x, y, z); the engine uses numpy order (z, y, x). The stored values
    # were z-scored before the volumes were cropped (mean about 1.4, sd 1.5 now): z-score them again,
    # as the model file says and as prediction does, so that the network sees at training what it
    # will see in `buseg predict`.
    return (
        normalize_intensity(np.ascontiguousarray(image.transpose(2, 1, 0)), "zscore"),
        class_indices(np.ascontiguousarray(label.transpose(2, 1, 0)), 1, path),
    )


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
    """The LA data of ``config``: labeled, unlabeled and validation volumes (catalog reader)."""
    root = Path(config.data.data_root)
    cases = read_list(root / "train.list")
    excluded = set(config.data.exclude_cases)
    validation_names = read_list(Path(config.data.validation)) if config.data.validation else []
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
    labeled_data = [_la_on_working_grid(*read_la_volume(root, c), working) for c in labeled]
    validation = [_la_validation_case(c, *read_la_volume(root, c), working) for c in validation_names]
    log(f"LA: {len(labeled)} labeled, {len(unlabeled)} unlabeled, {len(validation)} validation cases")
    return TrainingData(
        dimension="3d",
        labeled_images=[v[0] for v in labeled_data],
        labeled_labels=[v[1] for v in labeled_data],
        unlabeled_images=[
            _la_on_working_grid(read_la_volume(root, c)[0], None, working)[0] for c in unlabeled
        ],
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
