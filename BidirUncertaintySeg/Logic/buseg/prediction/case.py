"""One image through a loaded model: a :class:`Prediction` (labels, uncertainty, flagged regions).

:func:`predict_case` is the one path of an image: to the model's working grid when it was
trained at a working spacing, normalised, the probabilities of
:mod:`buseg.prediction.windows` finished slab by slab (argmax, normalised entropy: the
uncertainty map), back to the image grid, the optional largest-component clean-up, then the
regions worth reviewing (:mod:`buseg.prediction.regions`, with the shape flags of
:mod:`buseg.prediction.shape_flags`). The Slicer module's background worker, ``buseg rank``
and scripts call it with an image :class:`~buseg.files.images.Volume` and a
:class:`~buseg.config.PredictConfig`.

Also here: loading a model for prediction and choosing its backend (torch or ONNX Runtime,
:mod:`buseg.prediction.onnx_backend`), and the memory a case needs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from buseg.catalogs.measures import measure, measure_names
from buseg.config import PredictConfig
from buseg.data.preprocessing import normalize_intensity
from buseg.data.resample import (
    WORKING_GRID_MEMORY_HINT,
    Grid,
    image_on_working_grid,
    maps_on_grid,
    model_working_spacing,
    same_spacing,
    working_grid,
)
from buseg.errors import ConfigError, InputError
from buseg.files.images import Volume
from buseg.memory import check_memory
from buseg.model.checkpoint import LoadedModel, load_model
from buseg.model.uncertainty import class_argmax, normalized_entropy
from buseg.prediction.onnx_backend import backend_description, choose_backend, load_session, session_forward
from buseg.prediction.regions import RegionSet, find_regions, review_slice_axis
from buseg.prediction.shape_flags import parse_nesting_rules, shape_flag_map
from buseg.prediction.windows import (
    FINISH_SLICES,
    Forward,
    Warn,
    passes_per_input,
    probability_chunks,
    probability_function,
    release_freed_memory,
)


@dataclass
class Prediction:
    """The result of :func:`predict_case`; every array lies on ``reference``'s grid (z, y, x).

    ``reference`` carries the input image's geometry and path; its ``array`` is a read-only
    placeholder of the image's shape (the prediction does not keep the image's voxels).
    """

    labels: np.ndarray  # class index per voxel (0 = background); label_values() gives the file values
    uncertainty_map: np.ndarray  # float32, normalised entropy of the mean probabilities, 0..1
    regions: RegionSet
    reference: Volume
    classes: list[dict[str, Any]]
    method: str
    passes: int  # forward passes per slice/window
    model_seconds: float
    seconds: float
    probabilities: np.ndarray | None = None  # (C, z, y, x) float32, only with keep_probabilities
    warnings: list[str] = field(default_factory=list)
    engine: str = "torch"  # which engine ran the network: 'torch' or 'onnx' (ONNX Runtime)

    def label_values(self) -> np.ndarray:
        """The label map in the model's label values (what the training labels used), smallest dtype."""
        lut = np.array([int(c["label_value"]) for c in self.classes])
        dtype = np.uint8 if lut.max() <= 255 else (np.uint16 if lut.max() <= 65535 else np.int32)
        return lut.astype(dtype)[self.labels]

    def statistics(self) -> dict[str, Any]:
        """Per-image numbers: mean uncertainty, voxel volume of each class."""
        voxel_mm3 = self.reference.voxel_volume_mm3
        # count_nonzero per class: bincount would first copy the labels as int64 (8 bytes per voxel).
        return {
            "mean_uncertainty": float(self.uncertainty_map.mean(dtype=np.float64)),
            "class_volumes_mm3": {
                c["name"]: float(np.count_nonzero(self.labels == c["index"]) * voxel_mm3)
                for c in self.classes[1:]
            },
        }


def inference_network(network: nn.Module, dimension: str) -> nn.Module:
    """A copy of ``network`` that computes the same in eval mode, faster on the CPU.

    Each Conv (or ConvTranspose) directly followed by a BatchNorm with running statistics is
    folded into one convolution (exact up to float rounding), and 2D networks use the
    channels-last memory layout (measured 2.5x faster for the U-Net on this CPU together).
    Dropout layers stay, so MC-dropout samples the same network. The caller's network is
    not changed.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fast = copy.deepcopy(network).eval()
    convolutions = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    norms = (nn.BatchNorm2d, nn.BatchNorm3d)
    for module in list(fast.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, norm = module[i], module[i + 1]
            if (
                isinstance(conv, convolutions)
                and isinstance(norm, norms)
                and norm.track_running_stats
                and norm.running_mean is not None
            ):
                transpose = isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d))
                module[i] = fuse_conv_bn_eval(conv, norm, transpose=transpose)
                module[i + 1] = nn.Identity()
    if dimension == "2d":
        fast = fast.to(memory_format=torch.channels_last)
    return fast


def network_device(network: nn.Module) -> torch.device:
    parameter = next(network.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _forward_for(network: nn.Module, device: torch.device, amp: bool, dimension: str) -> Forward:
    """The network call with the input in the network's memory layout, under autocast where the
    device runs mixed precision (:func:`buseg.device.autocast_dtype`); logits come back float32."""
    from buseg.device import autocast_dtype

    dtype = autocast_dtype(device) if amp else None
    layout = torch.channels_last if dimension == "2d" else torch.contiguous_format
    autocast = (
        (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    )

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = network(x.contiguous(memory_format=layout))
        # Back to float32 (softmax/entropy stay full precision) and to the standard layout, in one
        # copy: argmax/entropy over classes are ~10x slower on channels-last.
        return logits.to(torch.float32, memory_format=torch.contiguous_format)

    return forward


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Fixed dropout masks for this prediction without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def window_batch_size(config: PredictConfig, device: torch.device) -> int:
    """Windows per pass: the configured number, or 4 on a GPU and 1 on the CPU (measured: no faster
    with more on the CPU, and each window's activations take about 0.3 GB for the V-Net)."""
    if config.sw_batch_size > 0:
        return config.sw_batch_size
    return 1 if device.type == "cpu" else 4


def check_model_settings(model: LoadedModel, config: PredictConfig) -> None:
    """Refuse settings the model cannot honour (a measure that needs dropout, such as MC-dropout,
    without dropout layers)."""
    from buseg.model.networks import has_dropout

    if measure(config.uncertainty).needs_dropout and not has_dropout(model.network):
        others = " or ".join(name for name in measure_names() if not measure(name).needs_dropout)
        raise ConfigError(
            f"--uncertainty {config.uncertainty} needs a model with dropout layers; this model was trained "
            "without dropout",
            hint=f"use --uncertainty {others}",
        )


def largest_component_per_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep each class's largest 26-connected component; the other components become background."""
    from scipy import ndimage

    out = labels.copy()
    structure = np.ones((3,) * labels.ndim, dtype=bool)
    for index in range(1, num_classes):
        mask = labels == index
        if not mask.any():
            continue
        component, count = ndimage.label(mask, structure=structure)
        if count > 1:
            sizes = np.bincount(component[mask])
            sizes[0] = 0
            out[mask & (component != int(sizes.argmax()))] = 0
    return out


def _spacing_warning(model: LoadedModel, image: Volume) -> str | None:
    trained = model.metadata.get("spacing_mm")
    if model.dimension != "3d" or not trained or len(trained) != 3:
        return None
    ratios = [s / t for s, t in zip(image.spacing_mm, trained, strict=True) if t > 0]
    if ratios and (max(ratios) > 1.5 or min(ratios) < 1 / 1.5):
        return (
            f"voxel spacing {tuple(round(s, 3) for s in image.spacing_mm)} mm differs from the training "
            f"spacing {tuple(round(t, 3) for t in trained)} mm; a 3D model sees structures at another "
            "scale - resample the image to the training spacing for reliable results"
        )
    return None


def review_regions(
    model: LoadedModel,
    labels: np.ndarray,
    uncertainty: np.ndarray,
    reference: Volume,
    config: PredictConfig,
    nesting: Sequence[tuple[int, int]] = (),
) -> RegionSet:
    """The regions to review and the slice order (docs/inference.md): uncertainty and shape flags,
    cut along the slice axis a 2D model ran on (a 3D model's: the axis of the coarsest spacing)."""
    axis_ijk = model.slice_axis if model.dimension == "2d" else review_slice_axis(reference.spacing_mm)
    flags = None
    if config.shape_flags:
        flags = shape_flag_map(labels, model.num_classes, 2 - axis_ijk, nesting=nesting)
    return find_regions(
        uncertainty,
        reference,
        labels=labels,
        class_names=[c["name"] for c in model.classes],
        threshold=config.region_threshold,
        min_region_mm3=config.min_region_mm3,
        min_region_voxels=config.min_region_voxels,
        max_regions=config.max_regions,
        flags=flags,
        slice_axis_ijk=axis_ijk,
        region_slices=config.region_slices,
        region_extent_mm=config.region_extent_mm,
    )


def _check_finite_output(probs: torch.Tensor, model: LoadedModel, image: Volume) -> None:
    """NaN or infinite probabilities are an error, never a result: argmax would call every such
    voxel background and the entropy would call it certain."""
    if not bool(torch.isfinite(probs).all()):
        raise InputError(
            f"the network's output is not finite (NaN or infinity) for this image (model {model.path}); "
            "no segmentation is written",
            path=image.path,
            hint="check the image's intensities (values near the float limits?) and the model file",
        )


def _input_notes(model: LoadedModel, image: Volume) -> list[str]:
    """What the user should know about this input before trusting its segmentation."""
    notes = []
    message = _spacing_warning(model, image)
    if message:
        notes.append(message)
    if image.array.size and float(image.array.min()) == float(image.array.max()):
        notes.append(
            f"the image is constant (every voxel is {float(image.array.min()):g}): its segmentation carries "
            "no information"
        )
    return notes


def _backend_forward(
    model: LoadedModel, network: nn.Module, device: torch.device, config: PredictConfig
) -> tuple[str, Forward]:
    """The engine that runs this prediction and its batch -> float32 logits function."""
    engine, _ = choose_backend(config.engine, device, config.uncertainty, config.amp, model.dimension)
    if engine == "onnx":  # the same network exported once (cached), run by ONNX Runtime in float32
        session = load_session(model.network, lambda: network, model.dimension, model.path)[0]
        return engine, session_forward(session)
    return engine, _forward_for(network, device, config.amp, model.dimension)


class _CaseMaps:
    """The label, uncertainty (and optionally probability) maps of one case, filled chunk by chunk."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, keep_probabilities: bool) -> None:
        self.labels = np.zeros(shape, dtype=np.uint8 if num_classes <= 256 else np.int16)
        self.uncertainty = np.zeros(shape, dtype=np.float32)
        self.probabilities = np.zeros((num_classes, *shape), dtype=np.float32) if keep_probabilities else None

    def fill(self, axis: int, first: int, probs: torch.Tensor) -> None:
        """Store the chunk ``probs`` (N, C, ...) whose N entries start at index ``first`` along ``axis``."""
        label_view = np.moveaxis(self.labels, axis, 0)
        uncertainty_view = np.moveaxis(self.uncertainty, axis, 0)
        # A few slices at a time: the entropy's temporaries stay small for a large slab.
        for offset in range(0, probs.shape[0], FINISH_SLICES):
            part = probs[offset : offset + FINISH_SLICES]
            rows = slice(first + offset, first + offset + part.shape[0])
            label_view[rows] = class_argmax(part).cpu().numpy()
            uncertainty_view[rows] = normalized_entropy(part, dim=1).cpu().numpy()
            if self.probabilities is not None:
                np.moveaxis(self.probabilities, 1 + axis, 0)[rows] = part.cpu().numpy()


def _geometry_only(image: Volume) -> Volume:
    """The image's geometry without its voxels: a zero-stride placeholder of the right shape lets the
    caller free the image (300 MB for a 512x512x300 CT) before the outputs are written."""
    return Volume(
        np.broadcast_to(np.zeros((), dtype=np.float32), image.array.shape),
        image.spacing_mm,
        image.origin,
        image.direction,
        image.path,
    )


def _model_maps(
    model: LoadedModel,
    image: Volume,
    config: PredictConfig,
    keep_probabilities: bool,
    note: Warn,
    should_stop: Callable[[], bool] | None,
) -> tuple[str, _CaseMaps]:
    """The model's pass over the whole volume (slice batches or sliding windows): the engine that ran
    it and the label, uncertainty (and probability) maps it filled."""
    network = inference_network(model.network, model.dimension)
    device = network_device(network)
    engine, forward = _backend_forward(model, network, device, config)
    normalized = normalize_intensity(image.array, model.normalization)
    prob_fn = probability_function(network, config.uncertainty, config.samples, forward)
    maps = _CaseMaps(image.array.shape, model.num_classes, keep_probabilities)
    batch_size = config.slice_batch_size if model.dimension == "2d" else window_batch_size(config, device)
    with _seeded(config.seed, device), torch.inference_mode():
        axis, chunks = probability_chunks(
            prob_fn,
            normalized,
            dimension=model.dimension,
            patch_size_xyz=model.patch_size_xyz,
            slice_axis=model.slice_axis,
            device=device,
            batch_size=batch_size,
            overlap=config.overlap,
            stride_xyz=config.stride,
            warn=note,
            should_stop=should_stop,
        )
        try:
            for first, _, probs in chunks:
                _check_finite_output(probs, model, image)
                maps.fill(axis, first, probs)
                del probs
        except InputError as exc:  # the window settings refused for this image: name the image
            if exc.path is not None:
                raise
            raise InputError(exc.message, path=image.path, hint=exc.hint) from None
    return engine, maps


def _network_input(model: LoadedModel, image: Volume, config: PredictConfig) -> Volume:
    """The volume the network runs on: ``image`` itself, or ``image`` resampled to the working spacing
    the model was trained at (its outputs are brought back to ``image``'s grid by :func:`_image_grid_maps`).

    The working grid can be far larger than the image whose memory was estimated from its header: it
    is refused, naming the model file, before anything of that size is allocated.
    """
    working_spacing = model_working_spacing(model.metadata)
    if not working_spacing or same_spacing(image.spacing_mm, working_spacing):
        return image
    target = working_grid(Grid.of(image), working_spacing, path=model.path, whose="the model's")
    check_memory(
        prediction_memory_bytes(target.shape[::-1], model, config, network_device(model.network)),
        f"predicting {Path(image.path or 'the image').name} at the model's working spacing "
        f"({'x'.join(map(str, target.shape[::-1]))} voxels)",
        path=model.path,
        hint=WORKING_GRID_MEMORY_HINT,
    )
    return image_on_working_grid(image, working_spacing)


def _image_grid_maps(
    maps: _CaseMaps, network_input: Volume, image: Volume, keep_probabilities: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Label map, uncertainty map and (with ``keep_probabilities``) probabilities on ``image``'s grid.

    From a working grid the class probabilities are resampled and the label map and entropy computed
    from them on ``image``'s grid (:func:`~buseg.data.resample.maps_on_grid`), not the labels resampled.
    """
    if network_input is image:
        return maps.labels, maps.uncertainty, maps.probabilities
    return maps_on_grid(
        maps.probabilities, Grid.of(network_input), Grid.of(image), keep_probabilities=keep_probabilities
    )


def predict_case(
    model: LoadedModel,
    image: Volume,
    config: PredictConfig | None = None,
    *,
    keep_probabilities: bool = False,
    should_stop: Callable[[], bool] | None = None,
    warn: Warn | None = None,
) -> Prediction:
    """Segment ``image`` with ``model``: label map, uncertainty map and flagged regions.

    The image is normalised as in training (the model's normalisation over the whole volume).
    One path for every case: to the model's working grid (when it was trained at a working
    spacing), the network's pass there, the maps back on ``image``'s grid, then the clean-up
    and the regions to review on that grid. ``config`` supplies the uncertainty method,
    regions, windows and post-processing (its file and device fields are not used: the model
    is already on its device).
    """
    config = config or PredictConfig()
    check_model_settings(model, config)
    nesting = parse_nesting_rules(config.nesting, [c["name"] for c in model.classes])
    if image.array.ndim != 3:
        raise InputError(f"expected a 3D volume, got {image.array.ndim} dimensions", path=image.path)
    start = time.perf_counter()
    network_input = _network_input(model, image, config)
    notes = _input_notes(model, network_input)
    for message in notes if warn is not None else ():
        warn(message)

    def note(message: str) -> None:
        notes.append(message)
        if warn is not None:
            warn(message)

    model_start = time.perf_counter()
    keep = keep_probabilities or network_input is not image  # resampled from the probabilities
    engine, maps = _model_maps(model, network_input, config, keep, note, should_stop)
    model_seconds = time.perf_counter() - model_start
    labels, uncertainty, probabilities = _image_grid_maps(maps, network_input, image, keep_probabilities)
    del maps, network_input
    if config.largest_component:
        labels = largest_component_per_class(labels, model.num_classes)
    reference = _geometry_only(image)
    region_set = review_regions(model, labels, uncertainty, reference, config, nesting)
    release_freed_memory()
    spatial_dims = 2 if model.dimension == "2d" else 3
    return Prediction(
        labels=labels,
        uncertainty_map=uncertainty,
        regions=region_set,
        reference=reference,
        classes=model.classes,
        method=config.uncertainty,
        passes=passes_per_input(config.uncertainty, config.samples, spatial_dims),
        model_seconds=model_seconds,
        seconds=time.perf_counter() - start,
        probabilities=probabilities,
        warnings=notes,
        engine=engine,
    )


# --------------------------------------------------------------------------------------
# Loading a model for prediction, its backend, the memory a case needs


def load_for_prediction(config: PredictConfig) -> tuple[LoadedModel, torch.device, str]:
    """The model on the configured device (threads set), and why that device."""
    from buseg.device import configure_threads, resolve_device

    configure_threads(config.num_threads)
    device, reason = resolve_device(config.device)
    model = load_model(config.model_path, device=device)
    check_model_settings(model, config)
    # Refuse impossible settings before the first case.
    choose_backend(config.engine, device, config.uncertainty, config.amp, model.dimension)
    return model, device, reason


def backend_info(model: LoadedModel, config: PredictConfig, device: torch.device) -> dict[str, str]:
    """The engine of a prediction run and its arithmetic, in words (the run's device line and summary).

    With ONNX Runtime the network is exported (or its cached export loaded) here, so that an export
    failure stops the run before its first case.
    """
    engine, reason = choose_backend(config.engine, device, config.uncertainty, config.amp, model.dimension)
    info = {"engine": engine, "precision": backend_description(engine, reason, device, config.amp)}
    if engine == "onnx":
        inference_form = functools.partial(inference_network, model.network, model.dimension)
        info["onnx_export"] = load_session(model.network, inference_form, model.dimension, model.path)[1]
    return info


# Image, normalised copy, uncertainty, labels, region map, and the review's flag codes, region keys and
# chance-of-error map (predict_case, review_regions).
BYTES_PER_VOXEL = 26


def prediction_memory_bytes(
    size_xyz: Sequence[int], model: LoadedModel, config: PredictConfig, device: torch.device | str = "cpu"
) -> int:
    """Peak memory :func:`predict_case` needs for an image of ``size_xyz`` voxels (an upper estimate).

    Per voxel: the float32 image and its normalised copy, the uncertainty map, labels and the
    region map (:data:`BYTES_PER_VOXEL`). On top, 3D: the window-deep slab of blended
    probabilities (classes + 1 weight map, padded to the window) and a padded copy of a
    volume smaller than a window; 2D: one batch of slices resized to the training size and
    back, with their probabilities. Memory on a GPU is not counted (out-of-memory there is
    retried with fewer slices or windows).
    """
    sizes = [max(1, int(s)) for s in size_xyz]
    frames = int(np.prod(sizes[3:], dtype=np.int64))  # a 4D header: every frame is read
    size = ([*sizes[:3]] + [1] * (3 - len(sizes[:3])))[::-1]  # spatial, numpy order (z, y, x); 2D: depth 1
    voxels = int(np.prod(size, dtype=np.int64))
    classes = model.num_classes
    total = BYTES_PER_VOXEL * voxels * frames
    if model.dimension == "3d":
        roi = [int(s) for s in model.patch_size_xyz[::-1]]
        padded = [max(s, r) for s, r in zip(size, roi, strict=True)]
        total += (classes + 1) * roi[0] * padded[1] * padded[2] * 4
        if padded != size:
            total += int(np.prod(padded, dtype=np.int64)) * 4
        batch = window_batch_size(config, torch.device(device))
        total += batch * (classes + 2) * int(np.prod(roi, dtype=np.int64)) * 4
    else:
        axis = 2 - model.slice_axis
        plane = voxels // max(1, size[axis])
        patch = int(np.prod(model.patch_size_xyz, dtype=np.int64))
        total += config.slice_batch_size * (classes + 1) * (plane + patch) * 4 * 2
    return int(total)
