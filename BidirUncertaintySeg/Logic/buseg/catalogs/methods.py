"""The catalog of training methods: the one list that every list of methods derives from.

The configuration's ``--method`` choices and their help, the learning-rate rule of
:mod:`buseg.training.loop`, :func:`buseg.training.methods.build_method`, the Slicer panel's method combo box
and which of its settings a method reads, and the quality benchmark's check of its
configurations all ask this catalog. It imports neither torch nor anything else of the
engine, so that the configuration, the command line's help and the Slicer module (which
does not import torch in its own process) can read it.

A new method is one file in this package (a :class:`buseg.training.methods.base.Method` subclass
with a ``step``) plus one :class:`MethodEntry` registered below; docs/method.md has the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from buseg.catalogs.catalog import Catalog


@dataclass(frozen=True)
class MethodEntry:
    """What the rest of the program needs to know about a method without loading it.

    ``reads_options``: the configuration options that only some methods read, given as
    sections ("url") or dotted fields ("method.unlabeled_weight"); the Slicer panel greys out
    a setting the chosen method does not read.

    ``research_options``: the dotted fields among those that exist for the method's ablations
    and controls (the paper's variants, our random controls), not for using the method: the
    method owns them. ``--help`` lists them apart, under "research options of <method>", and the
    Slicer panel offers none of them (a test checks).
    """

    name: str  # the --method value, as configs and checkpoints store it
    module: str  # the module of this package that holds the class ("bcp" for buseg.training.methods.bcp)
    class_name: str
    label: str  # the Slicer panel's text for it
    summary: str  # its description in ``buseg train --help``
    uses_unlabeled: bool  # semi-supervised: needs unlabeled images and batches of 4
    # A copy-paste pre-training stage at --lr precedes self-training, which runs at
    # --self-training-lr (when given).
    has_pretraining_stage: bool = False
    reads_options: tuple[str, ...] = ()
    research_options: tuple[str, ...] = ()

    def reads(self, option: str) -> bool:
        """Whether the method reads the dotted config ``option`` ("url.weight")."""
        section = option.split(".", 1)[0]
        return option in self.reads_options or section in self.reads_options


_COPY_PASTE_OPTIONS = ("method.mask_ratio", "method.unlabeled_weight", "method.pseudo_label_lcc")

# In the order the panel and the help list them: ours first, then the baselines.
CATALOG: Catalog[MethodEntry] = Catalog("method")
register = CATALOG.register
unregister = CATALOG.unregister
method_names = CATALOG.names
method_entry = CATALOG.entry


def research_option_owner(option: str) -> str | None:
    """The method whose research option the dotted config ``option`` is ("crl.threshold_mode"), or None."""
    return next((e.name for e in CATALOG.values() if option in e.research_options), None)


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
        # The ablation's variants and controls (docs/method.md, docs/benchmarks.md); the defaults
        # are the measured choices, and the panel offers the switches a user needs (on/off, weight,
        # quantile, the CRL weighting).
        research_options=(
            "url.source",
            "url.min_uncertainty",
            "url.loss",
            "url.selection",
            "crl.mode",
            "crl.threshold_mode",
            "crl.threshold",
            "crl.threshold_start",
            "crl.ramp_iterations",
            "crl.loss",
            "crl.extra_weight",
            "crl.shrink_iterations",
            "crl.negative_threshold",
            "crl.uncertainty_after_cleanup",
        ),
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
