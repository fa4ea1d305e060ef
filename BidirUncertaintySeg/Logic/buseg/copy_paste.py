"""Bidirectional copy-paste (BCP): the box mask, image/target mixing, pseudo-label clean-up.

Conventions follow the published recipe: the mask ``M`` is 1 *outside* one box and 0
inside it, the box side being ``ratio`` of each image side at a random position, one mask
per iteration for the whole batch. ``mix(a, b, M) = a * M + b * (1 - M)`` keeps ``a``
outside the box and pastes ``b`` inside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage


def box_mask(spatial_shape: Sequence[int], ratio: float, generator: torch.Generator,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Float mask of ``spatial_shape``: 0 inside one random box (side = ratio x image side), 1 outside."""
    mask = torch.ones(tuple(spatial_shape), device=device)
    box = []
    for size in spatial_shape:
        side = max(1, int(size * ratio))
        start = int(torch.randint(0, size - side + 1, (1,), generator=generator))
        box.append(slice(start, start + side))
    mask[tuple(box)] = 0
    return mask


def mix(outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``outside`` where mask is 1, ``inside`` in the box (mask 0); mask broadcasts over batch/channels."""
    if outside.dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        return torch.where(mask.bool(), outside, inside)
    return outside * mask + inside * (1 - mask)


def largest_component_per_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Keep, for every image and foreground class, only its largest connected component.

    ``labels`` is (N, *S) class indices (any device). Removed pixels become background.
    Connectivity is full (8 in 2D, 26 in 3D), as the reference pseudo-label clean-up. One
    scipy labelling per class for the whole batch (the structure does not connect across
    images), then the largest component of each image by ``bincount``.
    """
    array = labels.detach().to("cpu").numpy()
    structure = np.zeros((3,) * array.ndim, dtype=bool)
    structure[1] = ndimage.generate_binary_structure(array.ndim - 1, array.ndim - 1)
    keep = np.zeros(array.shape, dtype=bool)
    for cls in range(1, num_classes):
        mask = array == cls
        if not mask.any():
            continue
        components, count = ndimage.label(mask, structure=structure)
        for image in range(array.shape[0]):
            sizes = np.bincount(components[image].ravel(), minlength=count + 1)
            sizes[0] = 0
            if sizes.max() > 0:
                keep[image] |= components[image] == int(sizes.argmax())
    cleaned = np.where(keep, array, 0).astype(array.dtype)
    return torch.from_numpy(cleaned).to(labels.device)
