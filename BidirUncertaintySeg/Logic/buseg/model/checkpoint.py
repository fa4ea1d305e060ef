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
import math
import os
import pickle
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from buseg import __version__
from buseg.errors import ModelFileError
from buseg.files.images import regular_file_problem
from buseg.files.safe_files import atomic_path
from buseg.model.networks import build_network

FORMAT = "buseg-model"
FORMAT_VERSION = 1
NETWORKS = ("unet2d", "vnet")
NORMALIZATIONS = ("zscore", "minmax", "percentile", "none")
NETWORK_DIMENSION = {"unet2d": "2d", "vnet": "3d"}


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
    problem = regular_file_problem(path)
    if problem is not None:
        raise ModelFileError("model file not found" if problem == "file not found" else problem, path=path)
    _check_pickle_size(path)
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
        raise ModelFileError(
            "not a readable model file (not a torch file, truncated or corrupt)", path=path
        ) from None
    except Exception as exc:  # torch.load raises many kinds (IndexError, RuntimeError, ...) for garbage
        raise ModelFileError(
            f"not a readable model file (truncated or corrupt?): {str(exc)[:200]}", path=path
        ) from None
    if not isinstance(payload, dict) or "metadata" not in payload or "weights" not in payload:
        raise ModelFileError("not a buseg model file (no metadata/weights)", path=path)
    validate_metadata(payload["metadata"], path=path)
    if not isinstance(payload["weights"], dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload["weights"].items()
    ):
        raise ModelFileError("weights are not a mapping of names to tensors", path=path)
    return payload


# The pickled part of a model file (metadata, names, training history; not the tensors, which are
# stored beside it) is unpickled by Python, at about 0.5 s per MiB (measured: a 10^7-long list, 48 MiB,
# took 25 s): a larger one is refused before unpickling; below the bound it takes seconds at most, and
# a signal stops it. A real file holds a few KiB (a model) to a few MiB (a long run's history).
MAX_PICKLE_BYTES = 32 * 2**20
# Shape limits of the metadata: checked, without recursion, before any field is looked at.
MAX_METADATA_DEPTH = 32
MAX_METADATA_ITEMS = 200_000


def _check_pickle_size(path: Path) -> None:
    """Refuse a model file whose pickled part is too large to unpickle quickly (before unpickling)."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                size = sum(i.file_size for i in archive.infolist() if i.filename.endswith(".pkl"))
        else:  # torch's legacy format: pickle and tensors in one stream
            size = path.stat().st_size
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ModelFileError(
            f"not a readable model file (truncated or corrupt?): {str(exc)[:200]}", path=path
        ) from None
    if size > MAX_PICKLE_BYTES:
        raise ModelFileError(
            f"refused: its metadata and other non-tensor data take {size / 2**20:.1f} MiB, more than the "
            f"{MAX_PICKLE_BYTES // 2**20} MiB a model file holds (a damaged or crafted file?)",
            path=path,
        )


def check_metadata_shape(metadata: Any, *, path: str | Path | None = None) -> None:
    """Refuse metadata nested deeper than 32 levels or holding more than 200,000 items, and any value
    that is not plain data (str, number, bool, None, list, tuple, dict, tensor). Iterative, and it
    stops at the first excess: bounded time and memory whatever the metadata hold."""
    stack: list[tuple[Any, int]] = [(metadata, 1)]
    items = 0
    while stack:
        value, depth = stack.pop()
        items += 1
        if items > MAX_METADATA_ITEMS:
            raise ModelFileError(
                f"refused: its metadata hold more than {MAX_METADATA_ITEMS} items", path=path
            )
        if isinstance(value, (str, int, float, bool, type(None), torch.Tensor)):
            continue
        if not isinstance(value, (dict, list, tuple)):
            raise ModelFileError(f"refused: its metadata hold a {type(value).__name__}", path=path)
        if depth >= MAX_METADATA_DEPTH:
            raise ModelFileError(
                f"refused: its metadata are nested more than {MAX_METADATA_DEPTH} levels", path=path
            )
        if len(value) > MAX_METADATA_ITEMS:
            raise ModelFileError(
                f"refused: its metadata hold more than {MAX_METADATA_ITEMS} items", path=path
            )
        children = [v for pair in value.items() for v in pair] if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children)


def validate_metadata(metadata: Any, *, path: str | Path | None = None) -> None:
    """Check that metadata are complete, of known version and of sane types and values."""
    check_metadata_shape(metadata, path=path)
    if not isinstance(metadata, dict):
        raise ModelFileError("metadata are not a mapping", path=path)
    check = _MetadataCheck(metadata, path)
    check.format()
    check.fields()
    check.network()
    check.classes()
    check.sampling()
    check.working_spacing()


class _MetadataCheck:
    """The checks of :func:`validate_metadata`, run in this order: each relies on the fields the
    ones before it checked, and refuses the file at the first problem (a ModelFileError)."""

    def __init__(self, metadata: dict[str, Any], path: str | Path | None) -> None:
        self.metadata = metadata
        self.path = path

    def fail(self, message: str) -> NoReturn:
        raise ModelFileError(message, path=self.path)

    def format(self) -> None:
        """A buseg model file of a format version this buseg reads."""
        metadata = self.metadata
        if metadata.get("format") != FORMAT:
            self.fail(f"not a buseg model file (format {metadata.get('format')!r})")
        version = metadata.get("format_version")
        if not isinstance(version, int):
            self.fail("format_version missing")
        if version > FORMAT_VERSION:
            self.fail(
                f"written by a newer buseg (model format {version}; this buseg {__version__} reads up to "
                f"{FORMAT_VERSION}); update buseg to use it"
            )

    def fields(self) -> None:
        """The required fields, each of its type, and a known dimension."""
        metadata = self.metadata
        for key, kind in (
            ("dimension", str),
            ("network", dict),
            ("classes", list),
            ("normalization", str),
            ("patch_size", list),
            ("method", str),
        ):
            if not isinstance(metadata.get(key), kind):
                self.fail(f"metadata field {key!r} missing or not a {kind.__name__}")
        if metadata["dimension"] not in ("2d", "3d"):
            self.fail(f"dimension {metadata['dimension']!r} is neither 2d nor 3d")

    def network(self) -> None:
        """A known network of the model's dimension, with sensible sizes and one input channel."""
        network = self.metadata["network"]
        if network.get("name") not in NETWORKS:
            self.fail(f"unknown network {network.get('name')!r}")
        if NETWORK_DIMENSION[network["name"]] != self.metadata["dimension"]:
            self.fail(f"a {network['name']} network cannot be a {self.metadata['dimension']} model")
        for key in ("in_channels", "num_classes", "base_channels"):
            value = network.get(key)
            if not _is_int(value) or not 1 <= value <= 4096:
                self.fail(f"network field {key!r} is not a sensible integer: {value!r}")
        if network["in_channels"] != 1:
            self.fail(
                f"the model expects {network['in_channels']} images per case (input channels); this buseg "
                "segments one image per case"
            )
        if not isinstance(network.get("dropout", True), bool):
            self.fail(f"network field 'dropout' is not true/false: {network.get('dropout')!r}")

    def classes(self) -> None:
        """One class per network output (at least two), each well formed, no name or label value twice."""
        classes, outputs = self.metadata["classes"], self.metadata["network"]["num_classes"]
        if len(classes) != outputs or len(classes) < 2:
            self.fail(f"{len(classes)} classes listed but the network has {outputs} outputs")
        names, values = set(), set()
        for index, cls in enumerate(classes):
            self.class_entry(index, cls)
            if cls["name"] in names or cls["label_value"] in values:
                self.fail(f"class {cls['name']!r} (label value {cls['label_value']}) is listed twice")
            names.add(cls["name"])
            values.add(cls["label_value"])
            self.class_color(cls)
        # Outputs are label maps where 0 is background: training gives class 0 the value 0 and every
        # other class a value from the labels (never 0). Otherwise a class would be written as background.
        if classes[0]["label_value"] != 0:
            self.fail(
                f"the background class {classes[0]['name']!r} (class 0) has the label value "
                f"{classes[0]['label_value']}, not 0: its voxels would be written as another class"
            )
        foreground_zero = next((c["name"] for c in classes[1:] if c["label_value"] == 0), None)
        if foreground_zero is not None:
            self.fail(
                f"the class {foreground_zero!r} has the label value 0, which is the background's: it would be "
                "written as background"
            )

    def class_entry(self, index: int, cls: Any) -> None:
        """Class ``index``: a mapping with its index, a usable name and a valid label value."""
        if not isinstance(cls, dict) or cls.get("index") != index or not isinstance(cls.get("name"), str):
            self.fail(f"class entry {index} is malformed: {str(cls)[:200]}")
        problem = class_name_problem(cls["name"])
        if problem:
            self.fail(f"class {index} name {cls['name'][:80]!r} {problem}")
        if not _is_int(cls.get("label_value")) or not 0 <= cls["label_value"] <= 2**31 - 1:
            self.fail(f"class {cls['name']!r} has no valid label_value")

    def class_color(self, cls: dict[str, Any]) -> None:
        """A class's color, if any: three numbers in 0..1."""
        color = cls.get("color")
        if color is not None and not (
            isinstance(color, (list, tuple))
            and len(color) == 3
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in color)
        ):
            self.fail(
                f"class {cls['name']!r} has a color that is not three numbers in 0..1: {str(color)[:80]}"
            )

    def sampling(self) -> None:
        """How the images are fed: a known normalisation, a patch of the model's dimension, the
        slice axis and the training spacing (if recorded)."""
        metadata = self.metadata
        if metadata["normalization"] not in NORMALIZATIONS:
            self.fail(f"unknown normalization {metadata['normalization']!r}")
        expected = 2 if metadata["dimension"] == "2d" else 3
        patch = metadata["patch_size"]
        if len(patch) != expected or not all(_is_int(s) and 1 <= s <= 4096 for s in patch):
            self.fail(f"patch_size {str(patch)[:80]} does not fit a {metadata['dimension']} model")
        if any(s % PATCH_MULTIPLE for s in patch):
            self.fail(
                f"patch_size {patch} cannot be fed to the network: each size must be a multiple of "
                f"{PATCH_MULTIPLE} (the network halves the resolution four times; training never writes another)"
            )
        if not _is_int(metadata.get("slice_axis", 2)) or metadata.get("slice_axis", 2) not in (0, 1, 2):
            self.fail(f"slice_axis {metadata.get('slice_axis')!r} is not 0, 1 or 2")
        spacing = metadata.get("spacing_mm")
        if spacing is not None and not (
            isinstance(spacing, list)
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                for v in spacing
            )
        ):
            self.fail(f"spacing_mm {str(spacing)[:80]} is not a list of positive numbers")

    def working_spacing(self) -> None:
        """The training config (if recorded) a mapping, and its working spacing none or three plausible
        positive spacings in mm (prediction resamples every image to it)."""
        config = self.metadata.get("config")
        if config is None:
            return
        if not isinstance(config, dict) or not isinstance(config.get("model", {}), dict):
            self.fail(f"metadata field 'config' (the training settings) is not a mapping: {str(config)[:80]}")
        spacing = (config.get("model") or {}).get("working_spacing_mm")
        if spacing is None or spacing == []:
            return
        if not (
            isinstance(spacing, (list, tuple))
            and len(spacing) == 3
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1e5
                for v in spacing
            )
        ):
            self.fail(
                f"its training config's working_spacing_mm {repr(spacing)[:80]} is not three positive spacings "
                "in mm (x y z)"
            )


# The network halves the resolution four times: every patch size training accepts is a multiple of 16.
PATCH_MULTIPLE = 16


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def class_name_problem(name: str) -> str | None:
    """Why a class name cannot be used (it becomes a segment name in files and in Slicer), or None."""
    if not name.strip():
        return "is empty"
    if len(name) > 200:
        return "is longer than 200 characters"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        return "contains control characters (line breaks, tabs...)"
    return None


def network_from_metadata(metadata: dict[str, Any]) -> nn.Module:
    net = metadata["network"]
    return build_network(
        net["name"],
        in_channels=net["in_channels"],
        num_classes=net["num_classes"],
        base_channels=net["base_channels"],
        dropout=bool(net.get("dropout", True)),
    )


def _check_finite_weights(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """A weight or statistic that is NaN or infinite is a corrupt model (a diverged training, a
    damaged file): such a network outputs NaN, which argmax turns into a 'certain' background."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int(tensor.numel() - torch.isfinite(tensor).sum())
            if bad:
                raise ModelFileError(
                    f"refused: the weights hold {bad} NaN or infinite value(s) (tensor {name[:120]}): a corrupt "
                    "model, or a training that diverged",
                    path=path,
                    hint="use an earlier checkpoint, or train again (a lower learning rate if it diverged)",
                )


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file for inference (network in eval mode on ``device``)."""
    payload = read_checkpoint(path)
    metadata = payload["metadata"]
    # The network is first built without memory (meta device) and compared with the weights in
    # the file: metadata that describe a far larger network than the file holds (a corrupt or
    # crafted file) are refused before anything is allocated - such a file once took 22 GB.
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in network_from_metadata(metadata).state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in payload["weights"].items()}
    if shapes != stored:
        differing = sorted(set(shapes) ^ set(stored)) or sorted(k for k in shapes if shapes[k] != stored[k])
        raise ModelFileError(
            f"weights do not match the network the metadata describe ({len(differing)} tensor(s) differ, "
            f"e.g. {differing[0]})",
            path=path,
        )
    _check_finite_weights(payload["weights"], path)
    network = network_from_metadata(metadata)
    try:
        network.load_state_dict(payload["weights"], strict=True)
    except RuntimeError as exc:
        raise ModelFileError(
            f"weights do not match the network the metadata describe: {str(exc).splitlines()[0][:200]}",
            path=path,
        ) from None
    network.to(device).eval()
    return LoadedModel(network=network, metadata=metadata, path=str(path))
