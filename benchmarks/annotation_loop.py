"""Annotation-loop benchmark (issue 34): what the clinician's loop buys, round by round.

The loop the product promises: label a few scans, train, let the tool pick the next scan and point at
what to fix, correct only that, add it, fine-tune, repeat. Here a simulated clinician runs it on ACDC
(the quality protocol's CPU preset):

* round 0 is the quality protocol's 3-labeled model of the default method (``ours-url-only``, its
  last checkpoint), per seed: reused from the quality benchmark's run folder (same ``--work``) or
  trained by its code, copy-paste first stage included;
* each round adds one pool patient (both frames; the pool is every other training patient), chosen
  by the tool's ``rank`` order (``buseg.prediction.ranking``'s dice-risk of each frame's prediction; a patient
  comes with its highest-ranked frame) or at random, and annotated by the simulated person
  (benchmarks/loop_annotators.py): ``full`` (the truth), ``regions`` (the prediction with the truth
  inside the boxes of the tool's first k flagged regions of each frame: ``regions`` k = 5,
  ``regions10`` k = 10) or ``slices`` (the prediction with the truth on the first 2 slices of each
  frame's slice review order); the prediction, regions and slice order are ``buseg predict``'s;
* the annotated patient joins the labeled set (its slices leave the unlabeled set) and the model is
  fine-tuned from the current one as the Slicer panel does by default (its ``fineTuneIterations``
  and ``learningRate``, from the current model's weights, no pre-training, no hold-out validation;
  batch, patch and method settings are the preset's), then scored on all 20 held-out volumes. An arm
  whose name ends in ``-shown`` (``rank+regions-shown``, ``rank+slices-shown``) adds only the slices
  the person was shown (those of the corrected boxes, or the review slices) to the labeled set; the
  frame's other slices, the prediction nobody checked, stay unlabeled. Without it the whole frame is
  labeled, the uncorrected prediction included (what the panel adds today). ``random+none-shown`` is
  the control: nothing is annotated or labeled, so its rounds measure what the fine-tuning alone does.

Pool truth reaches only the simulated person (:class:`PoolTruth`); the choice of the next patient
and the training see the images and the annotations.

Cost per round: slices edited and voxels changed (against the prediction the person started from;
also the slices shown), and the wall time of choosing, annotating, fine-tuning and scoring.

Runs are resumable and recorded like the quality protocol's: each arm and seed has a record
``<out>/runs/<tag>/<arm>_seed<seed>.json`` rewritten as soon as a round finishes (its cost, scores,
times and the identity of the model it made); a round's folder (choice, annotation, fine-tuning
checkpoints) lets an interrupted round resume; a record counts only for the settings and the start
model (compared as weights) it was made with; ``--reuse-only`` assembles the report from records.

Usage (one arm and seed per process; two processes share two cores)::

    python -m benchmarks.annotation_loop --arms rank+full --seeds 1337 --threads 1
    python -m benchmarks.annotation_loop --reuse-only                 # the report from the records
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import importlib.util
import json
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from benchmarks import loop_annotators as annotators
from benchmarks import quality
from benchmarks.paths import module_command, shown_command
from buseg.config import PredictConfig, TrainConfig
from buseg.data.training_data import TrainingData, ValidationCase
from buseg.files.safe_files import write_bytes_atomic

ROOT = Path(__file__).resolve().parents[1]
COMMAND = module_command(__file__)
# The Slicer panel's Qt-free library: it ships with the Slicer module, not in the engine's wheel.
PANEL_LIBRARY = ROOT / "BidirUncertaintySeg" / "BidirUncertaintySegLib"

METHOD = "ours-url-only"  # the quality protocol's default configuration
START_LABELED = 3
SLICES_PER_FRAME = 2  # the `slices` annotation: the first slices of each frame's review order
DEFAULT_REGIONS_K = 5
RANK_SCORE = "dice-risk"  # buseg rank's default
DEFAULT_ARMS = ["rank+full", "random+full", "rank+regions", "rank+slices", "random+regions", "rank+regions10"]
RECORD_FORMAT = 1
RECORDS_FOLDER = "runs"
# Comparisons of the report, (A, B): A's Dice minus B's, paired by seed.
PAIRS = [
    ("rank+regions", "rank+full"),
    ("rank+full", "random+full"),
    ("rank+regions", "random+regions"),
    ("rank+slices", "rank+regions"),
    ("rank+regions10", "rank+regions"),
    ("rank+regions-shown", "rank+regions"),
    ("rank+regions-shown", "rank+full"),
    ("rank+slices-shown", "rank+slices"),
    ("rank+regions-shown", "random+none-shown"),
    ("rank+regions", "random+none-shown"),
    ("rank+full", "random+none-shown"),
]
# How an annotated frame joins the labeled set: "whole" (every slice, the uncorrected prediction
# included: the panel's way) or "shown" (only the slices the person was shown; the others stay unlabeled).
LABELED_SLICES = ("whole", "shown")


def panel_library_module(name: str) -> ModuleType:
    """``BidirUncertaintySegLib.<name>``, the panel library's module. The library is not installed, so
    its package is loaded from :data:`PANEL_LIBRARY` under its own name (once; an already imported
    one is used) instead of adding its folder to the import path."""
    package = PANEL_LIBRARY.name
    if package not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            package, PANEL_LIBRARY / "__init__.py", submodule_search_locations=[str(PANEL_LIBRARY)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{name}")


def panel_fine_tune_defaults() -> dict[str, float]:
    """The Slicer panel's default fine-tuning schedule (BidirUncertaintySegLib.parameters): its
    iterations and learning rate (buildTrainConfig: from the current model, no pre-training)."""
    defaults = {p.name: p.default for p in panel_library_module("parameters").PARAMETERS}
    return {"iterations": int(defaults["fineTuneIterations"]), "lr": float(defaults["learningRate"])}


@dataclass(frozen=True)
class Arm:
    """How the next patient is chosen and annotated: ``rank+regions`` (k = 5), ``rank+regions10``..."""

    name: str
    chooser: str
    annotation: str
    k: int = 0  # regions: how many of each frame's flagged regions are corrected
    labeled_slices: str = "whole"  # one of LABELED_SLICES

    def settings(self) -> dict:
        """What the arm's records depend on. ``labeled_slices`` is left out when "whole": records made
        before the option (the whole frame, always) stay valid."""
        fields = dict(self.__dict__)
        if fields["labeled_slices"] == "whole":
            del fields["labeled_slices"]
        return fields


def parse_arm(name: str) -> Arm:
    match = re.fullmatch(r"(rank|random)\+(full|slices|regions|none)(\d+)?(-shown)?", name)
    if (
        not match
        or (match.group(3) and match.group(2) != "regions")
        or (match.group(4) and match.group(2) == "full")
        or (not match.group(4) and match.group(2) == "none")
    ):
        raise ValueError(
            f"arm {name!r}: expected <rank|random>+<full|slices|regions[K]>[-shown] (-shown not with full) "
            "or <rank|random>+none-shown, e.g. rank+regions, rank+regions10 or rank+slices-shown"
        )
    chooser, annotation, k, shown = match.groups()
    return Arm(
        name,
        chooser,
        annotation,
        int(k) if k else DEFAULT_REGIONS_K if annotation == "regions" else 0,
        "shown" if shown else "whole",
    )


# --------------------------------------------------------------------------------------
# The pool: the training patients that are not labeled at the start


@dataclass
class Pool:
    """The pool's frames as volumes (z, y, x), and where their slices sit among the base data's
    unlabeled images (they leave that set when their patient is added)."""

    frames: dict[str, np.ndarray]
    unlabeled_indices: dict[str, list[int]] = field(default_factory=dict)

    def patients(self) -> list[str]:
        return sorted({annotators.patient_of(frame) for frame in self.frames})

    def frames_of(self, patient: str) -> list[str]:
        return sorted(frame for frame in self.frames if annotators.patient_of(frame) == patient)


class PoolTruth:
    """The pool's labels, for the simulated person only: ``reader(frame)`` gives a frame's class
    indices; ``read`` lists the frames read (what the annotator looked at)."""

    def __init__(self, reader: Callable[[str], np.ndarray]):
        self._reader = reader
        self.read: list[str] = []

    def labels(self, frame: str) -> np.ndarray:
        self.read.append(frame)
        return self._reader(frame)


def _slice_number(name: str) -> int:
    return int(name.rsplit("_slice_", 1)[1])


def acdc_pool(root: Path, base: TrainingData, patient_limit: int | None = None) -> tuple[Pool, PoolTruth]:
    """The ACDC pool: the unlabeled training slices of the base data (same order as
    ``base.unlabeled_images``) stacked per frame in slice order; their truth read only on demand."""
    from buseg.data.sources.acdc import acdc_split as labeled_split
    from buseg.data.sources.hdf5 import class_indices, read_h5

    _, unlabeled_names = labeled_split(root, START_LABELED)
    if len(unlabeled_names) != len(base.unlabeled_images):
        raise SystemExit(
            f"{root}: {len(unlabeled_names)} unlabeled slices listed, {len(base.unlabeled_images)} loaded"
        )
    by_frame: dict[str, list[tuple[int, int, str]]] = {}
    for index, name in enumerate(unlabeled_names):
        frame = name.rsplit("_slice_", 1)[0]
        by_frame.setdefault(frame, []).append((_slice_number(name), index, name))
    patients = sorted({annotators.patient_of(frame) for frame in by_frame})
    kept = set(patients[:patient_limit] if patient_limit else patients)
    frames, indices, names = {}, {}, {}
    for frame, entries in sorted(by_frame.items()):
        if annotators.patient_of(frame) not in kept:
            continue
        entries.sort()
        indices[frame] = [index for _, index, _ in entries]
        names[frame] = [name for _, _, name in entries]
        frames[frame] = np.stack([base.unlabeled_images[index] for index in indices[frame]])

    def read_truth(frame: str) -> np.ndarray:
        paths = [root / "data" / f"{name}.h5" for name in names[frame]]
        return np.stack([class_indices(read_h5(path, "label")[0], 3, path) for path in paths])

    return Pool(frames, indices), PoolTruth(read_truth)


# --------------------------------------------------------------------------------------
# The tool: prediction, regions, slice order and rank score of a frame


class ToolPredictor:
    """``buseg predict`` on a frame (the torch engine; regions and slice review order with the
    engine's defaults), the model loaded once per model file."""

    def __init__(self, device: str, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)):
        self.device = device
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        self._loaded: tuple[Path, object] | None = None
        self.config = PredictConfig(engine="torch", device=device)

    def __call__(self, model_path: Path, image: np.ndarray):
        from buseg.files.images import Volume
        from buseg.model.checkpoint import load_model
        from buseg.prediction.case import predict_case

        if self._loaded is None or self._loaded[0] != model_path:
            self._loaded = (model_path, load_model(model_path, device=self.device))
        volume = Volume(
            image, self.spacing_mm, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        )
        return predict_case(self._loaded[1], volume, self.config)

    def rank_score(self, prediction) -> float:
        from buseg.prediction.ranking import case_statistics, score

        return score(case_statistics(prediction, self.config.region_threshold), RANK_SCORE)


@dataclass
class Loop:
    """What every round of one seed needs."""

    args: argparse.Namespace
    preset: quality.Preset
    seed: int
    base: TrainingData  # the 3 labeled patients' slices and every unlabeled slice
    pool: Pool
    truth: PoolTruth
    volumes: list[ValidationCase]  # scored after each round
    root: Path  # the loop's work folder
    predictor: ToolPredictor


def frame_scores(loop: Loop, model_path: Path, frames: list[str]) -> dict[str, float]:
    """The rank score of each frame under ``model_path``, cached by the model's weights (the arms of
    a seed share their first round's ranking)."""
    cache = loop.root / "rankings" / f"{quality.weights_sha256(model_path)[:24]}.json"
    with quality.run_lock(cache, loop.args):
        scores = json.loads(cache.read_text())["scores"] if cache.exists() else {}
        missing = [frame for frame in frames if frame not in scores]
        for frame in missing:
            scores[frame] = loop.predictor.rank_score(loop.predictor(model_path, loop.pool.frames[frame]))
        if missing:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(cache, json.dumps({"score": RANK_SCORE, "scores": scores}, indent=1).encode())
    return {frame: scores[frame] for frame in frames}


def choose_patient(loop: Loop, arm: Arm, model_path: Path, remaining: list[str], round_index: int) -> dict:
    """The next patient: the tool's first (``rank``) or a random one; no truth is read here."""
    if not remaining:
        raise SystemExit(f"round {round_index}: every pool patient is labeled already (fewer --rounds)")
    if arm.chooser == "random":
        return {"patient": annotators.random_patient(remaining, loop.seed, round_index)}
    frames = [frame for patient in remaining for frame in loop.pool.frames_of(patient)]
    scores = frame_scores(loop, model_path, frames)
    order = annotators.rank_patients(scores)
    return {"patient": order[0], "rank_scores": {f: scores[f] for f in loop.pool.frames_of(order[0])}}


def annotate_patient(loop: Loop, arm: Arm, model_path: Path, patient: str) -> tuple[dict, dict, dict]:
    """The simulated person's annotation of each frame of ``patient``, the slices of each they were
    shown, and the cost (summed)."""
    annotations, shown, costs = {}, {}, []
    for frame in loop.pool.frames_of(patient):
        prediction = loop.predictor(model_path, loop.pool.frames[frame])
        review = prediction.regions.slice_review or {"axis_ijk": 2, "slices": []}
        axis = 2 - int(review["axis_ijk"])
        if axis != 0:  # the pool's frames are stacks of the data's 2D slices along numpy axis 0
            raise SystemExit(f"{frame}: the tool reviews slices along numpy axis {axis}, not the stack's 0")
        truth = loop.truth.labels(frame)
        predicted = prediction.labels.astype(truth.dtype)
        if arm.annotation == "full":
            done = annotators.annotate_full(predicted, truth, axis)
        elif arm.annotation == "none":
            done = annotators.annotate_none(predicted)
        elif arm.annotation == "regions":
            boxes = [(r.bbox_ijk_min, r.bbox_ijk_max) for r in prediction.regions.regions]
            done = annotators.annotate_regions(predicted, truth, boxes, arm.k, axis)
        else:
            order = [entry["index"] for entry in review["slices"]]
            done = annotators.annotate_slices(predicted, truth, order, SLICES_PER_FRAME, axis)
        annotations[frame] = done.labels
        shown[frame] = [int(index) for index in done.shown_slices]
        costs.append(
            {
                **annotators.edit_cost(predicted, done.labels, axis),
                "slices_shown": done.slices_shown,
                # What there was to fix: every annotator only replaces predicted voxels by the truth,
                # so voxels changed / error voxels is the share of the prediction's errors fixed.
                "error_voxels": int((predicted != truth).sum()),
            }
        )
    return annotations, shown, annotators.add_costs(costs)


def round_training_data(
    base: TrainingData,
    pool: Pool,
    annotations: dict[str, np.ndarray],
    labeled_slices: dict[str, list[int]] | None = None,
) -> TrainingData:
    """The base data with the annotated frames' slices labeled (from their annotations) and taken out
    of the unlabeled set; no validation (the panel trains without a hold-out). ``labeled_slices``:
    per frame, the only slices labeled (the frame's others stay unlabeled); None: every slice."""
    data = copy.copy(base)
    data.labeled_images = list(base.labeled_images)
    data.labeled_labels = list(base.labeled_labels)
    taken: set[int] = set()
    for frame, labels in annotations.items():
        every = range(len(labels))
        kept = every if labeled_slices is None else sorted(set(labeled_slices[frame]) & set(every))
        data.labeled_images += [pool.frames[frame][index] for index in kept]
        data.labeled_labels += [labels[index].astype(base.labeled_labels[0].dtype) for index in kept]
        positions = pool.unlabeled_indices.get(frame, [])
        taken.update(positions[index] for index in kept if index < len(positions))
    data.unlabeled_images = [image for i, image in enumerate(base.unlabeled_images) if i not in taken]
    added = {annotators.patient_of(frame) for frame in annotations}
    data.labeled_case_names = sorted({*base.labeled_case_names, *added})
    data.unlabeled_case_names = [name for name in base.unlabeled_case_names if name not in added]
    data.validation = []
    return data


def fine_tune_config(preset: quality.Preset, args, seed: int, out: Path, start: Path) -> TrainConfig:
    """The panel's fine-tuning (buildTrainConfig with initWeights) on the preset's settings."""
    config = quality.base_config(preset, args, METHOD, seed, out)
    config.init_weights = str(start)
    config.optim.pretrain_iterations = 0
    config.optim.iterations = args.fine_tune_iterations
    config.optim.lr = args.fine_tune_lr
    config.validation_interval = 0
    config.checkpoint_interval = min(config.checkpoint_interval or 250, args.fine_tune_iterations)
    return config


def score_model(loop: Loop, model_path: Path) -> dict:
    """The model on every held-out volume: mean Dice, HD95 (voxels), per class Dice, Dice-0 count."""
    device = loop.args.device if loop.args.device != "auto" else "cpu"
    evaluation = quality.evaluate_model(
        model_path, loop.volumes, loop.base.num_classes, device, loop.args.review_budget
    )
    summary = evaluation["summary"]
    keep = ("dice", "jaccard", "hd95_voxels", "asd_voxels")
    scores = {k: v for k, v in summary.items() if k in keep or k.startswith("dice_class")}
    return {**scores, "zero_dice_structures": quality.zero_dice_structures(evaluation)}


# --------------------------------------------------------------------------------------
# Rounds: made, resumed or reused


def arm_folder(loop: Loop, arm: Arm) -> Path:
    return loop.root / f"{arm.name}_seed{loop.seed}"


def _saved_annotation(folder: Path, model_identity: str) -> tuple[dict, dict] | None:
    """A round's choice and annotation made earlier from the same model (an interrupted round)."""
    try:
        choice = json.loads((folder / "choice.json").read_text())
        with np.load(folder / "annotation.npz") as stored:
            annotations = {frame: stored[frame] for frame in choice["frames"]}
        if set(choice["shown_slices"]) != set(annotations):
            raise KeyError("shown_slices")
    except (OSError, ValueError, KeyError):
        return None
    return (choice, annotations) if choice.get("model_weights_sha256") == model_identity else None


def prepare_round(loop: Loop, arm: Arm, folder: Path, model_path: Path, remaining: list[str], index: int):
    """The round's patient and annotation (and their seconds), saved in ``folder`` before training."""
    identity = quality.weights_sha256(model_path)
    saved = _saved_annotation(folder, identity)
    if saved is not None:
        return saved
    started = time.time()
    choice = choose_patient(loop, arm, model_path, remaining, index)
    chosen = time.time()
    annotations, shown, cost = annotate_patient(loop, arm, model_path, choice["patient"])
    choice.update(
        model_weights_sha256=identity,
        frames=sorted(annotations),
        shown_slices=shown,
        cost=cost,
        choice_seconds=round(chosen - started, 1),
        annotation_seconds=round(time.time() - chosen, 1),
    )
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "annotation.npz", **annotations)
    write_bytes_atomic(folder / "choice.json", json.dumps(choice, indent=1).encode())  # last: the mark
    return choice, annotations


@dataclass
class Annotations:
    """Every frame annotated so far in an arm: its label map and the slices the person was shown."""

    labels: dict[str, np.ndarray] = field(default_factory=dict)
    shown_slices: dict[str, list[int]] = field(default_factory=dict)

    def add(self, labels: dict[str, np.ndarray], shown_slices: dict[str, list[int]]) -> Annotations:
        return Annotations({**self.labels, **labels}, {**self.shown_slices, **shown_slices})

    def training_data(self, loop: Loop, arm: Arm) -> TrainingData:
        labeled = self.shown_slices if arm.labeled_slices == "shown" else None
        return round_training_data(loop.base, loop.pool, self.labels, labeled)


def run_round(
    loop: Loop, arm: Arm, index: int, model_path: Path, earlier: Annotations
) -> tuple[dict, Path, Annotations]:
    """Round ``index``: choose, annotate, fine-tune from ``model_path``, score. Returns the round's
    record, its model and every annotation so far."""
    folder = arm_folder(loop, arm) / f"round{index}"
    remaining = sorted(set(loop.pool.patients()) - {annotators.patient_of(f) for f in earlier.labels})
    choice, annotations = prepare_round(loop, arm, folder, model_path, remaining, index)
    every = earlier.add(annotations, choice["shown_slices"])
    out = folder / "fine-tune"
    config = fine_tune_config(loop.preset, loop.args, loop.seed, out, model_path)
    if (out / "final.pt").exists() and quality._reusable(out, config):
        seconds = quality._seconds(out)
    else:
        data = every.training_data(loop, arm)
        _, seconds = quality.train_or_resume(config, out, f"{arm.name} round {index}", loop.args, data)
    scoring_started = time.time()
    scores = score_model(loop, out / "final.pt")
    record = {
        "round": index,
        "patient": choice["patient"],
        "frames": choice["frames"],
        "shown_slices": choice["shown_slices"],
        "rank_scores": choice.get("rank_scores"),
        "cost": choice["cost"],
        "scores": scores,
        "seconds": {
            "choice": choice["choice_seconds"],
            "annotation": choice["annotation_seconds"],
            "fine_tune": round(seconds, 1),
            "scoring": round(time.time() - scoring_started, 1),
        },
        "model_weights_sha256": quality.weights_sha256(out / "final.pt"),
    }
    print(
        f"  {arm.name} seed {loop.seed} round {index}: {choice['patient']}, "
        f"{choice['cost']['slices_edited']} slices edited, Dice {scores['dice']:.4f}",
        flush=True,
    )
    return record, out / "final.pt", every


def arm_settings(
    arm: Arm, preset: quality.Preset, args, seed: int, quality_work: Path, pool: list[str], volumes: list[str]
) -> dict:
    """What a record's rounds depend on besides the start model's weights: the arm, the start model's
    training, the fine-tuning, the pool's patients and the scored volumes' names."""
    tune = fine_tune_config(preset, args, seed, Path("fine-tune"), Path("start.pt"))
    tune.init_weights = None  # the start of each round is its previous model, compared as weights
    return {
        "arm": arm.settings(),
        "slices_per_frame": SLICES_PER_FRAME,
        "rank_score": RANK_SCORE,
        "start": quality.planned_configs(METHOD, preset, args, seed, quality_work),
        "fine_tune": quality._portable(tune, quality_work),
        "pool": list(pool),
        "volumes": list(volumes),
    }


def read_loop_record(path: Path, settings: dict, start_identity: str | None) -> dict | None:
    """The record at ``path`` when it was made with these settings (and, when ``start_identity`` is
    known, from the same start weights); else None (its rounds are made again)."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        rounds = record["rounds"]
        if not isinstance(rounds, list):
            raise TypeError("rounds is not a list")
    except (OSError, ValueError, KeyError, TypeError) as problem:
        raise SystemExit(f"{path}: not a readable loop record ({problem!r}); restore it from git") from None
    if record.get("format") != RECORD_FORMAT or record.get("settings") != settings:
        print(f"{path}: records other settings; not used", flush=True)
        return None
    if start_identity is not None and record["start"]["model_weights_sha256"] != start_identity:
        print(f"{path}: made from other start weights (the start model was trained again); not used")
        return None
    return record


def write_loop_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


def resumable_rounds(loop: Loop, arm: Arm, rounds: list[dict]) -> tuple[int, Annotations]:
    """How many recorded rounds can be continued from (their annotations and the last one's model are
    in the work folder, the model the same weights as recorded), and their annotations."""
    for count in range(len(rounds), 0, -1):
        model = arm_folder(loop, arm) / f"round{count}" / "fine-tune" / "final.pt"
        if not model.exists() or quality.weights_sha256(model) != rounds[count - 1]["model_weights_sha256"]:
            continue
        annotations = Annotations()
        for entry in rounds[:count]:
            folder = arm_folder(loop, arm) / f"round{entry['round']}"
            try:
                with np.load(folder / "annotation.npz") as stored:
                    labels = {frame: stored[frame] for frame in entry["frames"]}
                # Records made before shown slices were kept: whole-frame arms (all there was) use none.
                every_slice = {frame: list(range(len(labels[frame]))) for frame in labels}
                annotations = annotations.add(labels, entry.get("shown_slices", every_slice))
            except (OSError, KeyError, ValueError):
                break
        else:
            return count, annotations
    return 0, Annotations()


def run_arm(loop: Loop, arm: Arm, start: Path, start_scores: dict, record_path: Path, settings: dict) -> dict:
    """Every round of ``arm`` asked for (``--rounds``) not recorded yet; the record is rewritten as soon
    as each finishes. Rounds whose models are gone are made again from the last one still here."""
    identity = quality.weights_sha256(start)
    with quality.run_lock(arm_folder(loop, arm), loop.args):
        record = read_loop_record(record_path, settings, identity) or {
            "format": RECORD_FORMAT,
            "arm": arm.name,
            "seed": loop.seed,
            "settings": settings,
            "start": {"model_weights_sha256": identity, "scores": start_scores},
            "rounds": [],
        }
        if len(record["rounds"]) >= loop.args.rounds:
            print(f"{arm.name} seed {loop.seed}: {loop.args.rounds} rounds recorded in {record_path}")
            return record
        done, annotations = resumable_rounds(loop, arm, record["rounds"])
        model = start if done == 0 else arm_folder(loop, arm) / f"round{done}" / "fine-tune" / "final.pt"
        for index in range(done + 1, loop.args.rounds + 1):
            entry, model, annotations = run_round(loop, arm, index, model, annotations)
            previous = record["rounds"][index - 1] if len(record["rounds"]) >= index else None
            if previous is not None and previous["model_weights_sha256"] != entry["model_weights_sha256"]:
                print(f"  round {index} made again came out different from its record; the new one is kept")
            record["rounds"] = [*record["rounds"][: index - 1], entry]
            write_loop_record(record_path, record)
        return record


# --------------------------------------------------------------------------------------
# Round 0: the quality protocol's 3-labeled model


def start_model(preset: quality.Preset, args, seed: int, quality_work: Path, data: TrainingData) -> Path:
    """The last checkpoint of the quality protocol's ``ours-url-only`` run for ``seed`` in
    ``quality_work``: reused when it trained this very configuration from the same first stage, else
    trained (or resumed) by the quality benchmark's code. With --reuse-only: UnfinishedRunError."""
    starts = quality.first_stages(preset, args, seed, quality_work, data, [METHOD])
    if args.reuse_only and preset.pretrain_iterations and "copy-paste" not in starts:
        raise quality.UnfinishedRunError(f"{METHOD} (seed {seed}): its first stage has not finished")
    out = quality_work / f"{METHOD}_seed{seed}"
    config, _ = quality.second_stage_config(METHOD, preset, args, seed, out, starts)
    with quality.run_lock(out, args):
        if (out / "final.pt").exists() and (out / "history.json").exists() and quality._reusable(out, config):
            print(f"start model (seed {seed}): reusing {out / 'final.pt'}", flush=True)
        else:
            quality.train_or_resume(config, out, f"{METHOD} (start model)", args, data)
    return out / "final.pt"


def start_scores(loop: Loop, start: Path) -> dict:
    """The start model's scores (round 0), cached by its weights: every arm of a seed shares them."""
    identity = quality.weights_sha256(start)
    cache = loop.root / f"start_seed{loop.seed}.json"
    with quality.run_lock(cache, loop.args):
        if cache.exists():
            stored = json.loads(cache.read_text())
            if stored["model_weights_sha256"] == identity and stored["volumes"] == [
                c.name for c in loop.volumes
            ]:
                return stored["scores"]
        scores = score_model(loop, start)
        stored = {
            "model_weights_sha256": identity,
            "volumes": [c.name for c in loop.volumes],
            "scores": scores,
        }
        write_bytes_atomic(cache, json.dumps(stored, indent=1).encode())
    return scores


# --------------------------------------------------------------------------------------
# Report: curves against cumulative cost, paired differences, the targets


COST_FIELDS = ("slices_edited", "voxels_changed", "slices_shown", "error_voxels")
PHASES = ("choice", "annotation", "fine_tune", "scoring")


def report_rows(records: list[dict]) -> list[dict]:
    """One row per arm, seed and round (round 0: the start model), with the cumulative cost."""
    rows = []
    for record in records:
        total = dict.fromkeys(COST_FIELDS, 0)
        start = {"round": 0, "patient": "", "scores": record["start"]["scores"], "cost": {}, "seconds": {}}
        for entry in [start, *record["rounds"]]:
            for name in COST_FIELDS:
                total[name] += int(entry["cost"].get(name, 0))
            row = {"method": record["arm"], "seed": record["seed"], "round": entry["round"]}
            row["patient"] = entry["patient"]
            row.update(entry["scores"])
            row.update({f"round_{name}": int(entry["cost"].get(name, 0)) for name in COST_FIELDS})
            row.update({f"cumulative_{name}": total[name] for name in COST_FIELDS})
            row.update({f"{phase}_seconds": entry["seconds"].get(phase, 0.0) for phase in PHASES})
            rows.append(row)
    return rows


def at_round(rows: list[dict], round_index: int) -> list[dict]:
    return [r for r in rows if r["round"] == round_index]


def gains(rows: list[dict], arm: str, round_index: int) -> dict[int, float]:
    """Per seed, the arm's Dice after ``round_index`` rounds minus its start model's."""
    start = {r["seed"]: r["dice"] for r in at_round(rows, 0) if r["method"] == arm}
    return {
        r["seed"]: r["dice"] - start[r["seed"]]
        for r in at_round(rows, round_index)
        if r["method"] == arm and r["seed"] in start
    }


def compare(rows: list[dict], a: str, b: str, round_index: int, metric: str = "dice") -> dict:
    """A's ``metric`` minus B's after ``round_index`` rounds, paired by seed, and the verdict."""
    differences = quality.paired_differences(at_round(rows, round_index), a, b, metric)
    scale = 100 if metric == "dice" else 1
    values = [scale * d for d in differences.values()]
    mean, se = quality.mean_and_standard_error(values)
    verdict = quality.verdict(values, higher_is_better=metric != "hd95_voxels") if values else "no seeds"
    return {
        "per_seed": {s: scale * d for s, d in differences.items()},
        "mean": mean,
        "se": se,
        "verdict": verdict,
    }


def target_regions_vs_full(rows: list[dict], final: int, arm: str = "rank+regions") -> dict:
    """``arm`` (a rank+regions arm) reaches >= 90% of rank+full's Dice gain after the last round at
    <= 25% of its edited slices (ratios of the means over paired seeds, at least 3)."""
    name = f"{arm} >= 90% of rank+full's Dice gain at <= 25% of its edited slices"
    regions, full = gains(rows, arm, final), gains(rows, "rank+full", final)
    seeds = [s for s in full if s in regions]
    if len(seeds) < quality.MIN_SEEDS_FOR_VERDICT:
        return {"target": name, "status": "not evaluable yet", "detail": f"{len(seeds)} paired seeds"}
    slices = {
        (r["method"], r["seed"]): r["cumulative_slices_edited"]
        for r in at_round(rows, final)
        if r["method"] in (arm, "rank+full")
    }
    gain_full = float(np.mean([full[s] for s in seeds]))
    gain_ratio = float(np.mean([regions[s] for s in seeds])) / gain_full if gain_full > 0 else float("nan")
    slice_ratio = float(np.mean([slices[(arm, s)] for s in seeds])) / max(
        1.0, float(np.mean([slices[("rank+full", s)] for s in seeds]))
    )
    detail = (
        f"gain {100 * np.mean([regions[s] for s in seeds]):+.2f} vs {100 * gain_full:+.2f} Dice points "
        f"({gain_ratio:.0%} of full's), edited slices {slice_ratio:.0%} of full's"
    )
    if not gain_full > 0:
        return {
            "target": name,
            "status": "not evaluable",
            "detail": detail + "; full labeling gained nothing",
        }
    met = gain_ratio >= 0.9 - 1e-9 and slice_ratio <= 0.25 + 1e-9  # at the bound exactly: met
    return {"target": name, "status": "met" if met else "not met", "detail": detail}


def target_rank_beats_random(rows: list[dict], final: int) -> dict:
    """rank beats random with the same annotation, by the project's rule (every annotation run)."""
    name = "rank beats random with the same annotation (by the rule)"
    results = []
    arms = set(r["method"] for r in rows)
    for a in sorted(arm for arm in arms if arm.startswith("rank+")):
        b = "random+" + a.removeprefix("rank+")
        if b in arms:
            results.append((a.removeprefix("rank+"), compare(rows, a, b, final)))
    if not results or any(c["verdict"] in ("too few seeds", "no seeds") for _, c in results):
        return {"target": name, "status": "not evaluable yet", "detail": _comparisons_text(results)}
    met = all(c["verdict"] == "better" for _, c in results)
    return {"target": name, "status": "met" if met else "not met", "detail": _comparisons_text(results)}


def _comparisons_text(results: list[tuple[str, dict]]) -> str:
    return (
        "; ".join(f"{label}: {c['verdict']}, {c['mean']:+.2f}{_se_text(c['se'])}" for label, c in results)
        or "no pair run"
    )


def _se_text(se: float) -> str:
    return f" ± {se:.2f}" if np.isfinite(se) else ""


def target_seven_labeled(rows: list[dict], final: int, seven: dict[int, float], arm: str) -> dict:
    """3 labeled + ``final`` corrected patients reach the 7-labeled default run's Dice (the mean paired
    difference is not below 0; the verdict by the rule beside it)."""
    name = f"3 labeled + {final} patients through the loop ({arm}) reach the 7-labeled run's Dice"
    loop_dice = {r["seed"]: r["dice"] for r in at_round(rows, final) if r["method"] == arm}
    differences = [100 * (loop_dice[s] - seven[s]) for s in loop_dice if s in seven]
    if len(differences) < quality.MIN_SEEDS_FOR_VERDICT:
        return {"target": name, "status": "not evaluable yet", "detail": f"{len(differences)} paired seeds"}
    mean, se = quality.mean_and_standard_error(differences)
    detail = (
        f"{np.mean([100 * loop_dice[s] for s in loop_dice if s in seven]):.2f} vs "
        f"{np.mean([100 * seven[s] for s in loop_dice if s in seven]):.2f}: {mean:+.2f}{_se_text(se)} "
        f"({quality.verdict(differences)} by the rule)"
    )
    return {"target": name, "status": "met" if mean >= 0 else "not met", "detail": detail}


def seven_labeled_dice(records: Path) -> dict[int, float]:
    """The 7-labeled default run's last-checkpoint Dice per seed, from the quality protocol's records."""
    dice = {}
    for path in sorted(records.glob(f"{METHOD}_seed*.json")):
        row = json.loads(path.read_text())["row"]
        dice[int(row["seed"])] = float(row["last_dice"])
    return dice


def errors_fixed_text(rows: list[dict]) -> str:
    """The share of the added patients' prediction errors the annotations fixed (cumulative, mean
    over the rows' seeds); '-' at round 0 or for records made before error voxels were counted."""
    shares = [
        r["cumulative_voxels_changed"] / r["cumulative_error_voxels"]
        for r in rows
        if r["cumulative_error_voxels"]
    ]
    return f"{100 * np.mean(shares):.0f}%" if shares else "-"


def markdown_report(
    rows: list[dict], tag: str, final: int, seven: dict[int, float], missing: list[str]
) -> list[str]:
    arms = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        f"# Annotation loop: {tag}",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Command: `{shown_command(COMMAND, sys.argv[1:])}`",
        "",
        "Round 0: the quality protocol's 3-labeled ours-url-only model; each round adds one pool patient "
        "(both frames), fine-tunes with the Slicer panel's default schedule and scores the model on the "
        "held-out volumes. Dice in %, HD95 in voxels, mean ± sample standard deviation over seeds. "
        "Cost (cumulative, mean over seeds): slices edited and voxels changed against the prediction the "
        "simulated person started from; errors fixed: the share of the added patients' prediction errors "
        "(voxels) that the annotations corrected. An arm ending in -shown labels only the slices the person "
        "was shown, the rest of the patient stays unlabeled; the others label the whole patient. Verdicts: A is better than B only when ahead in every seed or "
        f"the mean paired difference exceeds twice its standard error (at least {quality.MIN_SEEDS_FOR_VERDICT} seeds).",
        "",
        "## Dice and HD95 after each round against cumulative cost",
        "",
        "| arm | round | seeds | Dice | HD95 | slices edited | voxels changed | slices shown | errors fixed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        for index in sorted({r["round"] for r in rows if r["method"] == arm}):
            group = [r for r in rows if r["method"] == arm and r["round"] == index]
            lines.append(
                f"| {arm} | {index} | {len(group)} | {quality.spread([r['dice'] for r in group], 100)} | "
                f"{quality.spread([r['hd95_voxels'] for r in group])} | "
                + " | ".join(f"{np.mean([r[f'cumulative_{n}'] for r in group]):.0f}" for n in COST_FIELDS[:3])
                + f" | {errors_fixed_text(group)} |"
            )
    lines += ["", f"## Paired differences after round {final} (A − B, per seed)", ""]
    lines += ["| A | B | Dice per seed | Dice mean | verdict | HD95 verdict |", "|---|---|---|---|---|---|"]
    pairs = [(a, b) for a, b in PAIRS if a in arms and b in arms]
    pairs += [(arm, "7 labeled") for arm in arms if seven]
    for a, b in pairs:
        if b == "7 labeled":
            seven_rows = [{"method": b, "seed": s, "round": final, "dice": d} for s, d in seven.items()]
            dice = compare(rows + seven_rows, a, b, final)
            hd95 = {"verdict": "-"}
        else:
            dice, hd95 = compare(rows, a, b, final), compare(rows, a, b, final, "hd95_voxels")
        per_seed = " / ".join(f"{s}: {d:+.2f}" for s, d in dice["per_seed"].items()) or "-"
        lines.append(
            f"| {a} | {b} | {per_seed} | {dice['mean']:+.2f}{_se_text(dice['se'])} | {dice['verdict']} | "
            f"{hd95['verdict']} |"
        )
    lines += ["", f"Gain over the start model after round {final} (Dice points, per seed):", ""]
    for arm in arms:
        per_seed = gains(rows, arm, final)
        values = [100 * g for g in per_seed.values()]
        text = " / ".join(f"{s}: {100 * g:+.2f}" for s, g in per_seed.items()) or "-"
        lines.append(
            f"- {arm}: {text} (against the start: {quality.verdict(values) if values else 'no seeds'})"
        )
    lines += ["", "## The targets", "", "| target | status | detail |", "|---|---|---|"]
    regions_arms = [arm for arm in ("rank+regions", "rank+regions-shown") if arm in arms] or ["rank+regions"]
    targets = [target_regions_vs_full(rows, final, arm) for arm in regions_arms]
    targets.append(target_rank_beats_random(rows, final))
    targets += [
        target_seven_labeled(rows, final, seven, arm)
        for arm in ("rank+regions", "rank+regions-shown", "rank+full")
        if arm in arms
    ]
    lines += [f"| {t['target']} | {t['status']} | {t['detail']} |" for t in targets]
    lines += ["", "## What a round costs in compute (mean seconds per round)", ""]
    lines += [
        "| arm | rounds (all seeds) | choice (ranking) | annotation | fine-tuning | scoring | total |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        group = [r for r in rows if r["method"] == arm and r["round"] > 0]
        if group:
            means = [float(np.mean([r[f"{p}_seconds"] for r in group])) for p in PHASES]
            lines.append(
                f"| {arm} | {len(group)} | "
                + " | ".join(f"{m:.0f}" for m in means)
                + f" | {sum(means):.0f} |"
            )
    if missing:
        lines += [
            "",
            f"Not recorded yet (left out; comparisons use the seeds both arms have): {', '.join(missing)}.",
        ]
    return lines


def write_report(
    rows: list[dict], out: Path, tag: str, final: int, seven: dict[int, float], missing: list[str]
) -> None:
    """annotation_loop_<tag>.md / .csv / .png beside the other results."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"annotation_loop_{tag}"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    Path(f"{stem}.md").write_text("\n".join(markdown_report(rows, tag, final, seven, missing)) + "\n")
    plot_curves(rows, Path(f"{stem}.png"), tag, seven)  # (not with_suffix: a tag may hold a dot)


def plot_curves(rows: list[dict], path: Path, tag: str, seven: dict[int, float]) -> None:
    """Dice and HD95 (mean over seeds) against cumulative slices edited and voxels changed, one curve per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["method"] for r in rows))
    styles = quality.curve_styles(arms)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for arm in arms:
        rounds = sorted({r["round"] for r in rows if r["method"] == arm})
        means = {
            key: [np.mean([r[key] for r in rows if r["method"] == arm and r["round"] == i]) for i in rounds]
            for key in ("dice", "hd95_voxels", "cumulative_slices_edited", "cumulative_voxels_changed")
        }
        seeds = len({r["seed"] for r in rows if r["method"] == arm})
        label = f"{arm} ({seeds} seed{'s' if seeds > 1 else ''})"  # arms of fewer seeds start elsewhere
        for row, metric, scale in ((0, "dice", 100), (1, "hd95_voxels", 1)):
            for col, cost in enumerate(("cumulative_slices_edited", "cumulative_voxels_changed")):
                values = [scale * v for v in means[metric]]
                axes[row][col].plot(means[cost], values, marker="o", label=label, **styles[arm])
    if seven:
        for col in (0, 1):
            axes[0][col].axhline(
                100 * np.mean(list(seven.values())), color="gray", linestyle=":", label="7 labeled"
            )
    for col, cost in enumerate(("slices edited", "voxels changed")):
        axes[1][col].set_xlabel(f"cumulative {cost}")
    axes[0][0].set_ylabel("mean Dice (%), held-out volumes")
    axes[1][0].set_ylabel("mean HD95 (voxels)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Annotation loop: {tag} (markers: rounds 0, 1, ...)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Main


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    panel = panel_fine_tune_defaults()
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arms", nargs="+", default=DEFAULT_ARMS, help="e.g. rank+full random+regions rank+regions10"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=quality.DEFAULT_SEEDS)
    parser.add_argument("--rounds", type=int, default=4, help="Patients added, one per round.")
    parser.add_argument(
        "--fine-tune-iterations",
        type=int,
        default=panel["iterations"],
        help="Iterations of each round's fine-tuning (default: the Slicer panel's, %(default)s).",
    )
    parser.add_argument(
        "--fine-tune-lr",
        type=float,
        default=panel["lr"],
        help="Its learning rate (the panel's: %(default)s).",
    )
    parser.add_argument("--iterations", type=int, help="Override the start model's self-training iterations.")
    parser.add_argument("--pretrain-iterations", type=int, help="Override its pre-training iterations.")
    parser.add_argument("--pool-patients", type=int, help="Only the first N pool patients (smoke tests).")
    parser.add_argument(
        "--volumes", type=int, help="Score on the first N held-out volumes only (smoke tests)."
    )
    parser.add_argument(
        "--set", nargs="*", metavar="SECTION.FIELD=JSON", help="As benchmarks.quality's --set."
    )
    parser.add_argument("--review-budget", type=float, default=0.01)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "ACDC")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--work",
        type=Path,
        default=ROOT / "benchmarks" / "work",
        help="Work folder; the quality benchmark's (same default) holds the start models it reuses.",
    )
    parser.add_argument(
        "--quality-work",
        type=Path,
        default=None,
        help="The quality benchmark's --work folder whose 3-labeled runs are the start models (default: "
        "--work); a start model not finished there is trained there by the quality benchmark's code.",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", default="acdc_cpu", help="Result names: annotation_loop_<tag>.*")
    parser.add_argument(
        "--reuse-only", action="store_true", help="Only assemble the report from the records."
    )
    args = parser.parse_args(argv)
    try:
        args.arm_specs = [parse_arm(name) for name in dict.fromkeys(args.arms)]
    except ValueError as problem:
        parser.error(str(problem))
    if args.rounds < 1 or args.fine_tune_iterations < 1:
        parser.error("--rounds and --fine-tune-iterations: at least 1")
    args.dataset, args.la_holdout = "acdc", 0  # what quality.load_splits reads
    return args


def protocol_preset(args) -> quality.Preset:
    """The quality protocol's ACDC CPU preset at 3 labeled patients (its iterations as overridden)."""
    preset = copy.deepcopy(quality.PRESETS[("acdc", "cpu")])
    preset.labeled_count = START_LABELED
    if args.iterations is not None:
        preset.iterations = args.iterations
    if args.pretrain_iterations is not None:
        preset.pretrain_iterations = args.pretrain_iterations
    return preset


def quality_tag(args) -> str:
    """The quality benchmark's tag of the start models (its folder in --work)."""
    preset = quality.PRESETS[("acdc", "cpu")]
    changed = args.iterations not in (None, preset.iterations) or args.pretrain_iterations not in (
        None,
        preset.pretrain_iterations,
    )
    return f"acdc_cpu_{START_LABELED}labeled" + (f"_{args.tag}" if changed else "")


def listed_names(args) -> tuple[list[str], list[str]]:
    """The pool's patients and the scored volumes, from the data set's lists (no image read)."""
    from buseg.data.sources.acdc import acdc_split as labeled_split

    _, unlabeled = labeled_split(args.data_root, START_LABELED)
    patients = sorted({annotators.patient_of(name) for name in unlabeled})
    selection, evaluation = quality.acdc_split(args.data_root)
    volumes = [*selection, *evaluation]  # quality's order: the selection half, then the evaluation half
    return patients[: args.pool_patients] if args.pool_patients else patients, volumes[: args.volumes]


def main(argv: list[str] | None = None) -> int:
    from buseg.errors import BusegError

    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(args)
    except BusegError as problem:  # a missing list or data file: its path and the problem, no traceback
        raise SystemExit(f"annotation loop: {problem}") from None
    return 0


def run(args: argparse.Namespace) -> None:
    """Every asked arm and seed not recorded yet, then the report from the records."""
    preset = protocol_preset(args)
    quality_work = (args.quality_work or args.work) / quality_tag(args)
    loop_root = args.work / f"annotation_loop_{args.tag}"
    records = args.out / RECORDS_FOLDER / f"annotation_loop_{args.tag}"
    pool_names, volume_names = listed_names(args)
    loops: dict[int, tuple[Loop, Path]] = {}
    for seed in args.seeds:
        for arm in args.arm_specs:
            settings = arm_settings(arm, preset, args, seed, quality_work, pool_names, volume_names)
            path = records / f"{arm.name}_seed{seed}.json"
            recorded = read_loop_record(path, settings, None) if path.exists() else None
            if args.reuse_only or (recorded is not None and len(recorded["rounds"]) >= args.rounds):
                continue  # nothing with a whole record is made again
            if seed not in loops:
                loops[seed] = prepare_seed(args, preset, seed, quality_work, loop_root)
            loop, start = loops[seed]
            run_arm(loop, arm, start, start_scores(loop, start), path, settings)
    assemble(args, preset, quality_work, records, pool_names, volume_names)


def prepare_seed(
    args, preset: quality.Preset, seed: int, quality_work: Path, loop_root: Path
) -> tuple[Loop, Path]:
    """The seed's data, pool, held-out volumes and start model."""
    loop_root.mkdir(parents=True, exist_ok=True)
    base, evaluation = quality.load_splits(preset, args, loop_root)  # its split lists go to our folder
    volumes = [*base.validation, *evaluation][: args.volumes]
    pool, truth = acdc_pool(args.data_root, base, args.pool_patients)
    start = start_model(preset, args, seed, quality_work, base)
    device = args.device if args.device != "auto" else "cpu"
    loop = Loop(
        args, preset, seed, base, pool, truth, volumes, loop_root, ToolPredictor(device, base.spacing_mm)
    )
    return loop, start


def check_one_start_per_seed(records: list[dict], folder: Path) -> None:
    """Arms are compared paired by seed, so every record of a seed must start from the same model
    (a start model trained again, on another machine or engine, makes another one)."""
    by_seed: dict[int, dict[str, list[str]]] = {}
    for record in records:
        identity = str(record["start"].get("model_weights_sha256"))
        by_seed.setdefault(record["seed"], {}).setdefault(identity, []).append(record["arm"])
    for seed, starts in sorted(by_seed.items()):
        if len(starts) > 1:
            listing = "; ".join(
                f"{', '.join(arms)} from {identity[:12]}" for identity, arms in starts.items()
            )
            raise SystemExit(
                f"{folder}: the records of seed {seed} start from different models ({listing}); "
                "re-run or remove the older ones; nothing written"
            )


def assemble(args, preset, quality_work: Path, records: Path, pool: list[str], volumes: list[str]) -> None:
    """The report from every record of the asked arms and seeds made with these settings."""
    found, missing = [], []
    for seed in args.seeds:
        for arm in args.arm_specs:
            settings = arm_settings(arm, preset, args, seed, quality_work, pool, volumes)
            record = read_loop_record(records / f"{arm.name}_seed{seed}.json", settings, None)
            if record is None or not record["rounds"]:
                missing.append(f"{arm.name} (seed {seed})")
            else:
                found.append(record)
                first = len(record["rounds"]) + 1
                if first < args.rounds:
                    missing.append(f"{arm.name} (seed {seed}) rounds {first}-{args.rounds}")
                elif first == args.rounds:
                    missing.append(f"{arm.name} (seed {seed}) round {first}")
    if not found:  # a mistyped --tag must not replace a report with an empty one
        raise SystemExit(f"no loop record in {records} for these arms, seeds and settings; nothing written")
    check_one_start_per_seed(found, records)
    seven = seven_labeled_dice(args.out / RECORDS_FOLDER / "acdc_cpu_7labeled")
    write_report(report_rows(found), args.out, args.tag, args.rounds, seven, missing)
    print(f"report: {args.out / f'annotation_loop_{args.tag}.md'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
