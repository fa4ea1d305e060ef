"""``buseg train``: every option of :class:`~buseg.config.TrainConfig` as a flag.

Also the training worker: with ``--progress jsonl`` it speaks the protocol of
docs/worker-protocol.md (events on stdout, cancel by SIGTERM/SIGINT, ``--resume``), and
under ``torchrun --nproc_per_node=N -m buseg train ...`` it trains with DDP.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import TrainConfig, add_dataclass_arguments, apply_arguments, from_dict
from ..errors import ConfigError
from .common import StopFlag, add_common_arguments, make_sink, run_job, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="JSON",
        help="Start from a config file (e.g. a run's config.json); "
        "flags given on the command line override it.",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue the training in --out from its last checkpoint (last.pt), with the "
        "configuration stored there (only --device, --num-threads, --log-interval may change).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace a previous training's outputs in --out (never done without this flag).",
    )
    add_dataclass_arguments(parser, TrainConfig)
    add_common_arguments(parser)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig()
    if args.config:
        path = Path(args.config)
        try:
            config = from_dict(TrainConfig, json.loads(path.read_text()), where=str(path))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read the config file: {exc}", path=path) from None
    return apply_arguments(config, args)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    sink = make_sink(args.progress)
    stop = StopFlag()

    def job() -> dict:
        from ..train import train  # torch is imported here, inside the reported job

        config = config_from_args(args)
        # Absolute, so that the paths in events and outputs mean the same to the caller.
        config.out_dir = str(Path(config.out_dir).expanduser().resolve())
        if not args.resume:
            config.validate()
        result = train(config, events=sink, resume=args.resume, overwrite=args.overwrite, should_stop=stop)
        return {
            "model": str(result.model_path),
            "last": str(result.last_path),
            "best": str(result.best_path) if result.best_path else None,
            "out_dir": str(result.out_dir),
        }

    return run_job(sink, job, job_name="train", stop=stop)
