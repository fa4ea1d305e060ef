"""The training methods; each is a small object plugged into the one loop in :mod:`buseg.train`."""

from __future__ import annotations

from ..config import TrainConfig
from .base import Batch, Method, StepContext, StepOutput
from .bcp import BidirectionalCopyPaste
from .buarl import BUARL
from .mean_teacher import MeanTeacher
from .supervised import Supervised

METHOD_CLASSES: dict[str, type[Method]] = {
    "supervised": Supervised,
    "mean-teacher": MeanTeacher,
    "bcp": BidirectionalCopyPaste,
    "buarl": BUARL,
}


def build_method(config: TrainConfig, num_classes: int) -> Method:
    return METHOD_CLASSES[config.method.name](config, num_classes)


__all__ = [
    "BUARL",
    "METHOD_CLASSES",
    "Batch",
    "BidirectionalCopyPaste",
    "MeanTeacher",
    "Method",
    "StepContext",
    "StepOutput",
    "Supervised",
    "build_method",
]
