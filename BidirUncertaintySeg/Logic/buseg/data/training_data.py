"""What the training loop is given: :class:`TrainingData`, from whichever data source.

:func:`load_training_data` asks the catalog of data sources (:mod:`buseg.catalogs.data_sources`)
which plug-in reads ``config.data.source`` - the generic folder/manifest reader
(:mod:`buseg.data.sources.folders`) or a public benchmark's layout (:mod:`buseg.data.sources.acdc`,
:mod:`buseg.data.sources.la`) - and checks that the configured dimension fits it. Every source
ends in the same :class:`TrainingData`: normalised images (numpy order z, y, x), labels as class
indices 0..C-1, the class table (name, label value, color) and the validation cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from buseg.catalogs.data_sources import data_source, data_source_reader
from buseg.config import TrainConfig
from buseg.data.resample import (
    Grid,
    probabilities_to_grid,
)
from buseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

Log = Callable[[str], None]


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


def load_training_data(config: TrainConfig, log: Log = print) -> TrainingData:
    """Load the data a config describes, with the reader its data source registers."""
    entry = data_source(config.data.source)
    if entry.dimension and config.model.dimension != entry.dimension:
        raise ConfigError(
            f"the {entry.name} data are {entry.dimension.upper()} training data: use --dimension {entry.dimension}"
        )
    return data_source_reader(entry)(config, log)
