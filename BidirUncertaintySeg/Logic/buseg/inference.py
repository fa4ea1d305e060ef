"""Running a trained network over whole volumes.

2D models run slice-wise along the axis they were trained on: each slice is resized to the
training in-plane size, batched through the network, and the class probabilities are
resized back. 3D models run with MONAI's sliding-window inferer and Gaussian blending.
Both return class probabilities on the input's own voxel grid, numpy order (C, z, y, x).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .preprocessing import resize_slices

Forward = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict_probabilities(
    network: nn.Module | Forward,
    image: np.ndarray,
    *,
    dimension: str,
    patch_size_xyz: Sequence[int],
    slice_axis: int = 2,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    overlap: float = 0.5,
    stride_xyz: Sequence[int] | None = None,
) -> torch.Tensor:
    """Softmax probabilities (C, z, y, x) on the CPU for a normalised volume (z, y, x).

    ``network`` is called on batches on ``device`` and must be in the mode the caller
    wants (eval for a deterministic prediction; dropout on for an MC-dropout sample).
    """
    device = torch.device(device)
    if dimension == "2d":
        return _predict_2d(network, image, patch_size_xyz, slice_axis, device, batch_size)
    return _predict_3d(network, image, patch_size_xyz, device, batch_size, overlap, stride_xyz)


def _predict_2d(network, image, patch_size_xyz, slice_axis, device, batch_size) -> torch.Tensor:
    numpy_axis = 2 - slice_axis
    slices = np.moveaxis(image, numpy_axis, 0)
    native = slices.shape[1:]
    size_hw = tuple(int(s) for s in patch_size_xyz[::-1])
    outputs = []
    for start in range(0, slices.shape[0], batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size]))[:, None].to(device)
        logits = network(resize_slices(batch, size_hw, mode="bilinear")).float()
        probs = torch.softmax(logits, dim=1)
        outputs.append(resize_slices(probs, native, mode="bilinear").cpu())
    stacked = torch.cat(outputs, dim=0)  # (S, C, h, w)
    # Move the slice axis back to where it was in the volume.
    volume = stacked.permute(1, 0, 2, 3)  # (C, S, h, w)
    return torch.movedim(volume, 1, 1 + numpy_axis).contiguous()


def _predict_3d(network, image, patch_size_xyz, device, batch_size, overlap, stride_xyz) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    roi = tuple(int(s) for s in patch_size_xyz[::-1])
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    # Pad up to the window so that small volumes still see a full window.
    pads = [max(0, r - s) for r, s in zip(roi, tensor.shape[2:], strict=True)]
    if any(pads):
        pad_arg = []
        for p in reversed(pads):
            pad_arg += [p // 2, p - p // 2]
        tensor = torch.nn.functional.pad(tensor, pad_arg)
    if stride_xyz is not None:
        stride = tuple(int(s) for s in stride_xyz[::-1])
        overlap = tuple(max(0.0, 1.0 - s / r) for s, r in zip(stride, roi, strict=True))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(network(x.to(device)).float(), dim=1)

    probs = sliding_window_inference(
        tensor, roi_size=roi, sw_batch_size=batch_size, predictor=forward, overlap=overlap, mode="gaussian",
        sw_device=device, device=torch.device("cpu"),
    )[0]
    if any(pads):
        slices = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, image.shape, strict=True))
        probs = probs[(slice(None), *slices)]
    return probs.contiguous()
