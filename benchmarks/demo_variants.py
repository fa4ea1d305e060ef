"""Every configuration of the quality benchmark on the demo's generated data, several seeds, paired.

`make demo` compares our method with the supervised baseline on one seed. Whether a CRL variant
(or URL, or plain copy-paste) helps or hurts on that tiny data - 2 labeled volumes, where the
teacher is unsure about whole structures - needs the same care as on ACDC: several seeds, paired
by seed, one rule. Per seed this script builds the demo exactly as ``buseg demo`` does (same data
generator, same network, same shared supervised start, same branch budget); from that shared
start it trains one branch per configuration (the keys of ``quality.METHODS``; the demo has no
copy-paste pre-training, so the shared start is scored as ``shared-start``), segments the 4 test
volumes with the engine's own prediction and scores them with its own metrics.

Primary figure: the *last* weights (``final.pt``; no selection on 2 validation volumes); beside
it the weights the demo ships (``model.pt``: best on the validation volumes). Verdicts use
``quality.verdict``: better only when ahead in every seed or the mean paired difference exceeds
twice its standard error (at least 3 seeds).

Precision: float32, as the demo (the same figures on every CPU); ``--amp`` trains with the engine's
mixed precision instead (bfloat16 autocast on a CPU with native bfloat16, else float32 anyway).

Runs are reused: a branch whose saved row has the same configuration is not trained again.

Usage::

    python -m benchmarks.demo_variants --seeds 0 1 2 --threads 1
    python -m benchmarks.demo_variants --seeds 0 1 2 --threads 1 --amp --tag demo_variants_bf16
    python -m benchmarks.demo_variants --methods supervised bcp ours-url-only --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.paths import module_command, shown_command
from benchmarks.quality import (
    METHODS,
    PRETRAINING_ONLY,
    _file_sha256,
    apply_method_settings,
    mean_and_standard_error,
    paired_differences,
    spread,
    verdict,
)
from buseg.config import PredictConfig, TrainConfig, to_dict
from buseg.device import precision_description, resolve_device
from buseg.evaluation import demo
from buseg.evaluation.evaluate import evaluate_files
from buseg.prediction.predict_files import predict_files
from buseg.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
COMMAND = module_command(__file__)

SHARED_START = "shared-start"  # the demo's shared supervised start, scored as is
# "ours" repeats whichever variant is the engine's default: asked for by name only.
CONFIGURATIONS = [SHARED_START] + [key for key in METHODS if key != PRETRAINING_ONLY]
DEFAULT_CONFIGURATIONS = [key for key in CONFIGURATIONS if key != "ours"]
REFERENCES = ("supervised", "bcp")
ROW_SCHEMA = 3  # 2: rows record their start weights' hash; 3: the demo's scan population, best start


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_CONFIGURATIONS, choices=CONFIGURATIONS)
    parser.add_argument("--plan", choices=("full", "quick"), default="full", help="quick: a smoke test")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision (bfloat16 autocast where the CPU has it natively); default: float32 as the demo",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "demo_variants")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", default="demo_variants")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    plan = demo.QUICK if args.plan == "quick" else demo.FULL
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for seed in args.seeds:
        rows += run_seed(plan, seed, args)
        write_results(rows, plan, args)  # after every seed: a stopped run still leaves its tables
    print(f"wrote {args.out / f'{args.tag}.md'}")
    return 0


def run_seed(plan: demo.DemoPlan, seed: int, args: argparse.Namespace) -> list[dict]:
    """The demo's data and shared start for ``seed``, then every requested configuration from it."""
    seed_dir = (args.work / plan.name / f"seed{seed}").resolve()
    folders = _data(seed_dir, plan, seed)
    shared = branch_config(SHARED_START, folders, seed_dir, plan, seed, args)
    # The branches start from the shared start's model.pt (best on the validation volumes), as the demo's.
    shared_best = _train_once(shared, f"shared start (seed {seed})").with_name("model.pt")
    rows = []
    for key in args.methods:
        if key == SHARED_START:
            config = shared
        else:
            config = branch_config(key, folders, seed_dir, plan, seed, args, init_weights=shared_best)
        rows.append(_saved_row(config) or _train_and_score(key, seed, config, folders, args))
    return rows


def _data(seed_dir: Path, plan: demo.DemoPlan, seed: int) -> dict[str, Path]:
    """The demo's generated volumes (deterministic in the seed; written once)."""
    done = seed_dir / "data.json"
    if done.exists():
        return {name: Path(path) for name, path in json.loads(done.read_text()).items()}
    folders = demo.make_data(seed_dir, plan, seed)
    done.write_text(json.dumps({name: str(path) for name, path in folders.items()}))
    return folders


def branch_config(
    key: str,
    folders: dict[str, Path],
    seed_dir: Path,
    plan: demo.DemoPlan,
    seed: int,
    args: argparse.Namespace,
    init_weights: Path | None = None,
) -> TrainConfig:
    """The demo's own configuration of the shared start or a branch, with ``key``'s method settings."""
    if key == SHARED_START:
        config = demo.train_config(demo.SHARED_RUN, folders, seed_dir, plan, seed, args.device)
    else:
        method = METHODS[key][0]
        config = demo.train_config(method, folders, seed_dir, plan, seed, args.device, init_weights)
        if method != "supervised":
            config.data.unlabeled = str(folders["unlabeled"])
        apply_method_settings(config, key)
        config.out_dir = str(seed_dir / "runs" / key)
    config.num_threads = args.threads
    config.optim.amp = args.amp
    return config.validate()


def _train_once(config: TrainConfig, label: str) -> Path:
    """Train ``config`` unless its folder holds a finished run of it; its final.pt.

    Finished means: final.pt, the same configuration, and the same start weights (a branch's
    ``init_weights`` path stays the same when the shared start is trained again). ``trained.json``
    records the training's seconds and the start weights' hash."""
    out = Path(config.out_dir)
    saved, trained = out / "config.json", out / "trained.json"
    if (
        (out / "final.pt").exists()
        and saved.exists()
        and trained.exists()
        and _same(json.loads(saved.read_text()), config)
        and json.loads(trained.read_text()).get("start_sha256") == _start_sha256(config)
    ):
        return out / "final.pt"
    print(f"{label}: training {config.optim.iterations} iterations", flush=True)
    start = time.perf_counter()
    train(config, overwrite=True)
    record = {"seconds": time.perf_counter() - start, "start_sha256": _start_sha256(config)}
    trained.write_text(json.dumps(record))
    return out / "final.pt"


def _start_sha256(config: TrainConfig) -> str | None:
    return _file_sha256(Path(config.init_weights)) if config.init_weights else None


def _same(saved: dict, config: TrainConfig) -> bool:
    """Same training, whatever the thread count (which does not change what is learned in kind)."""
    current = to_dict(config)
    for entry in (saved, current):
        entry.pop("num_threads", None)
    return saved == current


def _saved_row(config: TrainConfig) -> dict | None:
    path = Path(config.out_dir) / "row.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("schema") != ROW_SCHEMA or not _same(saved["config"], config):
        return None
    if saved.get("start_sha256") != _start_sha256(config):  # the shared start was trained again
        return None
    return saved["row"]


def _train_and_score(
    key: str, seed: int, config: TrainConfig, folders: dict[str, Path], args: argparse.Namespace
) -> dict:
    out = Path(config.out_dir)
    final = _train_once(config, f"{key} (seed {seed})")
    seconds = json.loads((out / "trained.json").read_text())["seconds"]
    row = score(key, seed, final, out, folders, args, seconds=seconds, shipped=out / "model.pt")
    (out / "row.json").write_text(
        json.dumps(
            {
                "schema": ROW_SCHEMA,
                "config": to_dict(config),
                "start_sha256": _start_sha256(config),
                "row": row,
            },
            indent=1,
        )
    )
    return row


def score(
    key: str,
    seed: int,
    final: Path,
    run_dir: Path,
    folders: dict[str, Path],
    args: argparse.Namespace,
    *,
    seconds: float,
    shipped: Path,
) -> dict:
    """Test-volume figures of the last weights (and of the shipped ``model.pt`` where given)."""
    row: dict = {"method": key, "seed": seed, "branch_seconds": round(seconds, 1)}
    for which, model in (("last", final), ("shipped", shipped)):
        summary = _evaluate(model, run_dir / f"test_{which}", folders, args.device, args.amp)
        row[f"{which}_dice"] = summary["mean"]["dice"]
        row[f"{which}_hd95_mm"] = summary["mean"]["hd95_mm"]
        for name, figures in summary["classes"].items():
            row[f"{which}_dice_{name}"] = figures["dice"]
    print(
        f"  {key} (seed {seed}): test Dice last {100 * row['last_dice']:.1f}, HD95 {row['last_hd95_mm']:.2f} mm",
        flush=True,
    )
    return row


def _evaluate(model: Path, out: Path, folders: dict[str, Path], device: str, amp: bool) -> dict:
    predicted = predict_files(
        [folders["test"]],
        PredictConfig(
            model_path=str(model), out_dir=str(out / "predictions"), device=device, overwrite=True, amp=amp
        ),
    )
    evaluation = evaluate_files([predicted.out_dir], [folders["test"]], out / "evaluation", overwrite=True)
    return evaluation.summary


def write_results(rows: list[dict], plan: demo.DemoPlan, args: argparse.Namespace) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / f"{args.tag}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (args.out / f"{args.tag}.md").write_text("\n".join(markdown_report(rows, plan, args)) + "\n")


def summary_lines(rows: list[dict]) -> list[dict]:
    """Per configuration: figures over seeds, and the paired verdicts against each reference."""
    lines = []
    references = [r for r in REFERENCES if any(row["method"] == r for row in rows)]
    classes = sorted({k[len("last_dice_") :] for r in rows for k in r if k.startswith("last_dice_")})
    for key in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == key]
        line = {"configuration": key, "seeds": len(group)}
        line["Dice last"] = spread([r["last_dice"] for r in group], 100)
        line["per seed"] = " / ".join(f"{r['seed']}: {100 * r['last_dice']:.1f}" for r in group)
        for name in classes:
            line[name] = spread([r.get(f"last_dice_{name}", np.nan) for r in group], 100)
        line["HD95 mm last"] = spread([r["last_hd95_mm"] for r in group])
        line["Dice shipped"] = spread([r.get("shipped_dice", np.nan) for r in group], 100)
        for reference in references:
            if reference == key:
                line[f"vs {reference}"] = "(reference)"
                continue
            values = [100 * d for d in paired_differences(rows, key, reference, "last_dice").values()]
            mean, se = mean_and_standard_error(values)
            error = f" ± {se:.2f}" if np.isfinite(se) else ""
            line[f"vs {reference}"] = f"{verdict(values)}: {mean:+.2f}{error}" if values else "-"
        line["branch s"] = spread([r["branch_seconds"] for r in group])
        lines.append(line)
    return lines


def _precision(args: argparse.Namespace) -> str:
    if not args.amp:
        return "float32 (as the demo)"
    return precision_description(resolve_device(args.device)[0], True)


def markdown_report(rows: list[dict], plan: demo.DemoPlan, args: argparse.Namespace) -> list[str]:
    lines = [
        f"# Demo variants: {args.tag}",
        "",
        f"Machine: {platform.machine()}, torch {torch.__version__}, {args.threads or torch.get_num_threads()} "
        f"thread(s) per run, precision: {_precision(args)}. "
        f"Command: `{shown_command(COMMAND, sys.argv[1:])}`",
        "",
        f"The demo's plan `{plan.name}`: {plan.labeled} labeled, {plan.unlabeled} unlabeled, {plan.validation} "
        f"validation, {plan.test} test volumes of the population `{plan.population}` (buseg.data.synthetic); a shared "
        f"supervised start of {plan.shared_iterations} iterations, then {plan.iterations} iterations per branch "
        f"(batch {plan.batch_size}) from its best weights on the validation volumes.",
        "",
        "Test volumes' mean Dice over the 3 structures in %, HD95 in mm (a structure missing from a "
        "prediction scores 0 on every metric, the published protocol's rule: it lowers Dice and *flatters* "
        "HD95, so read HD95 beside the per-structure Dice). *Last*: the branch's final "
        "weights (the primary figure); *shipped*: its `model.pt` (best on the validation volumes), "
        "what `buseg demo` reports. *Per seed*: seed: last Dice. *vs X*: verdict on the last "
        "Dice paired by seed, mean difference ± its standard error; better only when ahead in every "
        "seed or the mean difference exceeds twice its standard error (3 seeds at least). "
        f"`{SHARED_START}`: the shared start itself, before any branch (*branch s*: its own training).",
        "",
    ]
    summary = summary_lines(rows)
    if summary:
        columns = list(dict.fromkeys(k for line in summary for k in line))
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(line.get(c, "-")) for c in columns) + " |" for line in summary]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
