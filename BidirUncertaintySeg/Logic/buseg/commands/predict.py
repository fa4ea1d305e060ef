"""``buseg predict``: every option of :class:`~buseg.config.PredictConfig` as a flag.

Also the shared pieces of ``buseg rank`` (which predicts the same way): the positional
inputs and building the config from ``--config`` plus flags.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import PredictConfig, add_dataclass_arguments, apply_arguments, from_dict
from ..errors import ConfigError
from .common import StopFlag, add_common_arguments, make_sink, run_job, setup_logging


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
        try:
            config = from_dict(PredictConfig, json.loads(path.read_text()), where=str(path))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read the config file: {exc}", path=path) from None
    config = apply_arguments(config, args)
    if config.out_dir:
        # Absolute, so that the paths in events and outputs mean the same to the caller.
        config.out_dir = str(Path(config.out_dir).expanduser().resolve())
    return config


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    sink = make_sink(args.progress)
    stop = StopFlag()

    def job() -> dict:
        from ..inference import predict_files

        config = config_from_args(args).validate()
        result = predict_files(args.inputs, config, events=sink, should_stop=stop)
        return {"out_dir": str(result.out_dir), "summary": str(result.summary_path)}

    return run_job(sink, job, job_name="predict", stop=stop)
