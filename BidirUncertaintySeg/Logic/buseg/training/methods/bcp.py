"""Bidirectional copy-paste (BCP, Bai et al., CVPR 2023), written as a method of the one loop.

Stage 'pretrain' (``pretrain_iterations``): labeled images only; two groups of labeled
images are mixed with one box mask and the student learns the mixed ground truth.

Stage 'train': the EMA teacher predicts the unlabeled images; its argmax, cleaned to the
largest connected component per class, is the pseudo-label. With one box mask M (1 outside
the box, 0 inside) the student sees both directions at once::

    x_in  = ua * M + la * (1 - M)     target: pseudo(ua) outside, truth(la) inside
    x_out = lb * M + ub * (1 - M)     target: truth(lb) outside, pseudo(ub) inside

Per mixed image the loss is region_loss(truth pixels, w=1) + unlabeled_weight *
region_loss(pseudo-labeled pixels, w=1) (see :mod:`buseg.training.losses`). Subclasses change the
per-pixel weights (:class:`~buseg.training.methods.buarl.BUARL`).

Differences from the public code, all measured or neutral: the teacher predicts both
unlabeled groups in one batched pass, the student predicts x_in and x_out in one pass, and
the teacher runs in eval mode by default (``teacher_mode``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from buseg.model.uncertainty import class_argmax
from buseg.training.copy_paste import box_mask, largest_component_per_class, mix
from buseg.training.losses import negative_loss, one_hot, region_loss
from buseg.training.methods.base import Batch, Method, StepContext, StepOutput


@dataclass
class MixedBatch:
    """The student's input and what each of its pixels should learn.

    ``truth_mask`` is 1 where the target is ground truth and 0 where it is a pseudo-label.
    ``teacher_probabilities`` are the teacher's class probabilities for the *source* image
    of each pixel, mixed with the same mask (used by subclasses for uncertainty).
    ``cleanup_changed`` is 1 on the pseudo-labeled pixels whose label the largest-component
    clean-up changed (the teacher's argmax there was another class), 0 elsewhere.
    """

    images: torch.Tensor
    targets: torch.Tensor
    truth_mask: torch.Tensor
    teacher_probabilities: torch.Tensor | None = None
    cleanup_changed: torch.Tensor | None = None


class BidirectionalCopyPaste(Method):
    name = "bcp"
    uses_teacher = True
    uses_unlabeled = True

    @property
    def pretrain_iterations(self) -> int:
        return self.config.optim.pretrain_iterations

    # -- hooks for subclasses -------------------------------------------------------------
    def teacher_sees_labeled(self) -> bool:
        """Whether the teacher must also predict the labeled images (for their uncertainty)."""
        return False

    def weighted_loss(self, ctx: StepContext, logits: torch.Tensor, mixed: MixedBatch) -> StepOutput:
        """BCP: truth pixels weigh 1, pseudo-labeled pixels ``unlabeled_weight``."""
        ones = torch.ones_like(mixed.truth_mask)
        return self.mixed_loss(logits, mixed, pseudo_weight=ones, url_selected=None)

    # -- the step ----------------------------------------------------------------------
    def step(self, ctx: StepContext, batch: Batch) -> StepOutput:
        if ctx.stage == "pretrain":
            return self.pretrain_step(ctx, batch)
        mixed = self.mix_batch(ctx, batch)
        logits = ctx.student(mixed.images)
        return self.weighted_loss(ctx, logits, mixed)

    def pretrain_step(self, ctx: StepContext, batch: Batch) -> StepOutput:
        images, targets = batch.labeled_images, batch.labeled_targets
        half = images.shape[0] // 2
        mask = box_mask(images.shape[2:], self.config.method.mask_ratio, ctx.generator, ctx.device)
        mixed_images = mix(images[:half], images[half : 2 * half], mask)
        mixed_targets = mix(targets[:half], targets[half : 2 * half], mask)
        logits = ctx.student(mixed_images)
        outside = mask.expand_as(mixed_targets)
        cache = self._cache(logits, mixed_targets)
        ones = torch.ones_like(outside)
        loss = region_loss(logits, mixed_targets, ones, outside, **cache) + region_loss(
            logits, mixed_targets, ones, 1 - outside, **cache
        )
        return StepOutput(loss, {"supervised": float(loss.detach())})

    @torch.no_grad()
    def mix_batch(self, ctx: StepContext, batch: Batch) -> MixedBatch:
        images, targets, unlabeled = batch.labeled_images, batch.labeled_targets, batch.unlabeled_images
        half = images.shape[0] // 2
        u_half = unlabeled.shape[0] // 2
        if u_half != half:
            raise ValueError("bcp needs as many unlabeled as labeled images per iteration")
        la, lb, ya, yb = images[:half], images[half : 2 * half], targets[:half], targets[half : 2 * half]
        ua, ub = unlabeled[:half], unlabeled[half : 2 * half]
        teacher_input = torch.cat([ua, ub, la, lb] if self.teacher_sees_labeled() else [ua, ub])
        probabilities = self.teacher_probabilities(ctx, teacher_input)
        argmax = class_argmax(probabilities[: 2 * half], torch.int64)
        pseudo = argmax
        if self.config.method.pseudo_label_lcc:
            pseudo = largest_component_per_class(argmax, self.num_classes)
        changed = (pseudo != argmax).float()
        pa, pb = pseudo[:half], pseudo[half:]
        mask = box_mask(images.shape[2:], self.config.method.mask_ratio, ctx.generator, ctx.device)
        x_in, x_out = mix(ua, la, mask), mix(lb, ub, mask)
        t_in, t_out = mix(pa, ya, mask), mix(yb, pb, mask)
        inside = (1 - mask).expand(half, *mask.shape)
        outside = mask.expand(half, *mask.shape)
        mixed_probabilities = None
        if probabilities is not None:
            qa, qb = probabilities[:half], probabilities[half : 2 * half]
            if self.teacher_sees_labeled():
                qla, qlb = probabilities[2 * half : 3 * half], probabilities[3 * half :]
            else:  # unused placeholders for the truth pixels
                qla, qlb = torch.zeros_like(qa), torch.zeros_like(qb)
            m = mask.unsqueeze(0)
            mixed_probabilities = torch.cat([mix(qa, qla, m), mix(qlb, qb, m)])
        none_changed = torch.zeros_like(changed[:half])
        return MixedBatch(
            images=torch.cat([x_in, x_out]),
            targets=torch.cat([t_in, t_out]).long(),
            truth_mask=torch.cat([inside, outside]).float(),
            teacher_probabilities=mixed_probabilities,
            cleanup_changed=torch.cat(
                [mix(changed[:half], none_changed, mask), mix(none_changed, changed[half:], mask)]
            ),
        )

    def teacher_probabilities(self, ctx: StepContext, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(ctx.teacher_forward(images).float(), dim=1)

    # -- loss over the two halves --------------------------------------------------------------
    def _cache(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        log_probabilities = F.log_softmax(logits.float(), dim=1)
        return {
            "log_probabilities": log_probabilities,
            "probabilities": log_probabilities.exp(),
            "target_one_hot": one_hot(targets, logits.shape[1]),
        }

    def mixed_loss(
        self,
        logits: torch.Tensor,
        mixed: MixedBatch,
        *,
        pseudo_weight: torch.Tensor,
        url_selected: torch.Tensor | None,
        url_weight: float = 0.0,
        url_dice: bool = False,
        pseudo_dice_weighted: bool = True,
        pseudo_extra: torch.Tensor | None = None,
        pseudo_extra_weight: float = 0.0,
        negative_weight: torch.Tensor | None = None,
        negative_classes: torch.Tensor | None = None,
    ) -> StepOutput:
        """Sum over the two halves (x_in, x_out) of the region losses, as the published recipe.

        truth:  region_loss(truth pixels, w = 1)
        pseudo: unlabeled_weight * [ region_loss(pseudo pixels, w = pseudo_weight)
                (``pseudo_dice_weighted=False``: the weights in CE only, Dice over all pseudo pixels)
                + pseudo_extra_weight * region_loss(pseudo pixels, w = pseudo_extra)   (if given)
                + negative_loss(pseudo pixels, negative_weight, negative_classes) ]   (if given)
        url:    url_weight * region_loss(truth pixels, w = url_selected, dice=url_dice)   (only if given)
        """
        half = logits.shape[0] // 2
        supervised = pseudo = url = logits.new_zeros(())
        for part in (slice(0, half), slice(half, 2 * half)):
            lg, tg, truth = logits[part], mixed.targets[part], mixed.truth_mask[part]
            cache = self._cache(lg, tg)
            supervised = supervised + region_loss(lg, tg, torch.ones_like(truth), truth, **cache)
            dice_weight = None if pseudo_dice_weighted else torch.ones_like(truth)
            pseudo = pseudo + region_loss(
                lg, tg, pseudo_weight[part], 1 - truth, dice_weight=dice_weight, **cache
            )
            if pseudo_extra is not None and pseudo_extra_weight > 0:
                pseudo = pseudo + pseudo_extra_weight * region_loss(
                    lg, tg, pseudo_extra[part], 1 - truth, dice=pseudo_dice_weighted, **cache
                )
            if negative_weight is not None:
                pseudo = pseudo + negative_loss(
                    cache["probabilities"], negative_weight[part], negative_classes[part], 1 - truth
                )
            if url_selected is not None and url_weight > 0:
                url = url + region_loss(lg, tg, url_selected[part], truth, dice=url_dice, **cache)
        loss = supervised + self.config.method.unlabeled_weight * pseudo + url_weight * url
        logs = {"supervised": float(supervised.detach()), "pseudo_label": float(pseudo.detach())}
        if url_selected is not None:
            logs["url"] = float(url.detach())
        return StepOutput(loss, logs)
