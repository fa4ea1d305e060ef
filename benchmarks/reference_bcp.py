"""A plain reference BCP self-training step, the yardstick of ``benchmarks/speed.py``.

Written the straightforward way the public BCP code (DeepMed-Lab-ECNU/BCP,
``code/ACDC_BCP_train.py`` and ``code/LA_BCP_train.py``) does one self-training iteration,
in our own words and with its structure kept, so that the speed benchmark compares our
engine with what a user of the public code would run:

* the EMA teacher predicts the two unlabeled groups in **two separate passes**, under
  ``torch.no_grad`` but in **train mode** (batch BatchNorm statistics, dropout active);
* pseudo-labels: softmax, then argmax (2D) or ``p >= 0.5`` of the foreground (3D), then the
  largest connected component **per image and per class**, each one copied to the host as
  numpy, labelled (``scipy.ndimage.label`` with full connectivity, what
  ``skimage.measure.label`` does by default; skimage is not installed here) and the cleaned
  batch copied back to the device;
* one box mask drawn with ``numpy.random`` (side ``mask_ratio`` of each image side);
* the two mixed images go through the student in **two separate passes**;
* ``mix_loss``: a masked Dice (the 2D one loops over classes with a hand-made one-hot; the
  3D one scatters a one-hot and averages per image) plus a masked cross-entropy, for the
  image part and the pasted part of each mixed image, weights 1 (truth) and 0.5 (pseudo);
* SGD step, then the EMA update: 2D through ``state_dict`` for every key (parameters and
  BatchNorm buffers), 3D over the parameters only, as each public script does.

``semantics="ours"`` keeps this straightforward code but computes what our engine computes
(teacher in eval mode, one teacher pass over both unlabeled groups, one student pass over
both mixed images): the like-for-like yardstick, whose difference from our engine is only
how it is implemented, not what it computes. ``semantics="public"`` is the public code.

The loss of one mixed image equals ours (:func:`buseg.training.losses.region_loss` summed as in
:class:`buseg.training.methods.bcp.BidirectionalCopyPaste`) up to the Dice smoothing constant
(1e-10 here, as the public 2D code; 1e-5 in ours) in 2D; the public 3D Dice differs
(union ``p + y`` per image instead of ``p^2 + y`` over the batch), which changes nothing
in the cost. ``Testing/Python/test_speed_equivalence.py`` checks the 2D equality.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

# --------------------------------------------------------------------------------------
# Pseudo-label clean-up: per image, per class, with a host round trip each time


def largest_component_2d(segmentation: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) class indices -> the largest 8-connected component of every class, per image.

    Mirrors the public 2D clean-up: a loop over images and classes, a 0/1 map per class
    built on the device, copied to numpy, labelled, its largest component kept (a class
    without pixels stays empty), the per-class maps summed, the batch sent back.
    """
    structure = ndimage.generate_binary_structure(2, 2)
    cleaned_images = []
    for index in range(segmentation.shape[0]):
        image = segmentation[index]
        per_class = []
        for cls in range(1, num_classes):
            binary = torch.zeros_like(image)
            binary[image == cls] = 1
            binary = binary.detach().cpu().numpy()
            components, count = ndimage.label(binary, structure=structure)
            if count:
                largest = np.argmax(np.bincount(components.flat)[1:]) + 1
                per_class.append((components == largest) * cls)
            else:
                per_class.append(binary)
        cleaned_images.append(sum(per_class))
    return _tensor_from_arrays(cleaned_images, segmentation.device)


def largest_component_3d(segmentation: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) 0/1 foreground -> its largest 26-connected component, per image (binary, LA)."""
    structure = ndimage.generate_binary_structure(3, 3)
    cleaned_images = []
    for index in range(segmentation.shape[0]):
        binary = segmentation[index].detach().cpu().numpy()
        components, count = ndimage.label(binary, structure=structure)
        if count:
            largest = np.argmax(np.bincount(components.flat)[1:]) + 1
            cleaned_images.append(components == largest)
        else:
            cleaned_images.append(binary)
    return _tensor_from_arrays(cleaned_images, segmentation.device)


def _tensor_from_arrays(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """``torch.Tensor(list of arrays)`` as the public code builds the batch (the slow path, kept)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that this path is slow: it is the point
        return torch.Tensor(arrays).to(device)


def pseudo_labels(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Softmax, then argmax (2D, multi-class) or foreground >= 0.5 (3D, binary), then the clean-up."""
    probabilities = F.softmax(logits, dim=1)
    if logits.dim() == 4:
        _, hard = torch.max(probabilities, dim=1)
        return largest_component_2d(hard, num_classes)
    hard = (probabilities >= 0.5).long()[:, 1].contiguous()
    return largest_component_3d(hard)


# --------------------------------------------------------------------------------------
# The box mask


def box_masks(
    images: torch.Tensor, ratio: float, rng: np.random.RandomState
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image mask (*S), loss mask (N, *S)): 0 inside one random box, 1 outside, as long tensors.

    The box side is ``int(side * ratio)`` along every spatial axis; its corner is drawn with
    numpy (``randint(0, side - box)``, so the box never touches the far border, as the
    public code), and both masks are built on the device.
    """
    spatial = images.shape[2:]
    batch = images.shape[0]
    loss_mask = torch.ones(batch, *spatial, device=images.device)
    mask = torch.ones(*spatial, device=images.device)
    box = []
    for side in spatial:
        length = int(side * ratio)
        start = rng.randint(0, side - length)
        box.append(slice(start, start + length))
    mask[tuple(box)] = 0
    loss_mask[(slice(None), *box)] = 0
    return mask.long(), loss_mask.long()


# --------------------------------------------------------------------------------------
# Losses


class MaskedDiceLoss2d(nn.Module):
    """Dice over the masked pixels of the whole batch, class by class (the public 2D DiceLoss)."""

    def __init__(self, num_classes: int, smooth: float = 1e-10):
        super().__init__()
        self.num_classes = num_classes
        self.smooth = smooth

    def _one_hot(self, target: torch.Tensor) -> torch.Tensor:
        planes = [target == cls * torch.ones_like(target) for cls in range(self.num_classes)]
        return torch.cat(planes, dim=1).float()

    def _class_loss(self, score: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target, mask = target.float(), mask.float()
        intersection = torch.sum(score * target * mask)
        target_sum = torch.sum(target * target * mask)
        score_sum = torch.sum(score * score * mask)
        return 1 - (2 * intersection + self.smooth) / (score_sum + target_sum + self.smooth)

    def forward(self, probabilities: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        one_hot = self._one_hot(target)
        mask = mask.repeat(1, self.num_classes, 1, 1).float()
        loss = 0.0
        for cls in range(self.num_classes):
            loss = loss + self._class_loss(probabilities[:, cls], one_hot[:, cls], mask[:, cls])
        return loss / self.num_classes


class MaskedDiceLoss3d(nn.Module):
    """Dice per image and class over the masked voxels, averaged (the public 3D mask_DiceLoss)."""

    def __init__(self, num_classes: int, smooth: float = 1e-5):
        super().__init__()
        self.num_classes = num_classes
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch = logits.shape[0]
        probabilities = F.softmax(logits.view(batch, self.num_classes, -1), dim=1)
        target = target.view(batch, 1, -1).long()
        one_hot = torch.zeros(batch, self.num_classes, target.shape[-1], device=logits.device)
        one_hot = one_hot.scatter_(1, target, 1)
        mask = mask.view(batch, 1, -1)
        intersection = (probabilities * one_hot * mask).sum(2)
        union = ((probabilities + one_hot) * mask).sum(2)
        dice = (2 * intersection + self.smooth) / (union + self.smooth)
        return 1 - dice.mean()


def mix_loss_2d(
    dice: MaskedDiceLoss2d,
    logits: torch.Tensor,
    image_target: torch.Tensor,
    patch_target: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    truth_weight: float = 1.0,
    pseudo_weight: float = 0.5,
    image_is_pseudo: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Dice, CE) of a mixed image: ``image_target`` outside the box (mask 1), ``patch_target`` inside.

    The part whose target is a pseudo-label weighs ``pseudo_weight``, the other ``truth_weight``.
    """
    cross_entropy = nn.CrossEntropyLoss(reduction="none")
    image_target, patch_target = image_target.long(), patch_target.long()
    probabilities = F.softmax(logits, dim=1)
    image_weight, patch_weight = (
        (pseudo_weight, truth_weight) if image_is_pseudo else (truth_weight, pseudo_weight)
    )
    patch_mask = 1 - loss_mask
    dice_loss = dice(probabilities, image_target.unsqueeze(1), loss_mask.unsqueeze(1)) * image_weight
    dice_loss = (
        dice_loss + dice(probabilities, patch_target.unsqueeze(1), patch_mask.unsqueeze(1)) * patch_weight
    )
    ce_loss = (
        image_weight * (cross_entropy(logits, image_target) * loss_mask).sum() / (loss_mask.sum() + 1e-16)
    )
    ce_loss = ce_loss + patch_weight * (cross_entropy(logits, patch_target) * patch_mask).sum() / (
        patch_mask.sum() + 1e-16
    )
    return dice_loss, ce_loss


def mix_loss_3d(
    dice: MaskedDiceLoss3d,
    logits: torch.Tensor,
    image_target: torch.Tensor,
    patch_target: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    truth_weight: float = 1.0,
    pseudo_weight: float = 0.5,
    image_is_pseudo: bool = False,
) -> torch.Tensor:
    """(Dice + CE) / 2 of a mixed volume, the public 3D ``mix_loss``."""
    cross_entropy = nn.CrossEntropyLoss(reduction="none")
    image_target, patch_target = image_target.long(), patch_target.long()
    image_weight, patch_weight = (
        (pseudo_weight, truth_weight) if image_is_pseudo else (truth_weight, pseudo_weight)
    )
    patch_mask = 1 - loss_mask
    dice_loss = dice(logits, image_target, loss_mask) * image_weight
    dice_loss = dice_loss + dice(logits, patch_target, patch_mask) * patch_weight
    ce_loss = (
        image_weight * (cross_entropy(logits, image_target) * loss_mask).sum() / (loss_mask.sum() + 1e-16)
    )
    ce_loss = ce_loss + patch_weight * (cross_entropy(logits, patch_target) * patch_mask).sum() / (
        patch_mask.sum() + 1e-16
    )
    return (dice_loss + ce_loss) / 2


# --------------------------------------------------------------------------------------
# EMA


def ema_through_state_dict(student: nn.Module, teacher: nn.Module, alpha: float) -> None:
    """teacher = alpha * teacher + (1 - alpha) * student for every state_dict entry, then loaded (2D)."""
    student_state = student.state_dict()
    teacher_state = teacher.state_dict()
    averaged = {key: alpha * teacher_state[key] + (1 - alpha) * student_state[key] for key in student_state}
    teacher.load_state_dict(averaged)


@torch.no_grad()
def ema_parameters(student: nn.Module, teacher: nn.Module, alpha: float) -> None:
    """The same over the parameters only (3D)."""
    for teacher_parameter, parameter in zip(teacher.parameters(), student.parameters(), strict=True):
        teacher_parameter.data.mul_(alpha).add_((1 - alpha) * parameter.data)


# --------------------------------------------------------------------------------------
# The step


@dataclass
class ReferenceOutput:
    loss: float
    dice: float
    ce: float


class ReferenceBCP:
    """One BCP self-training iteration at a time, the public code's way (see the module docstring).

    ``labeled`` and ``unlabeled`` batches hold two groups each (first half a, second half b).
    ``teacher`` is an EMA copy of ``student``; ``optimizer`` optimises ``student``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        num_classes: int,
        mask_ratio: float = 2 / 3,
        unlabeled_weight: float = 0.5,
        ema_decay: float = 0.99,
        semantics: str = "public",
        seed: int = 1337,
    ):
        if semantics not in ("public", "ours"):
            raise ValueError("semantics must be 'public' or 'ours'")
        self.student, self.teacher, self.optimizer = student, teacher, optimizer
        self.num_classes = num_classes
        self.mask_ratio = mask_ratio
        self.unlabeled_weight = unlabeled_weight
        self.ema_decay = ema_decay
        self.semantics = semantics
        self.rng = np.random.RandomState(seed)
        for parameter in self.teacher.parameters():
            parameter.detach_()
        self.dice_2d = MaskedDiceLoss2d(num_classes)
        self.dice_3d = MaskedDiceLoss3d(num_classes)

    def _teacher_logits(
        self, unlabeled_a: torch.Tensor, unlabeled_b: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        if self.semantics == "public":
            self.teacher.train()
            return self.teacher(unlabeled_a), self.teacher(unlabeled_b)
        self.teacher.eval()
        logits = self.teacher(torch.cat([unlabeled_a, unlabeled_b]))
        return logits[: unlabeled_a.shape[0]], logits[unlabeled_a.shape[0] :]

    def _student_logits(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.semantics == "public":
            return self.student(first), self.student(second)
        logits = self.student(torch.cat([first, second]))
        return logits[: first.shape[0]], logits[first.shape[0] :]

    def step(self, images: torch.Tensor, targets: torch.Tensor, unlabeled: torch.Tensor) -> ReferenceOutput:
        self.student.train()
        half = images.shape[0] // 2
        img_a, img_b = images[:half], images[half : 2 * half]
        lab_a, lab_b = targets[:half], targets[half : 2 * half]
        uimg_a, uimg_b = unlabeled[:half], unlabeled[half : 2 * half]
        three_d = images.dim() == 5
        with torch.no_grad():
            pre_a, pre_b = self._teacher_logits(uimg_a, uimg_b)
            plab_a = pseudo_labels(pre_a, self.num_classes)
            plab_b = pseudo_labels(pre_b, self.num_classes)
            img_mask, loss_mask = box_masks(img_a, self.mask_ratio, self.rng)
        if three_d:
            # LA script: labeled image outside the box, unlabeled inside (and the reverse).
            mixl_img = img_a * img_mask + uimg_a * (1 - img_mask)
            mixu_img = uimg_b * img_mask + img_b * (1 - img_mask)
            out_l, out_u = self._student_logits(mixl_img, mixu_img)
            w = self.unlabeled_weight
            loss_l = mix_loss_3d(self.dice_3d, out_l, lab_a, plab_a, loss_mask, pseudo_weight=w)
            loss_u = mix_loss_3d(
                self.dice_3d, out_u, plab_b, lab_b, loss_mask, pseudo_weight=w, image_is_pseudo=True
            )
            loss = loss_l + loss_u
            dice_value = ce_value = float("nan")
        else:
            # ACDC script: unlabeled image outside the box, labeled inside (and the reverse).
            net_input_unl = uimg_a * img_mask + img_a * (1 - img_mask)
            net_input_l = img_b * img_mask + uimg_b * (1 - img_mask)
            out_unl, out_l = self._student_logits(net_input_unl, net_input_l)
            w = self.unlabeled_weight
            unl_dice, unl_ce = mix_loss_2d(
                self.dice_2d, out_unl, plab_a, lab_a, loss_mask, pseudo_weight=w, image_is_pseudo=True
            )
            l_dice, l_ce = mix_loss_2d(self.dice_2d, out_l, lab_b, plab_b, loss_mask, pseudo_weight=w)
            loss_dice, loss_ce = unl_dice + l_dice, unl_ce + l_ce
            loss = (loss_dice + loss_ce) / 2
            dice_value, ce_value = float(loss_dice.detach()), float(loss_ce.detach())
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if three_d and self.semantics == "public":
            ema_parameters(self.student, self.teacher, self.ema_decay)
        else:
            ema_through_state_dict(self.student, self.teacher, self.ema_decay)
        return ReferenceOutput(float(loss.detach()), dice_value, ce_value)
