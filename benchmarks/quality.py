"""Quality benchmark: our method, its CRL variants and controls against the baselines on ACDC and LA.

The protocol (docs/benchmarks.md), made to tell a 1-point difference from noise:

* every configuration runs with the same seeds (default 1337, 2, 3), paired by seed: per seed one
  copy-paste pre-training (BCP stage 1) is shared by every semi-supervised configuration, and is
  scored as a configuration of its own (``cp-pretrain-only``);
* the supervised baseline has the same learning-rate schedule: a first stage of
  ``pretrain_iterations`` at ``lr`` (its best checkpoint on the selection volumes starts the
  second, as for copy-paste), then ``iterations`` at ``self_training_lr``; every method's model
  files hold its EMA teacher (``method.model_weights``), the supervised one's included;
* the primary figure is the *last* checkpoint scored on *all* held-out volumes (ACDC: the 20
  validation volumes; no selection, so no selection noise); beside it the checkpoint selected
  on the *selection* half, scored on the *evaluation* half;
* the tables give mean +- standard deviation over seeds, the per-seed paired differences
  against a reference (``--references``, default BCP and URL alone) and a verdict: A is better
  than B only when A is ahead in every seed or the mean paired difference exceeds twice its
  standard error (and only with at least 3 paired seeds);
* ACDC runs with 7 and with 3 labeled patients (``--labeled 7 3``, the default).

Splits (no label of an unlabeled training case is used for anything):

* ACDC: the labeled subset is the first 3 or 7 training patients; every other training
  slice is unlabeled. The 10 validation patients (20 volumes) are split by patient into a
  *selection* half (the training's validation: checkpoint selection) and an *evaluation* half.
* LA: the first 8 (or 4) cases of the list are labeled; the last ``la_holdout`` cases are
  held out (half selection, half evaluation); the rest are unlabeled.

Runs are resumable: every run checkpoints at each validation; a finished run with the same
configuration (and the same start weights) is reused, an unfinished one is resumed from its
``last.pt``. Stop it at any time and run the same command again. Every finished run is also
recorded beside the results (``<out>/runs/<tag>/<configuration>_seed<seed>.json``: its row, curve,
per-volume scores and configuration), and a table takes a run from its record when its folder is
gone - the runs of one table are made over days, on machines that do not keep their work folders.
A record counts only for the configuration it recorded; nothing with a record is trained again.

Usage::

    python -m benchmarks.quality --dataset acdc --preset cpu               # the whole protocol
    python -m benchmarks.quality --methods bcp ours-url-only --seeds 1337  # a part of it
    python -m benchmarks.quality --reuse-only                              # tables from finished runs
    python -m benchmarks.quality --dataset acdc --preset paper            (GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import json
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: run one benchmark process per --work folder there
    fcntl = None

from benchmarks.paths import module_command, shown_command, shown_path
from buseg.catalogs.methods import method_entry, method_names
from buseg.config import TrainConfig, to_dict
from buseg.data.training_data import TrainingData, ValidationCase, load_training_data
from buseg.events import EventSink, MultiSink
from buseg.files.safe_files import write_bytes_atomic
from buseg.model.checkpoint import read_checkpoint, save_checkpoint
from buseg.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
COMMAND = module_command(__file__)

METHODS: dict[str, tuple[str, bool | None, bool | None, dict]] = {
    # name: (method, url, crl, other settings "section.field": value); None: the engine's default.
    # The methods are the engine's catalog's (buseg.catalogs.methods); checked below.
    "supervised": ("supervised", False, False, {}),
    "mean-teacher": ("mean-teacher", False, False, {}),
    "cp-pretrain-only": ("bcp", False, False, {}),  # the shared copy-paste pre-training, scored as is
    "bcp": ("bcp", False, False, {}),
    "ours": ("buarl", None, None, {}),  # the engine's defaults, whichever variant they are
    "ours-url-only": ("buarl", True, False, {}),
    "ours-url-random": ("buarl", True, False, {"url.selection": "random"}),  # URL's control
    "ours-crl-only": ("buarl", False, True, {}),
    "ours-crl-discard": ("buarl", True, True, {"crl.weighting": "discard"}),
    "ours-crl-concentration": ("buarl", True, True, {"crl.weighting": "concentration"}),
    "ours-crl-foreground": ("buarl", True, True, {"crl.weighting": "foreground"}),
    "ours-crl-foreground-constant": (
        "buarl",
        True,
        True,
        {"crl.weighting": "foreground", "crl.shrink_iterations": 0},
    ),
    "ours-crl-negative": ("buarl", True, True, {"crl.weighting": "negative"}),
    "ours-crl-after-cleanup": (
        "buarl",
        True,
        True,
        {"crl.weighting": "discard", "crl.uncertainty_after_cleanup": True},
    ),
}
# The protocol's configurations: all but "ours", which repeats whichever variant is the default
# (the tables mark that one).
PROTOCOL = [key for key in METHODS if key != "ours"]
PRETRAINING_ONLY = "cp-pretrain-only"
_NOT_IN_CATALOG = sorted({method for method, *_ in METHODS.values()} - set(method_names()))
if _NOT_IN_CATALOG:
    raise ValueError(
        f"quality.METHODS names {', '.join(_NOT_IN_CATALOG)}, which the engine's method catalog "
        f"(buseg/catalogs/methods.py) does not have; its methods: {', '.join(method_names())}"
    )
# Every semi-supervised configuration starts from the seed's shared copy-paste pre-training.
SHARED_PRETRAINING = {key for key, (method, *_) in METHODS.items() if method_entry(method).uses_unlabeled}
DEFAULT_SEEDS = [1337, 2, 3]
MIN_SEEDS_FOR_VERDICT = 3
# Rows written by an older protocol are re-scored: 2 scored the last checkpoint on all held-out volumes
# (1: the evaluation half only); 3 keeps the largest connected component on LA, as the published test.
PROTOCOL_VERSION = 3


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
    # The published LA test keeps the largest connected component of the prediction (every method).
    largest_component: bool = False


PRESETS = {
    ("acdc", "paper"): Preset("acdc", [256, 256], 24, 10000, 30000, validation_interval=200),
    # 128x128 with bfloat16 autocast (on CPUs that run it natively; float32 elsewhere): about the
    # wall time of the former 96x96 float32 preset, without losing the thin myocardium and the small
    # apical slices to the coarser grid (benchmarks/results/speed_cpu-acdc-preset.md).
    ("acdc", "cpu"): Preset(
        "acdc", [128, 128], 16, 2000, 4000, self_training_lr=0.005, validation_interval=250
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
        largest_component=True,
    ),
    # The engine's `--preset cpu-3d` (buseg/config.py TRAIN_PRESETS): the same settings (docs/benchmarks.md, LA).
    ("la", "cpu"): Preset(
        "la",
        [64, 64, 32],
        4,
        1000,
        1000,
        lr_schedule="poly",
        validation_interval=250,
        labeled_count=8,
        # The 3D CPU preset (buseg train --preset cpu-3d): 1.25 mm working grid, 8 base channels.
        extra={"amp": False, "model.working_spacing_mm": [1.25, 1.25, 1.25], "model.base_channels": 8},
        largest_component=True,
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
    for key, value in preset.extra.items():  # "section.field", or an optim field by its name
        _set_option(c, key if "." in key else f"optim.{key}", value)
    apply_method_settings(c, method_key)
    c.seed = seed
    c.validation_interval = preset.validation_interval
    c.checkpoint_interval = preset.validation_interval  # an interrupted run resumes from there
    c.log_interval = 50
    c.out_dir = str(out)
    c.num_threads = args.threads
    c.device = args.device
    for assignment in args.set or []:
        key, value = assignment.split("=", 1)
        _set_option(c, key, json.loads(value))
    return c


def apply_method_settings(config: TrainConfig, method_key: str) -> None:
    """Set ``config``'s method, URL and CRL switches and other settings to those of ``method_key``
    (a switch given as None keeps the engine's default)."""
    method, url, crl, settings = METHODS[method_key]
    config.method.name = method
    if url is not None:
        config.url.enabled = url
    if crl is not None:
        config.crl.enabled = crl
    for key, value in settings.items():
        _set_option(config, key, value)


def _set_option(config: TrainConfig, key: str, value) -> None:
    """Set ``section.field`` (or a top-level field) of ``config``, converted to the field's type."""
    section, name = key.split(".") if "." in key else (None, key)
    target = getattr(config, section) if section else config
    if not hasattr(target, name):
        raise SystemExit(f"--set {key}: no such option")
    current = getattr(target, name)
    setattr(target, name, type(current)(value) if current is not None and value is not None else value)


class Progress(EventSink):
    """Prints validations; at every checkpoint records the training seconds so far (``seconds.json``),
    so that a run resumed in a later sitting reports its whole training time."""

    def __init__(self, label: str, out: Path | None = None, previous_seconds: float = 0.0):
        self.label = label
        self.out = out
        self.previous = previous_seconds if np.isfinite(previous_seconds) else 0.0
        self.start = time.time()

    def seconds(self) -> float:
        return self.previous + time.time() - self.start

    def handle(self, event: dict) -> None:
        if event["event"] == "validation":
            print(
                f"  [{self.label}] it {event['iteration']}: selection dice {event['metrics']['dice']:.4f} "
                f"(best {event['best']:.4f} @ {event['best_iteration']}) {self.seconds():.0f}s",
                flush=True,
            )
        if event["event"] == "checkpoint" and event.get("kind") == "last" and self.out is not None:
            (self.out / "seconds.json").write_text(json.dumps({"seconds": self.seconds(), "finished": False}))


class TeacherScores(EventSink):
    """``--score-every``: scores the EMA teacher (what a model file of the run would hold) on every
    held-out volume each ``every`` self-training iterations, as the run trains.

    A long run's last checkpoint is one draw from a curve that moves by points from one checkpoint to
    the next; these scores show the curve itself and how much the model a user gets depends on where
    training stopped. Each score is written as it comes to ``mirror`` (beside the results, so a run
    cut short by the end of a sitting still leaves its curve) and a resumed run skips what is scored.
    """

    def __init__(
        self,
        mirror: Path,
        every: int,
        volumes: Volumes,
        num_classes: int,
        args,
        about: dict,
    ):
        self.mirror, self.every, self.volumes = mirror, every, volumes
        self.num_classes, self.args, self.about = num_classes, args, about
        self.scores = read_teacher_scores(mirror, about)

    def handle(self, event: dict) -> None:
        if event["event"] != "checkpoint" or event.get("kind") != "last":
            return
        iteration = event["iteration"]
        if iteration % self.every or any(s["iteration"] == iteration for s in self.scores):
            return
        started = time.time()
        snapshot = Path(event["path"]).with_name("teacher_snapshot.pt")
        payload = read_checkpoint(event["path"])
        state = payload["training_state"]
        # What a model file written now would hold: the teacher with clean BatchNorm statistics.
        teacher = state.get("shipped") or state["teacher"]
        save_checkpoint(snapshot, weights=teacher, metadata={**payload["metadata"], "weights": "teacher"})
        device = self.args.device if self.args.device != "auto" else "cpu"
        evaluation = evaluate_model(
            snapshot,
            self.volumes.everything,
            self.num_classes,
            device,
            self.args.review_budget,
            self.volumes.largest_component,
        )
        snapshot.unlink()
        summary = evaluation["summary"]
        self.scores.append(
            {
                "iteration": iteration,
                "dice": summary["dice"],
                "hd95_voxels": summary["hd95_voxels"],
                "zero_dice_structures": zero_dice_structures(evaluation),
                **{k: v for k, v in summary.items() if k.startswith("dice_class")},
                "scoring_seconds": round(time.time() - started, 1),
            }
        )
        self.save(finished=False)
        print(
            f"  teacher at {iteration}: Dice {summary['dice']:.4f} on {len(self.volumes.everything)} volumes"
        )

    def save(self, *, finished: bool) -> None:
        record = {
            **self.about,
            "machine": machine_description(),
            "finished": finished,
            "scores": sorted(self.scores, key=lambda s: s["iteration"]),
        }
        self.mirror.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.mirror, (json.dumps(record, indent=1) + "\n").encode())


def machine_description() -> str:
    """The CPU (and its bfloat16 support: it decides the precision and the speed) and threads a run
    ran on, for the minutes a report quotes."""
    from buseg.device import cpu_native_bf16

    _, how = cpu_native_bf16()
    return f"{platform.machine()} {platform.processor() or ''}".strip() + (
        f", {torch.get_num_threads()} thread(s), {how}"
    )


def read_teacher_scores(path: Path, about: dict) -> list[dict]:
    """The teacher scores recorded in ``path`` for the run ``about`` describes (none for another run:
    a changed configuration starts its curve again)."""
    if not path.exists():
        return []
    try:
        record = json.loads(path.read_text())
        scores = list(record["scores"])
    except (OSError, ValueError, KeyError, TypeError) as problem:
        raise SystemExit(
            f"{path}: not a readable teacher-score record ({problem!r}); restore it from git"
        ) from None
    return scores if all(record.get(k) == v for k, v in about.items()) else []


# --------------------------------------------------------------------------------------
# Evaluation


def predict_case(model_path: Path, case: ValidationCase, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Argmax prediction and the normalised-entropy map of a model on a normalised volume."""
    from buseg.model.checkpoint import load_model
    from buseg.model.uncertainty import normalized_entropy
    from buseg.prediction.windows import predict_probabilities

    model = load_model(model_path, device=device)
    probabilities = predict_probabilities(
        model.network,
        case.image,
        dimension=model.dimension,
        patch_size_xyz=model.patch_size_xyz,
        slice_axis=model.slice_axis,
        device=device,
    )
    probabilities = case.to_case_grid(probabilities)  # from a working grid back to the labels' own
    return probabilities.argmax(0).numpy(), normalized_entropy(probabilities[None])[0].numpy()


def evaluate_model(
    model_path: Path,
    cases: list[ValidationCase],
    num_classes: int,
    device: str,
    review_budget: float,
    largest_component: bool = False,
) -> dict:
    # Per class Dice, Jaccard, HD95, ASD (voxels and mm) with the published (medpy) rules.
    from buseg.evaluation.simulated_review import simulate_review
    from buseg.metrics import evaluate_arrays
    from buseg.prediction.case import largest_component_per_class

    per_case = []
    for case in cases:
        prediction, uncertainty = predict_case(model_path, case, device)
        if largest_component:
            prediction = largest_component_per_class(prediction, num_classes)
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
    summary = {k: _mean_over_defined_cases([c[k] for c in per_case]) for k in keys}
    return {"summary": summary, "cases": per_case}


def _mean_over_defined_cases(values: list[float]) -> float:
    """Mean over the cases where a metric is defined; NaN (kept, and shown as such) where it is defined
    for none, e.g. the error AUROC of volumes predicted without a single wrong voxel."""
    defined = np.asarray(values, dtype=float)
    defined = defined[~np.isnan(defined)]
    return float(defined.mean()) if defined.size else float("nan")


def zero_dice_structures(evaluation: dict) -> int:
    """How many (volume, class) pairs of an ``evaluate_model`` result have Dice 0: a structure missed,
    entirely misplaced, or predicted in a volume without it. The published rule scores a missed
    structure's HD95 and ASD as 0, which flatters a mean, so the report counts them beside the
    distances."""
    return sum(
        1
        for case in evaluation["cases"]
        for key, value in case.items()
        if key.startswith("dice_class") and value == 0
    )


# --------------------------------------------------------------------------------------
# Main


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
        "--labeled",
        type=int,
        nargs="+",
        default=None,
        help="Labeled patients (ACDC; default 7 then 3) or cases (LA; default the preset's 8), one "
        "benchmark per value.",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=tuple(METHODS), default=PROTOCOL, help="Configurations to run."
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS)
    parser.add_argument(
        "--references",
        nargs="+",
        choices=tuple(METHODS),
        default=["bcp", "ours-url-only"],
        help="Configurations every other one is compared with, seed by seed (the first: per-seed differences).",
    )
    parser.add_argument(
        "--default-candidates",
        nargs="+",
        choices=tuple(METHODS),
        default=None,
        help="Apply the pre-registered rule for the default to these configurations (the last one: "
        "the default it keeps or replaces) and add its verdicts and pick to the report.",
    )
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
        "--score-every",
        type=int,
        default=0,
        metavar="ITERATIONS",
        help="Also score each run's EMA teacher on every held-out volume every ITERATIONS self-training "
        "iterations while it trains (a multiple of the preset's validation interval; 0: off). The scores "
        "are kept beside the results as they come (runs/<tag>/<configuration>_seed<seed>.teacher.json), "
        "so a run cut short still leaves its curve; python -m benchmarks.teacher_curve reports them.",
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
        help="Only assemble finished runs: nothing is trained; runs not finished yet are left out of "
        "the tables and listed under them (verdicts use the seeds both configurations have).",
    )
    parser.add_argument(
        "--tag",
        default=None,
        help="Name of the result files (default: dataset_preset_<N>labeled; with several --labeled "
        "values, _<N>labeled is appended to a given tag).",
    )
    args = parser.parse_args(argv)
    unmeasured = [key for key in args.default_candidates or [] if key not in args.methods]
    if unmeasured:  # else the rule would just say "not applied yet", as if seeds were missing
        parser.error(f"--default-candidates {' '.join(unmeasured)}: not among --methods")
    if args.score_every < 0:
        parser.error("--score-every: a number of iterations >= 0")
    if args.data_root is None:
        args.data_root = ROOT.parent / "shared" / "data" / ("ACDC" if args.dataset == "acdc" else "LA")
    if args.labeled is None:
        args.labeled = (
            [7, 3] if args.dataset == "acdc" else [PRESETS[(args.dataset, args.preset)].labeled_count]
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    for labeled in args.labeled:
        run_benchmark(args, labeled)
    return 0


def run_benchmark(args: argparse.Namespace, labeled: int) -> None:
    """Every configuration and seed for one labeled count; tables rewritten after every run."""
    preset = copy.deepcopy(PRESETS[(args.dataset, args.preset)])
    preset.labeled_count = labeled
    if args.iterations is not None:
        preset.iterations = args.iterations
    if args.pretrain_iterations is not None:
        preset.pretrain_iterations = args.pretrain_iterations
    tag = f"{args.dataset}_{args.preset}_{labeled}labeled"
    if args.tag:
        tag = args.tag if len(args.labeled) == 1 else f"{args.tag}_{labeled}labeled"
    work = args.work / tag
    work.mkdir(parents=True, exist_ok=True)
    if args.score_every and args.score_every % preset.validation_interval:
        raise SystemExit(
            f"--score-every {args.score_every}: not a multiple of the checkpoint interval "
            f"({preset.validation_interval}), so the teacher would never be scored"
        )
    data_all, evaluation_cases = load_splits(preset, args, work)
    volumes = Volumes(
        everything=[*data_all.validation, *evaluation_cases],
        evaluation=evaluation_cases,
        largest_component=preset.largest_component,
    )
    print(
        f"{tag}: selection {len(data_all.validation)} volumes, evaluation {len(evaluation_cases)}; "
        f"last checkpoint scored on all {len(volumes.everything)}",
        flush=True,
    )
    rows, curves, missing, from_records = [], {}, [], []
    records = args.out / RECORDS_FOLDER / tag
    for seed in args.seeds:
        recorded = {key: read_record(records, key, preset, args, seed, work) for key in args.methods}
        to_run = [key for key in args.methods if recorded[key] is None]
        starts = first_stages(preset, args, seed, work, data_all, to_run) if to_run else {}
        for key in args.methods:
            if recorded[key] is not None:
                row, curve = recorded[key]
                from_records.append(f"{key} (seed {seed})")
            else:
                try:
                    row, curve = run_method(key, preset, args, seed, work, data_all, starts, volumes, records)
                except UnfinishedRunError as reason:  # only with --reuse-only
                    print(f"  left out: {reason}", flush=True)
                    missing.append(f"{key} (seed {seed})")
                    continue
                row = write_record(records, key, row, curve, preset, args, seed, work)
            rows.append(row)
            curves[(key, seed)] = curve
            write_results(rows, curves, preset, args, tag, missing=missing, from_records=from_records)
    if not rows:  # a mistyped --work or --tag must not replace a results table with an empty one
        raise SystemExit(
            f"{tag}: no finished run in {work} or {records} (--reuse-only); nothing written to {args.out}"
        )
    write_results(rows, curves, preset, args, tag, final=True, missing=missing, from_records=from_records)
    # Only runs in the tables: an unfinished run's best.pt is not the model its row will be scored with.
    shown = [
        key for key in args.methods if any(r["method"] == key and r["seed"] == args.seeds[0] for r in rows)
    ]
    models = {key: _model_file(work / f"{key}_seed{args.seeds[0]}") for key in shown}
    if PRETRAINING_ONLY in models:
        models[PRETRAINING_ONLY] = _model_file(work / f"pretrain_seed{args.seeds[0]}")
    absent = [key for key, model in models.items() if model is None]
    if absent:  # rows from records: their models are not on this machine
        print(f"example figure kept as it was: no model file of {', '.join(absent)} here", flush=True)
        return
    plot_example(
        models,
        evaluation_cases[0],
        args.out / f"quality_{tag}_example.png",
        args.device if args.device != "auto" else "cpu",
        args.review_budget,
    )


@dataclass
class Volumes:
    """The held-out volumes: ``everything`` scores the last checkpoint, ``evaluation`` the selected one
    (the other half selected it)."""

    everything: list[ValidationCase]
    evaluation: list[ValidationCase]
    largest_component: bool = False  # predictions keep their largest connected component (LA's test)


def load_splits(preset: Preset, args, work: Path) -> tuple[TrainingData, list[ValidationCase]]:
    """The training data with the selection volumes as its validation, and the evaluation volumes."""
    probe = base_config(preset, args, "ours", args.seeds[0], work / "probe")
    if args.dataset == "acdc":
        selection, evaluation = acdc_split(args.data_root)
        excluded_from_selection, excluded_from_evaluation = [], []
    else:
        cases = [n.strip() for n in (args.data_root / "train.list").read_text().splitlines() if n.strip()]
        held = cases[-args.la_holdout :]
        selection, evaluation = held[0::2], held[1::2]
        excluded_from_selection, excluded_from_evaluation = evaluation, selection
    # Written atomically: benchmark processes sharing --work read these while another writes them.
    selection_list = work / "selection.list"
    write_bytes_atomic(selection_list, ("\n".join(selection) + "\n").encode())
    probe.data.validation = str(selection_list)
    if excluded_from_selection:
        probe.data.exclude_cases = excluded_from_selection
    data_all = load_training_data(probe, log=print)
    eval_config = copy.deepcopy(probe)
    eval_list = work / "evaluation.list"
    write_bytes_atomic(eval_list, ("\n".join(evaluation) + "\n").encode())
    eval_config.data.validation = str(eval_list)
    if excluded_from_evaluation:
        eval_config.data.exclude_cases = excluded_from_evaluation
    evaluation_cases = load_training_data(eval_config, log=lambda m: None).validation
    return data_all, evaluation_cases


def _model_file(run: Path) -> Path | None:
    """The model a method's row was evaluated with ('best'): best.pt, else the model file."""
    return next((p for p in (run / "best.pt", run / "model.pt") if p.exists()), None)


FIRST_STAGE_FOLDERS = {"copy-paste": "pretrain", "supervised": "supervised-stage1"}


class UnfinishedRunError(Exception):
    """With --reuse-only: a run the tables need has not finished (it is left out, not trained)."""


@contextlib.contextmanager
def run_lock(out: Path, args) -> Iterator[None]:
    """Hold the lock of run folder ``out`` while its run is checked, trained and scored, so that
    benchmark processes sharing ``--work`` (two queues of seeds, say) never train one folder at once:
    the second waits, then finds the run finished and reuses it. ``--reuse-only`` takes no lock (it
    trains nothing, and must not wait for runs in progress). No locking where ``fcntl`` is missing."""
    if args.reuse_only or fcntl is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"  waiting: another process is training {out}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def first_stages(
    preset: Preset, args, seed: int, work: Path, data: TrainingData, methods: list[str]
) -> dict[str, Path]:
    """The seed's first stages ``methods`` start from (with --reuse-only, the finished ones: a
    method whose start is missing is then left out, as its own run cannot have finished either)."""
    starts = {}
    for kind in first_stage_kinds(preset, methods):
        try:
            starts[kind] = run_first_stage(kind, preset, args, seed, work, data)
        except UnfinishedRunError as reason:
            print(f"  left out: {reason}", flush=True)
    return starts


def first_stage_kinds(preset: Preset, methods: list[str]) -> list[str]:
    """The first stages (``"copy-paste"``, ``"supervised"``) that ``methods`` start from."""
    kinds = []
    if SHARED_PRETRAINING & set(methods) and preset.pretrain_iterations:
        kinds.append("copy-paste")
    if "supervised" in methods and preset.pretrain_iterations:
        kinds.append("supervised")
    return kinds


def run_first_stage(kind: str, preset: Preset, args, seed: int, work: Path, data: TrainingData) -> Path:
    """The first ``pretrain_iterations`` at ``lr``: the copy-paste pre-training (BCP stage 1) shared by
    every semi-supervised configuration of the seed, or the supervised baseline's first stage.

    Both keep the student (as the recipe's pre-training), and the second stage starts from their best
    checkpoint on the selection volumes (model.pt), as the published recipe does.
    """
    out = work / f"{FIRST_STAGE_FOLDERS[kind]}_seed{seed}"
    config = first_stage_config(kind, preset, args, seed, out)
    with run_lock(out, args):
        if (out / "model.pt").exists() and _reusable(out, config):
            print(f"{kind} first stage (seed {seed}): reusing {out / 'model.pt'}", flush=True)
            return out / "model.pt"
        if not args.reuse_only:
            print(f"{kind} first stage (seed {seed}): {preset.pretrain_iterations} iterations", flush=True)
        train_or_resume(config, out, f"{kind}-stage1", args, data)
    return out / "model.pt"


def first_stage_config(kind: str, preset: Preset, args, seed: int, out: Path) -> TrainConfig:
    """The training of a first stage (``kind``: "copy-paste" or "supervised") into ``out``."""
    config = base_config(preset, args, "bcp" if kind == "copy-paste" else "supervised", seed, out)
    if kind == "copy-paste":
        config.optim.pretrain_iterations, config.optim.iterations = preset.pretrain_iterations, 0
    else:
        config.optim.pretrain_iterations, config.optim.iterations = 0, preset.pretrain_iterations
        config.method.model_weights = "student"
    return config


def second_stage_config(
    key: str, preset: Preset, args, seed: int, out: Path, starts: dict[str, Path]
) -> tuple[TrainConfig, int]:
    """A configuration's training and the iterations that precede it (its first stage's)."""
    config = base_config(preset, args, key, seed, out)
    start = starts.get("supervised" if key == "supervised" else "copy-paste")
    if start is None:  # no shared first stage: the method's own schedule from scratch
        config.optim.pretrain_iterations = 0 if key == "supervised" else preset.pretrain_iterations
        config.optim.iterations = preset.iterations + (
            preset.pretrain_iterations if key == "supervised" else 0
        )
        return config, 0
    config.init_weights = str(start)
    config.optim.pretrain_iterations = 0
    config.optim.iterations = preset.iterations
    if config.optim.self_training_lr is not None:
        config.optim.lr = config.optim.self_training_lr
    return config, preset.pretrain_iterations


def run_method(
    key: str,
    preset: Preset,
    args,
    seed: int,
    work: Path,
    data: TrainingData,
    starts: dict[str, Path],
    volumes: Volumes,
    records: Path | None = None,
) -> tuple[dict, list]:
    """Train (or resume, or reuse) and score configuration ``key`` for ``seed``; with --score-every its
    teacher scores go to ``records``."""
    if key == PRETRAINING_ONLY:
        with run_lock(work / f"{PRETRAINING_ONLY}_seed{seed}", args):
            return score_pretraining(preset, args, seed, work, data, volumes)
    out = work / f"{key}_seed{seed}"
    first_stage = "supervised" if key == "supervised" else "copy-paste"
    if args.reuse_only and preset.pretrain_iterations and first_stage not in starts:
        raise UnfinishedRunError(f"{key} (seed {seed}): its {first_stage} first stage has not finished")
    config, offset = second_stage_config(key, preset, args, seed, out, starts)
    scores = None
    if args.score_every and records is not None:
        about = {
            "configuration": key,
            "seed": seed,
            "every": args.score_every,
            "config": _portable(config, work),
        }
        mirror = records / f"{key}_seed{seed}.teacher.json"
        scores = TeacherScores(mirror, args.score_every, volumes, data.num_classes, args, about)
    with run_lock(out, args):
        row, curve = _row_of_run(key, config, offset, args, seed, out, data, starts, volumes, scores)
    if scores is not None:
        scores.save(finished=True)
    return row, curve


def _row_of_run(
    key: str, config: TrainConfig, offset: int, args, seed: int, out: Path, data, starts, volumes, scores=None
) -> tuple[dict, list]:
    """The row of configuration ``key``: reused when scored already, else trained (or resumed) and scored."""
    saved = _saved_row(out, config)
    if saved is not None:
        print(f"{key} (seed {seed}): reusing {out / 'row.json'}", flush=True)
        # Named as asked: its config equals this configuration's, whatever name it was run under (a
        # default's old runs, linked in under the name that now says what they trained).
        return {**saved[0], "method": key}, saved[1]
    if (out / "final.pt").exists() and (out / "history.json").exists() and _reusable(out, config):
        print(f"{key} (seed {seed}): reusing the finished training in {out}", flush=True)
        result, seconds = _finished_result(out), _seconds(out)
    else:
        if not args.reuse_only:
            print(f"{key} (seed {seed}): {config.optim.iterations} iterations", flush=True)
        result, seconds = train_or_resume(config, out, key, args, data, scores)
    iterations = config.optim.iterations
    if key == "supervised" and "supervised" in starts:  # its first stage is its own, not shared
        seconds += _seconds(starts["supervised"].parent)
        iterations += offset  # the first stage's time is in `seconds`, so its iterations count too
    return score_run(key, seed, out, result, seconds, iterations, offset, data, args, volumes)


def score_pretraining(
    preset: Preset, args, seed: int, work: Path, data: TrainingData, volumes: Volumes
) -> tuple[dict, list]:
    """The copy-paste pre-training scored as a configuration: how much of BCP's gain is stage 1."""
    source = work / f"pretrain_seed{seed}"
    out = work / f"{PRETRAINING_ONLY}_seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    config = first_stage_config("copy-paste", preset, args, seed, source)
    saved = _saved_row(out, config, source)
    if saved is not None:
        return saved
    if not (source / "final.pt").exists() or not _reusable(source, config):
        message = f"{PRETRAINING_ONLY} (seed {seed}): no finished pre-training in {source}"
        raise UnfinishedRunError(message) if args.reuse_only else SystemExit(message)
    result = _finished_result(source)
    return score_run(
        PRETRAINING_ONLY,
        seed,
        out,
        result,
        _seconds(source),
        preset.pretrain_iterations,
        0,
        data,
        args,
        volumes,
    )


def train_or_resume(
    config: TrainConfig, out: Path, label: str, args, data: TrainingData, also: EventSink | None = None
):
    """Train ``config`` into ``out``, resuming an interrupted run of the same configuration; returns the
    result and the training seconds (over every sitting)."""
    resumable = (out / "last.pt").exists() and _reusable(out, config)
    if args.reuse_only:
        raise UnfinishedRunError(
            f"{label} (seed {config.seed}): no finished run with this config in {out} (--reuse-only)"
        )
    previous = _seconds(out) if resumable else 0.0
    if resumable:
        print(f"  resuming {out / 'last.pt'}", flush=True)
    sink = Progress(label, out, previous)
    if not resumable:
        out.mkdir(parents=True, exist_ok=True)
        (out / "seconds.json").unlink(missing_ok=True)
        (out / "row.json").unlink(missing_ok=True)
        (out / "start_weights.json").write_text(json.dumps({"sha256": _start_weights(config)}))
    events = sink if also is None else MultiSink(sink, also)
    result = train(config, events=events, resume=resumable, overwrite=not resumable, data=data)
    seconds = sink.seconds()
    (out / "seconds.json").write_text(json.dumps({"seconds": seconds, "finished": True}))
    return result, seconds


def _seconds(out: Path) -> float:
    try:
        return float(json.loads((out / "seconds.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        return float("nan")


def score_run(
    key: str,
    seed: int,
    out: Path,
    result,
    seconds: float,
    iterations: int,
    offset: int,
    data: TrainingData,
    args,
    volumes: Volumes,
) -> tuple[dict, list]:
    """Evaluate a finished run: the last checkpoint on every held-out volume (the primary figure), the
    selected one on the evaluation half; writes row.json."""
    curve = [{"iteration": v["iteration"] + offset, "dice": v["dice"]} for v in result.history["validation"]]
    row = {
        "method": key,
        "seed": seed,
        "protocol": PROTOCOL_VERSION,
        "largest_component": volumes.largest_component,
        "train_seconds": round(seconds, 1),
        "seconds_per_iteration": round(seconds / max(1, iterations), 4),
        "best_iteration": (result.best_iteration or 0) + offset,
        "selection_dice": result.best_metric,
    }
    final = Path(result.model_path).parent / "final.pt"  # the pre-training's row reads its own folder
    row["final_sha256"] = _file_sha256(final)
    device = args.device if args.device != "auto" else "cpu"
    scored = (
        ("best", result.best_path or result.model_path, volumes.evaluation),
        ("last", final, volumes.everything),
    )
    for which, path, cases in scored:
        evaluation = evaluate_model(
            path, cases, data.num_classes, device, args.review_budget, volumes.largest_component
        )
        for metric, value in evaluation["summary"].items():
            row[f"{which}_{metric}"] = value
        row[f"{which}_zero_dice_structures"] = zero_dice_structures(evaluation)
        (out / f"evaluation_{which}.json").write_text(json.dumps(evaluation, indent=1))
    print(
        f"  {key} (seed {seed}): Dice last {row['last_dice']:.4f} ({len(volumes.everything)} volumes), "
        f"selected {row['best_dice']:.4f} ({len(volumes.evaluation)}) ({seconds:.0f} s)",
        flush=True,
    )
    (out / "row.json").write_text(json.dumps({"row": row, "curve": curve}, indent=1))
    return row, curve


def _saved_row(out: Path, config: TrainConfig, source: Path | None = None) -> tuple[dict, list] | None:
    """A row already scored under this protocol, from a run of this configuration (in ``source``)."""
    path = out / "row.json"
    if not path.exists() or not _reusable(source or out, config):
        return None
    saved = json.loads(path.read_text())
    row = saved["row"]
    if row.get("protocol") != PROTOCOL_VERSION or row.get("final_sha256") != _file_sha256(
        (source or out) / "final.pt"
    ):
        return None
    if "last_zero_dice_structures" not in row:  # scored before the count existed; same evaluation
        stored = out / "evaluation_last.json"
        row["last_zero_dice_structures"] = (
            zero_dice_structures(json.loads(stored.read_text())) if stored.exists() else None
        )
    return row, saved["curve"]


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


# Options added to the engine after runs were made, with the value that reproduces what those
# runs did: a stored config without such a field matches a current config with that value.
ADDED_OPTIONS = {
    ("url", "loss"): "ce+dice",
    ("crl", "loss"): "ce+dice",
    ("url", "selection"): "uncertainty",
    ("crl", "weighting"): "discard",
    ("crl", "extra_weight"): 1.0,
    ("crl", "shrink_iterations"): None,
    ("crl", "negative_threshold"): 0.05,
    ("crl", "uncertainty_after_cleanup"): False,
}
# Sections only our method reads: they do not distinguish runs of the other methods.
BUARL_SECTIONS = ("url", "crl", "uncertainty")
# What our method reads of the crl section with CRL off (buarl.BUARL.weighted_loss): the other
# fields, and so a change of their defaults, do not distinguish runs without CRL.
CRL_FIELDS_READ_WITH_CRL_OFF = ("enabled", "loss")
# Fields of the method section only mean teacher reads.
MEAN_TEACHER_FIELDS = ("consistency_weight", "consistency_rampup_iterations", "noise_std")
# How often a run reports and checkpoints, and on how many threads: not what it computes.
NOT_COMPUTED = ("out_dir", "checkpoint_interval", "log_interval", "num_threads")


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
        for name in NOT_COMPUTED:
            entry.pop(name, None)
        if entry.get("init_weights"):
            entry["init_weights"] = str(Path(entry["init_weights"]).resolve())
    return _same_computation(stored, current)


def _same_computation(stored: dict, current: dict) -> bool:
    """Whether config ``stored`` (of a run made earlier) trains what ``current`` trains: options added
    since take the value that reproduces the earlier runs, and what a method does not read does not
    count. Both are changed in place."""
    for (section, name), value in ADDED_OPTIONS.items():
        if isinstance(stored.get(section), dict):
            stored[section].setdefault(name, value)
    if current["method"]["name"] != "buarl":
        for section in BUARL_SECTIONS:
            stored.pop(section, None)
            current.pop(section, None)
    elif not current["crl"]["enabled"] and not stored.get("crl", {}).get("enabled", True):
        for entry in (stored, current):
            entry["crl"] = {k: v for k, v in entry["crl"].items() if k in CRL_FIELDS_READ_WITH_CRL_OFF}
    if current["method"]["name"] != "mean-teacher":
        for entry in (stored, current):
            for name in MEAN_TEACHER_FIELDS:
                entry.get("method", {}).pop(name, None)
    if not _reads_self_training_lr(current):  # a first stage: a self-training --set shares it
        for entry in (stored, current):
            entry.get("optim", {}).pop("self_training_lr", None)
    return stored == current


def _reads_self_training_lr(entry: dict) -> bool:
    """Whether a run's training reads ``optim.self_training_lr`` (buseg.training.loop.learning_rate: only a
    copy-paste method's self-training after its own pre-training in the same run)."""
    optim = entry.get("optim", {})
    return bool(
        entry.get("method", {}).get("name") in ("bcp", "buarl")
        and optim.get("pretrain_iterations")
        and optim.get("iterations")
    )


def _start_weights(config: TrainConfig) -> str | None:
    """The identity (SHA-256) of the weights a run starts from; None for a run from scratch."""
    return _file_sha256(Path(config.init_weights)) if config.init_weights else None


def _reusable(out: Path, config: TrainConfig) -> bool:
    """Same configuration and the same start weights: a first stage trained again (same path, new
    weights) makes the runs that started from the old one stale."""
    if not _same_config(out, config):
        return False
    try:
        stored = json.loads((out / "start_weights.json").read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        stored = None
    return stored == _start_weights(config)


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


# --------------------------------------------------------------------------------------
# Run records: a finished run's row, kept with the results
#
# A run folder (checkpoints, logs) lives on the machine that trained it; the runs of one table
# take days, on machines that do not keep their work folders. A record keeps what the tables
# need of a finished run - its row, curve, per-volume scores and the configuration it trained -
# beside the results (``<out>/runs/<tag>/<configuration>_seed<seed>.json``), so that a table is
# assembled from runs made anywhere. A record counts only for the configuration it recorded.

RECORDS_FOLDER = "runs"
RECORD_FORMAT = 1


def planned_configs(key: str, preset: Preset, args, seed: int, work: Path) -> dict[str, dict]:
    """What configuration ``key`` trains for ``seed``, as a record keeps it: its ``training`` and the
    ``first stage`` it starts from (whose length the training's own config does not show)."""
    if key == PRETRAINING_ONLY:
        config = first_stage_config("copy-paste", preset, args, seed, work / f"pretrain_seed{seed}")
        return {"training": _portable(config, work)}
    starts = first_stage_starts(preset, [key], seed, work)
    config, _ = second_stage_config(key, preset, args, seed, work / f"{key}_seed{seed}", starts)
    planned = {"training": _portable(config, work)}
    for kind, start in starts.items():
        planned["first stage"] = _portable(first_stage_config(kind, preset, args, seed, start.parent), work)
    return planned


def first_stage_starts(preset: Preset, methods: list[str], seed: int, work: Path) -> dict[str, Path]:
    """Where the first stages ``methods`` start from keep their start weights (trained or not)."""
    kinds = first_stage_kinds(preset, methods)
    return {kind: work / f"{FIRST_STAGE_FOLDERS[kind]}_seed{seed}" / "model.pt" for kind in kinds}


def weights_sha256(path: Path) -> str:
    """The identity of a model file's weights alone: the file's own hash changes with its metadata (its
    creation time and folder) although training is deterministic and the weights come out the same."""
    digest = hashlib.sha256()
    for name, tensor in sorted(read_checkpoint(path)["weights"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _portable(config: TrainConfig, work: Path) -> dict:
    """``config`` without what does not change what it computes, its paths made machine-independent:
    the start weights relative to the work folder, the data folder as result files show paths."""
    entry = to_dict(config)
    for name in NOT_COMPUTED:
        entry.pop(name, None)
    if entry.get("init_weights"):
        entry["init_weights"] = Path(entry["init_weights"]).relative_to(work).as_posix()
    entry["data"]["data_root"] = shown_path(entry["data"]["data_root"])
    return entry


def read_record(records: Path, key: str, preset: Preset, args, seed: int, work: Path):
    """The recorded ``(row, curve)`` of ``key`` for ``seed`` when a record of this very configuration
    exists, else None (a record of another configuration is ignored: the run is made or left out)."""
    path = records / f"{key}_seed{seed}.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        missing = {"row", "configs", "curve"} - set(record)  # what every record holds
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    except (OSError, ValueError, KeyError, TypeError) as problem:  # a truncated or hand-edited file
        raise SystemExit(f"{path}: not a readable run record ({problem!r}); restore it from git") from None
    if record.get("format") != RECORD_FORMAT or record["row"].get("protocol") != PROTOCOL_VERSION:
        print(f"{key} (seed {seed}): {path} is of an earlier protocol; not used", flush=True)
        return None
    planned = planned_configs(key, preset, args, seed, work)
    if set(record["configs"]) != set(planned) or not all(
        _same_computation(copy.deepcopy(record["configs"][part]), planned[part]) for part in planned
    ):
        print(f"{key} (seed {seed}): {path} records another configuration; not used", flush=True)
        return None
    print(f"{key} (seed {seed}): from the record {path}", flush=True)
    return {**record["row"], "method": key}, record["curve"]


def write_record(
    records: Path, key: str, row: dict, curve: list, preset: Preset, args, seed: int, work: Path
):
    """Record a row just scored or reused from its run folder; returns the row with the identity of
    the weights its run started from (``start_weights_sha256``; None for a run from scratch; for
    ``cp-pretrain-only``, the pre-training's model, which the other configurations start from)."""
    folder = work / (f"{PRETRAINING_ONLY}_seed{seed}" if key == PRETRAINING_ONLY else f"{key}_seed{seed}")
    # The run was reused or made only with this start file (``_reusable``), so it is the one it started from.
    start = next(iter(first_stage_starts(preset, [key], seed, work).values()), None)
    row = {**row, "start_weights_sha256": weights_sha256(start) if start and start.exists() else None}
    evaluation = folder / "evaluation_last.json"
    record = {
        "format": RECORD_FORMAT,
        "configuration": key,
        "seed": seed,
        "row": row,
        "curve": curve,
        "configs": planned_configs(key, preset, args, seed, work),
        "evaluation_last": json.loads(evaluation.read_text())["cases"] if evaluation.exists() else None,
    }
    path = records / f"{key}_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(record, indent=1) + "\n").encode())
    return row


def start_weight_mismatches(rows: list[dict]) -> list[str]:
    """Seeds whose copy-paste configurations started from different weights (compared as weights, not
    files): their pre-training was trained again in another sitting and came out different, so those
    pairs share the seed and the configuration but not the start. Training here is deterministic
    (a pre-training trained again scores the same to the last digit), so this names a real change."""
    lines = []
    for seed in dict.fromkeys(r["seed"] for r in rows):
        starts = {
            r["method"]: r["start_weights_sha256"]
            for r in rows
            if r["seed"] == seed and r.get("start_weights_sha256") and r["method"] in SHARED_PRETRAINING
        }
        if len(set(starts.values())) > 1:
            groups = {}
            for key, sha in starts.items():
                groups.setdefault(sha[:8], []).append(key)
            lines.append(
                f"seed {seed}: " + "; ".join(f"{', '.join(k)} from {sha}" for sha, k in groups.items())
            )
    return lines


# --------------------------------------------------------------------------------------
# Statistics over seeds


def paired_differences(rows: list[dict], key: str, reference: str, metric: str) -> dict[int, float]:
    """``metric`` of configuration ``key`` minus the reference's, per seed both have (finite)."""
    ours = {r["seed"]: r.get(metric, np.nan) for r in rows if r["method"] == key}
    theirs = {r["seed"]: r.get(metric, np.nan) for r in rows if r["method"] == reference}
    return {
        seed: float(ours[seed] - theirs[seed])
        for seed in dict.fromkeys(
            r["seed"] for r in rows
        )  # as asked (--seeds 1337 2 3): rows come seed by seed
        if seed in ours and seed in theirs and np.isfinite(ours[seed]) and np.isfinite(theirs[seed])
    }


def mean_and_standard_error(differences: list[float]) -> tuple[float, float]:
    """Mean of paired differences and its standard error (sample std / sqrt(n); NaN below 2 values)."""
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan")
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    return float(d.mean()), se


def verdict(differences: list[float], *, higher_is_better: bool = True) -> str:
    """'better' only when ahead in every seed or the mean paired difference exceeds twice its standard
    error; 'worse' by the same rule the other way; else 'not separable'; 'too few seeds' below
    MIN_SEEDS_FOR_VERDICT pairs (with one seed, 'ahead in every seed' would say nothing)."""
    d = np.asarray(differences, dtype=float) * (1.0 if higher_is_better else -1.0)
    if d.size < MIN_SEEDS_FOR_VERDICT:
        return "too few seeds"
    mean, se = mean_and_standard_error(list(d))
    if bool((d > 0).all()) or mean > 2 * se:
        return "better"
    if bool((d < 0).all()) or mean < -2 * se:
        return "worse"
    return "not separable"


def choose_default(rows: list[dict], candidates: list[str], incumbent: str) -> dict:
    """The pre-registered rule for the default (docs/benchmarks.md), on last-checkpoint Dice.

    A candidate is *eligible* when no other candidate is better than it (:func:`verdict`). The
    incumbent stays unless another candidate is better than it; otherwise the pick is the eligible
    candidate with the highest mean. Returns ``pick`` (None while any pair has fewer than
    MIN_SEEDS_FOR_VERDICT paired seeds: the rule is not applied on partial evidence), ``eligible``,
    ``means`` (in %) and ``verdicts[(a, b)]`` (a against b).
    """
    if incumbent not in candidates:
        raise ValueError(f"the incumbent {incumbent!r} must be one of the candidates {candidates}")
    means = {}
    for key in candidates:
        values = [100 * r["last_dice"] for r in rows if r["method"] == key and np.isfinite(r["last_dice"])]
        means[key] = float(np.mean(values)) if values else float("nan")
    verdicts = {
        (a, b): verdict([100 * d for d in paired_differences(rows, a, b, "last_dice").values()])
        for a in candidates
        for b in candidates
        if a != b
    }
    eligible = [a for a in candidates if not any(verdicts[(b, a)] == "better" for b in candidates if b != a)]
    result = {"pick": None, "eligible": eligible, "means": means, "verdicts": verdicts}
    if any(v == "too few seeds" for v in verdicts.values()):
        return result
    if not any(verdicts[(b, incumbent)] == "better" for b in candidates if b != incumbent):
        result["pick"] = incumbent
    else:
        result["pick"] = max(eligible, key=lambda key: means[key])
    return result


def default_rule_report(rows: list[dict], candidates: list[str], incumbent: str) -> list[str]:
    """Markdown lines: each candidate's verdicts against the others, and what the rule picks."""
    choice = choose_default(rows, candidates, incumbent)
    lines = [
        "",
        f"## The default by the pre-registered rule (candidates: {', '.join(candidates)}; "
        f"the default it keeps or replaces: {incumbent})",
        "",
        "| candidate | seeds | mean Dice last | "
        + " | ".join(f"vs {b}" for b in candidates)
        + " | eligible |",
        "|" + "---|" * (len(candidates) + 4),
    ]
    for a in candidates:
        cells = ["-" if a == b else choice["verdicts"][(a, b)] for b in candidates]
        eligible = "yes" if a in choice["eligible"] else "no"
        seeds = sum(1 for r in rows if r["method"] == a and np.isfinite(r["last_dice"]))
        lines.append(
            f"| {a} | {seeds} | {choice['means'][a]:.2f} | " + " | ".join(cells) + f" | {eligible} |"
        )
    lines.append("")
    if choice["pick"] is None:
        lines.append(f"Not applied yet: some pairs have fewer than {MIN_SEEDS_FOR_VERDICT} paired seeds.")
    elif choice["pick"] == incumbent:
        lines.append(f"Pick: **{incumbent}** stays (no candidate is better than it by the rule).")
    else:
        lines.append(
            f"Pick: **{choice['pick']}** (a candidate is better than {incumbent}; the highest mean of "
            "the eligible ones)."
        )
    return lines


def spread(values: list[float], scale: float = 1.0) -> str:
    """'mean ± sample standard deviation' (the value alone for one seed); where some seeds have no
    finite value, the count of those used follows, so the row's *seeds* column cannot mislead."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float) * scale
    if v.size == 0:
        return "-"
    text = f"{v[0]:.2f}" if v.size == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"
    return text if v.size == len(values) else f"{text} ({v.size} of {len(values)} seeds)"


def summary_rows(rows: list[dict], references: list[str]) -> list[dict]:
    """One line per configuration: the primary (last, all volumes) and selected figures over seeds, and
    the paired comparison with each reference on the primary Dice (and HD95 against the first)."""
    lines = []
    for key in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == key]
        line = {"configuration": key, "seeds": len(group)}
        for column, metric, scale in (
            ("Dice last", "last_dice", 100),
            ("Jaccard last", "last_jaccard", 100),
            ("HD95 last", "last_hd95_voxels", 1),
            ("ASD last", "last_asd_voxels", 1),
            ("Dice selected", "best_dice", 100),
            ("HD95 selected", "best_hd95_voxels", 1),
        ):
            line[column] = spread([r.get(metric, np.nan) for r in group], scale)
        line["minutes"] = spread([r.get("train_seconds", np.nan) / 60 for r in group])
        for index, reference in enumerate(references):
            if reference == key:
                line[f"vs {reference}"] = "(reference)"
                continue
            diffs = paired_differences(rows, key, reference, "last_dice")
            values = [100 * d for d in diffs.values()]
            mean, se = mean_and_standard_error(values)
            line[f"vs {reference}"] = f"{verdict(values)}: {mean:+.2f}{_error_text(se)}" if values else "-"
            if index == 0:
                line["per seed"] = " / ".join(f"{seed}: {100 * d:+.2f}" for seed, d in diffs.items()) or "-"
                hd95 = list(paired_differences(rows, key, reference, "last_hd95_voxels").values())
                line["HD95 Δ"] = (
                    f"{verdict(hd95, higher_is_better=False)}: {mean_and_standard_error(hd95)[0]:+.2f}"
                    if hd95
                    else "-"
                )
        lines.append(line)
    return lines


def per_seed_table(rows: list[dict], references: list[str]) -> list[str]:
    """Markdown table of every configuration's last-checkpoint Dice and HD95 in each seed, and its
    per-seed Dice differences against every reference: the figures the summary's means and
    verdicts are made of, so a per-seed claim can be read from the results file, not worked out."""
    seeds = list(dict.fromkeys(r["seed"] for r in rows))  # as asked: --seeds 1337 2 3
    if not seeds:
        return []
    header = ["configuration", *(f"seed {s}: Dice / HD95" for s in seeds)]
    header += [f"− {reference}, per seed" for reference in references]
    lines = [
        "",
        "## Per seed (last checkpoint, all held-out volumes)",
        "",
        "*(n at Dice 0)*: structures (volume and class) at Dice 0 - missed, misplaced, or predicted where "
        "there is none; the "
        "published rule scores a missed structure's HD95 as 0, which lowers that run's HD95 mean.",
        "",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in dict.fromkeys(r["method"] for r in rows):
        by_seed = {r["seed"]: r for r in rows if r["method"] == key}
        cells = [key]
        for seed in seeds:
            row = by_seed.get(seed)
            cells.append("-" if row is None else _per_seed_cell(row))
        for reference in references:
            diffs = paired_differences(rows, key, reference, "last_dice") if reference != key else {}
            cells.append(" / ".join(f"{seed}: {100 * d:+.2f}" for seed, d in diffs.items()) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _per_seed_cell(row: dict) -> str:
    text = f"{100 * row.get('last_dice', np.nan):.2f} / {row.get('last_hd95_voxels', np.nan):.2f}"
    missed = row.get("last_zero_dice_structures")
    if missed is None:  # not "none at Dice 0": the count is not known for this run
        return f"{text} (Dice-0 count unknown)"
    return f"{text} ({missed} at Dice 0)" if missed else text


def _error_text(standard_error: float) -> str:
    """' ± SE', or a note where one paired seed gives no standard error (it would print 'nan')."""
    return f" ± {standard_error:.2f}" if np.isfinite(standard_error) else " (one seed, no error estimate)"


def write_results(
    rows: list[dict],
    curves: dict,
    preset: Preset,
    args,
    tag: str,
    *,
    final: bool = False,
    missing: list[str] = (),
    from_records: list[str] = (),
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
    report = markdown_report(rows, preset, args, tag, missing, from_records)
    (out / f"quality_{tag}.md").write_text("\n".join(report) + "\n")
    if final and curves:
        plot_curves(curves, out / f"quality_{tag}_curves.png", tag)


def markdown_report(
    rows: list[dict],
    preset: Preset,
    args,
    tag: str,
    missing: list[str] = (),
    from_records: list[str] = (),
) -> list[str]:
    references = [r for r in args.references if any(row["method"] == r for row in rows)]
    default = next(
        (k for k in dict.fromkeys(r["method"] for r in rows) if _is_default(k, preset, args)), None
    )
    lines = [
        f"# Quality benchmark: {tag}",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {args.device}. Command: `{shown_command(COMMAND, sys.argv[1:])}`",
        "",
        f"Preset: `{json.dumps(preset.__dict__)}`",
        "",
        "Mean ± sample standard deviation over seeds. *Last*: the final checkpoint on all held-out "
        "volumes (no selection; the primary figure). *Selected*: the checkpoint with the best mean Dice "
        "on the selection half, scored on the evaluation half. Dice and Jaccard in %, "
        "HD95 and ASD in voxels (the published tables' units); with `largest_component` in the preset "
        "(LA) every method's prediction keeps its largest connected component before it is scored, as "
        "the published test does. *vs X*: "
        "verdict on the last-checkpoint Dice paired by seed, mean difference ± its standard error; "
        "'better' only when ahead in every seed or the mean difference exceeds twice its standard "
        f"error (at least {MIN_SEEDS_FOR_VERDICT} seeds). *Per seed*: the differences against "
        f"{references[0] if references else '-'}, seed: difference; *HD95 Δ*: the same rule on "
        "HD95 (lower is better). Minutes: training time of the run (the shared pre-training is the "
        f"{PRETRAINING_ONLY} row's). Default configuration: {default or 'not among these runs'}.",
        "",
    ]
    summary = summary_rows(rows, references)
    columns = list(dict.fromkeys(k for line in summary for k in line))
    if summary:
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for line in summary:
        cells = [str(line.get(c, "-")) for c in columns]
        if line["configuration"] == default:
            cells[0] += " (default)"
        lines.append("| " + " | ".join(cells) + " |")
    lines += per_seed_table(rows, references)
    if getattr(args, "default_candidates", None):
        lines += default_rule_report(rows, args.default_candidates, args.default_candidates[-1])
    if missing:
        lines += [
            "",
            "No finished run (queued, running or not planned), so not in this table; each comparison "
            f"uses the seeds both configurations have: {', '.join(missing)}.",
        ]
    if from_records:
        which = "every row" if len(from_records) == len(rows) else ", ".join(from_records)
        lines += [
            "",
            f"From run records ({RECORDS_FOLDER}/{tag}/ beside this file, each written when its run "
            f"finished; a record is read before a run folder, which may no longer exist): {which}.",
        ]
    mismatches = start_weight_mismatches(rows)
    if mismatches:
        lines += [
            "",
            "Not the same start weights within a seed (the pre-training was trained again and came out "
            "different; these pairs share the seed and the configuration, not the start): "
            + " | ".join(mismatches),
        ]
    return lines


def _is_default(key: str, preset: Preset, args) -> bool:
    """Whether a configuration trains exactly what the engine's defaults train (``ours``)."""
    if key == "ours" or key == PRETRAINING_ONLY:
        return key == "ours"

    def computed(name: str) -> dict:
        entry = to_dict(base_config(preset, args, name, 0, Path("unused")))
        return {section: entry[section] for section in ("method", *BUARL_SECTIONS)}

    return computed(key) == computed("ours")


def plot_example(
    models: dict[str, Path], case: ValidationCase, path: Path, device: str, budget: float
) -> None:
    """One evaluation slice per method: image, truth, prediction, uncertainty with the flagged voxels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from buseg.evaluation.simulated_review import flag_budget

    if not models:
        return
    foreground = (case.labels > 0).reshape(case.labels.shape[0], -1).sum(1)
    k = int(np.argmax(foreground))  # the slice (first axis) with the most structure
    # A model at a working spacing sees the image on its own grid; the panels show the labels' grid.
    image = case.to_case_grid(torch.from_numpy(case.image[None].astype(np.float32)))[0].numpy()
    fig, axes = plt.subplots(len(models), 4, figsize=(10, 2.6 * len(models)), squeeze=False)
    for row, (method, model_path) in enumerate(models.items()):
        prediction, uncertainty = predict_case(model_path, case, device)
        flagged = flag_budget(uncertainty, budget)
        classes = max(1, int(case.labels.max()))
        panels = [
            (image[k], "gray", {}),
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


def curve_styles(methods: list[str]) -> dict[str, dict]:
    """A line colour and style per configuration, none shared: 20 colours, then dashed, dotted..."""
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    dashes = ["-", "--", ":", "-."]
    return {
        method: {
            "color": palette(index % palette.N),
            "linestyle": dashes[(index // palette.N) % len(dashes)],
        }
        for index, method in enumerate(methods)
    }


def plot_curves(curves: dict, path: Path, title: str) -> None:
    """Validation Dice over iterations: one panel per seed, one colour per configuration.

    With a dozen configurations and three seeds a single panel repeats colours and hides curves
    under its legend; panels keep each seed's runs (which share a pre-training) together."""
    points = {
        key: ([c["iteration"] for c in curve], [c["dice"] for c in curve]) for key, curve in curves.items()
    }
    plot_seed_panels(
        points,
        path,
        f"Validation Dice over iterations: {title}",
        xlabel="iteration (pre-training + self-training)",
        ylabel="mean Dice, selection split",
    )


def plot_seed_panels(
    points: dict[tuple[str, int], tuple[list, list]],
    path: Path,
    title: str,
    *,
    xlabel: str,
    ylabel: str,
    marker: str | None = None,
) -> None:
    """Curves ``points[(configuration, seed)] = (xs, ys)``: one panel per seed, one colour per
    configuration, one legend for all; nothing is written when no curve has a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {key: xy for key, xy in points.items() if len(xy[0])}
    if not points:
        return
    methods = list(dict.fromkeys(method for method, _ in points))
    seeds = list(dict.fromkeys(seed for _, seed in points))
    styles = curve_styles(methods)
    fig, axes = plt.subplots(1, len(seeds), figsize=(2.0 + 4.2 * len(seeds), 4.6), sharey=True, squeeze=False)
    for ax, seed in zip(axes[0], seeds, strict=True):
        for method in methods:
            if (method, seed) in points:
                xs, ys = points[(method, seed)]
                ax.plot(xs, ys, **styles[method], marker=marker, markersize=3, label=method)
        ax.set_title(f"seed {seed}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles = [plt.Line2D([], [], **styles[method]) for method in methods]
    fig.legend(handles, methods, loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1.0 - 2.0 / (2.0 + 4.2 * len(seeds)), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
