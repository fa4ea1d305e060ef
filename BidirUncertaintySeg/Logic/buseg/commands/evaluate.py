"""``buseg evaluate``: Dice, Jaccard, HD95 and ASD of predictions against ground truth (docs/inference.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from buseg.commands.common import (
    StopFlag,
    add_common_arguments,
    label_value,
    locked_output_folder,
    make_sink,
    run_job,
    setup_logging,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pred",
        nargs="+",
        required=True,
        metavar="PATH",
        help="Predicted label maps: files, folders of label files, or a `buseg predict` output folder.",
    )
    parser.add_argument(
        "--truth",
        nargs="+",
        required=True,
        metavar="PATH",
        help="Ground-truth label maps (or .seg.nrrd): files or folders (a folder's labels/ "
        "sub-folder is used when it holds no label files itself). Cases are matched by name.",
    )
    parser.add_argument(
        "--out",
        default="evaluation",
        metavar="DIR",
        help="Folder for metrics.csv and metrics.json (default: evaluation).",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        type=label_value,
        metavar="V",
        help="Label values to evaluate (default: every non-zero value found).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace existing metrics files in --out.")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    sink = make_sink(args.progress)
    stop = StopFlag(immediate=True)  # outputs are atomic: a signal stops at once

    def job() -> dict:
        from buseg.evaluation.evaluate import evaluate_files, format_summary

        out = Path(args.out).resolve()
        with locked_output_folder(out, "evaluate"):
            result = evaluate_files(
                args.pred,
                args.truth,
                out,
                label_values=args.labels,
                overwrite=args.overwrite,
                events=sink,
                should_stop=stop,
            )
        stream = sys.stderr if args.progress == "jsonl" else sys.stdout
        print(format_summary(result.summary), file=stream, flush=True)
        return {"metrics_csv": str(result.csv_path), "metrics_json": str(result.json_path)}

    return run_job(sink, job, job_name="evaluate", stop=stop)
