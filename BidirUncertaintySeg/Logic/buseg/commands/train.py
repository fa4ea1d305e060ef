"""``buseg train``: every option of :class:`~buseg.config.TrainConfig` as a flag.

Also the training worker: with ``--progress jsonl`` it speaks the protocol of
docs/worker-protocol.md (events on stdout, cancel by SIGTERM/SIGINT, ``--resume``), and
under ``torchrun --nproc_per_node=N -m buseg train ...`` it trains with DDP.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from buseg.commands.common import (
    StopFlag,
    add_common_arguments,
    check_numbers,
    make_sink,
    run_job,
    setup_logging,
)
from buseg.config import (
    TRAIN_PRESETS,
    TrainConfig,
    add_dataclass_arguments,
    apply_arguments,
    apply_preset,
    from_dict,
)
from buseg.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="JSON",
        help="Start from a config file (e.g. a run's config.json); "
        "flags given on the command line override it.",
    )
    parser.add_argument(
        "--preset",
        choices=tuple(TRAIN_PRESETS),
        help="Named settings applied on top of --config; other flags override them. 'cpu-3d': 3D training "
        "in under an hour on a 2-core CPU (1.25 mm working spacing, 8 base channels, 64x64x32 patches, "
        "batch 4, 1000+1000 iterations, float32). On LA with 8 labeled cases supervised training reached "
        "81%% Dice with it (give it --iterations 2000: supervised has no pre-training stage), the "
        "semi-supervised methods 76-78%% (docs/benchmarks.md).",
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
    return config_and_given_fields(args)[0]


def config_and_given_fields(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """The config of the command line, and the dotted names of the fields the user set (in the
    --config file, by --preset or by a flag): what a --resume compares with last.pt."""
    config = TrainConfig()
    given: set[str] = set()
    if args.config:
        from buseg.files.images import read_json

        path = Path(args.config)
        data = read_json(path, what="training config file", error=ConfigError)
        config = from_dict(TrainConfig, data, where=str(path))
        for key, value in data.items():
            given |= {f"{key}.{name}" for name in value} if isinstance(value, dict) else {key}
    if getattr(args, "preset", None):
        config = apply_preset(config, args.preset)
        given |= set(TRAIN_PRESETS[args.preset])
    config = apply_arguments(config, args)
    given |= {dest for dest, value in vars(args).items() if value is not None}
    check_numbers(config)
    return config, given


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    sink = make_sink(args.progress)
    stop = StopFlag()

    def job() -> dict:
        from buseg.training.loop import train  # torch is imported here, inside the reported job

        config, given = config_and_given_fields(args)
        # Absolute, so that the paths in events and outputs mean the same to the caller.
        config.out_dir = str(Path(config.out_dir).expanduser().resolve())
        if not args.resume:
            config.validate()
        result = train(
            config, events=sink, resume=args.resume, overwrite=args.overwrite, should_stop=stop, given=given
        )
        return {
            "model": str(result.model_path),
            "last": str(result.last_path),
            "best": str(result.best_path) if result.best_path else None,
            "out_dir": str(result.out_dir),
        }

    return run_job(sink, job, job_name="train", stop=stop)
