"""The catalog of training methods: the one list that every list of methods derives from.

The configuration's ``--method`` choices and their help, the learning-rate rule of
:mod:`buseg.train`, :func:`buseg.methods.build_method`, the Slicer panel's method combo box
and which of its settings a method reads, and the quality benchmark's check of its
configurations all ask this catalog. It imports neither torch nor anything else of the
engine, so that the configuration, the command line's help and the Slicer module (which
does not import torch in its own process) can read it.

A new method is one file in this package (a :class:`buseg.methods.base.Method` subclass
with a ``step``) plus one :class:`MethodEntry` registered below; docs/method.md has the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodEntry:
    """What the rest of the program needs to know about a method without loading it.

    ``reads_options``: the configuration options that only some methods read, given as
    sections ("url") or dotted fields ("method.unlabeled_weight"); the Slicer panel greys out
    a setting the chosen method does not read.
    """

    name: str  # the --method value, as configs and checkpoints store it
    module: str  # the module of this package that holds the class ("bcp" for buseg.methods.bcp)
    class_name: str
    label: str  # the Slicer panel's text for it
    summary: str  # its description in ``buseg train --help``
    uses_unlabeled: bool  # semi-supervised: needs unlabeled images and batches of 4
    # A copy-paste pre-training stage at --lr precedes self-training, which runs at
    # --self-training-lr (when given).
    has_pretraining_stage: bool = False
    reads_options: tuple[str, ...] = ()

    def reads(self, option: str) -> bool:
        """Whether the method reads the dotted config ``option`` ("url.weight")."""
        section = option.split(".", 1)[0]
        return option in self.reads_options or section in self.reads_options


_COPY_PASTE_OPTIONS = ("method.mask_ratio", "method.unlabeled_weight", "method.pseudo_label_lcc")

# In the order the panel and the help list them: ours first, then the baselines.
CATALOG: dict[str, MethodEntry] = {}


def register(entry: MethodEntry) -> MethodEntry:
    """Add ``entry`` to the catalog (a name is registered once)."""
    if entry.name in CATALOG:
        raise ValueError(f"method {entry.name!r} is already in the catalog")
    CATALOG[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove method ``name`` from the catalog (tests register throw-away methods)."""
    del CATALOG[name]


def method_names() -> tuple[str, ...]:
    """The names of the methods, in catalog order."""
    return tuple(CATALOG)


def method_entry(name: str) -> MethodEntry:
    """The entry of method ``name``; KeyError naming the known methods if there is none."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; methods: {', '.join(CATALOG)}") from None


def method_help() -> str:
    """The ``--method`` help text: each method with its summary."""
    return ", ".join(f"{e.name} ({e.summary})" for e in CATALOG.values()) + "."


register(
    MethodEntry(
        "buarl",
        "buarl",
        "BUARL",
        "BUARL (ours): copy-paste + uncertainty-aware region learning",
        "ours: bcp + uncertainty-aware region learning on labeled pixels + certainty-aware region "
        "learning on pseudo-labeled pixels",
        uses_unlabeled=True,
        has_pretraining_stage=True,
        reads_options=(*_COPY_PASTE_OPTIONS, "url", "crl", "uncertainty"),
    )
)
register(
    MethodEntry(
        "bcp",
        "bcp",
        "BidirectionalCopyPaste",
        "BCP: bidirectional copy-paste",
        "bidirectional copy-paste",
        uses_unlabeled=True,
        has_pretraining_stage=True,
        reads_options=_COPY_PASTE_OPTIONS,
    )
)
register(
    MethodEntry(
        "mean-teacher",
        "mean_teacher",
        "MeanTeacher",
        "Mean teacher",
        "consistency with an EMA teacher",
        uses_unlabeled=True,
        reads_options=(
            "method.consistency_weight",
            "method.consistency_rampup_iterations",
            "method.noise_std",
        ),
    )
)
register(
    MethodEntry(
        "supervised",
        "supervised",
        "Supervised",
        "Supervised (labeled cases only)",
        "labeled only",
        uses_unlabeled=False,
    )
)
