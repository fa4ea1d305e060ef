"""``buseg evaluate``."""

from __future__ import annotations

import argparse

from .common import add_common_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("buseg evaluate: not available yet")
