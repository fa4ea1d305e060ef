"""The model file: network weights plus plain metadata, safe to load.

One format serves two purposes:

* a **model file** (``best.pt``, ``model.pt``) - the weights used for inference and the
  metadata that inference needs (network, classes with names/label values/colors,
  intensity normalisation, training spacing, the full training config, version);
* a **resumable checkpoint** (``last.pt``) - the same plus ``training_state``: student,
  teacher, optimizer, iteration, random-number states and the history so far.

Everything in the file is tensors and plain Python containers, so it loads with
``torch.load(..., weights_only=True)``: a model file never executes code when loaded.
Metadata are validated before any weights are used; a file from a newer format version is
refused with a message, not misread. Writes are atomic (temporary file, fsync, rename).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import ModelFileError
from .io import atomic_path
from .networks import build_network

FORMAT = "buseg-model"
FORMAT_VERSION = 1
NETWORKS = ("unet2d", "vnet")
NORMALIZATIONS = ("zscore", "minmax", "percentile", "none")


@dataclass
class LoadedModel:
    """A network ready for inference, with the metadata that says how to feed it."""

    network: nn.Module
    metadata: dict[str, Any]
    path: str

    @property
    def dimension(self) -> str:
        return self.metadata["dimension"]

    @property
    def classes(self) -> list[dict[str, Any]]:
        """All classes including background (index 0), each with index/name/label_value/color."""
        return self.metadata["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.metadata["classes"])

    @property
    def normalization(self) -> str:
        return self.metadata["normalization"]

    @property
    def patch_size_xyz(self) -> list[int]:
        return list(self.metadata["patch_size"])

    @property
    def slice_axis(self) -> int:
        return int(self.metadata.get("slice_axis", 2))


def save_checkpoint(
    path: str | Path,
    *,
    weights: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> None:
    """Write a model file (or, with ``training_state``, a resumable checkpoint) atomically."""
    metadata = dict(metadata)
    metadata.setdefault("format", FORMAT)
    metadata.setdefault("format_version", FORMAT_VERSION)
    metadata.setdefault("buseg_version", __version__)
    metadata.setdefault("created_unix_seconds", time.time())
    validate_metadata(metadata, path=path)
    payload: dict[str, Any] = {"metadata": metadata, "weights": _cpu(weights)}
    if training_state is not None:
        payload["training_state"] = _cpu(training_state)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_path(path, overwrite=True) as temp, open(temp, "wb") as handle:
        handle.write(buffer.getbuffer())
        handle.flush()
        os.fsync(handle.fileno())


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a model file or checkpoint safely (``weights_only=True``) and validate its metadata."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError("model file not found", path=path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        blocked = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", text)
        if blocked:
            raise ModelFileError(
                f"refused: the file asks to run or import {blocked.group(1) or blocked.group(2)} when loaded; "
                "a model file holds only weights and plain data (loaded with weights_only=True)",
                path=path,
            ) from None
        raise ModelFileError("not a readable model file (not a torch file, truncated or corrupt)", path=path) from None
    except Exception as exc:  # torch.load raises many kinds (IndexError, RuntimeError, ...) for garbage
        raise ModelFileError(f"not a readable model file (truncated or corrupt?): {str(exc)[:200]}", path=path) from None
    if not isinstance(payload, dict) or "metadata" not in payload or "weights" not in payload:
        raise ModelFileError("not a buseg model file (no metadata/weights)", path=path)
    validate_metadata(payload["metadata"], path=path)
    if not isinstance(payload["weights"], dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["weights"].items()
    ):
        raise ModelFileError("weights are not a mapping of names to tensors", path=path)
    return payload


def validate_metadata(metadata: Any, *, path: str | Path | None = None) -> None:
    """Check that metadata are complete, of known version and of sane types and values."""

    def fail(message: str) -> None:
        raise ModelFileError(message, path=path)

    if not isinstance(metadata, dict):
        fail("metadata are not a mapping")
    if metadata.get("format") != FORMAT:
        fail(f"not a buseg model file (format {metadata.get('format')!r})")
    version = metadata.get("format_version")
    if not isinstance(version, int):
        fail("format_version missing")
    if version > FORMAT_VERSION:
        fail(
            f"written by a newer buseg (model format {version}; this buseg {__version__} reads up to "
            f"{FORMAT_VERSION}); update buseg to use it"
        )
    for key, kind in (("dimension", str), ("network", dict), ("classes", list), ("normalization", str),
                      ("patch_size", list), ("method", str)):
        if not isinstance(metadata.get(key), kind):
            fail(f"metadata field {key!r} missing or not a {kind.__name__}")
    if metadata["dimension"] not in ("2d", "3d"):
        fail(f"dimension {metadata['dimension']!r} is neither 2d nor 3d")
    network = metadata["network"]
    if network.get("name") not in NETWORKS:
        fail(f"unknown network {network.get('name')!r}")
    for key in ("in_channels", "num_classes", "base_channels"):
        value = network.get(key)
        if not isinstance(value, int) or not 1 <= value <= 4096:
            fail(f"network field {key!r} is not a sensible integer: {value!r}")
    classes = metadata["classes"]
    if len(classes) != network["num_classes"] or len(classes) < 2:
        fail(f"{len(classes)} classes listed but the network has {network['num_classes']} outputs")
    for index, cls in enumerate(classes):
        if not isinstance(cls, dict) or cls.get("index") != index or not isinstance(cls.get("name"), str):
            fail(f"class entry {index} is malformed: {cls!r}")
        if not isinstance(cls.get("label_value"), int) or cls["label_value"] < 0:
            fail(f"class {cls.get('name')!r} has no valid label_value")
    if metadata["normalization"] not in NORMALIZATIONS:
        fail(f"unknown normalization {metadata['normalization']!r}")
    expected = 2 if metadata["dimension"] == "2d" else 3
    patch = metadata["patch_size"]
    if len(patch) != expected or not all(isinstance(s, int) and 1 <= s <= 4096 for s in patch):
        fail(f"patch_size {patch!r} does not fit a {metadata['dimension']} model")


def network_from_metadata(metadata: dict[str, Any]) -> nn.Module:
    net = metadata["network"]
    return build_network(
        net["name"], in_channels=net["in_channels"], num_classes=net["num_classes"],
        base_channels=net["base_channels"], dropout=bool(net.get("dropout", True)),
    )


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file for inference (network in eval mode on ``device``)."""
    payload = read_checkpoint(path)
    metadata = payload["metadata"]
    network = network_from_metadata(metadata)
    try:
        network.load_state_dict(payload["weights"], strict=True)
    except RuntimeError as exc:
        raise ModelFileError(
            f"weights do not match the network the metadata describe: {str(exc).splitlines()[0][:200]}", path=path
        ) from None
    network.to(device).eval()
    return LoadedModel(network=network, metadata=metadata, path=str(path))
