"""``buseg predict``: every option of :class:`~buseg.config.PredictConfig` as a flag.

Also the shared pieces of ``buseg rank`` (which predicts the same way): the positional
inputs and building the config from ``--config`` plus flags.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from buseg.commands.common import (
    StopFlag,
    add_common_arguments,
    check_numbers,
    locked_output_folder,
    make_sink,
    run_job,
    setup_logging,
)
from buseg.config import PredictConfig, add_dataclass_arguments, apply_arguments, from_dict
from buseg.errors import ConfigError
from buseg.files.images import read_json

logger = logging.getLogger("buseg")


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="Image files (NIfTI, NRRD, MHA) or folders of images (a folder's images/ "
        "sub-folder is used when it holds no images itself).",
    )
    parser.add_argument(
        "--config",
        metavar="JSON",
        help="Start from a prediction config file (e.g. the 'config' "
        "of an earlier summary.json saved on its own); flags given on the command line override it.",
    )
    add_dataclass_arguments(parser, PredictConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_prediction_arguments(parser)
    add_common_arguments(parser)


def config_from_args(args: argparse.Namespace) -> PredictConfig:
    config = PredictConfig()
    if args.config:
        path = Path(args.config)
        data = read_json(path, what="prediction config file", error=ConfigError)
        config = from_dict(PredictConfig, data, where=str(path))
    config = apply_arguments(config, args)
    check_numbers(config)
    if config.out_dir:
        # Absolute, so that the paths in events and outputs mean the same to the caller.
        config.out_dir = str(Path(config.out_dir).expanduser().resolve())
    return config


def log_slices_to_check(cases: list[dict]) -> None:
    """Where to look first, per case, on stderr: the slices of summary.json's ``slices_to_check``."""
    for case in cases:
        slices = case.get("slices_to_check") or []
        if case.get("status") == "ok" and slices:
            listed = ", ".join(f"{s['index']} ({s['expected_error_voxels']:.0f})" for s in slices)
            logger.info(
                "%s: slices to check first along IJK axis %s (expected wrong voxels): %s",
                case["case"],
                case["slice_axis_ijk"],
                listed,
            )


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    sink = make_sink(args.progress)
    stop = StopFlag(immediate=True)  # outputs are atomic: a signal stops at once

    def job() -> dict:
        from buseg.prediction.predict_files import predict_files

        config = config_from_args(args).validate()
        with locked_output_folder(config.out_dir, "predict"):
            result = predict_files(args.inputs, config, events=sink, should_stop=stop)
        log_slices_to_check(result.cases)
        return {"out_dir": str(result.out_dir), "summary": str(result.summary_path)}

    return run_job(sink, job, job_name="predict", stop=stop)
