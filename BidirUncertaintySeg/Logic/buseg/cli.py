"""The ``buseg`` command line: ``train``, ``predict``, ``evaluate``, ``rank``, ``demo``.

Each sub-command lives in :mod:`buseg.commands` as a module with ``add_arguments(parser)``
and ``run(args) -> int``. This file only builds the parser and dispatches; errors meant
for the user (:class:`~buseg.errors.BusegError`) become a clear message and a non-zero
exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from buseg import __version__

COMMANDS = {
    "train": "Train a segmentation model from labeled and unlabeled images.",
    "predict": "Segment images with a model; write label maps, .seg.nrrd, uncertainty maps, regions.",
    "evaluate": "Compare predicted label maps with ground truth (Dice, Jaccard, HD95, ASD).",
    "rank": "Rank unlabeled images by model uncertainty: which case to label next.",
    "demo": "Run the whole idea end to end on generated data and write a report.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="buseg",
        description="Semi-supervised medical image segmentation with bidirectional uncertainty-aware "
        "region learning, voxel-wise uncertainty and flagged regions to review.",
    )
    parser.add_argument("--version", action="version", version=f"buseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"buseg.commands.{name}")
        command = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter
            if getattr(module, "DEFAULTS_IN_HELP", False)
            else argparse.HelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
