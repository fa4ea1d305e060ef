"""The training methods; each is a small object plugged into the one loop in :mod:`buseg.training.loop`.

Which methods there are is :mod:`buseg.catalogs.methods` (torch-free); a method's module,
and torch with it, is imported only when a method is built or one of its names is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from buseg.catalogs.methods import CATALOG, MethodEntry, method_entry, method_names

if TYPE_CHECKING:
    from buseg.config import TrainConfig
    from buseg.training.methods.base import Method

# Names this package has always offered, and the module that defines each.
_LAZY_NAMES = {
    "Batch": "base",
    "Method": "base",
    "StepContext": "base",
    "StepOutput": "base",
    "BidirectionalCopyPaste": "bcp",
    "BUARL": "buarl",
    "MeanTeacher": "mean_teacher",
    "Supervised": "supervised",
}


def method_class(entry: MethodEntry) -> type[Method]:
    """The class of the catalog ``entry``, imported now."""
    return getattr(importlib.import_module(f"{__name__}.{entry.module}"), entry.class_name)


def build_method(config: TrainConfig, num_classes: int) -> Method:
    """The method ``config.method.name`` names, made for ``num_classes`` classes."""
    return method_class(method_entry(config.method.name))(config, num_classes)


def __getattr__(name: str) -> Any:
    if name == "METHOD_CLASSES":  # name -> class, for every method of the catalog
        return {entry.name: method_class(entry) for entry in CATALOG.values()}
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUARL",
    "CATALOG",
    "METHOD_CLASSES",
    "Batch",
    "BidirectionalCopyPaste",
    "MeanTeacher",
    "Method",
    "MethodEntry",
    "StepContext",
    "StepOutput",
    "Supervised",
    "build_method",
    "method_class",
    "method_entry",
    "method_names",
]
