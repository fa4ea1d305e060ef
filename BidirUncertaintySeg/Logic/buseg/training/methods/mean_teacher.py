"""Mean teacher (the SSL4MIS recipe).

Loss = supervised (CE + Dice)/2 on labeled images + w(t) * MSE between the student's and
the teacher's softmax on unlabeled images, the teacher seeing the image with Gaussian
noise (std ``noise_std`` clipped at 2 std). w(t) = consistency_weight * exp(-5 (1 - t)^2),
t = min(1, iteration / T) (the sigmoid ramp-up), T = ``consistency_rampup_iterations``, by
default the run's length (``optim.iterations``): the recipe's 12000 was for 30000 iterations, and
a short run with that ramp would end with a weight near 0 (supervised fine-tuning).
"""

from __future__ import annotations

import math

import torch

from buseg.training.losses import segmentation_loss
from buseg.training.methods.base import Batch, Method, StepContext, StepOutput


def sigmoid_rampup(current: float, length: float) -> float:
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


class MeanTeacher(Method):
    name = "mean-teacher"
    uses_teacher = True
    uses_unlabeled = True

    @property
    def rampup_iterations(self) -> int:
        ramp = self.config.method.consistency_rampup_iterations
        return self.config.optim.iterations if ramp is None else ramp

    def step(self, ctx: StepContext, batch: Batch) -> StepOutput:
        m = self.config.method
        labeled_count = batch.labeled_images.shape[0]
        # One student pass over labeled and unlabeled images together.
        logits = ctx.student(torch.cat([batch.labeled_images, batch.unlabeled_images]))
        supervised = segmentation_loss(logits[:labeled_count], batch.labeled_targets)
        noise = torch.randn(batch.unlabeled_images.shape, generator=ctx.generator).to(ctx.device)
        noise = noise.mul_(m.noise_std).clamp_(-2 * m.noise_std, 2 * m.noise_std)
        teacher_probabilities = torch.softmax(
            ctx.teacher_forward(batch.unlabeled_images + noise).float(), dim=1
        )
        student_probabilities = torch.softmax(logits[labeled_count:].float(), dim=1)
        consistency = torch.mean((student_probabilities - teacher_probabilities) ** 2)
        weight = m.consistency_weight * sigmoid_rampup(ctx.iteration, self.rampup_iterations)
        loss = supervised + weight * consistency
        return StepOutput(
            loss,
            {
                "supervised": float(supervised.detach()),
                "consistency": float(consistency.detach()),
                "consistency_weight": weight,
            },
        )
