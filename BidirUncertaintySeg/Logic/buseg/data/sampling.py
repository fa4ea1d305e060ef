"""Random training batches with the reference augmentation, drawn from data held in memory.

All randomness comes from one ``torch.Generator`` owned by the training loop, so a run is
reproducible from its seed and resumable from a checkpoint (the generator state is saved).

* 2D (:class:`SliceSampler`): slices are resized once to the network input size; each draw
  picks slices with replacement and augments them as the reference ``RandomGenerator``:
  with probability 1/2 a random rot90 and flip, else with probability 1/2 a random
  rotation in [-20, 20) degrees (bilinear for images, nearest for labels).
* 3D (:class:`PatchSampler`): a random rot90 in the axial plane and flip (reference
  ``RandomRotFlip``), then a random crop of the patch size (volumes smaller than the patch
  are zero-padded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from buseg.data.preprocessing import resize_slices


def _randint(high: int, generator: torch.Generator, size: int = 1) -> torch.Tensor:
    return torch.randint(0, high, (size,), generator=generator)


def _label_dtype(labels: Sequence[np.ndarray], *, numpy: bool = False) -> torch.dtype | type:
    """uint8 for class indices up to 255 (a quarter of int32's memory), int32 beyond: a narrower
    type would wrap class 256 around to background without a word."""
    wide = any(np.asarray(lab).size and int(np.asarray(lab).max()) > 255 for lab in labels)
    if numpy:
        return np.int32 if wide else np.uint8
    return torch.int32 if wide else torch.uint8


class SliceSampler:
    """2D slices (all resized to ``size_hw`` up front) and their labels."""

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray] | None,
        size_hw: Sequence[int],
        *,
        augment: bool = True,
    ):
        if not images:
            raise ValueError("no slices to sample from")
        self.size_hw = tuple(int(s) for s in size_hw)
        self.augment = augment
        self.images = torch.cat(
            [
                resize_slices(
                    torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None],
                    self.size_hw,
                    mode="bilinear",
                )
                for img in images
            ]
        )
        self.labels = None
        if labels is not None:
            self.labels = torch.cat(
                [
                    resize_slices(
                        torch.from_numpy(np.asarray(lab, dtype=np.float32))[None, None],
                        self.size_hw,
                        mode="nearest",
                    )
                    for lab in labels
                ]
            )[:, 0].to(_label_dtype(labels))

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = _randint(len(self), generator, count)
        images = self.images[index].clone()
        labels = self.labels[index].clone().float() if self.labels is not None else None
        if self.augment:
            images, labels = augment_2d(images, labels, generator)
        return images, (labels.round().long() if labels is not None else None)


def augment_2d(
    images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference 2D augmentation on a batch (N, 1, H, W) and labels (N, H, W) as float."""
    count = images.shape[0]
    choice = torch.rand(count, generator=generator)
    second = torch.rand(count, generator=generator)
    ks = _randint(4, generator, count)
    axes = _randint(2, generator, count)
    angles = (torch.rand(count, generator=generator) * 40 - 20) * math.pi / 180
    square = images.shape[-1] == images.shape[-2]
    rotate = []
    for i in range(count):
        if choice[i] > 0.5:
            k = int(ks[i]) if square else 2 * (int(ks[i]) % 2)  # keep the shape of non-square slices
            images[i] = torch.flip(torch.rot90(images[i], k, dims=(-2, -1)), dims=(-2 + int(axes[i]),))
            if labels is not None:
                labels[i] = torch.flip(torch.rot90(labels[i], k, dims=(-2, -1)), dims=(-2 + int(axes[i]),))
        elif second[i] > 0.5:
            rotate.append(i)
    if rotate:
        idx = torch.tensor(rotate)
        theta = torch.zeros(len(rotate), 2, 3)
        cos, sin = torch.cos(angles[idx]), torch.sin(angles[idx])
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        grid = F.affine_grid(theta, [len(rotate), 1, *images.shape[-2:]], align_corners=False)
        images[idx] = F.grid_sample(
            images[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        if labels is not None:
            labels[idx] = F.grid_sample(
                labels[idx][:, None], grid, mode="nearest", padding_mode="zeros", align_corners=False
            )[:, 0]
    return images, labels


class PatchSampler:
    """3D volumes (z, y, x) and labels; draws augmented random patches of ``patch_zyx``."""

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray] | None,
        patch_zyx: Sequence[int],
        *,
        augment: bool = True,
    ):
        if not images:
            raise ValueError("no volumes to sample from")
        self.patch = tuple(int(s) for s in patch_zyx)
        self.augment = augment
        self.images = [torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for v in images]
        self.labels = (
            [
                torch.from_numpy(np.ascontiguousarray(v).astype(_label_dtype(labels, numpy=True)))
                for v in labels
            ]
            if labels
            else None
        )

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = [], []
        for _ in range(count):
            index = int(_randint(len(self), generator))
            image = self.images[index]
            label = self.labels[index] if self.labels is not None else None
            k = int(_randint(4, generator)) if self.augment else 0
            flip_axis = int(_randint(2, generator)) if self.augment else -1
            # Crop a region that has the patch's shape after the rot90 in the (y, x) plane.
            crop = (self.patch[0], self.patch[2], self.patch[1]) if k % 2 else self.patch
            starts = [
                int(_randint(max(1, s - c + 1), generator)) for s, c in zip(image.shape, crop, strict=True)
            ]
            window = tuple(slice(st, st + c) for st, c in zip(starts, crop, strict=True))
            img = _pad_to(image[window], crop)
            lab = _pad_to(label[window], crop) if label is not None else None
            if self.augment:
                img = torch.flip(torch.rot90(img, k, dims=(1, 2)), dims=(1 + flip_axis,))
                if lab is not None:
                    lab = torch.flip(torch.rot90(lab, k, dims=(1, 2)), dims=(1 + flip_axis,))
            images.append(img)
            labels.append(lab)
        batch = torch.stack(images)[:, None].contiguous()
        label_batch = torch.stack(labels).long() if self.labels is not None else None
        return batch, label_batch


def _pad_to(array: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    missing = [t - s for s, t in zip(array.shape, shape, strict=True)]
    if not any(missing):
        return array
    pad = []
    for m in reversed(missing):
        pad += [m // 2, m - m // 2]
    return F.pad(array, pad)
