"""Segmentation losses with per-pixel weights, evaluated over regions.

The copy-paste methods split every mixed image into regions whose targets come from
different sources (ground truth inside the pasted box, pseudo-labels outside, or the
reverse). As in the published BCP recipe, each region gets its own cross-entropy (a mean
over the region's pixels) and its own soft Dice, and the region's loss is weighted by the
trust in its source. URL and CRL act through the per-pixel ``weight`` map:

    region_loss(r, w) = ( sum_{i in r} w_i CE_i / |r|  +  Dice_w(r) ) / 2

    Dice_w(r) = mean_k [ 1 - (2 sum_i w_i p_ik y_ik + s) / (sum_i w_i p_ik^2 + sum_i w_i y_ik + s) ]

with ``w_i = 0`` outside ``r``, ``p`` the softmax, ``y`` the one-hot target, ``k`` over all
classes including background (the reference averages over all classes), ``s = 1e-5``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

DICE_SMOOTH = 1e-5


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, *S) integer labels -> (N, C, *S) float one-hot."""
    return F.one_hot(target.long(), num_classes).movedim(-1, 1).float()


def weighted_dice_loss(
    probabilities: torch.Tensor, target_one_hot: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Soft Dice loss averaged over classes, each pixel counted with ``weight`` (N, *S)."""
    w = weight.unsqueeze(1)
    dims = [0, *range(2, probabilities.dim())]
    intersection = (w * probabilities * target_one_hot).sum(dims)
    denominator = (w * probabilities * probabilities).sum(dims) + (w * target_one_hot).sum(dims)
    dice = (2 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
    return (1 - dice).mean()


def region_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    region: torch.Tensor,
    *,
    log_probabilities: torch.Tensor | None = None,
    probabilities: torch.Tensor | None = None,
    target_one_hot: torch.Tensor | None = None,
    dice: bool = True,
    dice_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """(CE + Dice) / 2 over the pixels of ``region`` (N, *S, 0/1), each weighted by ``weight``.

    ``dice=False`` gives the CE half alone (CE / 2): the weighted pixels' share of the CE term.
    ``dice_weight`` (default ``weight``) weighs the pixels of the Dice half separately.

    CE is normalised by the region's pixel count (not by the weight sum), so pixels with
    weight 0 simply contribute nothing and extra weight adds loss. Precomputed softmax,
    log-softmax and one-hot can be passed to avoid recomputing them for several regions.
    """
    if log_probabilities is None:
        log_probabilities = F.log_softmax(logits.float(), dim=1)
    if probabilities is None:
        probabilities = log_probabilities.exp()
    if target_one_hot is None:
        target_one_hot = one_hot(target, logits.shape[1])
    region = region.float()
    pixel_weight = weight * region
    ce = F.nll_loss(log_probabilities, target.long(), reduction="none")
    ce_term = (ce * pixel_weight).sum() / region.sum().clamp_min(1.0)
    if not dice:
        return ce_term / 2
    dice_pixel_weight = pixel_weight if dice_weight is None else dice_weight * region
    dice_term = weighted_dice_loss(probabilities, target_one_hot, dice_pixel_weight)
    return (ce_term + dice_term) / 2


def negative_loss(
    probabilities: torch.Tensor, weight: torch.Tensor, negative_classes: torch.Tensor, region: torch.Tensor
) -> torch.Tensor:
    """Negative learning (UPS): teach "not class k" for the classes in ``negative_classes``.

        NL(r, w) = sum_{i in r} w_i * ( -1/|N_i| sum_{k in N_i} log(1 - p_ik) ) / |r|

    ``probabilities`` (N, C, *S) is the student's softmax, ``negative_classes`` (N, C, *S) 0/1
    marks N_i, ``weight`` and ``region`` are (N, *S). Pixels without a negative class add
    nothing; like the CE of :func:`region_loss`, the sum is normalised by the region's size.
    """
    negatives = negative_classes.float()
    count = negatives.sum(1)
    per_class = -torch.log((1 - probabilities.float()).clamp_min(1e-6)) * negatives
    per_pixel = per_class.sum(1) / count.clamp_min(1.0)
    region = region.float()
    return (per_pixel * weight * region).sum() / region.sum().clamp_min(1.0)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain supervised loss (CE + Dice) / 2 over all pixels (the reference's)."""
    ones = torch.ones(target.shape, device=logits.device)
    return region_loss(logits, target, ones, ones)
