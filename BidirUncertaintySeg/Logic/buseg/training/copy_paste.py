"""Bidirectional copy-paste (BCP): the box mask, image/target mixing, pseudo-label clean-up.

Conventions follow the published recipe: the mask ``M`` is 1 *outside* one box and 0
inside it, the box side being ``ratio`` of each image side at a random position, one mask
per iteration for the whole batch. ``mix(a, b, M) = a * M + b * (1 - M)`` keeps ``a``
outside the box and pastes ``b`` inside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import cc3d
import numpy as np
import torch


def box_mask(
    spatial_shape: Sequence[int], ratio: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
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
    multi-label ``cc3d`` labelling per image finds the components of all classes at once
    (each component has one class); the largest of each class is kept, the first in raster
    order on ties, as ``skimage.measure.label`` + ``argmax`` in the reference. Measured 4-30x
    faster than the reference's per-image, per-class loop (docs/speed.md); the same result
    (tested against it).
    """
    array = labels.detach().to("cpu").numpy()
    connectivity = 8 if array.ndim == 3 else 26
    cleaned = np.zeros_like(array)
    for index, image in enumerate(array):
        components, count = cc3d.connected_components(image, connectivity=connectivity, return_N=True)
        if count == 0:
            continue
        flat = components.ravel()
        sizes = np.bincount(flat, minlength=count + 1)
        component_class = np.zeros(count + 1, dtype=np.int64)
        component_class[flat] = image.ravel()
        sizes[0] = -1  # background is no component
        # Per class, the largest component (lowest id among equal sizes: ids follow raster order).
        order = np.lexsort((np.arange(count + 1), -sizes, component_class))
        classes_sorted = component_class[order]
        first_of_class = np.r_[True, classes_sorted[1:] != classes_sorted[:-1]]
        keep = np.zeros(count + 1, dtype=bool)
        largest = order[first_of_class]
        keep[largest[(component_class[largest] > 0) & (component_class[largest] < num_classes)]] = True
        cleaned[index] = np.where(keep[components], image, 0)
    return torch.from_numpy(cleaned).to(labels.device)
