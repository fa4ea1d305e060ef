"""Voxel-wise uncertainty: the same functions feed training (URL/CRL) and the maps shown to users.

All maps are *normalised predictive entropy* in 0..1: the entropy of a class-probability
vector divided by ln(C), so 0 means one class has probability 1 and 1 means all C classes
are equally likely. What differs between methods is which probability vector:

* ``entropy``: the softmax of one deterministic pass (dropout off). Free: the prediction
  is computed anyway. Measures how ambiguous the model finds a voxel.
* ``mc-dropout``: the mean softmax of T passes with dropout on (BatchNorm in eval mode),
  then its entropy. Costs T passes; adds the model's own disagreement (epistemic part).
  With T = 1 it is the entropy of a single dropout-perturbed pass, *not* of the
  deterministic pass - use ``entropy`` for that.
* ``tta`` (inference only): the mean softmax over flips of the input, then its entropy.

Which measures exist, and what each costs and needs, is the catalog :mod:`buseg.catalogs.measures`; the
probability functions it names are here (``*_probabilities``/``*_function`` taking the network,
the backend's forward call and the number of samples).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import nn

from buseg.model.networks import set_dropout


def normalized_entropy(probabilities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entropy of ``probabilities`` along ``dim`` divided by ln(C); result in [0, 1]."""
    classes = probabilities.shape[dim]
    if classes < 2:
        raise ValueError("entropy needs at least two classes")
    p = probabilities.float().clamp_min(1e-8)
    entropy = -(p * p.log()).sum(dim=dim)
    return (entropy / math.log(classes)).clamp_(0.0, 1.0)


def class_argmax(probabilities: torch.Tensor, dtype: torch.dtype = torch.int16) -> torch.Tensor:
    """``probabilities.argmax(1)`` (first maximum wins), as a running maximum over the few classes.

    torch's argmax over a short, strided class axis is ~8x slower on the CPU than these
    element-wise passes (120 ms vs 15 ms for 10 x 4 x 256 x 224; 53 vs 7 ms for a training batch of
    16 x 4 x 128 x 128 teacher probabilities). Equal to ``argmax(1)`` for finite probabilities.
    """
    best = probabilities[:, 0].clone()
    labels = torch.zeros(best.shape, dtype=dtype, device=probabilities.device)
    for index in range(1, probabilities.shape[1]):
        candidate = probabilities[:, index]
        labels[candidate > best] = index
        torch.maximum(best, candidate, out=best)
    return labels


def entropy_without_argmax(probabilities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Normalised entropy (still divided by ln C) of ``probabilities`` with their most likely class
    removed and the rest renormalised: how certain the model is among the classes left when that
    class is ruled out (as the largest-component clean-up rules it out where it removes a piece)."""
    p = probabilities.float()
    top = (class_argmax(p, torch.int64) if dim == 1 else p.argmax(dim=dim)).unsqueeze(dim)
    rest = p.scatter(dim, top, 0.0).clamp_min(1e-8)
    return normalized_entropy(rest / rest.sum(dim=dim, keepdim=True), dim=dim)


@torch.no_grad()
def mc_dropout_probabilities(
    model: nn.Module,
    inputs: torch.Tensor,
    samples: int,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean softmax of ``samples`` passes with dropout active and BatchNorm in eval mode.

    The model's train/eval state is restored afterwards. ``forward`` may wrap the model call
    (autocast, channels-last); it receives the inputs and returns logits.
    """
    if samples < 1:
        raise ValueError("samples must be at least 1")
    was_training = model.training
    model.eval()
    set_dropout(model, True)
    call = forward or model
    try:
        total = None
        for _ in range(samples):
            p = torch.softmax(call(inputs).float(), dim=1)
            total = p if total is None else total.add_(p)
        return total / samples
    finally:
        set_dropout(model, False)
        model.train(was_training)


# --------------------------------------------------------------------------------------
# The probability functions of the measures in :mod:`buseg.catalogs.measures`: (network, forward, samples) ->
# a function batch -> mean probabilities. ``forward`` runs the network (autocast, ONNX Runtime).

Forward = Callable[[torch.Tensor], torch.Tensor]


def one_pass_probabilities(network: nn.Module, forward: Forward, samples: int) -> Forward:
    """``entropy``: the softmax of one deterministic pass (``samples`` is not used)."""
    return lambda x: torch.softmax(forward(x).float(), dim=1)


def mc_dropout_function(network: nn.Module, forward: Forward, samples: int) -> Forward:
    """``mc-dropout``: the mean softmax of ``samples`` passes with ``network``'s dropout on."""
    return lambda x: mc_dropout_probabilities(network, x, samples, forward=forward)


def flip_sets(spatial_dims: int, count: int) -> list[tuple[int, ...]]:
    """The first ``count`` flip combinations of a (N, C, *spatial) batch: identity, single axes, pairs..."""
    dims = range(2, 2 + spatial_dims)
    combos = [c for r in range(spatial_dims + 1) for c in itertools.combinations(dims, r)]
    return combos[: max(1, count)]


def flip_mean_probabilities(network: nn.Module, forward: Forward, samples: int) -> Forward:
    """``tta``: the mean softmax over the first ``samples`` flip combinations of the input."""

    def mean_over_flips(x: torch.Tensor) -> torch.Tensor:
        flips = flip_sets(x.ndim - 2, samples)
        total = None
        for dims in flips:
            p = torch.softmax(forward(torch.flip(x, dims) if dims else x).float(), dim=1)
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total.add_(p)
        return total / len(flips)

    return mean_over_flips
