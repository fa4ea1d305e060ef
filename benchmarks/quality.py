"""Quality benchmark: our method against the published baselines on ACDC and LA.

Runs supervised (labeled only), mean teacher, BCP, ours (BUARL) and its ablations (URL
only, CRL only) with the same seeds, data and iteration budget, sharing the copy-paste
pre-training between the methods whose recipe has one, then evaluates on held-out volumes
with the published protocol's metrics and measures how useful the uncertainty is for
review. Writes CSV, markdown and PNG plots to ``--out`` (default benchmarks/results).

Splits (no label of an unlabeled training case is used for anything):

* ACDC: the labeled subset is the first 3 or 7 training patients; every other training
  slice is unlabeled. The 10 validation patients (20 volumes) are split by patient into a
  *selection* half (model selection: the best checkpoint by mean Dice) and an *evaluation*
  half (every reported figure). The checkpoint at the last iteration is reported too.
* LA: the first 8 (or 4) cases of the list are labeled; the last ``la_holdout`` cases are
  held out (half selection, half evaluation); the rest are unlabeled.

Usage::

    python benchmarks/quality.py --dataset acdc --preset cpu            # all methods, 1 seed
    python benchmarks/quality.py --dataset acdc --preset paper --seeds 1 2 3   (GPU)
    python benchmarks/quality.py --dataset la --preset cpu
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "BidirUncertaintySeg" / "Logic"))

from buseg.config import TrainConfig, to_dict  # noqa: E402
from buseg.data import TrainingData, ValidationCase, load_training_data  # noqa: E402
from buseg.events import EventSink  # noqa: E402
from buseg.train import train  # noqa: E402

METHODS = {
    # name: (method, url, crl)
    "bcp": ("bcp", False, False),
    "ours": ("buarl", True, True),
    "ours-url-only": ("buarl", True, False),
    "ours-crl-only": ("buarl", False, True),
    "mean-teacher": ("mean-teacher", False, False),
    "supervised": ("supervised", False, False),
}
SHARED_PRETRAINING = {"mean-teacher", "bcp", "ours", "ours-url-only", "ours-crl-only"}


@dataclass
class Preset:
    """Everything a benchmark run fixes. CLI flags override single fields."""

    dataset: str
    patch_size: list[int]
    batch_size: int
    pretrain_iterations: int
    iterations: int
    lr: float = 0.01
    self_training_lr: float | None = None
    lr_schedule: str = "constant"
    validation_interval: int = 200
    labeled_count: int = 7
    extra: dict = field(default_factory=dict)


PRESETS = {
    ("acdc", "paper"): Preset("acdc", [256, 256], 24, 10000, 30000, validation_interval=200),
    ("acdc", "cpu"): Preset(
        "acdc", [96, 96], 16, 2000, 4000, self_training_lr=0.005, validation_interval=250
    ),
    ("la", "paper"): Preset(
        "la",
        [112, 112, 80],
        8,
        2000,
        15000,
        lr_schedule="step",
        validation_interval=500,
        labeled_count=8,
        extra={"lr_step_iterations": 2500},
    ),
    ("la", "cpu"): Preset(
        "la", [64, 64, 48], 4, 300, 700, lr_schedule="constant", validation_interval=250, labeled_count=8
    ),
}


def acdc_split(root: Path) -> tuple[list[str], list[str]]:
    """Validation volumes split by patient: alternate patients go to selection / evaluation."""
    names = [n.strip() for n in (root / "val.list").read_text().splitlines() if n.strip()]
    patients = sorted({n.split("_")[0] for n in names})
    selection_patients = set(patients[0::2])
    selection = [n for n in names if n.split("_")[0] in selection_patients]
    evaluation = [n for n in names if n.split("_")[0] not in selection_patients]
    return selection, evaluation


def base_config(
    preset: Preset, args: argparse.Namespace, method_key: str, seed: int, out: Path
) -> TrainConfig:
    method, url, crl = METHODS[method_key]
    c = TrainConfig()
    c.data.source = preset.dataset
    c.data.data_root = str(args.data_root)
    c.data.labeled_count = preset.labeled_count
    c.model.dimension = "2d" if preset.dataset == "acdc" else "3d"
    c.model.patch_size = list(preset.patch_size)
    c.optim.batch_size = preset.batch_size
    c.optim.lr = preset.lr
    c.optim.self_training_lr = preset.self_training_lr
    c.optim.lr_schedule = preset.lr_schedule
    for key, value in preset.extra.items():
        setattr(c.optim, key, value)
    c.method.name = method
    c.url.enabled, c.crl.enabled = url, crl
    c.seed = seed
    c.validation_interval = preset.validation_interval
    c.checkpoint_interval = 10**9
    c.log_interval = 50
    c.out_dir = str(out)
    c.num_threads = args.threads
    c.device = args.device
    for assignment in args.set or []:
        key, value = assignment.split("=", 1)
        section, name = key.split(".") if "." in key else (None, key)
        target = getattr(c, section) if section else c
        current = getattr(target, name)
        setattr(target, name, type(current)(json.loads(value)) if current is not None else json.loads(value))
    return c


class Progress(EventSink):
    def __init__(self, label: str):
        self.label = label
        self.start = time.time()

    def handle(self, event: dict) -> None:
        if event["event"] == "validation":
            print(
                f"  [{self.label}] it {event['iteration']}: selection dice {event['metrics']['dice']:.4f} "
                f"(best {event['best']:.4f} @ {event['best_iteration']}) {time.time() - self.start:.0f}s",
                flush=True,
            )


# --------------------------------------------------------------------------------------
# Evaluation


def predict_case(model_path: Path, case: ValidationCase, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Argmax prediction and the normalised-entropy map of a model on a normalised volume."""
    from buseg.checkpoint import load_model
    from buseg.inference import predict_probabilities
    from buseg.uncertainty import normalized_entropy

    model = load_model(model_path, device=device)
    probabilities = predict_probabilities(
        model.network,
        case.image,
        dimension=model.dimension,
        patch_size_xyz=model.patch_size_xyz,
        slice_axis=model.slice_axis,
        device=device,
    )
    return probabilities.argmax(0).numpy(), normalized_entropy(probabilities[None])[0].numpy()


def evaluate_model(
    model_path: Path, cases: list[ValidationCase], num_classes: int, device: str, review_budget: float
) -> dict:
    # Per class Dice, Jaccard, HD95, ASD (voxels and mm) with the published (medpy) rules.
    from buseg.metrics import evaluate_arrays
    from buseg.review import simulate_review

    per_case = []
    for case in cases:
        prediction, uncertainty = predict_case(model_path, case, device)
        rows = evaluate_arrays(
            case.name,
            prediction,
            case.labels,
            case.spacing_mm,
            [(value, str(value)) for value in range(1, num_classes)],
        )
        metrics = {}
        for metric in ("dice", "jaccard", "hd95_voxels", "asd_voxels", "hd95_mm", "asd_mm"):
            values = [getattr(r, metric) for r in rows]
            metrics[metric] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        for row in rows:
            metrics[f"dice_class{row.label_value}"] = row.dice
        review = simulate_review(
            prediction,
            case.labels,
            uncertainty,
            num_classes,
            budget_fraction=review_budget,
            spacing_mm=case.spacing_mm,
        )
        per_case.append({"case": case.name, **metrics, **review})
    keys = [k for k in per_case[0] if k != "case"]
    summary = {k: float(np.nanmean([c[k] for c in per_case])) for k in keys}
    return {"summary": summary, "cases": per_case}


# --------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=("acdc", "la"), default="acdc")
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="Benchmark data folder (default: ../shared/data/ACDC or ../shared/data/LA).",
    )
    parser.add_argument(
        "--labeled", type=int, default=None, help="Labeled patients (ACDC 3/7) or cases (LA 4/8)."
    )
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337])
    parser.add_argument("--iterations", type=int, help="Override the preset's self-training iterations.")
    parser.add_argument(
        "--pretrain-iterations", type=int, help="Override the preset's pre-training iterations."
    )
    parser.add_argument(
        "--set",
        nargs="*",
        metavar="SECTION.FIELD=JSON",
        help="Override any TrainConfig field for every method, e.g. crl.threshold=0.4",
    )
    parser.add_argument(
        "--review-budget",
        type=float,
        default=0.01,
        help="Fraction of each volume flagged for review in the simulated-review figures.",
    )
    parser.add_argument(
        "--la-holdout", type=int, default=6, help="LA: cases held out (half selection, half evaluation)."
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--reuse-only",
        action="store_true",
        help="Only assemble finished runs (stop instead of training anything).",
    )
    parser.add_argument(
        "--tag", default=None, help="Name of this run's result files (default: dataset_preset_labeled)."
    )
    args = parser.parse_args(argv)

    preset = copy.deepcopy(PRESETS[(args.dataset, args.preset)])
    if args.labeled is not None:
        preset.labeled_count = args.labeled
    if args.iterations is not None:
        preset.iterations = args.iterations
    if args.pretrain_iterations is not None:
        preset.pretrain_iterations = args.pretrain_iterations
    if args.data_root is None:
        args.data_root = ROOT.parent / "shared" / "data" / ("ACDC" if args.dataset == "acdc" else "LA")
    tag = args.tag or f"{args.dataset}_{args.preset}_{preset.labeled_count}labeled"
    work = args.work / tag
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    # Data once for all methods, with the selection split as the training loop's validation.
    probe = base_config(preset, args, "ours", args.seeds[0], work / "probe")
    if args.dataset == "acdc":
        selection, evaluation = acdc_split(args.data_root)
        selection_list = work / "selection.list"
        selection_list.write_text("\n".join(selection) + "\n")
        probe.data.validation = str(selection_list)
        data_all = load_training_data(probe, log=print)
        eval_config = copy.deepcopy(probe)
        eval_list = work / "evaluation.list"
        eval_list.write_text("\n".join(evaluation) + "\n")
        eval_config.data.validation = str(eval_list)
        evaluation_cases = load_training_data(eval_config, log=lambda m: None).validation
    else:
        cases = [n.strip() for n in (args.data_root / "train.list").read_text().splitlines() if n.strip()]
        held = cases[-args.la_holdout :]
        selection, evaluation = held[0::2], held[1::2]
        selection_list = work / "selection.list"
        selection_list.write_text("\n".join(selection) + "\n")
        probe.data.validation = str(selection_list)
        probe.data.exclude_cases = evaluation
        data_all = load_training_data(probe, log=print)
        eval_config = copy.deepcopy(probe)
        eval_list = work / "evaluation.list"
        eval_list.write_text("\n".join(evaluation) + "\n")
        eval_config.data.validation = str(eval_list)
        eval_config.data.exclude_cases = selection
        evaluation_cases = load_training_data(eval_config, log=lambda m: None).validation
    print(
        f"selection: {len(data_all.validation)} volumes; evaluation: {len(evaluation_cases)} volumes",
        flush=True,
    )

    rows, curves = [], {}
    for seed in args.seeds:
        pretrained = None
        if SHARED_PRETRAINING & set(args.methods) and preset.pretrain_iterations:
            pretrained = run_pretraining(preset, args, seed, work, data_all)
        for key in args.methods:
            row, curve = run_method(key, preset, args, seed, work, data_all, pretrained, evaluation_cases)
            rows.append(row)
            curves[(key, seed)] = curve
            write_results(rows, curves, preset, args, tag)
    write_results(rows, curves, preset, args, tag, final=True)
    models = {key: _model_file(work / f"{key}_seed{args.seeds[0]}") for key in args.methods}
    plot_example(
        {k: m for k, m in models.items() if m is not None},
        evaluation_cases[0],
        args.out / f"quality_{tag}_example.png",
        args.device if args.device != "auto" else "cpu",
        args.review_budget,
    )
    return 0


def _model_file(run: Path) -> Path | None:
    """The model a method's row was evaluated with ('best'): best.pt, else the model file."""
    return next((p for p in (run / "best.pt", run / "model.pt") if p.exists()), None)


def run_pretraining(preset: Preset, args, seed: int, work: Path, data: TrainingData) -> Path:
    """The copy-paste pre-training (BCP stage 1) shared by the semi-supervised methods.

    Self-training starts from its best checkpoint on the selection split (the published
    recipe selects the pre-trained model the same way).
    """
    out = work / f"pretrain_seed{seed}"
    if (out / "model.pt").exists():
        print(f"pre-training (seed {seed}): reusing {out / 'model.pt'}", flush=True)
        return out / "model.pt"
    if args.reuse_only:
        raise SystemExit(f"pre-training (seed {seed}): no finished run in {out} (--reuse-only)")
    config = base_config(preset, args, "bcp", seed, out)
    config.optim.pretrain_iterations = preset.pretrain_iterations
    config.optim.iterations = 0
    start = time.time()
    print(f"pre-training (seed {seed}): {preset.pretrain_iterations} copy-paste iterations", flush=True)
    train(config, events=Progress("pretrain"), overwrite=True, data=data)
    print(f"  pre-training took {time.time() - start:.0f} s", flush=True)
    return out / "model.pt"  # the best pre-training checkpoint on the selection split, as the recipe


def run_method(
    key: str,
    preset: Preset,
    args,
    seed: int,
    work: Path,
    data: TrainingData,
    pretrained: Path | None,
    evaluation_cases: list[ValidationCase],
) -> tuple[dict, list]:
    out = work / f"{key}_seed{seed}"
    config = base_config(preset, args, key, seed, out)
    if key == "supervised" or pretrained is None:
        # Labeled only, for the whole budget (pre-training + self-training iterations).
        config.optim.pretrain_iterations = 0
        config.optim.iterations = preset.pretrain_iterations + preset.iterations
        if key != "supervised":
            config.optim.pretrain_iterations = preset.pretrain_iterations
            config.optim.iterations = preset.iterations
        offset = 0
    else:
        config.init_weights = str(pretrained)
        config.optim.pretrain_iterations = 0
        config.optim.iterations = preset.iterations
        if config.optim.self_training_lr is not None:
            config.optim.lr = config.optim.self_training_lr
        offset = preset.pretrain_iterations
    saved_row = out / "row.json"
    if saved_row.exists() and _same_config(out, config):
        print(f"{key} (seed {seed}): reusing {saved_row}", flush=True)
        saved = json.loads(saved_row.read_text())
        return saved["row"], saved["curve"]
    if (out / "final.pt").exists() and (out / "history.json").exists() and _same_config(out, config):
        print(f"{key} (seed {seed}): reusing the finished training in {out}", flush=True)
        result = _finished_result(out)
        seconds = (
            json.loads((out / "seconds.json").read_text())["seconds"]
            if (out / "seconds.json").exists()
            else float("nan")
        )
    else:
        if args.reuse_only:
            raise SystemExit(f"{key} (seed {seed}): no finished run with this config in {out} (--reuse-only)")
        print(f"{key} (seed {seed}): {config.optim.iterations} iterations", flush=True)
        start = time.time()
        result = train(config, events=Progress(key), overwrite=True, data=data)
        seconds = time.time() - start
        (out / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    curve = [{"iteration": v["iteration"] + offset, "dice": v["dice"]} for v in result.history["validation"]]
    row = {
        "method": key,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "seconds_per_iteration": round(seconds / max(1, config.optim.iterations), 4),
        "best_iteration": (result.best_iteration or 0) + offset,
        "selection_dice": result.best_metric,
    }
    for which, path in (("best", result.best_path or result.model_path), ("last", out / "final.pt")):
        evaluation = evaluate_model(
            path,
            evaluation_cases,
            data.num_classes,
            args.device if args.device != "auto" else "cpu",
            args.review_budget,
        )
        for metric, value in evaluation["summary"].items():
            row[f"{which}_{metric}"] = value
        (out / f"evaluation_{which}.json").write_text(json.dumps(evaluation, indent=1))
    print(
        f"  {key}: evaluation dice best {row['best_dice']:.4f} / last {row['last_dice']:.4f} "
        f"({seconds:.0f} s)",
        flush=True,
    )
    saved_row.write_text(json.dumps({"row": row, "curve": curve}, indent=1))
    return row, curve


# Options added to the engine after runs were made, with the value that reproduces what those
# runs did: a stored config without such a field matches a current config with that value.
ADDED_OPTIONS = {("url", "loss"): "ce+dice", ("crl", "loss"): "ce+dice"}
# Sections only our method reads: they do not distinguish runs of the other methods.
BUARL_SECTIONS = ("url", "crl", "uncertainty")


def _same_config(out: Path, config: TrainConfig) -> bool:
    """A finished run in ``out`` may be reused only if it was made with this config (what the
    method reads of it)."""
    try:
        stored = json.loads((out / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    current = to_dict(config)
    # Where a run lives is not what it computes (a run may be reached through another work
    # folder); the start weights are compared as the files they are.
    for entry in (stored, current):
        entry.pop("out_dir", None)
        if entry.get("init_weights"):
            entry["init_weights"] = str(Path(entry["init_weights"]).resolve())
    for (section, name), value in ADDED_OPTIONS.items():
        if isinstance(stored.get(section), dict):
            stored[section].setdefault(name, value)
    if current["method"]["name"] != "buarl":
        for section in BUARL_SECTIONS:
            stored.pop(section, None)
            current.pop(section, None)
    return stored == current


def _finished_result(out: Path) -> SimpleNamespace:
    history = json.loads((out / "history.json").read_text())
    validation = history.get("validation", [])
    best = max(validation, key=lambda v: v["dice"]) if validation else None
    return SimpleNamespace(
        history=history,
        best_path=out / "best.pt" if best else None,
        model_path=out / "model.pt",
        best_iteration=best["iteration"] if best else None,
        best_metric=best["dice"] if best else None,
    )


def write_results(
    rows: list[dict], curves: dict, preset: Preset, args, tag: str, *, final: bool = False
) -> None:
    out = args.out
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"quality_{tag}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / f"quality_{tag}_curves.json").write_text(
        json.dumps({f"{k}/seed{s}": v for (k, s), v in curves.items()}, indent=1)
    )
    lines = [
        f"# Quality benchmark: {tag}",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {args.device}. Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`",
        "",
        f"Preset: `{json.dumps(preset.__dict__)}`",
        "",
        "Mean over seeds (spread = standard deviation). Evaluation half of the held-out volumes; "
        "'best' = checkpoint chosen on the selection half, 'last' = final iteration. Dice/Jaccard in %, "
        "HD95/ASD in voxels (published-table convention). Review: the top "
        f"{args.review_budget:.0%} most uncertain voxels of each volume flagged, as regions.",
        "",
        "Error AUROC: how well voxel uncertainty ranks wrong voxels above right ones, whole volume "
        "(near 1 for any model: background dominates; read it beside the review figures).",
        "",
        "| method | Dice best | Jaccard | HD95 | ASD | Dice last | errors caught | flagged | Dice after review "
        "| error AUROC | s/it |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]

        def stat(key, scale=1.0, group=group):
            values = np.array([r.get(key, np.nan) for r in group], dtype=float) * scale
            if len(values) > 1:
                return f"{np.nanmean(values):.2f} ± {np.nanstd(values):.2f}"
            return f"{values[0]:.2f}"

        lines.append(
            f"| {method} | {stat('best_dice', 100)} | {stat('best_jaccard', 100)} | {stat('best_hd95_voxels')} "
            f"| {stat('best_asd_voxels')} | {stat('last_dice', 100)} | {stat('best_review_error_recall', 100)}% "
            f"| {stat('best_review_flagged_fraction', 100)}% | {stat('best_review_dice_after', 100)} "
            f"| {stat('best_error_auroc')} | {stat('seconds_per_iteration')} |"
        )
    (out / f"quality_{tag}.md").write_text("\n".join(lines) + "\n")
    if final:
        plot_curves(curves, out / f"quality_{tag}_curves.png", tag)


def plot_example(
    models: dict[str, Path], case: ValidationCase, path: Path, device: str, budget: float
) -> None:
    """One evaluation slice per method: image, truth, prediction, uncertainty with the flagged voxels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from buseg.review import flag_budget

    if not models:
        return
    foreground = (case.labels > 0).reshape(case.labels.shape[0], -1).sum(1)
    k = int(np.argmax(foreground))  # the slice (first axis) with the most structure
    fig, axes = plt.subplots(len(models), 4, figsize=(10, 2.6 * len(models)), squeeze=False)
    for row, (method, model_path) in enumerate(models.items()):
        prediction, uncertainty = predict_case(model_path, case, device)
        flagged = flag_budget(uncertainty, budget)
        classes = max(1, int(case.labels.max()))
        panels = [
            (case.image[k], "gray", {}),
            (case.labels[k], "viridis", {"vmin": 0, "vmax": classes}),
            (prediction[k], "viridis", {"vmin": 0, "vmax": classes}),
            (uncertainty[k], "inferno", {"vmin": 0, "vmax": 1}),
        ]
        for col, (array, cmap, scale) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(array, cmap=cmap, **scale)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 3].contour(flagged[k], levels=[0.5], colors="cyan", linewidths=0.8)
        axes[row, 0].set_ylabel(method)
    for col, title in enumerate(
        ("image", "truth", "prediction (best checkpoint)", f"uncertainty, top {budget:.0%} flagged")
    ):
        axes[0, col].set_title(title, fontsize=9)
    fig.suptitle(f"{case.name}, slice {k}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (method, seed), curve in curves.items():
        if curve:
            ax.plot(
                [c["iteration"] for c in curve], [c["dice"] for c in curve], label=f"{method} (seed {seed})"
            )
    ax.set_xlabel("iteration (pre-training + self-training)")
    ax.set_ylabel("mean Dice, selection split")
    ax.set_title(f"Validation Dice over iterations: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
