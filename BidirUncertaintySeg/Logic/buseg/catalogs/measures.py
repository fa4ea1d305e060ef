"""The catalog of uncertainty measures: the one list every list of measures derives from.

A measure says which probability vector a voxel's uncertainty map is the normalised entropy of
(:mod:`buseg.model.uncertainty`). The configuration's ``--uncertainty`` choices (training and
prediction), their help, the Slicer panel's two uncertainty combo boxes, which backend runs a
prediction (:mod:`buseg.prediction.onnx_backend`) and the prediction itself (:mod:`buseg.prediction.case`) all
ask this catalog. It imports neither torch nor anything else of the engine at module level, so
that the configuration and the Slicer module (which does not import torch in its own process)
can read it; an entry's probability function imports torch only when it is called.

A new measure is one :class:`UncertaintyMeasure` registered below plus its probability
function; docs/inference.md ("Adding an uncertainty measure") has the recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from buseg.catalogs.catalog import Catalog

# (network, forward, samples) -> a function batch -> mean class probabilities (N, C, *spatial).
# ``forward`` is the network call the backend chose (autocast, ONNX Runtime); ``network`` is the
# torch network in eval mode, for measures that switch its layers (dropout).
ProbabilityFactory = Callable[[Any, Callable[[Any], Any], int], Callable[[Any], Any]]


@dataclass(frozen=True)
class UncertaintyMeasure:
    """What the program needs to know about an uncertainty measure."""

    name: str  # the --uncertainty value, as configs, summaries and regions.json store it
    label: str  # the Slicer panel's text for it
    summary: str  # its description in --help
    probabilities: ProbabilityFactory
    # Forward passes each slice/window costs, from --samples and the spatial dimensions (2 or 3).
    passes: Callable[[int, int], int]
    needs_dropout: bool = False  # the network's dropout on at inference: only models with dropout
    onnx: bool = True  # the ONNX Runtime backend can run it (its exported graph has no dropout)
    in_training: bool = False  # offered as training's --uncertainty (the teacher's map for URL/CRL)


MEASURES: Catalog[UncertaintyMeasure] = Catalog(
    "uncertainty measure"
)  # in the order the help and the panel list them
register = MEASURES.register
unregister = MEASURES.unregister
measure = MEASURES.entry


def measure_names(*, training: bool = False) -> tuple[str, ...]:
    """The measures' names in catalog order; with ``training``, those training offers."""
    return tuple(name for name, m in MEASURES.items() if m.in_training or not training)


def measure_help(*, training: bool = False) -> str:
    """The ``--uncertainty`` help text: each measure with its summary."""
    names = measure_names(training=training)
    return "; ".join(f"'{name}': {MEASURES[name].summary}" for name in names) + "."


def function_at(path: str) -> ProbabilityFactory:
    """The probability factory at ``path`` ("package.module:function"), imported when first called.

    A catalog entry names its function by path, as the method catalog names its classes, so that
    this catalog imports nothing of the engine (the function needs torch; the configuration and
    the Slicer module read this catalog without it).
    """
    module_name, function_name = path.split(":")

    def factory(network: Any, forward: Callable[[Any], Any], samples: int) -> Callable[[Any], Any]:
        return getattr(importlib.import_module(module_name), function_name)(network, forward, samples)

    factory.__name__ = factory.__qualname__ = function_name
    return factory


def flip_count(samples: int, spatial_dims: int) -> int:
    """Flip combinations ``tta`` runs: the first ``samples`` of the 2^dims (at least the identity)."""
    return min(max(1, samples), 2**spatial_dims)


register(
    UncertaintyMeasure(
        "entropy",
        "Entropy (one pass)",
        "normalised entropy of one pass's softmax (free: the network predicts anyway)",
        function_at("buseg.model.uncertainty:one_pass_probabilities"),
        passes=lambda samples, spatial_dims: 1,
        in_training=True,
    )
)
register(
    UncertaintyMeasure(
        "mc-dropout",
        "MC dropout",
        "entropy of the mean of several passes with dropout on (--samples in prediction, "
        "--uncertainty-samples teacher passes in training)",
        function_at("buseg.model.uncertainty:mc_dropout_function"),
        passes=lambda samples, spatial_dims: samples,
        needs_dropout=True,
        onnx=False,
        in_training=True,
    )
)
register(
    UncertaintyMeasure(
        "tta",
        "Test-time augmentation",
        "entropy of the mean over flips of the input (prediction only)",
        function_at("buseg.model.uncertainty:flip_mean_probabilities"),
        passes=lambda samples, spatial_dims: flip_count(samples, spatial_dims),
    )
)
