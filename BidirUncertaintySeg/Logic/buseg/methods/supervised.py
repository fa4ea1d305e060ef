"""Supervised baseline: labeled images only, (CE + Dice) / 2."""

from __future__ import annotations

from ..losses import segmentation_loss
from .base import Batch, Method, StepContext, StepOutput


class Supervised(Method):
    name = "supervised"

    def step(self, ctx: StepContext, batch: Batch) -> StepOutput:
        logits = ctx.student(batch.labeled_images)
        loss = segmentation_loss(logits, batch.labeled_targets)
        return StepOutput(loss, {"supervised": float(loss.detach())})
