"""Screen of a long-run remedy: the EMA teacher's weights averaged over the end of a run.

A long self-training run's last checkpoint is one draw from a curve that still moves by points
(``benchmarks.teacher_curve``: the spread of the last checkpoints). Averaging the teacher's weights
over the last stretch of the run (stochastic weight averaging, as the SSL literature does for it)
gives a model that does not depend on where training stopped. This script scores that model
post hoc from copies of a run's ``last.pt`` taken as it trained (one every checkpoint interval):

* the teacher weights of every copy from ``--from-iteration`` on are averaged, parameter by
  parameter (BatchNorm statistics included, then replaced);
* BatchNorm statistics are re-estimated on clean training batches, as the engine does for every
  model file (``buseg.training.loop.with_clean_batchnorm``, the same batches as its last
  checkpoint's);
* the averaged model is scored on every held-out volume, beside the run's own teacher scores.

It is a screen (one run's copies; no training), so it decides nothing by itself: it says whether
the remedy is worth running on every seed. Usage (the copies named ``<configuration>_seed<seed>_*.pt``)::

    python -m benchmarks.teacher_average --snapshots ../bench-work/snapshots --seed 3 \\
        --tag acdc_cpu_7labeled_long12000 --configurations ours-url-only ours-crl-concentration \\
        --from-iteration 8000 10000 --labeled 7 --iterations 12000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks import quality
from benchmarks.paths import module_command, shown_command
from buseg.data.sampling import SliceSampler
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


def snapshots_of(folder: Path, configuration: str, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    """Teacher weights by iteration of the run's copies (a copy taken twice counts once)."""
    teachers = {}
    for path in sorted(folder.glob(f"{configuration}_seed{seed}_*.pt")):
        state = read_checkpoint(path)["training_state"]
        teachers[int(state["iteration"])] = state["teacher"]
    if not teachers:
        raise SystemExit(f"{folder}: no copies of last.pt named {configuration}_seed{seed}_*.pt")
    return teachers


def clean_batches(data, config, seed: int, iteration: int) -> Iterator[torch.Tensor]:
    """The engine's clean BatchNorm batches of a model file written at ``iteration`` of the run."""
    size = config.model.patch_size[::-1]
    labeled = SliceSampler(data.labeled_images, data.labeled_labels, size, augment=config.data.augment)
    unlabeled = SliceSampler(data.unlabeled_images, None, size, augment=config.data.augment)
    return clean_batchnorm_batches(labeled, unlabeled, config.optim.batch_size, seed, iteration)


def averaged_model(run_folder: Path, teacher: dict, batches: Iterator[torch.Tensor], path: Path) -> Path:
    """A model file of ``teacher`` (with clean BatchNorm statistics) in the format of the run's own."""
    skeleton = run_folder / "best.pt"  # any model file of the run: the same network
    network = load_model(skeleton).network.float().cpu()
    network.load_state_dict(teacher)
    network = with_clean_batchnorm(network, batches)
    metadata = read_checkpoint(skeleton)["metadata"]
    save_checkpoint(path, weights=network.state_dict(), metadata={**metadata, "weights": "teacher-average"})
    return path


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--snapshots", type=Path, required=True, help="Folder of the copies of last.pt.")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--tag", required=True, help="The benchmarks.quality tag of the runs.")
    parser.add_argument("--configurations", nargs="+", required=True)
    parser.add_argument(
        "--from-iteration", nargs="+", type=int, required=True, help="Average the copies from here on."
    )
    parser.add_argument("--labeled", type=int, default=7)
    parser.add_argument("--iterations", type=int, required=True, help="The runs' self-training length.")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = {
        "--dataset": "acdc",
        "--preset": "cpu",
        "--labeled": args.labeled,
        "--seeds": args.seed,
        "--iterations": args.iterations,
        "--work": args.work,
        "--out": args.out,
    }
    bench = quality.parse_arguments([str(word) for pair in protocol.items() for word in pair])
    preset = quality.PRESETS[("acdc", "cpu")]
    preset.labeled_count, preset.iterations = args.labeled, args.iterations
    work = args.work / args.tag
    data, evaluation = quality.load_splits(preset, bench, work)
    volumes = [*data.validation, *evaluation]
    records = args.out / quality.RECORDS_FOLDER / args.tag
    lines = [
        f"# Teacher weight averaging, screened on seed {args.seed}: {args.tag}",
        "",
        f"Command: `{shown_command(COMMAND, args.argv)}`",
        "",
        "Dice % on all held-out volumes: the run's own teacher (its last checkpoint, and the spread of "
        "its last five scored checkpoints) beside its teacher's weights averaged from an iteration on "
        "(every copy of last.pt from there; clean BatchNorm statistics re-estimated). One seed: a screen.",
        "",
        "| configuration | teacher at the end | sd (range) of its last 5 scores | averaged from | copies | averaged |",
        "|---|---|---|---|---|---|",
    ]
    for configuration in args.configurations:
        run = json.loads((records / f"{configuration}_seed{args.seed}.teacher.json").read_text())
        scores = sorted(run["scores"], key=lambda s: s["iteration"])
        end = [s for s in scores if s["iteration"] == args.iterations]
        if not end:
            raise SystemExit(f"{configuration} seed {args.seed}: no teacher score at {args.iterations}")
        last = [100 * s["dice"] for s in scores[-5:]]
        teachers = snapshots_of(args.snapshots, configuration, args.seed)
        config, _ = quality.second_stage_config(
            configuration, preset, bench, args.seed, work / "unused", {"copy-paste": Path("unused")}
        )
        for start in args.from_iteration:
            chosen = [teachers[i] for i in sorted(teachers) if i >= start]
            batches = clean_batches(data, config, args.seed, args.iterations)
            with tempfile.TemporaryDirectory() as folder:
                model = averaged_model(
                    work / f"{configuration}_seed{args.seed}",
                    average_state(chosen),
                    batches,
                    Path(folder) / "averaged.pt",
                )
                summary = quality.evaluate_model(
                    model, volumes, data.num_classes, "cpu", bench.review_budget
                )["summary"]
            spread = torch.tensor(last)
            lines.append(
                f"| {configuration} | {100 * end[0]['dice']:.2f} | {spread.std().item():.2f} "
                f"({(spread.max() - spread.min()).item():.2f}) | {start} | {len(chosen)} | "
                f"{100 * summary['dice']:.2f} |"
            )
            print(lines[-1], flush=True)
    path = args.out / f"teacher_average_{args.tag}_seed{args.seed}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
