"""Ours: bidirectional uncertainty-aware region learning on top of BCP.

Every pixel of a copy-paste mixed image knows whether its target is ground truth or a
pseudo-label, and has an uncertainty ``u`` in 0..1 (normalised predictive entropy, see
:mod:`buseg.model.uncertainty`). Two region rules act on the per-pixel loss weights:

* **URL** (labeled pixels): the high-uncertainty region of the truth pixels of each mixed
  image, S = {truth pixels with u > their per-image ``url.quantile`` and u > ``url.min_uncertainty``},
  gets an extra loss term ``url.weight * region_loss(truth pixels, w = 1[S])``: exact labels
  teach the model where it is unsure.
* **CRL** (pseudo-labeled pixels): a certainty ``c = 1[u <= tau]`` (hard) or
  ``c = clip(1 - u / tau, 0, 1)`` (soft), tau fixed, ramped (from ``crl.threshold_start`` to
  ``crl.threshold``), a batch quantile, or one quantile per pseudo-label class
  (``class-quantile``). ``crl.weighting`` says what c does: ``discard`` (the pseudo-label loss
  keeps only the certain pixels, w = c), ``concentration`` (every pixel keeps BCP's loss and the
  certain ones get an extra term), ``foreground`` (discard without ever dropping background, the
  dropped share shrinking over training), ``negative`` (discard, plus "not class k" learning on
  the uncertain pixels). ``crl.uncertainty_after_cleanup`` takes u of the pixels the
  largest-component clean-up changed among the classes it left.
* A control for URL (``url.selection='random'``): as many truth pixels per image as URL selects,
  drawn at random.

Where u comes from: for pseudo-labeled pixels, the teacher's prediction on the unlabeled
image, which BCP computes anyway (free). For truth pixels, by default the student's own
detached prediction on the mixed image (``url.source='student'``, free), or the teacher's
batched pass extended to the labeled images (``url.source='teacher'``, ~1.2x the cost). With
``uncertainty.method='mc-dropout'`` the teacher probabilities are the mean of
``uncertainty.samples`` dropout passes. Switching both parts off gives exactly BCP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from buseg.catalogs.measures import measure
from buseg.model.uncertainty import entropy_without_argmax, normalized_entropy
from buseg.training.methods.base import StepContext, StepOutput
from buseg.training.methods.bcp import BidirectionalCopyPaste, MixedBatch


def crl_threshold(config, stage_iteration: int) -> float:
    """The ramped/fixed uncertainty threshold tau at a self-training iteration."""
    c = config.crl
    if c.threshold_mode == "ramp" and c.ramp_iterations > 0:
        t = min(1.0, stage_iteration / c.ramp_iterations)
        return c.threshold_start + (c.threshold - c.threshold_start) * t
    return c.threshold


def crl_shrink(config, stage_iteration: int) -> float:
    """``foreground``: the factor (1 down to 0) applied to the dropped share at a self-training
    iteration, s = max(0, 1 - t / T) (U2PL's linear schedule); 1 for the other weightings."""
    c = config.crl
    if c.weighting != "foreground":
        return 1.0
    length = config.optim.iterations if c.shrink_iterations is None else c.shrink_iterations
    if length <= 0:
        return 1.0
    return max(0.0, 1.0 - stage_iteration / length)


def _shrunk(value: float, shrink: float) -> float:
    """A kept fraction or threshold whose complement (the dropped share) is scaled by ``shrink``."""
    return value if shrink >= 1.0 else 1.0 - (1.0 - value) * shrink


@dataclass
class PseudoWeights:
    """Per-pixel weights of the pseudo-label term for one CRL weighting (docs/method.md).

    ``base`` weighs L(P, .); ``certainty`` is c (logged as the kept fraction); ``extra`` (concentration)
    weighs the extra term L(P, c); ``negative`` (negative learning) weighs NL(P, 1 - c) over the classes
    in ``negative_classes``.
    """

    base: torch.Tensor
    certainty: torch.Tensor
    extra: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    negative_classes: torch.Tensor | None = None


def crl_pseudo_weights(
    config,
    uncertainty: torch.Tensor,
    pseudo_region: torch.Tensor,
    pseudo_labels: torch.Tensor,
    teacher_probabilities: torch.Tensor,
    stage_iteration: int,
) -> tuple[PseudoWeights, float]:
    """The CRL weights of ``config.crl.weighting`` and the threshold used (see :func:`certainty_weights`)."""
    c = config.crl
    shrink = crl_shrink(config, stage_iteration)
    certainty, tau = certainty_weights(
        uncertainty,
        pseudo_region,
        mode=c.mode,
        threshold_mode=c.threshold_mode,
        threshold=_shrunk(crl_threshold(config, stage_iteration), shrink),
        quantile=_shrunk(c.quantile, shrink),
        pseudo_labels=pseudo_labels,
    )
    if c.weighting == "foreground":
        certainty = torch.where(pseudo_labels == 0, pseudo_region, certainty)
    if c.weighting == "concentration":
        return PseudoWeights(base=pseudo_region.clone(), certainty=certainty, extra=certainty), tau
    if c.weighting == "negative":
        classes = torch.arange(teacher_probabilities.shape[1], device=pseudo_labels.device)
        is_target = classes.view(1, -1, *([1] * (pseudo_labels.dim() - 1))) == pseudo_labels.unsqueeze(1)
        negative_classes = (teacher_probabilities < c.negative_threshold) & ~is_target
        return PseudoWeights(
            base=certainty,
            certainty=certainty,
            negative=(1 - certainty) * pseudo_region,
            negative_classes=negative_classes,
        ), tau
    return PseudoWeights(base=certainty, certainty=certainty), tau


def certainty_weights(
    uncertainty: torch.Tensor,
    pseudo_region: torch.Tensor,
    *,
    mode: str,
    threshold_mode: str,
    threshold: float,
    quantile: float,
    pseudo_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """CRL weights of pseudo-labeled pixels (0 elsewhere) and the threshold used (the mean of the
    per-class thresholds for ``class-quantile``)."""
    region = pseudo_region > 0
    if threshold_mode == "quantile":
        threshold = max(_quantile(uncertainty[region], quantile, default=1.0), 1e-6)
    elif threshold_mode == "class-quantile":
        if pseudo_labels is None:
            raise ValueError("class-quantile needs the pseudo-labels")
        # One cut per pseudo-label class: foreground pixels are more uncertain than background,
        # so one cut for all would drop the structures first and teach the student to shrink them.
        cuts = class_quantiles(uncertainty[region], pseudo_labels[region].long(), quantile)
        present = cuts[~torch.isnan(cuts)]
        threshold = float(present.mean()) if present.numel() else 1.0
        cut = cuts.nan_to_num(1.0).clamp_min(1e-6)[pseudo_labels.long().clamp(0, cuts.numel() - 1)]
        return _weights(uncertainty, cut, mode) * pseudo_region, threshold
    return _weights(uncertainty, threshold, mode) * pseudo_region, threshold


def class_quantiles(values: torch.Tensor, labels: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of non-negative ``values`` within each label (NaN for absent labels).

    Linear interpolation as :func:`torch.quantile` does, for all labels with one sort: the
    key ``label * stride + value`` (stride above the largest value) orders by label, then by
    value (tested against one ``torch.quantile`` per label).
    """
    if values.numel() == 0:
        return torch.full((1,), float("nan"), device=values.device)
    counts = torch.bincount(labels)
    stride = float(values.max()) + 1.0
    keys = (labels.double() * stride + values.double()).sort().values
    ordered = keys - torch.floor(keys / stride) * stride
    starts = counts.cumsum(0) - counts
    position = (counts - 1).clamp_min(0).double() * q
    low, frac = position.floor().long(), position - position.floor()
    high = (low + 1).clamp_max((counts - 1).clamp_min(0))
    last = ordered.numel() - 1
    below = ordered[(starts + low).clamp_max(last)]
    above = ordered[(starts + high).clamp_max(last)]
    cuts = (below + (above - below) * frac).to(values.dtype)
    return torch.where(counts > 0, cuts, torch.full_like(cuts, float("nan")))


def _weights(uncertainty: torch.Tensor, threshold: torch.Tensor | float, mode: str) -> torch.Tensor:
    if mode == "hard":
        return (uncertainty <= threshold).float()
    return (1 - uncertainty / threshold).clamp(0, 1)


def _quantile(values: torch.Tensor, q: float, *, default: float) -> float:
    """``torch.quantile`` of a flat tensor (kthvalue beyond quantile's size limit); ``default`` if empty."""
    values = values.float().reshape(-1)
    if values.numel() == 0:
        return default
    if values.numel() < _QUANTILE_LIMIT:
        return float(torch.quantile(values, q))
    return float(values.kthvalue(max(1, int(q * values.numel()))).values)


def url_selection(
    uncertainty: torch.Tensor, truth_region: torch.Tensor, *, quantile: float, min_uncertainty: float
) -> torch.Tensor:
    """1 on the truth pixels of each image whose uncertainty is in its top (1 - quantile) and > min.

    The per-image cut is the ``quantile`` of that image's truth-pixel uncertainties (linear
    interpolation, as :func:`torch.quantile`), computed for the whole batch at once: pixels
    outside the truth region become NaN and :func:`torch.nanquantile` skips them (an image
    without truth pixels gets a NaN cut and selects nothing). Same result as one
    ``torch.quantile`` per image (tested), without the per-image loop and its host syncs.
    """
    count = uncertainty.shape[0]
    flat = uncertainty.reshape(count, -1).float()
    region = truth_region.reshape(count, -1) > 0
    if flat.shape[1] >= _QUANTILE_LIMIT:  # torch.quantile's size limit: one image at a time
        return _url_selection_per_image(
            uncertainty, truth_region, quantile=quantile, min_uncertainty=min_uncertainty
        )
    rows_per_chunk = max(1, _QUANTILE_LIMIT // flat.shape[1])
    cuts = torch.cat(
        [
            torch.nanquantile(torch.where(r, f, torch.nan), quantile, dim=1, keepdim=True)
            for f, r in zip(flat.split(rows_per_chunk), region.split(rows_per_chunk), strict=True)
        ]
    )
    selected = region & (flat > cuts) & (flat > min_uncertainty)
    return selected.reshape(uncertainty.shape).to(uncertainty.dtype)


_QUANTILE_LIMIT = 2**24  # torch.quantile refuses inputs with more elements


def random_selection_like(
    selected: torch.Tensor, truth_region: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The URL control: in every image as many truth pixels as ``selected`` holds, drawn uniformly
    at random among its truth pixels (``generator`` on the CPU, as the run's other random draws)."""
    count = selected.shape[0]
    wanted = selected.reshape(count, -1).sum(1, keepdim=True)
    region = truth_region.reshape(count, -1) > 0
    scores = torch.rand(region.shape, generator=generator).to(region.device)
    scores = torch.where(region, scores, torch.full_like(scores, -1.0))  # non-truth pixels rank last
    order = scores.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return ((rank < wanted) & region).reshape(selected.shape).to(selected.dtype)


def _url_selection_per_image(
    uncertainty: torch.Tensor, truth_region: torch.Tensor, *, quantile: float, min_uncertainty: float
) -> torch.Tensor:
    """The straightforward per-image selection (kthvalue where an image is too large for quantile)."""
    selected = torch.zeros_like(uncertainty)
    for index in range(uncertainty.shape[0]):
        region = truth_region[index] > 0
        values = uncertainty[index][region]
        if values.numel() == 0:
            continue
        cut = _quantile(values, quantile, default=1.0)
        selected[index] = (
            region & (uncertainty[index] > cut) & (uncertainty[index] > min_uncertainty)
        ).float()
    return selected


class BUARL(BidirectionalCopyPaste):
    name = "buarl"

    def teacher_sees_labeled(self) -> bool:
        return self.config.url.enabled and self.url_source == "teacher"

    @property
    def url_source(self) -> str:
        return self.config.url.source

    def teacher_probabilities(self, ctx: StepContext, images: torch.Tensor) -> torch.Tensor:
        # A measure that is more than the teacher's own deterministic pass (MC dropout: several
        # passes, dropout on) computes the probabilities whose entropy URL and CRL read; the
        # measures' catalog says which, so a new measure needs no change here.
        u = self.config.uncertainty
        chosen = measure(u.method)
        more_than_one_pass = chosen.needs_dropout or chosen.passes(u.samples, images.ndim - 2) > 1
        if more_than_one_pass and (self.config.url.enabled or self.config.crl.enabled):
            return chosen.probabilities(ctx.teacher, ctx.teacher_forward, u.samples)(images)
        return super().teacher_probabilities(ctx, images)

    def weighted_loss(self, ctx: StepContext, logits: torch.Tensor, mixed: MixedBatch) -> StepOutput:
        url, crl = self.config.url, self.config.crl
        logs: dict[str, float] = {}
        with torch.no_grad():
            teacher_uncertainty = normalized_entropy(mixed.teacher_probabilities)
            weights = self.pseudo_weights(ctx, mixed, teacher_uncertainty, logs)
            selected = (
                self.url_selected(ctx, logits, mixed, teacher_uncertainty, logs) if url.enabled else None
            )
        output = self.mixed_loss(
            logits,
            mixed,
            pseudo_weight=weights.base,
            url_selected=selected,
            url_weight=url.weight if url.enabled else 0.0,
            url_dice=url.loss == "ce+dice",
            pseudo_dice_weighted=crl.loss == "ce+dice",
            pseudo_extra=weights.extra,
            pseudo_extra_weight=crl.extra_weight,
            negative_weight=weights.negative,
            negative_classes=weights.negative_classes,
        )
        if crl.enabled:
            output.logs["crl"] = output.logs.pop("pseudo_label")
        output.logs.update(logs)
        return output

    def pseudo_weights(
        self, ctx: StepContext, mixed: MixedBatch, teacher_uncertainty: torch.Tensor, logs: dict[str, float]
    ) -> PseudoWeights:
        """CRL's weights of the pseudo-labeled pixels (all 1 without CRL: BCP's loss)."""
        crl = self.config.crl
        pseudo_region = 1 - mixed.truth_mask
        if not crl.enabled:
            return PseudoWeights(base=torch.ones_like(pseudo_region), certainty=pseudo_region)
        uncertainty = teacher_uncertainty
        if crl.uncertainty_after_cleanup and mixed.cleanup_changed is not None:
            # The clean-up ruled the teacher's argmax out there: its certainty among the classes left.
            changed = mixed.cleanup_changed > 0
            uncertainty = torch.where(
                changed, entropy_without_argmax(mixed.teacher_probabilities), uncertainty
            )
            logs["crl_cleanup_changed_fraction"] = float(changed.sum() / pseudo_region.sum().clamp_min(1))
        weights, tau = crl_pseudo_weights(
            self.config,
            uncertainty,
            pseudo_region,
            mixed.targets,
            mixed.teacher_probabilities,
            ctx.stage_iteration,
        )
        logs["crl_threshold"] = tau
        logs["crl_kept_fraction"] = float(weights.certainty.sum() / pseudo_region.sum().clamp_min(1))
        return weights

    def url_selected(
        self,
        ctx: StepContext,
        logits: torch.Tensor,
        mixed: MixedBatch,
        teacher_uncertainty: torch.Tensor,
        logs: dict[str, float],
    ) -> torch.Tensor:
        """URL's selected truth pixels (or, for the random control, as many drawn at random)."""
        url, truth = self.config.url, mixed.truth_mask
        if self.url_source == "student":
            truth_uncertainty = normalized_entropy(torch.softmax(logits.detach().float(), dim=1))
        else:
            truth_uncertainty = teacher_uncertainty
        selected = url_selection(
            truth_uncertainty, truth, quantile=url.quantile, min_uncertainty=url.min_uncertainty
        )
        if url.selection == "random":
            selected = random_selection_like(selected, truth, ctx.generator)
        logs["url_selected_fraction"] = float(selected.sum() / truth.sum().clamp_min(1))
        return selected
