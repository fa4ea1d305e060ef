"""What a method is: a small object the one training loop calls once per iteration.

The loop owns data sampling, optimisation, the EMA teacher update, validation,
checkpoints and events. A method only turns a :class:`Batch` into a loss (and numbers to
log), using the models the :class:`StepContext` gives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from buseg.config import TrainConfig


@dataclass
class Batch:
    """One iteration's data on the training device.

    Images are (N, 1, *S) float, targets (N, *S) int64 class indices. Unlabeled images are
    absent for the supervised method and during copy-paste pre-training.
    """

    labeled_images: torch.Tensor
    labeled_targets: torch.Tensor
    unlabeled_images: torch.Tensor | None = None


@dataclass
class StepOutput:
    """The loss to minimise and what to report (loss parts, fractions, thresholds)."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class StepContext:
    """The models and helpers a method may use in one step.

    ``student`` runs with gradients; ``teacher`` (None for methods without one) must be
    called through ``teacher_forward``, which disables autograd and applies the configured
    teacher mode. ``generator`` is the run's seeded random generator (masks, noise).
    """

    student: Callable[[torch.Tensor], torch.Tensor]
    teacher: nn.Module | None
    teacher_forward: Callable[[torch.Tensor], torch.Tensor] | None
    iteration: int
    stage: str
    stage_iteration: int
    generator: torch.Generator
    device: torch.device


class Method:
    """Base class. Subclasses set the class attributes and implement :meth:`step`."""

    name = "method"
    uses_teacher = False
    uses_unlabeled = False

    def __init__(self, config: TrainConfig, num_classes: int):
        self.config = config
        self.num_classes = num_classes

    @property
    def pretrain_iterations(self) -> int:
        """Iterations of the 'pretrain' stage that precede the 'train' stage (0 = none)."""
        return 0

    def stage(self, iteration: int) -> str:
        return "pretrain" if iteration < self.pretrain_iterations else "train"

    def batch_sizes(self, stage: str) -> tuple[int, int]:
        """(labeled, unlabeled) images to sample for an iteration of ``stage``."""
        if self.uses_unlabeled and stage == "train":
            half = self.config.optim.batch_size // 2
            return half, half
        return self.config.optim.batch_size, 0

    def step(self, ctx: StepContext, batch: Batch) -> StepOutput:
        raise NotImplementedError
