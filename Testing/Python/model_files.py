"""Small untrained model files for tests: the checkpoint metadata training writes, in one place.

Prediction, review and fault tests need a model file but not a trained model; building the
metadata by hand in every test file let the copies drift from what ``buseg train`` writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from buseg.model.checkpoint import network_from_metadata, save_checkpoint


def model_metadata(
    class_names: Sequence[str],
    *,
    dimension: str = "2d",
    label_values: Sequence[int] | None = None,
    colors: Sequence[Sequence[float]] | None = None,
    patch_size: Sequence[int] | None = None,
    slice_axis: int = 2,
    dropout: bool = True,
    method: str = "supervised",
) -> dict[str, Any]:
    """Checkpoint metadata of a 4-base-channel network for ``class_names`` (background first).

    ``label_values`` default to the class indices; classes have no colour unless ``colors``
    gives one per class; the patch defaults to 32x32 (2D) or 32x32x16 (3D).
    """
    for given, what in ((label_values, "label_values"), (colors, "colors")):
        if given is not None and len(given) != len(class_names):
            raise ValueError(f"{what}: {len(given)} given for {len(class_names)} classes")
    name = "unet2d" if dimension == "2d" else "vnet"
    values = list(label_values) if label_values is not None else list(range(len(class_names)))
    classes = []
    for index, class_name in enumerate(class_names):
        entry: dict[str, Any] = {"index": index, "name": class_name, "label_value": values[index]}
        if colors is not None:
            entry["color"] = list(colors[index])
        classes.append(entry)
    return {
        "method": method,
        "dimension": dimension,
        "normalization": "minmax",
        "patch_size": list(patch_size or ([32, 32] if dimension == "2d" else [32, 32, 16])),
        "slice_axis": slice_axis,
        "network": {
            "name": name,
            "in_channels": 1,
            "num_classes": len(class_names),
            "base_channels": 4,
            "dropout": dropout,
        },
        "classes": classes,
    }


def untrained_network(metadata: dict[str, Any], *, seed: int = 0) -> torch.nn.Module:
    """The network ``metadata`` describes, initialised from ``seed``."""
    torch.manual_seed(seed)
    return network_from_metadata(metadata)


def write_untrained_model(
    path: Path, metadata: dict[str, Any], *, seed: int = 0, zero_head_bias: bool = False
) -> Path:
    """Save an untrained network for ``metadata`` at ``path``.

    ``zero_head_bias``: an untrained head's bias can make one class win everywhere; without it
    the argmax follows the image, so predictions hold several classes.
    """
    network = untrained_network(metadata, seed=seed)
    if zero_head_bias:
        with torch.no_grad():
            network.head.bias.zero_()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, weights=network.state_dict(), metadata=metadata)
    return path
