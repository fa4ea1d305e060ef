"""The long-run report: each run's EMA teacher scored every N iterations, compared seed by seed.

``python -m benchmarks.quality --score-every N`` scores the teacher of every self-training run on all held-out volumes
every N iterations and keeps the scores beside the results (``runs/<tag>/<configuration>_seed<seed>
.teacher.json``). This script turns those records into the report of a long-run study:

* the mean Dice of each configuration at chosen iterations (``--at``, e.g. 4000 8000 12000) with the
  per-seed paired differences against a reference and the project's verdict rule
  (``quality.verdict``: better only when ahead in every seed or the mean paired difference exceeds
  twice its standard error, with at least 3 seeds);
* how much the model a user gets depends on where training stopped: the spread (sample standard
  deviation and range) of each run's last ``--last`` scored checkpoints;
* a consistency check against a shorter table: where a run of the same configuration and seed ended
  at one of the ``--at`` iterations (``--short-tag``, the 4000-iteration table), its last-checkpoint
  Dice beside the long run's score at that iteration (training is deterministic here, and nothing in
  these configurations depends on the run's length, so the two should agree);
* the curves, one panel per seed.

A run that has not finished (its record says so) is shown up to its last score and named.

Usage::

    python -m benchmarks.teacher_curve --tag acdc_cpu_7labeled_long12000 --at 4000 8000 12000 \\
        --reference ours-url-only --short-tag acdc_cpu_7labeled
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.paths import module_command, shown_command
from benchmarks.quality import RECORDS_FOLDER, mean_and_standard_error, plot_seed_panels, verdict

ROOT = Path(__file__).resolve().parents[1]
COMMAND = module_command(__file__)

TEACHER_SUFFIX = ".teacher.json"


def read_runs(records: Path) -> list[dict]:
    """Every teacher-score record in ``records`` (one per configuration and seed)."""
    runs = []
    for path in sorted(records.glob(f"*{TEACHER_SUFFIX}")):
        try:
            run = json.loads(path.read_text())
            missing = {"configuration", "seed", "scores"} - set(run)  # what every record holds
            if missing:
                raise KeyError(", ".join(sorted(missing)))
            run["scores"] = sorted(run["scores"], key=lambda s: s["iteration"])
        except (OSError, ValueError, KeyError, TypeError) as problem:
            raise SystemExit(f"{path}: not a readable teacher-score record ({problem!r})") from None
        run["path"] = path
        runs.append(run)
    if not runs:
        raise SystemExit(
            f"{records}: no teacher-score records (*{TEACHER_SUFFIX}); run python -m benchmarks.quality --score-every"
        )
    return runs


def score_at(run: dict, iteration: int, metric: str = "dice") -> float:
    """The run's ``metric`` at ``iteration`` (NaN where it was not scored)."""
    return next((float(s[metric]) for s in run["scores"] if s["iteration"] == iteration), float("nan"))


def last_scores_spread(run: dict, count: int) -> dict:
    """Standard deviation and range (in Dice %) of the run's last ``count`` scored checkpoints; NaN
    when fewer were scored (an unfinished run's spread would describe another stretch)."""
    values = [100 * s["dice"] for s in run["scores"][-count:]]
    if len(values) < count or not run.get("finished"):
        return {"sd": float("nan"), "range": float("nan"), "from": None}
    return {
        "sd": float(np.std(values, ddof=1)),
        "range": float(max(values) - min(values)),
        "from": run["scores"][-count]["iteration"],
    }


def training_minutes(run: dict, records: Path) -> float:
    """Wall minutes of the finished run's training without the time spent scoring the teacher (taken
    from its quality record, which holds the training seconds); NaN before it finished."""
    record = records / f"{run['configuration']}_seed{run['seed']}.json"
    if not record.exists():
        return float("nan")
    seconds = json.loads(record.read_text())["row"].get("train_seconds", float("nan"))
    scoring = sum(s.get("scoring_seconds", 0.0) for s in run["scores"])
    return (seconds - scoring) / 60.0


def comparison(runs: list[dict], key: str, reference: str, iteration: int) -> tuple[dict[int, float], str]:
    """Per-seed Dice differences (in %) of ``key`` minus ``reference`` at ``iteration``, and the verdict."""
    ours = {r["seed"]: score_at(r, iteration) for r in runs if r["configuration"] == key}
    theirs = {r["seed"]: score_at(r, iteration) for r in runs if r["configuration"] == reference}
    differences = {
        seed: 100 * (ours[seed] - theirs[seed])
        for seed in ours
        if seed in theirs and np.isfinite(ours[seed]) and np.isfinite(theirs[seed])
    }
    if not differences:
        return differences, "-"
    mean, se = mean_and_standard_error(list(differences.values()))
    error = f" ± {se:.2f}" if np.isfinite(se) else " (one seed, no error estimate)"
    return differences, f"{verdict(list(differences.values()))}: {mean:+.2f}{error}"


def _cell(values: list[float]) -> str:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return "-"
    if len(finite) == 1:
        return f"{finite[0]:.2f}"
    return f"{np.mean(finite):.2f} ± {np.std(finite, ddof=1):.2f}"


def machines_text(runs: list[dict]) -> str:
    """Which machine made which runs (the minutes depend on it: native bfloat16 about halves them)."""
    by_machine: dict[str, list[str]] = {}
    for run in runs:
        by_machine.setdefault(run.get("machine", "not recorded"), []).append(
            f"{run['configuration']} seed {run['seed']}"
        )
    return "; ".join(f"{machine} ({', '.join(names)})" for machine, names in by_machine.items())


def _number(value: float) -> str:
    return f"{value:.2f}" if np.isfinite(value) else "-"


def report(runs: list[dict], args: argparse.Namespace, records: Path) -> list[str]:
    """The report's markdown lines (``records``: the long runs' quality records, for their minutes)."""
    configurations = list(dict.fromkeys(r["configuration"] for r in runs))
    seeds = list(dict.fromkeys(r["seed"] for r in runs))
    lines = [
        f"# Long-run teacher scores: {args.tag}",
        "",
        f"Command: `{shown_command(COMMAND, args.argv)}`",
        "",
        "Each run's EMA teacher (what its model files hold) scored on all held-out volumes every "
        f"{runs[0].get('every', '?')} self-training iterations (`python -m benchmarks.quality --score-every`). Dice in %, mean "
        "± sample standard deviation over seeds. Verdicts on Dice paired by seed: 'better' only when ahead "
        "in every seed or the mean difference exceeds twice its standard error (at least 3 seeds).",
        "",
        "Machines: " + machines_text(runs),
        "",
        "| configuration | seeds | "
        + " | ".join(f"Dice at {i}" for i in args.at)
        + " | "
        + " | ".join(f"vs {args.reference} at {i}" for i in args.at)
        + " |",
        "|---|---|" + "---|" * (2 * len(args.at)),
    ]
    for key in configurations:
        group = [r for r in runs if r["configuration"] == key]
        cells = [_cell([100 * score_at(r, i) for r in group]) for i in args.at]
        versus = []
        for iteration in args.at:
            if key == args.reference:
                versus.append("(reference)")
                continue
            differences, text = comparison(runs, key, args.reference, iteration)
            per_seed = " / ".join(f"{s}: {d:+.2f}" for s, d in differences.items())
            versus.append(f"{text} ({per_seed})" if differences else "-")
        lines.append(f"| {key} | {len(group)} | " + " | ".join(cells) + " | " + " | ".join(versus) + " |")
    lines += [
        "",
        f"## Where training stops: the spread of each run's last {args.last} scored checkpoints",
        "",
        "| configuration | seed | finished | last scored | Dice at last | sd of last "
        f"{args.last} | range of last {args.last} | training minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        spread = last_scores_spread(run, args.last)
        last = run["scores"][-1] if run["scores"] else None
        lines.append(
            f"| {run['configuration']} | {run['seed']} | {'yes' if run.get('finished') else 'no'} | "
            f"{last['iteration'] if last else '-'} | {100 * last['dice'] if last else float('nan'):.2f} | "
            f"{_number(spread['sd'])} | {_number(spread['range'])} | {_number(training_minutes(run, records))} |"
        )
    if args.short_tag:
        lines += consistency_lines(runs, args)
    unfinished = [f"{r['configuration']} (seed {r['seed']})" for r in runs if not r.get("finished")]
    if unfinished:
        lines += ["", "Not finished (shown up to their last score): " + ", ".join(unfinished) + "."]
    lines += ["", f"Seeds: {', '.join(str(s) for s in seeds)}."]
    return lines


def consistency_lines(runs: list[dict], args: argparse.Namespace) -> list[str]:
    """The long runs' scores beside the shorter table's last checkpoints of the same seed."""
    lines = [
        "",
        f"## Against the shorter table ({args.short_tag})",
        "",
        "The same configuration and seed, trained to the shorter table's end: its last-checkpoint Dice "
        "beside this run's teacher at that iteration (the same computation where nothing depends on the "
        "run's length).",
        "",
        "| configuration | seed | iteration | shorter table | this run | difference |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        record = args.out / RECORDS_FOLDER / args.short_tag / f"{run['configuration']}_seed{run['seed']}.json"
        if not record.exists():
            continue
        recorded = json.loads(record.read_text())
        row, end = recorded["row"], recorded["configs"]["training"]["optim"]["iterations"]
        here = score_at(run, end)
        lines.append(
            f"| {run['configuration']} | {run['seed']} | {end} | {100 * row['last_dice']:.2f} | "
            f"{100 * here:.2f} | {100 * (here - row['last_dice']):+.2f} |"
        )
    return lines


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Teacher Dice over self-training iterations: one panel per seed, one colour per configuration."""
    points = {
        (run["configuration"], run["seed"]): (
            [s["iteration"] for s in run["scores"]],
            [100 * s["dice"] for s in run["scores"]],
        )
        for run in runs
    }
    plot_seed_panels(
        points,
        path,
        f"EMA teacher over a long self-training: {title}",
        xlabel="self-training iteration",
        ylabel="teacher Dice %, all held-out volumes",
        marker="o",
    )


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tag", required=True, help="The benchmarks.quality tag of the long runs.")
    parser.add_argument("--at", nargs="+", type=int, default=[4000, 8000, 12000], help="Iterations compared.")
    parser.add_argument("--reference", default="ours-url-only", help="Configuration compared with.")
    parser.add_argument(
        "--last", type=int, default=5, help="Scored checkpoints at the end whose spread is given."
    )
    parser.add_argument("--short-tag", default=None, help="The shorter table to check the long runs against.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.last < 2:
        parser.error("--last: at least 2 checkpoints (a spread of one says nothing)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    records = args.out / RECORDS_FOLDER / args.tag
    runs = read_runs(records)
    text = report(runs, args, records)
    (args.out / f"teacher_curve_{args.tag}.md").write_text("\n".join(text) + "\n")
    plot(runs, args.out / f"teacher_curve_{args.tag}.png", args.tag)
    print(f"wrote {args.out / f'teacher_curve_{args.tag}.md'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
