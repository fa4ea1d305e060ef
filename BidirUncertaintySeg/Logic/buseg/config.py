"""The one typed configuration of a training run and of a prediction run.

The command line, the Slicer module's parameter node and the console API all fill these
dataclasses; the checkpoint stores ``TrainConfig`` as plain JSON-compatible data so that a
model file says exactly how it was made. Every field has a default and a ``help`` text;
``buseg train --help`` is generated from them (see :func:`add_dataclass_arguments`).

Axis conventions: sizes a user types (``patch_size``) are in image order *x, y[, z]*, as
ITK and Slicer show them; arrays inside the engine are numpy order *(z, y, x)*.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from buseg.catalogs.data_sources import (
    data_source,
    data_source_help,
    data_source_names,
    data_source_option_owners,
)
from buseg.catalogs.measures import measure_help, measure_names
from buseg.catalogs.methods import method_entry, method_help, method_names, research_option_owner
from buseg.errors import ConfigError


def opt(
    default: Any,
    help: str | Callable[[], str],
    *,
    choices: tuple | Callable[[], tuple] | None = None,
    flag: str | None = None,
) -> Any:
    """A dataclass field with its documentation (used for ``--help``).

    ``help`` and ``choices`` may be functions, asked when they are used: the methods' come
    from :mod:`buseg.catalogs.methods`, which may gain a method after this module is loaded.
    """
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if flag is not None:
        metadata["flag"] = flag
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """Where the training images come from and how they are prepared."""

    source: str = opt(
        "files",
        lambda: f"Where the training data come from: {data_source_help()}",
        choices=data_source_names,
    )
    labeled: str | None = opt(
        None,
        "Labeled data: a folder with images/ and labels/ sub-folders, or a manifest (.csv or .json) "
        "listing image/label pairs (and optionally unlabeled and validation images). See docs/data.md.",
    )
    unlabeled: str | None = opt(None, "Unlabeled images: a folder of images or a manifest.")
    validation: str | None = opt(
        None,
        "Validation image/label pairs for model selection (folder or manifest); optional. Benchmark "
        "layouts: a list file of validation volume/case names (ACDC default: val.list).",
    )
    data_root: str | None = opt(
        None, "Root folder of a benchmark layout (the --source values that read one: acdc, la)."
    )
    labeled_count: int = opt(
        7,
        "Benchmark layouts only: number of labeled patients (ACDC: 3 or 7) or cases (LA: 4 or 8), "
        "taken from the start of the standard list; the rest of the training list is unlabeled.",
    )
    exclude_cases: list[str] = opt(
        [], "Benchmark layouts: case names left out of training entirely (held-out evaluation cases)."
    )
    normalization: Literal["auto", "zscore", "minmax", "percentile", "none"] = opt(
        "auto",
        "Intensity normalisation per image, recorded in the model and repeated at inference: "
        "'zscore' (mean 0, sd 1 over the image), 'minmax' (0..1), 'percentile' (0.5-99.5 percentile "
        "window to 0..1, robust for CT/MR), 'none'; 'auto' = minmax for 2D, zscore for 3D "
        "(the benchmark data's own preprocessing).",
        choices=("auto", "zscore", "minmax", "percentile", "none"),
    )
    resample_labels_to_image: bool = opt(
        False,
        "If a label's geometry differs from its image, resample the label (nearest neighbour) onto "
        "the image grid instead of refusing. Off by default: a mismatch usually means a wrong pairing.",
    )
    augment: bool = opt(
        True, "Random rot90/flip or rotation (2D) and crop/flip/rot90 (3D), as the reference."
    )


@dataclass
class ModelConfig:
    """The network and the geometry of its input."""

    dimension: Literal["2d", "3d"] = opt(
        "2d", "2d: slice-wise U-Net (ACDC style); 3d: patch-wise V-Net (LA style).", choices=("2d", "3d")
    )
    network: Literal["auto", "unet2d", "vnet"] = opt(
        "auto",
        "Network: 'unet2d' or 'vnet'; 'auto' picks from --dimension.",
        choices=("auto", "unet2d", "vnet"),
    )
    base_channels: int = opt(16, "Channels of the first level (doubled at each of the lower levels).")
    dropout: bool = opt(True, "Use dropout as the reference networks do (needed for MC-dropout).")
    patch_size: list[int] = opt(
        [256, 256],
        "Network input size in image order x y [z]: 2D slices are resized to it, 3D patches are "
        "cropped at it (reference: 256 256 for ACDC, 112 112 80 for LA).",
    )
    slice_axis: int = opt(2, "2D only: image axis (0=x, 1=y, 2=z) along which volumes are cut into slices.")
    working_spacing_mm: list[float] = opt(
        [],
        "Working resolution in mm, x y z: training volumes and labels are resampled to it, and "
        "prediction resamples each input to it and brings the outputs back to the input's grid "
        "(e.g. 1.25 1.25 1.25 halves each side of 0.625 mm LA volumes). Empty: the data's own spacing.",
    )


@dataclass
class OptimConfig:
    """Optimisation schedule (shared by every method)."""

    iterations: int = opt(30000, "Training iterations after pre-training (each one batch).")
    pretrain_iterations: int = opt(
        10000, "bcp/buarl only: supervised copy-paste pre-training iterations before self-training."
    )
    batch_size: int = opt(
        24,
        "Images per iteration. Semi-supervised methods split it into half labeled, half unlabeled "
        "(BCP: 24 = 12 labeled + 12 unlabeled, in two groups each).",
    )
    lr: float = opt(0.01, "Learning rate (SGD).")
    lr_schedule: Literal["constant", "poly", "step"] = opt(
        "constant",
        "'constant' (BCP ACDC), 'poly' (lr*(1-t)^0.9, SSL4MIS), 'step' (x lr_step_gamma every "
        "lr_step_iterations, BCP LA).",
        choices=("constant", "poly", "step"),
    )
    lr_step_iterations: int = opt(2500, "With lr_schedule=step: iterations between decays.")
    lr_step_gamma: float = opt(0.1, "With lr_schedule=step: decay factor.")
    self_training_lr: float | None = opt(
        None, "Learning rate for the self-training stage (bcp/buarl); default: same as --lr."
    )
    momentum: float = opt(0.9, "SGD momentum.")
    weight_decay: float = opt(1e-4, "SGD weight decay.")
    amp: bool = opt(
        True,
        "Mixed precision: bfloat16 autocast on a CPU that runs it natively (AVX512-BF16/AMX/ARM BF16; "
        "float32 elsewhere), bfloat16 or float16 on CUDA. --no-amp: float32 everywhere.",
    )
    channels_last: bool = opt(
        True,
        "Run 2D networks in the channels-last memory layout: faster convolutions, same results up "
        "to float rounding (3D networks stay channels-first; see docs/speed.md).",
    )
    compile: bool = opt(
        False,
        "torch.compile the student and teacher (needs a C++ compiler on the CPU; minutes of "
        "compilation first; see docs/speed.md).",
    )


@dataclass
class MethodConfig:
    """The semi-supervised method and its own parameters."""

    name: str = opt("buarl", method_help, choices=method_names, flag="--method")
    ema_decay: float = opt(0.99, "Teacher = exponential moving average of the student with this decay.")
    teacher_mode: Literal["eval", "train"] = opt(
        "eval",
        "Teacher forward mode: 'eval' (no dropout, running BatchNorm statistics; stable on small "
        "batches) or 'train' (the public BCP code's behaviour).",
        choices=("eval", "train"),
    )
    consistency_weight: float = opt(0.1, "mean-teacher: weight of the MSE consistency loss.")
    consistency_rampup_iterations: int | None = opt(
        None,
        "mean-teacher: sigmoid ramp-up length of the consistency weight (in iterations); default: the "
        "run's --iterations, so that the full weight is reached at the end of the run (the recipe's 12000 "
        "was for 30000 iterations).",
    )
    noise_std: float = opt(
        0.1, "mean-teacher: std of the Gaussian noise (clipped at 2 std) on teacher input."
    )
    mask_ratio: float = opt(2 / 3, "bcp/buarl: side of the copy-paste box as a fraction of each image side.")
    unlabeled_weight: float = opt(0.5, "bcp/buarl: loss weight of pseudo-labeled pixels (labeled: 1).")
    pseudo_label_lcc: bool = opt(
        True, "bcp/buarl: keep only the largest connected component per class in pseudo-labels."
    )
    model_weights: Literal["teacher", "student"] = opt(
        "teacher",
        "Methods with a teacher: which network validation scores and the model files hold - the EMA "
        "teacher (a running average of the student: steadier from checkpoint to checkpoint) or the "
        "student (what the public BCP code evaluates). 'teacher' gives the supervised baseline an EMA "
        "teacher too (one rule for every method). Copy-paste pre-training always uses the student.",
        choices=("teacher", "student"),
    )
    batchnorm_statistics: Literal["clean", "running"] = opt(
        "clean",
        "BatchNorm statistics of the network that validation scores and the model files hold: "
        "'clean' = re-estimated just before, on training images as the network meets them in use "
        "(labeled and unlabeled, augmented, not copy-paste mixed); 'running' = the running averages "
        "of training, which for copy-paste methods are statistics of mixed images (docs/method.md).",
        choices=("clean", "running"),
    )


@dataclass
class UncertaintyConfig:
    """How the voxel-wise uncertainty map is computed (training and inference alike)."""

    method: str = opt(
        "entropy",
        functools.partial(measure_help, training=True),
        choices=functools.partial(measure_names, training=True),
        flag="--uncertainty",
    )
    samples: int = opt(4, "mc-dropout: number of stochastic teacher passes.", flag="--uncertainty-samples")


@dataclass
class URLConfig:
    """URL: uncertainty-aware region learning on ground-truth (labeled) pixels."""

    enabled: bool = opt(
        True, "buarl: raise the loss weight of high-uncertainty labeled pixels.", flag="--url"
    )
    weight: float = opt(
        1.0,
        "Extra weight: a selected labeled pixel weighs (1 + url_weight) in CE and Dice (see docs/method.md).",
    )
    quantile: float = opt(
        0.8,
        "Labeled pixels whose uncertainty is above this quantile (per image, over its ground-truth "
        "pixels) form the high-uncertainty region.",
    )
    source: Literal["teacher", "student"] = opt(
        "student",
        "Uncertainty of labeled pixels from the teacher (its batched pass is extended to the labeled "
        "images) or from the student's own detached prediction (free).",
        choices=("teacher", "student"),
    )
    min_uncertainty: float = opt(
        0.05, "...and above this absolute normalised uncertainty (so that a confident image selects nothing)."
    )
    loss: Literal["ce", "ce+dice"] = opt(
        "ce+dice",
        "The extra term on the selected pixels: 'ce' = their cross-entropy (each selected pixel weighs "
        "1 + url_weight in CE); 'ce+dice' = also a soft Dice over the selected pixels alone.",
        choices=("ce", "ce+dice"),
    )
    selection: Literal["uncertainty", "random"] = opt(
        "uncertainty",
        "Which labeled pixels get the extra term: 'uncertainty' (URL); 'random' = a control: in every "
        "image as many truth pixels as URL would select there, drawn at random (if it does as well, "
        "the gain is extra labeled-pixel weight, not uncertainty).",
        choices=("uncertainty", "random"),
    )


@dataclass
class CRLConfig:
    """CRL: certainty-aware region learning on pseudo-labeled pixels."""

    # Off by default: on ACDC (3 seeds, docs/benchmarks.md) no CRL weighting added to URL alone,
    # and the pre-registered rule for the default picked URL alone.
    enabled: bool = opt(
        False,
        "buarl: also weigh pseudo-labeled pixels by the teacher's certainty (CRL, the paper's second "
        "direction; off by default: it did not add to URL on ACDC, docs/benchmarks.md).",
        flag="--crl",
    )
    mode: Literal["hard", "soft"] = opt(
        "hard",
        "'hard': pixels above the threshold get weight 0; 'soft': weight (1 - u/threshold) clipped to 0..1.",
        choices=("hard", "soft"),
    )
    threshold_mode: Literal["fixed", "quantile", "class-quantile", "ramp"] = opt(
        "class-quantile",
        "'fixed': normalised uncertainty threshold crl_threshold; 'quantile': keep the crl_quantile "
        "most certain pseudo-labeled pixels of the batch; 'class-quantile': the same within each "
        "pseudo-label class; 'ramp': threshold ramped from crl_threshold_start to crl_threshold "
        "over crl_ramp_iterations (UA-MT style).",
        choices=("fixed", "quantile", "class-quantile", "ramp"),
    )
    threshold: float = opt(0.5, "Normalised-uncertainty threshold (0..1; final value of the ramp).")
    threshold_start: float = opt(0.3, "ramp: threshold at the start of self-training.")
    ramp_iterations: int = opt(5000, "ramp: iterations over which the threshold rises.")
    loss: Literal["ce", "ce+dice"] = opt(
        "ce+dice",
        "Where the certainty weights act: 'ce' = in the pseudo-label cross-entropy only (the pseudo-label "
        "Dice stays over all pseudo-labeled pixels, as BCP's); 'ce+dice' = in both.",
        choices=("ce", "ce+dice"),
    )
    quantile: float = opt(
        0.8,
        "quantile, class-quantile: fraction of pseudo-labeled pixels (of each class) kept, most certain first.",
    )
    weighting: Literal["discard", "concentration", "foreground", "negative"] = opt(
        "concentration",
        "What the certainty c (from crl_mode and the threshold) does to pseudo-labeled pixels "
        "(equations in docs/method.md): 'discard' = weight c, uncertain pixels removed; "
        "'concentration' = every pixel keeps BCP's loss, plus crl_extra_weight x the loss over the "
        "certain pixels; 'foreground' = discard, but background pseudo-labels are never dropped and the "
        "dropped share shrinks to 0 over crl_shrink_iterations (U2PL); 'negative' = discard, plus "
        "'not class k' on uncertain pixels for classes the teacher gives < crl_negative_threshold (UPS).",
        choices=("discard", "concentration", "foreground", "negative"),
    )
    extra_weight: float = opt(1.0, "concentration: weight of the extra loss term over the certain pixels.")
    shrink_iterations: int | None = opt(
        None,
        "foreground: self-training iterations over which the dropped share falls linearly to 0 "
        "(default: the run's --iterations; 0: no shrinking).",
    )
    negative_threshold: float = opt(
        0.05, "negative: classes with teacher probability below this are learned as 'not this class'."
    )
    uncertainty_after_cleanup: bool = opt(
        False,
        "Where the largest-component clean-up changed a pseudo-label, take the uncertainty among the "
        "classes the clean-up left (the removed class excluded) instead of the raw teacher entropy.",
    )


@dataclass
class TrainConfig:
    """Everything that defines a training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    url: URLConfig = field(default_factory=URLConfig)
    crl: CRLConfig = field(default_factory=CRLConfig)
    init_weights: str | None = opt(
        None,
        "Start from this model file's weights (fine-tuning, or a shared supervised pre-training: with "
        "--pretrain-iterations 0 bcp/buarl self-train from it directly). Classes and network must match.",
    )
    out_dir: str = opt("runs/train", "Output folder (model files, logs); created if missing.", flag="--out")
    seed: int = opt(1337, "Random seed (data order, augmentation, masks, initialisation).")
    device: str = opt("auto", "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps.")
    num_threads: int = opt(0, "CPU threads for torch (0 = torch's default).")
    validation_interval: int = opt(200, "Iterations between validations (needs validation data; 0 = never).")
    checkpoint_interval: int = opt(
        500, "Iterations between resumable checkpoints (last.pt; 0 = only when cancelled)."
    )
    log_interval: int = opt(10, "Iterations between progress events/log lines.")

    def validate(self) -> TrainConfig:
        """Check values and combinations; raise :class:`ConfigError` naming the option."""
        m, o = self.model, self.optim
        if self.method.name not in method_names():
            raise ConfigError(
                f"--method must be one of {', '.join(method_names())}, not {self.method.name!r}"
            )
        expected = 2 if m.dimension == "2d" else 3
        if len(m.patch_size) != expected:
            raise ConfigError(
                f"--patch-size needs {expected} numbers for a {m.dimension} model, got {m.patch_size}"
            )
        if any(int(s) < 16 for s in m.patch_size):
            raise ConfigError(f"--patch-size must be at least 16 along each axis, got {m.patch_size}")
        divisor = 16
        if any(int(s) % divisor for s in m.patch_size):
            raise ConfigError(
                f"--patch-size {m.patch_size}: each size must be a multiple of {divisor} "
                "(the network halves the resolution four times)"
            )
        if (m.network == "unet2d" and m.dimension != "2d") or (m.network == "vnet" and m.dimension != "3d"):
            raise ConfigError(f"--network {m.network} does not fit --dimension {m.dimension}")
        if m.slice_axis not in (0, 1, 2):
            raise ConfigError(f"--slice-axis must be 0, 1 or 2, got {m.slice_axis}")
        if m.working_spacing_mm and (len(m.working_spacing_mm) != 3 or min(m.working_spacing_mm) <= 0):
            raise ConfigError(
                f"--working-spacing-mm needs three positive numbers (x y z), got {m.working_spacing_mm}"
            )
        if m.working_spacing_mm and not data_source(self.data.source).has_spacing:
            raise ConfigError(
                f"--working-spacing-mm: the {self.data.source} images carry no voxel spacing to resample from"
            )
        if o.iterations < 0 or o.pretrain_iterations < 0:
            raise ConfigError("--iterations and --pretrain-iterations must not be negative")
        semi = method_entry(self.method.name).uses_unlabeled
        min_batch = 4 if semi else 1
        if o.batch_size < min_batch or (semi and o.batch_size % 4):
            raise ConfigError(
                f"--batch-size {o.batch_size}: semi-supervised methods need a multiple of 4 "
                "(two labeled and two unlabeled groups)"
                if semi
                else f"--batch-size must be at least 1, got {o.batch_size}"
            )
        if not 0 < self.method.mask_ratio < 1:
            raise ConfigError(f"--mask-ratio must be in (0, 1), got {self.method.mask_ratio}")
        if not 0 <= self.method.ema_decay < 1:
            raise ConfigError(f"--ema-decay must be in [0, 1), got {self.method.ema_decay}")
        if not 0 < self.url.quantile < 1 or not 0 < self.crl.quantile <= 1:
            raise ConfigError("--url-quantile must be in (0, 1) and --crl-quantile in (0, 1]")
        if not 0 < self.crl.threshold <= 1 or not 0 < self.crl.threshold_start <= 1:
            raise ConfigError("--crl-threshold and --crl-threshold-start must be in (0, 1]")
        if self.crl.extra_weight < 0 or not 0 < self.crl.negative_threshold < 1:
            raise ConfigError("--crl-extra-weight must be >= 0 and --crl-negative-threshold in (0, 1)")
        if (self.crl.shrink_iterations or 0) < 0 or (self.method.consistency_rampup_iterations or 0) < 0:
            raise ConfigError(
                "--crl-shrink-iterations and --consistency-rampup-iterations must not be negative"
            )
        if self.uncertainty.method not in measure_names(training=True):
            raise ConfigError(
                f"--uncertainty must be one of {', '.join(measure_names(training=True))} in training, "
                f"not {self.uncertainty.method!r}"
            )
        if self.uncertainty.samples < 1:
            raise ConfigError("--uncertainty-samples must be at least 1")
        if self.validation_interval < 0 or self.checkpoint_interval < 0 or self.log_interval < 1:
            raise ConfigError(
                "--validation-interval and --checkpoint-interval must not be negative (0 = never), "
                "--log-interval must be at least 1"
            )
        self._check_ranges()
        if self.data.source == "files" and not self.data.labeled:
            raise ConfigError("--labeled is required (a folder or a manifest of labeled images)")
        if data_source(self.data.source).needs_data_root and not self.data.data_root:
            raise ConfigError(f"--data-root is required with --source {self.data.source}")
        self._refuse_options_of_other_sources()
        return self

    def _refuse_options_of_other_sources(self) -> None:
        """An option that only other data sources read would be silently ignored: refused instead."""
        defaults = DataConfig()
        for f in dataclasses.fields(DataConfig):
            owners = data_source_option_owners(f"data.{f.name}")
            if (
                owners
                and self.data.source not in owners
                and getattr(self.data, f.name) != getattr(defaults, f.name)
            ):
                raise ConfigError(
                    f"{_flag_for('data', f)} is read only with --source {' or '.join(owners)}, "
                    f"not with --source {self.data.source}"
                )

    def _check_ranges(self) -> None:
        """Numbers outside what they can mean: a negative learning rate, a momentum of 5, a
        network without channels (torch would fail with a traceback, or train on nonsense)."""
        o, m = self.optim, self.method
        checks = [
            (o.lr > 0, f"--lr must be positive, got {o.lr}"),
            (
                o.self_training_lr is None or o.self_training_lr > 0,
                f"--self-training-lr must be positive, got {o.self_training_lr}",
            ),
            (o.weight_decay >= 0, f"--weight-decay must not be negative, got {o.weight_decay}"),
            (0 <= o.momentum < 1, f"--momentum must be in [0, 1), got {o.momentum}"),
            (
                o.lr_step_iterations >= 1,
                f"--lr-step-iterations must be at least 1, got {o.lr_step_iterations}",
            ),
            (0 < o.lr_step_gamma <= 1, f"--lr-step-gamma must be in (0, 1], got {o.lr_step_gamma}"),
            (
                self.model.base_channels >= 1,
                f"--base-channels must be at least 1, got {self.model.base_channels}",
            ),
            (
                m.consistency_weight >= 0,
                f"--consistency-weight must not be negative, got {m.consistency_weight}",
            ),
            (m.noise_std >= 0, f"--noise-std must not be negative, got {m.noise_std}"),
            (m.unlabeled_weight >= 0, f"--unlabeled-weight must not be negative, got {m.unlabeled_weight}"),
            (self.url.weight >= 0, f"--url-weight must not be negative, got {self.url.weight}"),
            (
                0 <= self.url.min_uncertainty <= 1,
                f"--url-min-uncertainty must be in [0, 1], got {self.url.min_uncertainty}",
            ),
            (
                self.crl.ramp_iterations >= 0,
                f"--crl-ramp-iterations must not be negative, got {self.crl.ramp_iterations}",
            ),
            (
                self.data.labeled_count >= 1,
                f"--labeled-count must be at least 1, got {self.data.labeled_count}",
            ),
            (self.seed >= 0, f"--seed must not be negative, got {self.seed}"),
            (
                self.num_threads >= 0,
                f"--num-threads must be 0 (torch's default) or more, got {self.num_threads}",
            ),
        ]
        for fine, message in checks:
            if not fine:
                raise ConfigError(message)

    @property
    def network_name(self) -> str:
        if self.model.network != "auto":
            return self.model.network
        return "unet2d" if self.model.dimension == "2d" else "vnet"


@dataclass
class PredictConfig:
    """Everything that defines an inference run (``buseg predict`` and ``buseg rank``)."""

    model_path: str = opt("", "Model file written by `buseg train` (best.pt or final model).", flag="--model")
    out_dir: str = opt("predictions", "Output folder; one sub-folder per input case.", flag="--out")
    uncertainty: str = opt(
        "entropy",
        lambda: f"{measure_help()} See docs/inference.md for what each means and costs.",
        choices=measure_names,
    )
    samples: int = opt(
        8, "Passes for mc-dropout; tta uses the first min(samples, 4 in 2D / 8 in 3D) flip combinations."
    )
    seed: int = opt(0, "Random seed of the mc-dropout masks (same seed, same maps).")
    region_threshold: float = opt(
        0.5, "Voxels with normalised uncertainty above this are candidates for flagged regions."
    )
    min_region_mm3: float = opt(10.0, "Flagged regions smaller than this volume (mm^3) are dropped.")
    min_region_voxels: int = opt(4, "...and flagged regions of fewer voxels than this are dropped too.")
    max_regions: int = opt(50, "At most this many regions are listed, most worth reviewing first (0 = all).")
    region_slices: int = opt(
        1,
        "A listed region spans at most this many consecutive slices along the slice axis (a band of "
        "uncertainty around a whole structure is cut into one region per slab of slices).",
    )
    region_extent_mm: float = opt(
        64.0,
        "Regions wider than this (mm) in the slice plane are cut into equal tiles no wider (0 = not cut); "
        "64 mm: about a quarter of a band around a heart (docs/benchmarks.md, review guidance).",
    )
    shape_flags: bool = opt(
        True,
        "Also flag confident misses from shape: a class missing or extra on one slice, an abrupt change "
        "of area between slices, detached fragments, --nesting violations (docs/inference.md).",
    )
    nesting: list[str] = opt(
        [],
        "Anatomy rules INNER:OUTER with the model's class names (e.g. 'left ventricle:myocardium': the "
        "cavity is enclosed by the wall); gaps in OUTER around INNER are flagged.",
    )
    largest_component: bool = opt(False, "Keep only the largest connected component of each class.")
    overlap: float = opt(0.5, "3D: sliding-window overlap (0..<1); --stride overrides it.")
    stride: list[int] | None = opt(
        None, "3D: sliding-window stride in image order x y z (reference LA: 18 18 4)."
    )
    sw_batch_size: int = opt(
        0,
        "3D: windows per forward pass; 0 = automatic: 4 on a GPU, 1 on the CPU (where larger batches are no "
        "faster but need about 0.3 GB more per window). Lowered automatically on out-of-memory.",
    )
    slice_batch_size: int = opt(16, "2D: slices per forward pass (lowered automatically on out-of-memory).")
    output_format: Literal["auto", "nii.gz", "nii", "nrrd", "mha"] = opt(
        "auto",
        "File format of the label and uncertainty maps; 'auto' = the input's format.",
        choices=("auto", "nii.gz", "nii", "nrrd", "mha"),
    )
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps.")
    num_threads: int = opt(0, "CPU threads for torch (0 = torch's default).")
    amp: bool = opt(
        True,
        "Mixed precision: bfloat16 autocast on a CPU that runs it natively (AVX512-BF16/AMX/ARM BF16; "
        "float32 elsewhere), bfloat16 or float16 on CUDA. --no-amp: float32 everywhere.",
    )
    engine: Literal["auto", "torch", "onnx"] = opt(
        "auto",
        "What runs the network: 'torch', or 'onnx' (ONNX Runtime, float32, CPU only; entropy and tta, not "
        "mc-dropout; the network is exported once to <model>.onnx beside the model file). 'auto': ONNX "
        "Runtime for a 3D model on a CPU without native bfloat16 when it is installed (pip install "
        "'buseg[onnx]') and --amp is on, else torch (for 2D models ONNX Runtime was measured no faster). "
        "Speeds per engine: docs/inference.md.",
        choices=("auto", "torch", "onnx"),
    )
    overwrite: bool = opt(False, "Replace existing outputs of the same case (never done silently).")

    def validate(self) -> PredictConfig:
        """Check values; raise :class:`ConfigError` naming the option."""
        if not self.model_path:
            raise ConfigError("--model is required (a model file written by `buseg train`)")
        if self.uncertainty not in measure_names():
            raise ConfigError(
                f"--uncertainty must be one of {', '.join(measure_names())}, not {self.uncertainty!r}"
            )
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}")
        if not 0 <= self.region_threshold < 1:
            raise ConfigError(f"--region-threshold must be in [0, 1), got {self.region_threshold}")
        if self.min_region_mm3 < 0 or self.min_region_voxels < 0 or self.max_regions < 0:
            raise ConfigError("--min-region-mm3, --min-region-voxels and --max-regions must not be negative")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"--overlap must be in [0, 1), got {self.overlap}")
        if self.stride is not None and (len(self.stride) != 3 or any(int(s) < 1 for s in self.stride)):
            raise ConfigError(f"--stride needs three positive numbers (x y z), got {self.stride}")
        if self.sw_batch_size < 0 or self.slice_batch_size < 1:
            raise ConfigError("--sw-batch-size must be 0 (automatic) or more, --slice-batch-size at least 1")
        if self.engine not in ("auto", "torch", "onnx"):
            raise ConfigError(f"--engine must be auto, torch or onnx, not {self.engine!r}")
        if self.region_slices < 1 or self.region_extent_mm < 0:
            raise ConfigError("--region-slices must be at least 1 and --region-extent-mm not negative")
        if self.seed < 0 or self.num_threads < 0:
            raise ConfigError(
                f"--seed and --num-threads must not be negative, got {self.seed}, {self.num_threads}"
            )
        return self


# --------------------------------------------------------------------------------------
# Plain-data round trip (checkpoint metadata, JSON config files, the Slicer parameter node)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as JSON-compatible nested dicts."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, data: dict[str, Any], *, where: str = "config") -> Any:
    """Build a config dataclass from nested dicts, refusing unknown keys (typos must not pass)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, where=f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
            choices = _asked(known[name].metadata.get("choices"))
            if choices is not None and kwargs[name] is not None and kwargs[name] not in choices:
                raise ConfigError(
                    f"{where}.{name}: {kwargs[name]!r} is not one of {', '.join(map(str, choices))}"
                )
    return cls(**kwargs)


def _asked(value: Any) -> Any:
    """A field's help or choices: the function's answer where it is a function (see :func:`opt`)."""
    return value() if callable(value) else value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: must not be empty")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    return _coerce_scalar(value, hint, where)


def _coerce_scalar(value: Any, hint: Any, where: str) -> Any:
    """``value`` as a ``hint`` (bool, int, float, str), or :class:`ConfigError`.

    Strict as JSON types are: only true and false are booleans (``[0]`` or ``"maybe"`` must not
    turn an option on), only whole numbers are integers (not ``true``, not ``2.5``; ``3.0`` is 3),
    numbers are numbers (not strings, not booleans), and text is text (a list must not become its
    repr). Command-line values arrive here already typed by argparse.
    """
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and is_number and (isinstance(value, int) or value.is_integer()):
        return int(value)
    if hint is float and is_number:
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if hint not in (bool, int, float, str):
        return value
    expected = {
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "text",
    }[hint]
    raise ConfigError(f"{where}: {value!r} is not {expected}")


# --------------------------------------------------------------------------------------
# Presets: named settings for a kind of run, applied before the user's own flags

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # 3D training on a 2-core CPU in under an hour (docs/benchmarks.md, LA: what each setting gave).
    # float32: a short LA run learned far more in float32 than in bfloat16 (docs/benchmarks.md).
    "cpu-3d": {
        "model.dimension": "3d",
        "model.working_spacing_mm": [1.25, 1.25, 1.25],
        "model.base_channels": 8,
        "model.patch_size": [64, 64, 32],
        "optim.batch_size": 4,
        "optim.pretrain_iterations": 1000,
        "optim.iterations": 1000,
        "optim.lr_schedule": "poly",
        "optim.amp": False,
        "validation_interval": 250,
    },
}


def apply_preset(config: TrainConfig, name: str) -> TrainConfig:
    """Set the fields of preset ``name`` on ``config`` (flags the user gives are applied after)."""
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"--preset {name!r} is not a preset; presets: {', '.join(TRAIN_PRESETS)}")
    for key, value in TRAIN_PRESETS[name].items():
        *sections, field_name = key.split(".")
        target = config
        for section in sections:
            target = getattr(target, section)
        hint = typing.get_type_hints(type(target))[field_name]
        setattr(target, field_name, _coerce(value, hint, f"preset {name}: {key}"))
    return config


def save_json(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")


# --------------------------------------------------------------------------------------
# Command-line flags generated from the dataclasses


def _flag_for(prefix: str, f: dataclasses.Field) -> str:
    if "flag" in f.metadata:
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    if prefix in ("url", "crl") or (prefix == "uncertainty"):
        return f"--{prefix}-{name}"
    return f"--{name}"


def _owner_group(parser: argparse.ArgumentParser, dest: str) -> Any:
    """The ``--help`` group of an option that belongs to some methods or data sources (the catalogs
    say which: a method's research options, the benchmark layouts' options), or None."""
    method = research_option_owner(dest)
    sources = data_source_option_owners(dest)
    if method is not None:
        title = f"research options of {method}"
        description = (
            "The ablations' variants and controls; the defaults are the measured choices (docs/method.md)."
        )
    elif sources:
        title = f"options of --source {' and '.join(sources)}"
        description = "Read only by these data sources; another source refuses them."
    else:
        return None
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title, description)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--flag`` per (nested) field of ``cls``, with its help text and default."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    section = (
        parser
        if not prefix
        else parser.add_argument_group(f"{prefix} options", (cls.__doc__ or "").strip().splitlines()[0])
    )
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            add_dataclass_arguments(parser, hint, prefix=f.name)
            continue
        flag = _flag_for(prefix, f)
        dest = f"{prefix}.{f.name}" if prefix else f.name
        group = _owner_group(parser, dest) or section
        default = getattr(defaults, f.name)
        help_text = _asked(f.metadata.get("help", ""))
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        base_hint = base[0] if typing.get_origin(hint) is not list else hint
        if base_hint is bool:
            group.add_argument(
                flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (default: {'on' if default else 'off'})",
            )
        elif typing.get_origin(base_hint) is list:
            item = typing.get_args(base_hint)[0]
            group.add_argument(
                flag,
                dest=dest,
                nargs="+",
                type=item,
                default=None,
                metavar="N",
                help=f"{help_text} (default: {' '.join(map(str, default)) if default else 'none'})",
            )
        else:
            choices = _asked(f.metadata.get("choices"))
            typ = (
                typing.get_args(base_hint)[0].__class__
                if typing.get_origin(base_hint) is Literal
                else base_hint
            )
            if typ not in (int, float, str):
                typ = str
            group.add_argument(
                flag,
                dest=dest,
                type=typ,
                choices=choices,
                default=None,
                metavar=None if choices else f.name.upper(),
                help=f"{help_text} (default: {default})",
            )


def apply_arguments(config: Any, args: argparse.Namespace, prefix: str = "") -> Any:
    """Copy the flags the user gave (not None) onto ``config``; return it."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if dataclasses.is_dataclass(hints[f.name]):
            apply_arguments(getattr(config, f.name), args, prefix=f.name)
            continue
        dest = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(args, dest, None)
        if value is not None:
            setattr(config, f.name, _coerce(value, hints[f.name], _flag_for(prefix, f)))
    return config
