"""The one training loop.

Every method (supervised, mean teacher, BCP, ours) runs through :func:`train`: the loop
samples batches, asks the method for its loss, optimises the student, updates the EMA
teacher, validates, writes checkpoints and reports events; methods only compute losses
(:mod:`buseg.methods`).

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
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import read_checkpoint, save_checkpoint
from .config import TrainConfig, from_dict, to_dict
from .data import TrainingData, load_training_data
from .device import autocast_dtype, configure_threads, resolve_device
from .distributed import DistributedContext, init_distributed
from .errors import BusegError, Cancelled, ConfigError, OutputError, ResourceError
from .events import EventSink, split_logs
from .inference import is_out_of_memory, predict_probabilities
from .io import write_json_atomic
from .methods import Batch, Method, StepContext, build_method
from .networks import build_network, channels_last_format, to_channels_last
from .sampling import PatchSampler, SliceSampler

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


class OutputLock:
    """``train.lock`` in the output folder: a second training into the same folder refuses."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        import psutil

        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and psutil.pid_exists(pid):
                    raise OutputError(
                        f"another training (process {pid}) is writing to this folder",
                        path=self.path.parent,
                        hint="wait for it, cancel it, or choose another --out folder",
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # stale lock of a process that is gone
                continue
            except OSError as exc:
                raise OutputError(
                    f"cannot write to the output folder: {exc.strerror}", path=self.path.parent
                ) from None
            with os.fdopen(handle, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return
        raise OutputError("cannot take the training lock", path=self.path)

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False


def prepare_output_folder(
    out_dir: Path, *, resume: bool, overwrite: bool, lock: OutputLock | None = None
) -> None:
    """Create the folder, take its ``lock`` (a running training there is reported before anything
    else), refuse to replace a previous training, and remove temporary files that a killed
    training left behind."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", path=out_dir) from None
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
    # Temporary files of io.atomic_path ('.last.pt.<random>.tmp.pt') that a killed run left; only
    # the lock holder may remove them (another training could be writing its own).
    for name in OUTPUT_FILES:
        for stale in out_dir.glob(f".{name}.*.tmp*"):
            with contextlib.suppress(OSError):
                stale.unlink()


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


def learning_rate(config: TrainConfig, stage: str, stage_iteration: int, stage_length: int) -> float:
    o = config.optim
    base = (
        o.self_training_lr
        if (
            stage == "train"
            and o.self_training_lr is not None
            and o.pretrain_iterations
            and config.method.name in ("bcp", "buarl")
        )
        else o.lr
    )
    if o.lr_schedule == "poly":
        return base * (1 - stage_iteration / max(1, stage_length)) ** 0.9
    if o.lr_schedule == "step":
        return base * o.lr_step_gamma ** (stage_iteration // max(1, o.lr_step_iterations))
    return base


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class (1.0 where a class is absent from both)."""
    scores = []
    for cls in range(1, num_classes):
        p, t = prediction == cls, truth == cls
        denominator = int(p.sum()) + int(t.sum())
        scores.append(1.0 if denominator == 0 else 2.0 * int((p & t).sum()) / denominator)
    return scores


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
            prediction = probabilities.argmax(0).numpy()
            per_class.append(dice_per_class(prediction, case.labels, data.num_classes))
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
) -> TrainResult:
    """Train a model as ``config`` says; returns where the outputs are.

    ``should_stop`` is polled after every iteration (and between validation cases): when
    it returns True, ``last.pt`` is written and :class:`~buseg.errors.Cancelled` is raised
    (its ``outputs`` name last.pt). Under torchrun all ranks agree on stopping. ``data``
    may be passed to reuse data already in memory (benchmarks); otherwise it is loaded
    from the config.
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
        config = _resume_config(config, stored["metadata"]["config"], sink)
    config.validate()
    dist = init_distributed(config.device)
    if not dist.is_main:
        sink = EventSink()  # only rank 0 reports (docs/worker-protocol.md, multi-GPU)
    lock = OutputLock(out_dir)
    if dist.is_main:
        prepare_output_folder(out_dir, resume=resume, overwrite=overwrite, lock=lock)
    try:
        return _train(config, sink, stored, should_stop or (lambda: False), data, dist)
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


def _train(
    config: TrainConfig,
    sink: EventSink,
    stored: dict | None,
    should_stop: Callable[[], bool],
    data: TrainingData | None,
    dist: DistributedContext,
) -> TrainResult:
    out_dir = Path(config.out_dir)
    configure_threads(config.num_threads)
    device, reason = (
        resolve_device(config.device) if not dist.enabled else dist.device_and_reason(config.device)
    )
    _seed_everything(config.seed + dist.rank)
    generator = torch.Generator().manual_seed(config.seed + 1000 * dist.rank)

    if data is None:
        data = load_training_data(config, log=logger.info)
    for message in data.warnings:
        sink.emit("warning", message=message)
    method: Method = build_method(config, data.num_classes)
    if method.uses_unlabeled and not data.unlabeled_images:
        raise ConfigError(f"method {config.method.name} needs unlabeled images")
    if config.validation_interval and not data.validation:
        sink.emit("warning", message="no validation data: model.pt will be the final weights, not the best")

    patch = config.model.patch_size
    if config.model.dimension == "2d":
        size_hw = patch[::-1]
        labeled = SliceSampler(data.labeled_images, data.labeled_labels, size_hw, augment=config.data.augment)
        unlabeled = (
            SliceSampler(data.unlabeled_images, None, size_hw, augment=config.data.augment)
            if method.uses_unlabeled
            else None
        )
    else:
        patch_zyx = patch[::-1]
        labeled = PatchSampler(
            data.labeled_images, data.labeled_labels, patch_zyx, augment=config.data.augment
        )
        unlabeled = (
            PatchSampler(data.unlabeled_images, None, patch_zyx, augment=config.data.augment)
            if method.uses_unlabeled
            else None
        )

    student = build_network(
        config.network_name,
        in_channels=1,
        num_classes=data.num_classes,
        base_channels=config.model.base_channels,
        dropout=config.model.dropout,
    ).to(device)
    layout = _input_layout(config)  # channels-last weights and inputs for 2D (docs/speed.md)
    if layout is to_channels_last:
        student = student.to(memory_format=channels_last_format(2))
    if config.init_weights:
        _load_initial_weights(student, config, data)
    teacher = copy.deepcopy(student).requires_grad_(False) if method.uses_teacher else None
    optimizer = _optimizer(student, config, config.optim.lr)
    total = method.pretrain_iterations + config.optim.iterations
    start_iteration = 0
    history: dict[str, Any] = {"losses": [], "validation": [], "lr": []}
    best_metric: float | None = None
    best_iteration: int | None = None
    if stored is not None:
        state = stored["training_state"]
        student.load_state_dict(state["student"])
        if teacher is not None and state.get("teacher") is not None:
            teacher.load_state_dict(state["teacher"])
        if method.stage(state["iteration"]) == "train" and method.pretrain_iterations:
            optimizer = _optimizer(student, config, config.optim.self_training_lr or config.optim.lr)
        optimizer.load_state_dict(state["optimizer"])
        start_iteration = int(state["iteration"])
        history = state["history"]
        best_metric, best_iteration = state.get("best_metric"), state.get("best_iteration")
        _restore_random_states(state, generator, dist, config.seed, start_iteration)
        if dist.is_main and len(state.get("random_per_rank") or [None]) != dist.world_size:
            sink.emit(
                "warning",
                message=f"resumed with {dist.world_size} process(es), checkpoint written by "
                f"{len(state.get('random_per_rank') or [None])}: random batches differ from an uninterrupted run",
            )

    amp_dtype = autocast_dtype(device) if config.optim.amp else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    student_module = student
    if dist.enabled:
        student = dist.wrap(student)  # broadcasts rank 0's weights to every rank
        if teacher is not None and stored is None:
            teacher.load_state_dict(student_module.state_dict())

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    student_call = torch.compile(student) if config.optim.compile else student
    teacher_call = torch.compile(teacher) if config.optim.compile and teacher is not None else teacher

    def student_forward(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = student_call(layout(x))
        return logits.float()  # losses, softmax and uncertainty in float32

    def teacher_forward(x: torch.Tensor) -> torch.Tensor:
        # Only switch when the top-level mode differs: MC-dropout turns on the dropout layers of
        # an eval-mode teacher, and teacher.eval() here would silently turn them off again.
        if teacher.training != (config.method.teacher_mode == "train"):
            teacher.train(config.method.teacher_mode == "train")
        with torch.no_grad(), autocast():
            logits = teacher_call(layout(x))
        return logits.float()

    def eval_forward(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return student_module(layout(x))

    def teacher_eval_forward(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return teacher(layout(x))

    def exported(stage: str) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        """The network that validation scores and model files hold (``method.model_weights``)."""
        if (
            teacher is not None
            and config.method.model_weights == "teacher"
            and (stage == "train" or not method.pretrain_iterations)
        ):
            return teacher, teacher_eval_forward
        return student_module, eval_forward

    def _weights_name(stage: str) -> str:
        return "teacher" if exported(stage)[0] is teacher else "student"

    def metadata(iteration: int, extra: dict | None = None) -> dict:
        return model_metadata(config, data, iteration, extra)

    def write_last(iteration: int) -> Path:
        path = out_dir / "last.pt"
        random_per_rank = dist.gather(_random_states(generator))
        if dist.is_main:
            save_checkpoint(
                path,
                weights=student_module.state_dict(),
                metadata=metadata(iteration),
                training_state={
                    "student": student_module.state_dict(),
                    "teacher": teacher.state_dict() if teacher is not None else None,
                    "optimizer": optimizer.state_dict(),
                    "iteration": iteration,
                    "history": history,
                    "best_metric": best_metric,
                    "best_iteration": best_iteration,
                    "random": random_per_rank[0],
                    "random_per_rank": random_per_rank,
                },
            )
            write_json_atomic(out_dir / "history.json", history)
            sink.emit("checkpoint", iteration=iteration, path=str(path), kind="last")
        return path

    if dist.is_main:
        write_json_atomic(out_dir / "config.json", to_dict(config))
    sink.emit(
        "started",
        job="train",
        config=to_dict(config),
        device=str(device),
        device_reason=reason,
        total=total,
        start_iteration=start_iteration,
        world_size=dist.world_size,
        global_batch_size=config.optim.batch_size * dist.world_size,
        amp=str(amp_dtype).removeprefix("torch.") if amp_dtype else None,
        num_threads=torch.get_num_threads(),
        buseg_version=__version__,
        classes=[c["name"] for c in data.classes],
        resumed=stored is not None,
    )

    if dist.any(should_stop()):  # cancelled while the data were loading
        raise _cancelled(
            f"cancelled before iteration {start_iteration + 1} of {total}",
            out_dir,
            resumable=stored is not None,
        )
    student.train()
    window_losses: dict[str, list[float]] = {}
    window_start, window_iterations = time.perf_counter(), 0
    for iteration in range(start_iteration, total):
        stage = method.stage(iteration)
        stage_start = 0 if stage == "pretrain" else method.pretrain_iterations
        stage_length = method.pretrain_iterations if stage == "pretrain" else config.optim.iterations
        stage_iteration = iteration - stage_start
        if stage == "train" and iteration == method.pretrain_iterations and method.pretrain_iterations:
            # BCP: self-training starts from the best pre-trained model (by validation, when there is
            # validation data; else the last), teacher included, with a fresh optimizer.
            if best_iteration is not None and best_iteration <= method.pretrain_iterations:
                student_module.load_state_dict(read_checkpoint(out_dir / "best.pt")["weights"])
            if dist.enabled:  # only rank 0 validates: every rank continues from its choice
                for tensor in student_module.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)
            teacher.load_state_dict(student_module.state_dict())
            dist.sync_buffers(teacher)
            optimizer = _optimizer(student_module, config, config.optim.self_training_lr or config.optim.lr)
        lr = learning_rate(config, stage, stage_iteration, stage_length)
        for group in optimizer.param_groups:
            group["lr"] = lr

        labeled_count, unlabeled_count = method.batch_sizes(stage)
        images, targets = labeled.sample(labeled_count, generator)
        unlabeled_images = unlabeled.sample(unlabeled_count, generator)[0] if unlabeled_count else None
        batch = Batch(
            images.to(device, non_blocking=True),
            targets.to(device, non_blocking=True),
            unlabeled_images.to(device, non_blocking=True) if unlabeled_images is not None else None,
        )
        context = StepContext(
            student=student_forward,
            teacher=teacher,
            teacher_forward=teacher_forward,
            iteration=iteration,
            stage=stage,
            stage_iteration=stage_iteration,
            generator=generator,
            device=device,
        )
        output = method.step(context, batch)
        if not torch.isfinite(output.loss):
            raise BusegError(
                f"the loss became {float(output.loss)} at iteration {iteration + 1} ({stage} stage)",
                hint="lower --lr, or check the images for extreme intensities",
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(output.loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            output.loss.backward()
            optimizer.step()
        if teacher is not None and (stage == "train" or not method.pretrain_iterations):
            ema_update(teacher, student_module, config.method.ema_decay, stage_iteration)
            dist.sync_buffers(teacher)  # DDP: every rank keeps rank 0's teacher statistics

        done = iteration + 1
        window_iterations += 1
        for key, value in {"total": float(output.loss.detach()), **output.logs}.items():
            window_losses.setdefault(key, []).append(value)
        if done % config.log_interval == 0 or done == total:
            seconds = time.perf_counter() - window_start
            speed = window_iterations / seconds if seconds > 0 else None
            means = dist.mean({k: float(np.mean(v)) for k, v in window_losses.items()})  # over ranks
            history["losses"].append({"iteration": done, "stage": stage, **means})
            history["lr"].append({"iteration": done, "lr": lr})
            losses, stats = split_logs(means)
            sink.emit(
                "progress",
                iteration=done,
                total=total,
                stage=stage,
                losses=losses,
                stats=stats,
                lr=lr,
                iterations_per_second=speed,
                eta_seconds=(total - done) / speed if speed else None,
            )
            window_losses, window_start, window_iterations = {}, time.perf_counter(), 0
        if (
            dist.is_main
            and data.validation
            and config.validation_interval
            and (done % config.validation_interval == 0 or done == total)
        ):
            validation_start = time.perf_counter()
            network, forward = exported(stage)
            metrics = evaluate(network, data, config, device, forward, should_stop if done < total else None)
        else:
            metrics = None
        if metrics is not None:  # None: no validation now, or interrupted by a cancel
            history["validation"].append({"iteration": done, "stage": stage, **metrics})
            if best_metric is None or metrics["dice"] > best_metric:
                best_metric, best_iteration = metrics["dice"], done
                save_checkpoint(
                    out_dir / "best.pt",
                    weights=exported(stage)[0].state_dict(),
                    metadata=metadata(done, {"validation": metrics, "weights": _weights_name(stage)}),
                )
                sink.emit("checkpoint", iteration=done, path=str(out_dir / "best.pt"), kind="best")
            sink.emit(
                "validation",
                iteration=done,
                metrics=metrics,
                best=best_metric,
                best_iteration=best_iteration,
                seconds=time.perf_counter() - validation_start,
            )
            window_start = time.perf_counter()  # validation time is not training speed
        stop = done < total and dist.any(should_stop())  # every rank stops at the same iteration
        if (done % config.checkpoint_interval == 0 and done != total) or stop:
            write_last(done)
        if stop:
            raise _cancelled(f"cancelled at iteration {done} of {total}; resume with --resume", out_dir)

    last_path = write_last(total)
    best_path = out_dir / "best.pt" if best_iteration is not None else None
    final_path = out_dir / "final.pt"
    if dist.is_main:
        final_stage = method.stage(total - 1) if total else "train"
        save_checkpoint(
            final_path,
            weights=exported(final_stage)[0].state_dict(),
            metadata=metadata(total, {"weights": _weights_name(final_stage)}),
        )
        chosen = best_path if best_path is not None else final_path
        _copy_atomic(chosen, out_dir / "model.pt")
        sink.emit("checkpoint", iteration=total, path=str(out_dir / "model.pt"), kind="final")
    dist.barrier()
    return TrainResult(
        status="completed",
        out_dir=out_dir,
        model_path=out_dir / "model.pt",
        last_path=last_path,
        best_path=best_path,
        best_metric=best_metric,
        best_iteration=best_iteration,
        iterations=total,
        history=history,
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
    from .io import atomic_path

    with atomic_path(destination, overwrite=True) as temp:
        shutil.copyfile(source, temp)
