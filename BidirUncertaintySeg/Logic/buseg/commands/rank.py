"""``buseg rank``: which unlabeled image to label next (most uncertain first), with regions to look at."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from buseg.commands.common import (
    StopFlag,
    add_common_arguments,
    locked_output_folder,
    make_sink,
    non_negative_int,
    run_job,
    setup_logging,
)
from buseg.commands.predict import add_prediction_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from buseg.prediction.ranking import SCORES

    add_prediction_arguments(parser)
    parser.add_argument(
        "--score",
        choices=SCORES,
        default="dice-risk",
        help="Per-image score (docs/inference.md): 'dice-risk' (default) = expected errors relative to "
        "the predicted structures, E / (2F + E); 'mean-uncertainty' over the whole image (MONAI "
        "Label's); 'flagged-volume' = uncertain volume in mm^3.",
    )
    parser.add_argument(
        "--top-regions",
        type=non_negative_int,
        default=3,
        metavar="N",
        help="Regions listed per case in ranking.json (default: 3).",
    )
    parser.add_argument(
        "--save-predictions",
        action="store_true",
        help="Also write each case's label map, .seg.nrrd, uncertainty map and regions.json "
        "into OUT/<case>/ (as buseg predict does).",
    )
    parser.add_argument(
        "--save-first-prediction",
        action="store_true",
        help="Write the outputs of the first-ranked case only, into OUT/<case>/ (what the next "
        "case to label opens, without predicting it again; one case's files on disk at a time).",
    )
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    sink = make_sink(args.progress)
    stop = StopFlag(immediate=True)  # outputs are atomic: a signal stops at once

    def job() -> dict:
        from buseg.prediction.ranking import format_ranking, rank_files

        config = config_from_args(args)
        if args.out_dir is None and not args.config:
            config.out_dir = str(Path("ranking").resolve())
        config.validate()
        with locked_output_folder(config.out_dir, "rank"):
            result = rank_files(
                args.inputs,
                config,
                score_name=args.score,
                top_regions=args.top_regions,
                save_predictions=args.save_predictions,
                save_first_prediction=args.save_first_prediction,
                events=sink,
                should_stop=stop,
            )
        # stdout carries the events with --progress jsonl; the table then goes to stderr.
        stream = sys.stderr if args.progress == "jsonl" else sys.stdout
        print(format_ranking(result.entries, args.score), file=stream, flush=True)
        return {"ranking_csv": str(result.csv_path), "ranking_json": str(result.json_path)}

    return run_job(sink, job, job_name="rank", stop=stop)
