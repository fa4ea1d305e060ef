"""Supervised baseline: labeled images only, (CE + Dice) / 2.

With ``model_weights='teacher'`` (the default) the loop keeps an EMA teacher of the student, as
for every other method, and validation and model files use it: the baseline is scored by the
same rule as the semi-supervised methods (the teacher plays no part in its loss).
"""

from __future__ import annotations

from buseg.training.losses import segmentation_loss
from buseg.training.methods.base import Batch, Method, StepContext, StepOutput


class Supervised(Method):
    name = "supervised"

    @property
    def uses_teacher(self) -> bool:
        return self.config.method.model_weights == "teacher"

    def step(self, ctx: StepContext, batch: Batch) -> StepOutput:
        logits = ctx.student(batch.labeled_images)
        loss = segmentation_loss(logits, batch.labeled_targets)
        return StepOutput(loss, {"supervised": float(loss.detach())})
