"""The one training loop.

Every method (supervised, mean teacher, BCP, ours) runs through :func:`train`: the loop
samples batches, asks the method for its loss, optimises the student, updates the EMA
teacher, validates, writes checkpoints and reports events; methods only compute losses
(:mod:`buseg.training.methods`).

Outputs in ``config.out_dir``:

* ``config.json`` - the run's configuration;
* ``last.pt`` - resumable checkpoint (student, teacher, optimizer, iteration, random
  states, history), written every ``checkpoint_interval`` iterations, on cancel and at the end;
* ``best.pt`` - model file of the best validation score (if validation data are given);
* ``final.pt`` - model file of the last iteration; ``model.pt`` - the one to use
  (best.pt if there was validation, else final.pt);
* ``history.json`` - losses and validation scores over iterations (learning curves).

A run interrupted (cancel, kill) and resumed with ``resume=True`` ends with the same
weights as an uninterrupted run on the CPU with the same seed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from buseg import __version__
from buseg.config import TrainConfig, _flag_for, from_dict, to_dict
from buseg.data.sampling import PatchSampler, SliceSampler
from buseg.data.training_data import TrainingData, load_training_data
from buseg.device import autocast_dtype, configure_threads, precision_description, resolve_device
from buseg.errors import BusegError, Cancelled, ConfigError, OutputError, ResourceError
from buseg.events import EventSink, split_logs
from buseg.files.images import read_json, resolved_path
from buseg.files.safe_files import TEMPORARY_PREFIX, FolderLock, file_in_the_way, write_json_atomic
from buseg.metrics import dice_per_class
from buseg.model.checkpoint import read_checkpoint, save_checkpoint
from buseg.model.networks import build_network, channels_last_format, to_channels_last
from buseg.model.uncertainty import class_argmax
from buseg.prediction.windows import is_out_of_memory, predict_probabilities
from buseg.training.distributed import DistributedContext, init_distributed
from buseg.training.methods import Batch, Method, StepContext, build_method, method_entry

logger = logging.getLogger("buseg")

OUTPUT_FILES = ("last.pt", "best.pt", "final.pt", "model.pt", "history.json", "config.json")
LOCK_NAME = "train.lock"
# Fields that may differ when resuming (where and how fast it runs, not what it computes).
RESUME_MAY_CHANGE = ("device", "num_threads", "log_interval")


@dataclass
class TrainResult:
    status: str
    out_dir: Path
    model_path: Path | None
    last_path: Path
    best_path: Path | None
    best_metric: float | None
    best_iteration: int | None
    iterations: int
    history: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Output folder: lock and no silent overwrite


def prepare_output_folder(
    out_dir: Path, *, resume: bool, overwrite: bool, lock: FolderLock | None = None
) -> None:
    """Create the folder, take its ``lock`` (a running training there is reported before anything
    else), refuse to replace a previous training, and remove temporary files that a killed
    training left behind."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_in_the_way(out_dir) or OutputError(
            f"cannot create the output folder: {exc.strerror}", path=out_dir
        ) from None
    if not os.access(out_dir, os.W_OK):
        raise OutputError("output folder is not writable", path=out_dir)
    if lock is not None:
        lock.acquire()
    try:
        existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
        if resume:
            if not (out_dir / "last.pt").exists():
                raise OutputError("nothing to resume: no last.pt in this folder", path=out_dir)
        elif existing and not overwrite:
            raise OutputError(
                f"holds a previous training ({', '.join(existing)})",
                path=out_dir,
                hint="use --resume to continue it, --overwrite to replace it, or another --out folder",
            )
    except OutputError:
        if lock is not None:
            lock.release()
        raise
    # Temporary files of safe_files.atomic_path that a killed training left; only the lock holder may
    # remove them (another training could be writing its own).
    for stale in _stale_temporaries(out_dir):
        with contextlib.suppress(OSError):
            stale.unlink()


def _stale_temporaries(out_dir: Path) -> list[Path]:
    """The temporary files of this folder's own output files: buseg's temporary names
    ('.buseg-tmp-last.pt.<random>.pt'), and those of earlier versions ('.last.pt.<8 random>.tmp.pt')
    in exactly that form. A user's file is never taken for one, nor another job's (a prediction
    may write here under its own lock)."""
    import re

    found = []
    for name in OUTPUT_FILES:
        suffix = re.escape(Path(name).suffix)
        current = rf"{re.escape(TEMPORARY_PREFIX + name)}\.[a-z0-9_]{{8}}{suffix}"
        old = rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp{suffix}"
        pattern = re.compile(rf"^({current}|{old})$")
        found += [
            p for p in out_dir.glob(".*") if pattern.match(p.name) and p.is_file() and not p.is_symlink()
        ]
    return found


# --------------------------------------------------------------------------------------
# Pieces of the loop


def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> None:
    """teacher = decay * teacher + (1 - decay) * student, for parameters and BatchNorm statistics.

    The decay is warmed up as min(1 - 1/(step + 1), decay) (SSL4MIS). BatchNorm running
    statistics are averaged too: a teacher in eval mode never updates its own, and stale
    statistics would make its predictions drift from its weights.
    """
    alpha = min(1.0 - 1.0 / (step + 1), decay)
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
            t.mul_(alpha).add_(s.detach(), alpha=1 - alpha)
        for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
            if t.dtype.is_floating_point:
                t.mul_(alpha).add_(s.detach(), alpha=1 - alpha)
            else:
                t.copy_(s)


# Batches of clean training images that re-estimate BatchNorm statistics (method.batchnorm_statistics):
# 16 x 24 slices (2D presets) settle the running means to within a few percent of 32 batches.
BATCHNORM_BATCHES = 16


def with_clean_batchnorm(network: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """A copy of ``network`` whose BatchNorm statistics are the plain averages over ``batches``
    (torch's ``swa_utils.update_bn``: running statistics reset, cumulative averaging, train mode).

    Copy-paste training normalises mixed images, so the running statistics a BCP-style student
    accumulates - and its EMA teacher inherits - describe images the network never meets in use;
    measured on the demo's data, the teacher scored 28 Dice with them and 51 with clean ones ten
    iterations into self-training (docs/method.md). The network itself is left as it is."""
    copy_ = copy.deepcopy(network)
    torch.optim.swa_utils.update_bn(batches, copy_)
    return copy_.eval()


def clean_batchnorm_batches(
    labeled: SliceSampler | PatchSampler,
    unlabeled: SliceSampler | PatchSampler | None,
    batch_size: int,
    seed: int,
    iteration: int,
) -> Iterator[torch.Tensor]:
    """The batches whose statistics a model file of ``iteration`` carries: training images as they
    come before mixing, labeled and unlabeled alternately, from a generator of their own (the
    training's random stream is not touched, so a resumed run draws the same)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + iteration)
    for index in range(BATCHNORM_BATCHES):
        sampler = unlabeled if index % 2 and unlabeled is not None else labeled
        yield sampler.sample(batch_size, generator)[0]


def has_batchnorm(network: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())


def learning_rate(config: TrainConfig, stage: str, stage_iteration: int, stage_length: int) -> float:
    o = config.optim
    base = (
        o.self_training_lr
        if (
            stage == "train"
            and o.self_training_lr is not None
            and o.pretrain_iterations
            and method_entry(config.method.name).has_pretraining_stage
        )
        else o.lr
    )
    if o.lr_schedule == "poly":
        return base * (1 - stage_iteration / max(1, stage_length)) ** 0.9
    if o.lr_schedule == "step":
        return base * o.lr_step_gamma ** (stage_iteration // max(1, o.lr_step_iterations))
    return base


def evaluate(
    network: nn.Module,
    data: TrainingData,
    config: TrainConfig,
    device: torch.device,
    forward: Callable[[torch.Tensor], torch.Tensor],
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float] | None:
    """Mean foreground Dice (and per class) of ``network`` on the validation volumes.

    Returns None if ``should_stop`` turned True between cases (a cancel need not wait for
    a long validation).
    """
    was_training = network.training
    network.eval()
    per_class = []
    try:
        for case in data.validation:
            if should_stop is not None and should_stop():
                return None
            probabilities = predict_probabilities(
                forward,
                case.image,
                dimension=config.model.dimension,
                patch_size_xyz=config.model.patch_size,
                slice_axis=config.model.slice_axis,
                device=device,
            )
            prediction = class_argmax(case.to_case_grid(probabilities)[None], torch.int64)[0].numpy()
            per_class.append(dice_per_class(prediction, case.labels, range(1, data.num_classes)))
    finally:
        network.train(was_training)
    scores = np.array(per_class)
    metrics = {"dice": float(scores.mean())}
    for cls, value in zip(data.classes[1:], scores.mean(axis=0), strict=True):
        metrics[f"dice/{cls['name']}"] = float(value)
    return metrics


def model_metadata(
    config: TrainConfig, data: TrainingData, iteration: int, extra: dict[str, Any] | None = None
) -> dict:
    return {
        "method": config.method.name,
        "dimension": config.model.dimension,
        "network": {
            "name": config.network_name,
            "in_channels": 1,
            "num_classes": data.num_classes,
            "base_channels": config.model.base_channels,
            "dropout": config.model.dropout,
        },
        "classes": data.classes,
        "normalization": data.normalization,
        "patch_size": [int(s) for s in config.model.patch_size],
        "slice_axis": config.model.slice_axis,
        "spacing_mm": data.spacing_mm,
        "iteration": iteration,
        "config": to_dict(config),
        "training_data": {
            "labeled_cases": data.labeled_case_names,
            "unlabeled_cases": data.unlabeled_case_names,
            "labeled_images": len(data.labeled_images),
            "unlabeled_images": len(data.unlabeled_images),
        },
        "buseg_version": __version__,
        **(extra or {}),
    }


def _random_states(generator: torch.Generator) -> dict[str, Any]:
    states: dict[str, Any] = {"sampler": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_random_states(
    state: dict[str, Any], generator: torch.Generator, dist: DistributedContext, seed: int, iteration: int
) -> None:
    """Restore this rank's random states; under torchrun each rank has its own (``random_per_rank``)."""
    per_rank = state.get("random_per_rank") or [state["random"]]
    if dist.rank < len(per_rank) and len(per_rank) == dist.world_size:
        _set_random_states(per_rank[dist.rank], generator)
        return
    # Resumed with another number of processes: rank 0 continues its own stream; the
    # others start fresh streams (the run stays valid, only not bit-identical).
    _set_random_states(per_rank[0], generator)
    if dist.rank:
        generator.manual_seed(seed + 1000 * dist.rank + iteration)
        torch.manual_seed(seed + dist.rank + iteration)


def _set_random_states(states: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(states["sampler"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Sections of the config that say what a run learns from and what it builds: a resume never
# changes them, so a flag that names other values means last.pt is not the run the user means.
RESUME_SAME_RUN = ("data", "model")


def _same_run_fields() -> dict[str, str]:
    """Dotted name -> command-line flag of every field of :data:`RESUME_SAME_RUN`."""
    names = {}
    for section in RESUME_SAME_RUN:
        for f in dataclasses.fields(getattr(TrainConfig(), section)):
            names[f"{section}.{f.name}"] = _flag_for(section, f)
    return names


def _field(config: dict[str, Any], dotted: str) -> Any:
    section, name = dotted.split(".")
    values = config.get(section)
    return values.get(name) if isinstance(values, dict) else None


def _same_value(a: Any, b: Any) -> bool:
    """Equal, or (paths of data) the same file or folder whichever way it was written."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):
        return resolved_path(Path(a).expanduser()) == resolved_path(Path(b).expanduser())
    return False


def _differences(ours: dict[str, Any], theirs: dict[str, Any], fields: dict[str, str]) -> list[str]:
    return [
        f"{flag} {_field(ours, name)!r} / {_field(theirs, name)!r}"
        for name, flag in fields.items()
        if not _same_value(_field(ours, name), _field(theirs, name))
    ]


def check_resume_is_the_same_run(
    config: TrainConfig, stored: dict[str, Any], out_dir: Path, given: Collection[str] | None = None
) -> None:
    """Refuse a resume whose last.pt was written by another run, before anything is replaced.

    Two signs: data or model settings the user asked for (``given``: the dotted names of the
    fields set on the command line or in its --config file; None: every field that differs from
    its default) that differ from last.pt's, and a folder whose config.json (the run that wrote
    its model.pt and final.pt) names other data or model settings than last.pt. Resuming would
    otherwise replace those model files with a network of another run.
    """
    fields = _same_run_fields()
    asked = to_dict(config)
    if given is None:
        defaults = to_dict(TrainConfig())
        wanted = {n: f for n, f in fields.items() if _field(asked, n) != _field(defaults, n)}
    else:
        wanted = {n: f for n, f in fields.items() if n in given}
    differ = _differences(asked, stored, wanted)
    if differ:
        raise ConfigError(
            "was written by a training with other data or model settings than given here (given / in last.pt): "
            + "; ".join(differ),
            path=out_dir / "last.pt",
            hint="resume with the settings of that run (or only --resume --out), or start a new training "
            "in another --out folder",
        )
    folder_config = out_dir / "config.json"
    if folder_config.is_file():
        written = read_json(folder_config, what="training config", error=ConfigError)
        differ = _differences(written if isinstance(written, dict) else {}, stored, fields)
        if differ:
            raise ConfigError(
                "comes from another run than this folder's config.json, model.pt and final.pt "
                "(config.json / last.pt): " + "; ".join(differ),
                path=out_dir / "last.pt",
                hint="resuming would replace this folder's model files with another run's network; "
                "move last.pt away, or use --overwrite to start this folder's training afresh",
            )


def _resume_config(config: TrainConfig, stored: dict[str, Any], sink: EventSink) -> TrainConfig:
    """The stored config wins on resume (except where/how fast it runs); differences are reported."""
    resumed = from_dict(TrainConfig, stored, where="checkpoint config")
    for name in RESUME_MAY_CHANGE:
        setattr(resumed, name, getattr(config, name))
    resumed.out_dir = config.out_dir
    given, kept = to_dict(config), to_dict(resumed)
    changed = [
        f"{section}.{key}"
        for section, values in given.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if kept[section].get(key) != value
    ]
    if changed:
        sink.emit(
            "warning",
            message="resuming with the configuration stored in last.pt; ignored: " + ", ".join(changed[:12]),
            detail={"ignored": changed},
        )
    return resumed


# --------------------------------------------------------------------------------------
# The loop


def train(
    config: TrainConfig,
    *,
    events: EventSink | None = None,
    resume: bool = False,
    overwrite: bool = False,
    should_stop: Callable[[], bool] | None = None,
    data: TrainingData | None = None,
    given: Collection[str] | None = None,
) -> TrainResult:
    """Train a model as ``config`` says; returns where the outputs are.

    ``should_stop`` is polled after every iteration (and between validation cases): when
    it returns True, ``last.pt`` is written and :class:`~buseg.errors.Cancelled` is raised
    (its ``outputs`` name last.pt). Under torchrun all ranks agree on stopping. ``data``
    may be passed to reuse data already in memory (benchmarks); otherwise it is loaded
    from the config. ``given``: with ``resume``, the config fields the caller set on purpose
    (dotted names; see :func:`check_resume_is_the_same_run`).
    """
    sink = events or EventSink()
    out_dir = Path(config.out_dir)
    stored = None
    if resume:
        last = out_dir / "last.pt"
        if not last.exists():
            raise OutputError("nothing to resume: no last.pt in this folder", path=out_dir)
        stored = read_checkpoint(last)
        if "training_state" not in stored:
            raise OutputError("last.pt is a model file without training state; cannot resume", path=last)
        check_resume_is_the_same_run(config, stored["metadata"]["config"], out_dir, given)
        config = _resume_config(config, stored["metadata"]["config"], sink)
    config.validate()
    dist = init_distributed(config.device)
    if not dist.is_main:
        sink = EventSink()  # only rank 0 reports (docs/worker-protocol.md, multi-GPU)
    lock = FolderLock(out_dir, name=LOCK_NAME, job="training")  # a second training here refuses
    if dist.is_main:
        prepare_output_folder(out_dir, resume=resume, overwrite=overwrite, lock=lock)
    try:
        return Trainer(config, sink, stored, should_stop or (lambda: False), data, dist).run()
    except (RuntimeError, MemoryError) as exc:  # torch's OutOfMemoryError is a RuntimeError
        if not (isinstance(exc, MemoryError) or is_out_of_memory(exc)):
            raise
        patch = " x ".join(str(s) for s in config.model.patch_size)
        try:
            device = str(resolve_device(config.device)[0])
        except BusegError:
            device = config.device
        raise ResourceError(
            f"out of memory on {device} while training with --batch-size {config.optim.batch_size} and "
            f"--patch-size {patch}: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}",
            hint=f"lower --batch-size (now {config.optim.batch_size}) or --patch-size (now {patch}), or "
            "--base-channels; or train on another device (--device)",
        ) from None
    finally:
        if dist.is_main:
            lock.release()
        dist.shutdown()


@dataclass
class _LossWindow:
    """Loss values since the last progress event, and the time they took."""

    values: dict[str, list[float]] = field(default_factory=dict)
    start_seconds: float = field(default_factory=time.perf_counter)
    iterations: int = 0

    def add(self, logs: dict[str, float]) -> None:
        self.iterations += 1
        for key, value in logs.items():
            self.values.setdefault(key, []).append(value)

    def iterations_per_second(self) -> float | None:
        seconds = time.perf_counter() - self.start_seconds
        return self.iterations / seconds if seconds > 0 else None


class Trainer:
    """One training run: the networks, optimizer, samplers and history as fields, the loop in
    :meth:`run`, and one small method per thing the loop does (:meth:`step`, :meth:`validate`,
    :meth:`save_last`, :meth:`export`).

    Construction does everything before the first iteration, in an order that fixes the random
    streams (seeding, data, samplers, network initialisation, optional resume), so that a
    resumed run continues exactly where the interrupted one stopped.
    """

    def __init__(
        self,
        config: TrainConfig,
        sink: EventSink,
        stored: dict | None,
        should_stop: Callable[[], bool],
        data: TrainingData | None,
        dist: DistributedContext,
    ):
        self.config, self.sink, self.should_stop, self.dist = config, sink, should_stop, dist
        self.out_dir = Path(config.out_dir)
        self.resumed = stored is not None
        configure_threads(config.num_threads)
        self.device, self.device_reason = (
            resolve_device(config.device) if not dist.enabled else dist.device_and_reason(config.device)
        )
        _seed_everything(config.seed + dist.rank)
        self.generator = torch.Generator().manual_seed(config.seed + 1000 * dist.rank)
        self.data = data if data is not None else load_training_data(config, log=logger.info)
        self.method: Method = self._build_method()
        self.labeled, self.unlabeled = self._build_samplers()
        self.layout = _input_layout(config)  # channels-last weights and inputs for 2D (docs/speed.md)
        self.student_module = self._build_student()
        self.teacher = (
            copy.deepcopy(self.student_module).requires_grad_(False) if self.method.uses_teacher else None
        )
        self.optimizer = _optimizer(self.student_module, config, config.optim.lr)
        self.total = self.method.pretrain_iterations + config.optim.iterations
        self.start_iteration = 0
        self.history: dict[str, Any] = {"losses": [], "validation": [], "lr": []}
        self.best_metric: float | None = None
        self.best_iteration: int | None = None
        self._shipped: tuple[tuple[int, int], nn.Module] | None = None  # see shipped()
        if stored is not None:
            self._restore(stored["training_state"])
        self.amp_dtype = autocast_dtype(self.device) if config.optim.amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.student: nn.Module = self.student_module  # the DDP wrapper under torchrun
        if dist.enabled:
            self.student = dist.wrap(self.student_module)  # broadcasts rank 0's weights to every rank
            if self.teacher is not None and stored is None:
                self.teacher.load_state_dict(self.student_module.state_dict())
        compile_ = config.optim.compile
        self.student_call = torch.compile(self.student) if compile_ else self.student
        self.teacher_call = (
            torch.compile(self.teacher) if compile_ and self.teacher is not None else self.teacher
        )

    # -- construction -------------------------------------------------------------------

    def _build_method(self) -> Method:
        config, data = self.config, self.data
        for message in data.warnings:
            self.sink.emit("warning", message=message)
        method = build_method(config, data.num_classes)
        if method.uses_unlabeled and not data.unlabeled_images:
            raise ConfigError(f"method {config.method.name} needs unlabeled images")
        if config.validation_interval and not data.validation:
            self.sink.emit(
                "warning", message="no validation data: model.pt will be the final weights, not the best"
            )
        return method

    def _build_samplers(self) -> tuple[SliceSampler | PatchSampler, SliceSampler | PatchSampler | None]:
        data, augment = self.data, self.config.data.augment
        sampler = SliceSampler if self.config.model.dimension == "2d" else PatchSampler
        size = self.config.model.patch_size[::-1]  # (H, W) slices or (Z, Y, X) patches
        labeled = sampler(data.labeled_images, data.labeled_labels, size, augment=augment)
        unlabeled = (
            sampler(data.unlabeled_images, None, size, augment=augment)
            if self.method.uses_unlabeled
            else None
        )
        return labeled, unlabeled

    def _build_student(self) -> nn.Module:
        config = self.config
        student = build_network(
            config.network_name,
            in_channels=1,
            num_classes=self.data.num_classes,
            base_channels=config.model.base_channels,
            dropout=config.model.dropout,
        ).to(self.device)
        if self.layout is to_channels_last:
            student = student.to(memory_format=channels_last_format(2))
        if config.init_weights:
            _load_initial_weights(student, config, self.data)
        return student

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue from ``last.pt``'s training state: weights, optimizer, history, random streams."""
        config, method, dist = self.config, self.method, self.dist
        self.student_module.load_state_dict(state["student"])
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
        if method.stage(state["iteration"]) == "train" and method.pretrain_iterations:
            self.optimizer = _optimizer(
                self.student_module, config, config.optim.self_training_lr or config.optim.lr
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_iteration = int(state["iteration"])
        self.history = state["history"]
        self.best_metric, self.best_iteration = state.get("best_metric"), state.get("best_iteration")
        _restore_random_states(state, self.generator, dist, config.seed, self.start_iteration)
        written_by = len(state.get("random_per_rank") or [None])
        if dist.is_main and written_by != dist.world_size:
            self.sink.emit(
                "warning",
                message=f"resumed with {dist.world_size} process(es), checkpoint written by "
                f"{written_by}: random batches differ from an uninterrupted run",
            )

    # -- network passes -----------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def student_forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.student_call(self.layout(x))
        return logits.float()  # losses, softmax and uncertainty in float32

    def teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only switch when the top-level mode differs: MC-dropout turns on the dropout layers of
        # an eval-mode teacher, and teacher.eval() here would silently turn them off again.
        wanted_training = self.config.method.teacher_mode == "train"
        if self.teacher.training != wanted_training:
            self.teacher.train(wanted_training)
        with torch.no_grad(), self._autocast():
            logits = self.teacher_call(self.layout(x))
        # float32 in the standard layout, in one copy: pseudo-labels take the argmax over classes,
        # which is ~10x slower on channels-last (measured 225 ms for a 24x4x128x128 batch).
        return logits.to(torch.float32, memory_format=torch.contiguous_format)

    def exported(self, stage: str) -> nn.Module:
        """The network that validation scores and model files hold (``method.model_weights``):
        the EMA teacher once it exists as such (not during copy-paste pre-training), else the student."""
        if (
            self.teacher is not None
            and self.config.method.model_weights == "teacher"
            and (stage == "train" or not self.method.pretrain_iterations)
        ):
            return self.teacher
        return self.student_module

    def shipped(self, iteration: int, stage: str) -> nn.Module:
        """What validation scores and model files hold after ``iteration``: :meth:`exported`, with
        clean BatchNorm statistics unless ``method.batchnorm_statistics`` is 'running' (made once
        per iteration: the validation and the model file written after it share it)."""
        network = self.exported(stage)
        if self.config.method.batchnorm_statistics == "running" or not has_batchnorm(network):
            return network
        key = (iteration, id(network))
        if self._shipped is None or self._shipped[0] != key:
            self._shipped = (key, with_clean_batchnorm(network, self._clean_batches(iteration)))
        return self._shipped[1]

    def _clean_batches(self, iteration: int) -> Iterator[torch.Tensor]:
        batches = clean_batchnorm_batches(
            self.labeled, self.unlabeled, self.config.optim.batch_size, self.config.seed, iteration
        )
        for images in batches:
            yield self.layout(images.to(self.device))

    def _eval_forward(self, network: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return network(self.layout(x))

        return forward

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train from ``start_iteration`` to the end; raises Cancelled (after save_last) on a stop."""
        self._announce()
        if self.dist.any(self.should_stop()):  # cancelled while the data were loading
            raise _cancelled(
                f"cancelled before iteration {self.start_iteration + 1} of {self.total}",
                self.out_dir,
                resumable=self.resumed,
            )
        self.student.train()
        window = _LossWindow()
        for iteration in range(self.start_iteration, self.total):
            stage, lr, logs = self.step(iteration)
            done = iteration + 1
            window.add(logs)
            if done % self.config.log_interval == 0 or done == self.total:
                self._report_progress(done, stage, lr, window)
                window = _LossWindow()
            if self._validation_due(done) and self.validate(done, stage) is not None:
                window.start_seconds = time.perf_counter()  # validation time is not training speed
            stop = done < self.total and self.dist.any(self.should_stop())  # every rank stops together
            interval = self.config.checkpoint_interval
            if (interval and done % interval == 0 and done != self.total) or stop:
                self.save_last(done)
            if stop:
                raise _cancelled(
                    f"cancelled at iteration {done} of {self.total}; resume with --resume", self.out_dir
                )
        return self.finish()

    def step(self, iteration: int) -> tuple[str, float, dict[str, float]]:
        """One optimisation step (and the EMA update); returns the stage, learning rate and logs."""
        method, config = self.method, self.config
        stage = method.stage(iteration)
        stage_start = 0 if stage == "pretrain" else method.pretrain_iterations
        stage_length = method.pretrain_iterations if stage == "pretrain" else config.optim.iterations
        stage_iteration = iteration - stage_start
        if stage == "train" and iteration == method.pretrain_iterations and method.pretrain_iterations:
            self.start_self_training()
        lr = learning_rate(config, stage, stage_iteration, stage_length)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        context = StepContext(
            student=self.student_forward,
            teacher=self.teacher,
            teacher_forward=self.teacher_forward,
            iteration=iteration,
            stage=stage,
            stage_iteration=stage_iteration,
            generator=self.generator,
            device=self.device,
        )
        output = method.step(context, self._sample_batch(stage))
        if not torch.isfinite(output.loss):
            raise BusegError(
                f"the loss became {float(output.loss)} at iteration {iteration + 1} ({stage} stage)",
                hint="lower --lr, or check the images for extreme intensities",
            )
        self._optimise(output.loss)
        if self.teacher is not None and (stage == "train" or not method.pretrain_iterations):
            ema_update(self.teacher, self.student_module, config.method.ema_decay, stage_iteration)
            self.dist.sync_buffers(self.teacher)  # DDP: every rank keeps rank 0's teacher statistics
        return stage, lr, {"total": float(output.loss.detach()), **output.logs}

    def _sample_batch(self, stage: str) -> Batch:
        labeled_count, unlabeled_count = self.method.batch_sizes(stage)
        images, targets = self.labeled.sample(labeled_count, self.generator)
        unlabeled = self.unlabeled.sample(unlabeled_count, self.generator)[0] if unlabeled_count else None
        device = self.device
        return Batch(
            images.to(device, non_blocking=True),
            targets.to(device, non_blocking=True),
            unlabeled.to(device, non_blocking=True) if unlabeled is not None else None,
        )

    def _optimise(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # float16 on CUDA
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def start_self_training(self) -> None:
        """BCP: self-training starts from the best pre-trained model (by validation, when there is
        validation data; else the last), teacher included, with a fresh optimizer."""
        config, student = self.config, self.student_module
        if self.best_iteration is not None and self.best_iteration <= self.method.pretrain_iterations:
            student.load_state_dict(read_checkpoint(self.out_dir / "best.pt")["weights"])
        if self.dist.enabled:  # only rank 0 validates: every rank continues from its choice
            for tensor in student.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        self.teacher.load_state_dict(student.state_dict())
        self.dist.sync_buffers(self.teacher)
        self.optimizer = _optimizer(student, config, config.optim.self_training_lr or config.optim.lr)

    def _report_progress(self, done: int, stage: str, lr: float, window: _LossWindow) -> None:
        speed = window.iterations_per_second()
        means = self.dist.mean({k: float(np.mean(v)) for k, v in window.values.items()})  # over ranks
        self.history["losses"].append({"iteration": done, "stage": stage, **means})
        self.history["lr"].append({"iteration": done, "lr": lr})
        losses, stats = split_logs(means)
        self.sink.emit(
            "progress",
            iteration=done,
            total=self.total,
            stage=stage,
            losses=losses,
            stats=stats,
            lr=lr,
            iterations_per_second=speed,
            eta_seconds=(self.total - done) / speed if speed else None,
        )

    def _validation_due(self, done: int) -> bool:
        interval = self.config.validation_interval
        return bool(
            self.dist.is_main
            and self.data.validation
            and interval
            and (done % interval == 0 or done == self.total)
        )

    def validate(self, done: int, stage: str) -> dict[str, float] | None:
        """Score the exported network on the validation volumes; keep ``best.pt`` up to date.

        Returns None when a cancel interrupted it (the last validation is never interrupted).
        """
        start_seconds = time.perf_counter()
        network = self.shipped(done, stage)
        stop = self.should_stop if done < self.total else None
        metrics = evaluate(network, self.data, self.config, self.device, self._eval_forward(network), stop)
        if metrics is None:
            return None
        self.history["validation"].append({"iteration": done, "stage": stage, **metrics})
        if self.best_metric is None or metrics["dice"] > self.best_metric:
            self.best_metric, self.best_iteration = metrics["dice"], done
            self.export(self.out_dir / "best.pt", done, stage, {"validation": metrics})
            self.sink.emit("checkpoint", iteration=done, path=str(self.out_dir / "best.pt"), kind="best")
        self.sink.emit(
            "validation",
            iteration=done,
            metrics=metrics,
            best=self.best_metric,
            best_iteration=self.best_iteration,
            seconds=time.perf_counter() - start_seconds,
        )
        return metrics

    # -- outputs ------------------------------------------------------------------------

    def _announce(self) -> None:
        config, dist = self.config, self.dist
        if dist.is_main:
            write_json_atomic(self.out_dir / "config.json", to_dict(config))
        self.sink.emit(
            "started",
            job="train",
            config=to_dict(config),
            device=str(self.device),
            device_reason=self.device_reason,
            total=self.total,
            start_iteration=self.start_iteration,
            world_size=dist.world_size,
            global_batch_size=config.optim.batch_size * dist.world_size,
            amp=str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else None,
            precision=precision_description(self.device, config.optim.amp),
            num_threads=torch.get_num_threads(),
            buseg_version=__version__,
            classes=[c["name"] for c in self.data.classes],
            resumed=self.resumed,
        )

    def metadata(self, iteration: int, extra: dict | None = None) -> dict:
        return model_metadata(self.config, self.data, iteration, extra)

    def export(self, path: Path, iteration: int, stage: str, extra: dict | None = None) -> None:
        """Write a model file of the exported network (teacher or student, said in its metadata)."""
        weights_name = "teacher" if self.exported(stage) is self.teacher else "student"
        network = self.shipped(iteration, stage)
        metadata = self.metadata(iteration, {**(extra or {}), "weights": weights_name})
        save_checkpoint(path, weights=network.state_dict(), metadata=metadata)

    def save_last(self, iteration: int) -> Path:
        """``last.pt`` with everything a resume needs, and ``history.json``. Its ``shipped``
        weights are what a model file written now would hold (clean BatchNorm statistics; None
        when those are the exported network's own), for whoever scores a run as it goes."""
        path = self.out_dir / "last.pt"
        random_per_rank = self.dist.gather(_random_states(self.generator))
        if self.dist.is_main:
            student_weights = self.student_module.state_dict()
            stage = self.method.stage(iteration - 1) if iteration else "train"
            shipped = self.shipped(iteration, stage)
            save_checkpoint(
                path,
                weights=student_weights,
                metadata=self.metadata(iteration),
                training_state={
                    "student": student_weights,
                    "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                    "shipped": shipped.state_dict() if shipped is not self.exported(stage) else None,
                    "optimizer": self.optimizer.state_dict(),
                    "iteration": iteration,
                    "history": self.history,
                    "best_metric": self.best_metric,
                    "best_iteration": self.best_iteration,
                    "random": random_per_rank[0],
                    "random_per_rank": random_per_rank,
                },
            )
            write_json_atomic(self.out_dir / "history.json", self.history)
            self.sink.emit("checkpoint", iteration=iteration, path=str(path), kind="last")
        return path

    def finish(self) -> TrainResult:
        """The end of a run: last.pt, final.pt, and model.pt (best.pt where there was validation)."""
        total, out_dir = self.total, self.out_dir
        last_path = self.save_last(total)
        best_path = out_dir / "best.pt" if self.best_iteration is not None else None
        final_path = out_dir / "final.pt"
        if self.dist.is_main:
            self.export(final_path, total, self.method.stage(total - 1) if total else "train")
            _copy_atomic(best_path if best_path is not None else final_path, out_dir / "model.pt")
            self.sink.emit("checkpoint", iteration=total, path=str(out_dir / "model.pt"), kind="final")
        self.dist.barrier()
        return TrainResult(
            status="completed",
            out_dir=out_dir,
            model_path=out_dir / "model.pt",
            last_path=last_path,
            best_path=best_path,
            best_metric=self.best_metric,
            best_iteration=self.best_iteration,
            iterations=total,
            history=self.history,
        )


def _input_layout(config: TrainConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the network inputs go through: channels-last (2D only) or nothing.

    3D stays channels-first: on the CPU, channels-last 3D was not faster (docs/speed.md) and its
    BatchNorm statistics are less precise.
    """
    return (
        to_channels_last if config.optim.channels_last and config.model.dimension == "2d" else (lambda x: x)
    )


def _load_initial_weights(student: nn.Module, config: TrainConfig, data: TrainingData) -> None:
    path = Path(config.init_weights)
    payload = read_checkpoint(path)
    meta = payload["metadata"]
    names = [c["name"] for c in meta["classes"]]
    if meta["network"]["name"] != config.network_name or names != [c["name"] for c in data.classes]:
        raise ConfigError(
            f"--init-weights {path}: a {meta['network']['name']} for classes {names} does not fit this run "
            f"({config.network_name}, classes {[c['name'] for c in data.classes]})"
        )
    try:
        student.load_state_dict(payload["weights"])
    except RuntimeError as exc:
        raise ConfigError(
            f"--init-weights {path}: weights do not fit the network: {str(exc)[:200]}"
        ) from None


def _cancelled(message: str, out_dir: Path, *, resumable: bool = True) -> Cancelled:
    """The exception that ends a cancelled run; ``outputs`` tells the caller what to resume from."""
    exc = Cancelled(message)
    exc.outputs = {"last": str(out_dir / "last.pt") if resumable else None, "out_dir": str(out_dir)}
    return exc


def _optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    o = config.optim
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _copy_atomic(source: Path, destination: Path) -> None:
    from buseg.files.safe_files import atomic_path

    with atomic_path(destination, overwrite=True) as temp:
        shutil.copyfile(source, temp)
