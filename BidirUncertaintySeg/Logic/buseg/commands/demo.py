"""``buseg demo``: generated data -> training (ours and supervised) -> segmentation with uncertainty ->
evaluation -> report (see :mod:`buseg.evaluation.demo`)."""

from __future__ import annotations

import argparse
import sys

from buseg.commands.common import (
    StopFlag,
    add_common_arguments,
    make_sink,
    non_negative_int,
    run_job,
    setup_logging,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="demo_output",
        metavar="DIR",
        help="Folder for everything the demo writes (default: demo_output). It must be new or "
        "empty, or hold an earlier demo's outputs and --overwrite be given.",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="Random seed of the generated data and of training (default: 0).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="A tiny version (seconds): checks that every step works; its numbers mean nothing.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an earlier demo's outputs in --out (other files there are left alone).",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto).",
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    sink = make_sink(args.progress)
    stop = StopFlag()
    # With --progress jsonl stdout carries the events; the demo's own messages go to stderr then.
    stream = sys.stderr if args.progress == "jsonl" else sys.stdout

    def job() -> dict:
        from buseg.evaluation.demo import run_demo

        result = run_demo(
            args.out,
            seed=args.seed,
            quick=args.quick,
            overwrite=args.overwrite,
            device=args.device,
            events=sink,
            should_stop=stop,
            stream=stream,
        )
        return {"out_dir": str(result.out_dir), "report": str(result.report_path)}

    return run_job(sink, job, job_name="demo", stop=stop)
