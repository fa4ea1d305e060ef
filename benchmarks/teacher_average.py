"""A long-run remedy measured post hoc: the EMA teacher's weights averaged over the end of a run.

A long self-training run's last checkpoint is one draw from a curve that still moves by points
(``benchmarks.teacher_curve``: the spread of the last checkpoints). Averaging the teacher's weights
over the last stretch of the run (stochastic weight averaging, as the SSL literature does against
it) gives a model that depends less on where training stopped. Averaging changes nothing in the
training, so it is measured on the runs themselves, from copies of their ``last.pt`` taken as they
trained (one per checkpoint interval, ``<configuration>_seed<seed>_*.pt`` in ``--snapshots``):

* for each stopping point (``--stops``, default the last five multiples of 500 iterations), the
  model a run stopped there ships - its teacher with clean BatchNorm statistics, as ``last.pt``
  holds it - and the average of the teacher weights of the copies within ``--window`` iterations
  before it, with BatchNorm statistics re-estimated on the engine's clean batches of that iteration
  (``buseg.training.loop.clean_batchnorm_batches``), each scored on every held-out volume;
* per run: Dice at the end and the spread (sd, range) over the stopping points, shipped against
  averaged; per configuration, paired by seed with the project's rule: the averaging is kept only
  when it lowers the spread without its Dice at the end being worse.

A check comes with it: a shipped teacher scored here equals the run's own teacher score at that
iteration (``--score-every``), where both exist. Scores are kept as they come
(``<out>/teacher_average_<tag>.json``), so a run of this script resumes. Usage::

    python -m benchmarks.teacher_average --snapshots ../bench-work/snapshots --seeds 1337 2 3 \\
        --tag acdc_cpu_7labeled_long12000 --configurations ours-crl-concentration --iterations 12000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import quality
from benchmarks.paths import module_command, shown_command
from buseg.data.sampling import SliceSampler
from buseg.data.training_data import TrainingData
from buseg.model.checkpoint import load_model, read_checkpoint, save_checkpoint
from buseg.training.loop import clean_batchnorm_batches, with_clean_batchnorm

ROOT = Path(__file__).resolve().parents[1]
COMMAND = module_command(__file__)


def average_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The parameter-by-parameter mean of ``states`` (floating tensors; the others, such as BatchNorm's
    batch counters, are taken from the last state)."""
    if not states:
        raise ValueError("nothing to average")
    averaged = {}
    for name, last in states[-1].items():
        if torch.is_floating_point(last):
            averaged[name] = torch.stack([s[name].float() for s in states]).mean(0).to(last.dtype)
        else:
            averaged[name] = last.clone()
    return averaged


def snapshots_of(folder: Path, configuration: str, seed: int) -> dict[int, Path]:
    """The run's copies of last.pt by iteration (a copy taken twice counts once)."""
    copies = {}
    for path in sorted(folder.glob(f"{configuration}_seed{seed}_*.pt")):
        copies[int(read_checkpoint(path)["training_state"]["iteration"])] = path
    if not copies:
        raise SystemExit(f"{folder}: no copies of last.pt named {configuration}_seed{seed}_*.pt")
    return copies


def clean_batches(data, config, seed: int, iteration: int) -> Iterator[torch.Tensor]:
    """The engine's clean BatchNorm batches of a model file written at ``iteration`` of the run."""
    size = config.model.patch_size[::-1]
    labeled = SliceSampler(data.labeled_images, data.labeled_labels, size, augment=config.data.augment)
    unlabeled = SliceSampler(data.unlabeled_images, None, size, augment=config.data.augment)
    return clean_batchnorm_batches(labeled, unlabeled, config.optim.batch_size, seed, iteration)


def model_file(run_folder: Path, weights: dict, path: Path, batches: Iterator[torch.Tensor] | None) -> Path:
    """A model file of ``weights`` in the format of the run's own; with ``batches``, its BatchNorm
    statistics are first re-estimated on them."""
    skeleton = run_folder / "best.pt"  # any model file of the run: the same network
    network = load_model(skeleton).network.float().cpu()
    network.load_state_dict(weights)
    if batches is not None:
        network = with_clean_batchnorm(network, batches)
    metadata = read_checkpoint(skeleton)["metadata"]
    save_checkpoint(path, weights=network.state_dict(), metadata={**metadata, "weights": "teacher"})
    return path


def averaged_model(run_folder: Path, teacher: dict, batches: Iterator[torch.Tensor], path: Path) -> Path:
    """A model file of ``teacher`` with clean BatchNorm statistics, in the format of the run's own."""
    return model_file(run_folder, teacher, path, batches)


@dataclass
class Screen:
    """What every scoring needs: the data, the held-out volumes, the protocol's settings."""

    data: TrainingData
    volumes: list
    bench: argparse.Namespace
    preset: quality.Preset
    work: Path
    scores: dict
    scores_path: Path

    def score(self, key: str, make_model) -> float:
        """Dice (%) of the model ``make_model(path)`` writes, kept under ``key`` (scored once)."""
        if key not in self.scores:
            with tempfile.TemporaryDirectory() as folder:
                model = make_model(Path(folder) / "model.pt")
                summary = quality.evaluate_model(
                    model, self.volumes, self.data.num_classes, "cpu", self.bench.review_budget
                )["summary"]
            self.scores[key] = 100 * summary["dice"]
            self.scores_path.write_text(json.dumps(self.scores, indent=1, sort_keys=True))
            print(f"  {key}: {self.scores[key]:.2f}", flush=True)
        return self.scores[key]

    def run(self, configuration: str, seed: int, stops: list[int], window: int, snapshots: Path) -> dict:
        """Shipped and averaged Dice at each stop of one run."""
        copies = snapshots_of(snapshots, configuration, seed)
        folder = self.work / f"{configuration}_seed{seed}"
        config, _ = quality.second_stage_config(
            configuration, self.preset, self.bench, seed, self.work / "unused", {"copy-paste": Path("x")}
        )
        shipped, averaged = {}, {}
        for stop in stops:
            if stop not in copies:
                raise SystemExit(f"{configuration} seed {seed}: no copy of last.pt at iteration {stop}")
            state = read_checkpoint(copies[stop])["training_state"]
            shipped[stop] = self.score(
                f"{configuration}/{seed}/shipped/{stop}",
                lambda path, state=state: model_file(
                    folder, state["shipped"] or state["teacher"], path, None
                ),
            )
            inside = [i for i in sorted(copies) if stop - window < i <= stop]

            def make_average(path: Path, inside=inside, stop=stop) -> Path:
                teachers = [read_checkpoint(copies[i])["training_state"]["teacher"] for i in inside]
                batches = clean_batches(self.data, config, seed, stop)
                return averaged_model(folder, average_state(teachers), batches, path)

            averaged[stop] = self.score(f"{configuration}/{seed}/averaged{window}/{stop}", make_average)
        return {"shipped": shipped, "averaged": averaged, "copies": len(copies)}


def _spread(values: dict[int, float]) -> tuple[float, float]:
    """Sample sd and range of the scores over the stops (NaN for one stop: no spread to speak of)."""
    array = np.array(list(values.values()))
    if len(array) < 2:
        return float("nan"), float("nan")
    return float(np.std(array, ddof=1)), float(array.max() - array.min())


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--snapshots", type=Path, required=True, help="Folder of the copies of last.pt.")
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument("--tag", required=True, help="The benchmarks.quality tag of the runs.")
    parser.add_argument("--configurations", nargs="+", required=True)
    parser.add_argument("--iterations", type=int, required=True, help="The runs' self-training length.")
    parser.add_argument("--window", type=int, default=2000, help="Iterations averaged before each stop.")
    parser.add_argument(
        "--stops", nargs="+", type=int, help="Stopping points (default: the last five every 500)."
    )
    parser.add_argument("--labeled", type=int, default=7)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--records", type=Path, help="The runs' teacher-score records (default: --out's).")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.stops = sorted(args.stops or [args.iterations - 500 * k for k in range(4, -1, -1)])
    if len(args.stops) < 2 or args.stops[0] - args.window < 0:
        parser.error("--stops: at least two stopping points, each at least --window iterations into the run")
    return args


def report(args: argparse.Namespace, runs: dict, records: Path) -> list[str]:
    """The markdown: per run, then per configuration paired by seed with the rule."""
    lines = [
        f"# Teacher weight averaging over the last {args.window} iterations: {args.tag}",
        "",
        f"Command: `{shown_command(COMMAND, args.argv)}`",
        "",
        "Dice % on all held-out volumes of the model a run stopped at each of "
        f"{', '.join(map(str, args.stops))} ships (its teacher, clean BatchNorm statistics) and of its "
        f"teacher's weights averaged over the {args.window} iterations before the stop (clean BatchNorm "
        "statistics re-estimated). Spread: sd (range) over those stops.",
        "",
        "| configuration | seed | shipped at the end | averaged at the end | shipped spread | averaged spread "
        "| check against the run's teacher scores |",
        "|---|---|---|---|---|---|---|",
    ]
    for (configuration, seed), run in runs.items():
        end = args.stops[-1]
        (sd_s, range_s), (sd_a, range_a) = _spread(run["shipped"]), _spread(run["averaged"])
        lines.append(
            f"| {configuration} | {seed} | {run['shipped'][end]:.2f} | {run['averaged'][end]:.2f} | "
            f"{sd_s:.2f} ({range_s:.2f}) | {sd_a:.2f} ({range_a:.2f}) | {check_text(run, records, configuration, seed)} |"
        )
    for configuration in dict.fromkeys(c for c, _ in runs):
        pairs = {seed: run for (c, seed), run in runs.items() if c == configuration}
        end = args.stops[-1]
        dice = {s: r["averaged"][end] - r["shipped"][end] for s, r in pairs.items()}
        spread = {s: _spread(r["averaged"])[0] - _spread(r["shipped"])[0] for s, r in pairs.items()}
        dice_verdict = quality.verdict(list(dice.values()))
        spread_verdict = quality.verdict(list(spread.values()), higher_is_better=False)
        if "too few seeds" in (dice_verdict, spread_verdict):
            decision = "not decided (the rule needs 3 seeds)"
        elif spread_verdict == "better" and dice_verdict != "worse":
            decision = "kept: steadier at no cost in Dice"
        else:
            decision = f"not kept (spread: {spread_verdict}; Dice: {dice_verdict})"
        mean_dice, se_dice = quality.mean_and_standard_error(list(dice.values()))
        mean_sd, se_sd = quality.mean_and_standard_error(list(spread.values()))
        lines += [
            "",
            f"## {configuration}: averaged against shipped, paired by seed",
            "",
            f"- Dice at {end}: {dice_verdict}: {mean_dice:+.2f} ± {se_dice:.2f} "
            f"({' / '.join(f'{s}: {d:+.2f}' for s, d in dice.items())})",
            f"- sd over the stops: {spread_verdict}: {mean_sd:+.2f} ± {se_sd:.2f} "
            f"({' / '.join(f'{s}: {d:+.2f}' for s, d in spread.items())})",
            f"- Decision: {decision}.",
        ]
    return lines


def check_text(run: dict, records: Path, configuration: str, seed: int) -> str:
    """The largest difference between a shipped score here and the run's own teacher score."""
    path = records / f"{configuration}_seed{seed}.teacher.json"
    if not path.exists():
        return "no teacher record"
    recorded = {s["iteration"]: 100 * s["dice"] for s in json.loads(path.read_text())["scores"]}
    shared = [i for i in run["shipped"] if i in recorded]
    if not shared:
        return "no shared iteration"
    worst = max(abs(run["shipped"][i] - recorded[i]) for i in shared)
    return f"max difference {worst:.2f} at {len(shared)} iterations"


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = {
        "--dataset": "acdc",
        "--preset": "cpu",
        "--labeled": args.labeled,
        "--seeds": args.seeds[0],
        "--iterations": args.iterations,
        "--work": args.work,
        "--out": args.out,
    }
    bench = quality.parse_arguments([str(word) for pair in protocol.items() for word in pair])
    preset = quality.PRESETS[("acdc", "cpu")]
    preset.labeled_count, preset.iterations = args.labeled, args.iterations
    work = args.work / args.tag
    args.out.mkdir(parents=True, exist_ok=True)
    data, evaluation = quality.load_splits(preset, bench, work)
    scores_path = args.out / f"teacher_average_{args.tag}.json"
    scores = json.loads(scores_path.read_text()) if scores_path.exists() else {}
    screen = Screen(data, [*data.validation, *evaluation], bench, preset, work, scores, scores_path)
    runs = {
        (configuration, seed): screen.run(configuration, seed, args.stops, args.window, args.snapshots)
        for configuration in args.configurations
        for seed in args.seeds
    }
    records = args.records or args.out / quality.RECORDS_FOLDER / args.tag
    path = args.out / f"teacher_average_{args.tag}.md"
    path.write_text("\n".join(report(args, runs, records)) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
