"""Readers shared by the public benchmarks' HDF5 layouts (ACDC, LA): list files, datasets, labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from buseg.errors import InputError
from buseg.files.images import (
    label_values_array,
)


def read_list(path: Path) -> list[str]:
    """The non-empty lines of a list file (case or slice names)."""
    if not path.is_file():
        raise InputError("list file not found", path=path)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_h5(path: Path, *keys: str) -> list[np.ndarray]:
    """The datasets ``keys`` of an HDF5 file, as arrays."""
    import h5py

    if not path.is_file():
        raise InputError("file not found", path=path)
    try:
        with h5py.File(path, "r") as handle:
            return [np.asarray(handle[key]) for key in keys]
    except (OSError, KeyError) as exc:
        raise InputError(f"cannot read datasets {', '.join(keys)}: {exc}", path=path) from None


def class_indices(label: np.ndarray, foreground_classes: int, path: Path) -> np.ndarray:
    """A benchmark label array (values are class indices) checked in its stored type, as uint8."""
    values = label_values_array(label, path)
    if values.size and int(values.max()) > foreground_classes:
        raise InputError(
            f"label value {int(values.max())} is not a class of this data set (0..{foreground_classes})",
            path=path,
        )
    return values.astype(np.uint8)
