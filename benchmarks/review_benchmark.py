"""Review benchmark: does the tool tell a reviewer where to look?

A simulated reviewer fixes exactly what they are pointed to (every wrong voxel there gets
its true class) on whole ACDC validation volumes, and the mean foreground Dice after the
fix is compared with pointing them elsewhere:

* **slices**: the first k = 1, 2, 3 slices of the tool's slice order (``slice_review`` in
  regions.json: expected error per slice, uncertainty and shape flags), of the summed
  uncertainty alone, of a perfect ranking (most wrong voxels first) and of random choice
  (the mean over ``--random-draws`` draws);
* **regions**: the boxes of the first n = 1, 3, 5 listed regions (every wrong voxel inside
  the union of the boxes is fixed), against the same regions in a perfect order (most
  wrong voxels in the box first) and in random order, with the share of the volume the
  boxes hold;
* **voxels**: the 1% most uncertain voxels, and the 1% most suspicious (the chance of an
  error from uncertainty and shape flags together: what the regions are ranked by).

Regions, flags and the slice order come from the same code as ``buseg predict``
(:func:`buseg.prediction.case.review_regions` with a :class:`~buseg.config.PredictConfig`). It
also measures, per shape flag reason, the share of flagged voxels that are wrong.

Usage (models from ``python -m benchmarks.quality``, e.g. the copy-paste pre-training and BCP)::

    python -m benchmarks.review_benchmark --data-root ../shared/data/ACDC \\
        --model pre-training=benchmarks/work/.../pretrain_seed1337/model.pt \\
        --model bcp=benchmarks/work/.../bcp_seed1337/final.pt --out benchmarks/results --tag acdc_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.paths import module_command, shown_command
from buseg.config import PredictConfig, TrainConfig
from buseg.data.training_data import ValidationCase, load_training_data
from buseg.evaluation.simulated_review import flag_budget, mean_foreground_dice
from buseg.files.images import Volume
from buseg.model.checkpoint import LoadedModel, load_model
from buseg.model.uncertainty import normalized_entropy
from buseg.prediction.case import review_regions
from buseg.prediction.shape_flags import REASONS, expected_error_map, parse_nesting_rules, shape_flag_map
from buseg.prediction.windows import predict_probabilities

ROOT = Path(__file__).resolve().parents[1]
COMMAND = module_command(__file__)

SLICE_COUNTS = (1, 2, 3)
REGION_COUNTS = (1, 3, 5)
VOXEL_BUDGET = 0.01
ACDC_NESTING = ["left ventricle:myocardium"]


@dataclass
class CaseMaps:
    """One volume's prediction and what the review step derives from it (numpy order z, y, x)."""

    name: str
    truth: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray
    error_chance: np.ndarray
    flags: np.ndarray
    regions: list[dict]
    slice_order: list[int]
    slice_axis_numpy: int


def load_cases(data_root: Path) -> list[ValidationCase]:
    """The validation volumes of val.list (the labeled slices are loaded too: the loader's way)."""
    config = TrainConfig()
    config.data.source, config.data.data_root = "acdc", str(data_root)
    config.method.name = "supervised"  # no unlabeled slices are read
    return load_training_data(config, log=lambda message: None).validation


def case_maps(model: LoadedModel, case: ValidationCase, config: PredictConfig) -> CaseMaps:
    probabilities = predict_probabilities(
        model.network,
        case.image,
        dimension=model.dimension,
        patch_size_xyz=model.patch_size_xyz,
        slice_axis=model.slice_axis,
    )
    labels = probabilities.argmax(0).numpy().astype(np.uint8)
    uncertainty = normalized_entropy(probabilities[None])[0].numpy()
    reference = Volume(np.zeros(case.image.shape, dtype=np.float32), case.spacing_mm, (0.0,) * 3, _identity())
    names = [c["name"] for c in model.classes]
    nesting = parse_nesting_rules(config.nesting, names)
    region_set = review_regions(model, labels, uncertainty, reference, config, nesting)
    axis_numpy = 2 - region_set.slice_review["axis_ijk"]
    flags = shape_flag_map(labels, model.num_classes, axis_numpy, nesting=nesting)
    return CaseMaps(
        case.name,
        case.labels,
        labels,
        uncertainty,
        expected_error_map(uncertainty, flags if config.shape_flags else None),
        flags,
        [r.to_dict() for r in region_set.regions],
        [s["index"] for s in region_set.slice_review["slices"]],
        axis_numpy,
    )


def _identity() -> tuple[float, ...]:
    return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def fixed_dice(maps: CaseMaps, where: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice after every wrong voxel in ``where`` got its true class."""
    return mean_foreground_dice(np.where(where, maps.truth, maps.labels), maps.truth, num_classes)


def slice_mask(maps: CaseMaps, slices: list[int]) -> np.ndarray:
    mask = np.zeros(maps.truth.shape, dtype=bool)
    np.moveaxis(mask, maps.slice_axis_numpy, 0)[list(slices)] = True
    return mask


def box_mask(shape: tuple[int, ...], regions: list[dict]) -> np.ndarray:
    """Union of the regions' voxel boxes (bbox_ijk_* are inclusive, in i, j, k order)."""
    mask = np.zeros(shape, dtype=bool)
    for region in regions:
        low, high = region["bbox_ijk_min"][::-1], region["bbox_ijk_max"][::-1]
        mask[tuple(slice(a, b + 1) for a, b in zip(low, high, strict=True))] = True
    return mask


def slice_figures(maps: CaseMaps, num_classes: int, rng: np.random.Generator, draws: int) -> dict:
    axis = maps.slice_axis_numpy
    errors = maps.labels != maps.truth
    wrong_per_slice = np.moveaxis(errors, axis, 0).sum(axis=(1, 2))
    uncertainty_per_slice = np.moveaxis(maps.uncertainty, axis, 0).sum(axis=(1, 2), dtype=np.float64)
    count = errors.shape[axis]
    tool = maps.slice_order + [k for k in range(count) if k not in maps.slice_order]
    orders = {
        "tool": tool,
        "uncertainty": list(np.argsort(-uncertainty_per_slice, kind="stable")),
        "perfect": list(np.argsort(-wrong_per_slice, kind="stable")),
    }
    out = {}
    for k in SLICE_COUNTS:
        for name, order in orders.items():
            out[f"slices{k}_{name}"] = fixed_dice(maps, slice_mask(maps, order[:k]), num_classes)
        out[f"slices{k}_random"] = float(
            np.mean(
                [
                    fixed_dice(
                        maps,
                        slice_mask(maps, list(rng.choice(count, min(k, count), replace=False))),
                        num_classes,
                    )
                    for _ in range(draws)
                ]
            )
        )
        out[f"slices{k}_share"] = min(k, count) / count
    return out


def region_figures(maps: CaseMaps, num_classes: int, rng: np.random.Generator, draws: int) -> dict:
    errors = maps.labels != maps.truth
    shape = maps.truth.shape
    wrong_in_box = [int(errors[box_mask(shape, [r])].sum()) for r in maps.regions]
    perfect = [maps.regions[i] for i in np.argsort(-np.array(wrong_in_box, dtype=np.int64), kind="stable")]
    out = {}
    for n in REGION_COUNTS:
        chosen = box_mask(shape, maps.regions[:n])
        out[f"regions{n}_tool"] = fixed_dice(maps, chosen, num_classes)
        out[f"regions{n}_share"] = float(chosen.mean())
        out[f"regions{n}_recall"] = float((errors & chosen).sum() / max(1, errors.sum()))
        out[f"regions{n}_perfect"] = fixed_dice(maps, box_mask(shape, perfect[:n]), num_classes)
        picks = [rng.permutation(len(maps.regions))[:n] for _ in range(draws)] if maps.regions else []
        out[f"regions{n}_random"] = (
            float(
                np.mean(
                    [
                        fixed_dice(maps, box_mask(shape, [maps.regions[i] for i in p]), num_classes)
                        for p in picks
                    ]
                )
            )
            if picks
            else mean_foreground_dice(maps.labels, maps.truth, num_classes)
        )
    first = maps.regions[0] if maps.regions else None
    axis_ijk = 2 - maps.slice_axis_numpy
    out["region1_slices"] = (
        first["bbox_ijk_max"][axis_ijk] - first["bbox_ijk_min"][axis_ijk] + 1 if first else 0
    )
    out["regions_listed"] = len(maps.regions)
    for reason in ("uncertainty", *REASONS):
        out[f"top5_{reason}"] = sum(r["reason"] == reason for r in maps.regions[:5])
    return out


def voxel_figures(maps: CaseMaps, num_classes: int) -> dict:
    errors = maps.labels != maps.truth
    total = max(1, int(errors.sum()))
    out = {"error_fraction": float(errors.mean())}
    # Flags give many voxels the same chance; the uncertainty breaks those ties.
    scores = {"uncertainty": maps.uncertainty, "suspicious": maps.error_chance + 1e-3 * maps.uncertainty}
    for name, score in scores.items():
        flagged = flag_budget(score, VOXEL_BUDGET)
        out[f"voxels_{name}_recall"] = float((errors & flagged).sum() / total)
        out[f"voxels_{name}"] = fixed_dice(maps, flagged, num_classes)
    # Calibration: how often a voxel of each uncertainty band (tenths) is wrong.
    band = np.minimum((maps.uncertainty * 10).astype(np.int64), 9).ravel()
    out["band_voxels"] = np.bincount(band, minlength=10).tolist()
    out["band_wrong"] = np.bincount(band, weights=errors.ravel(), minlength=10).astype(np.int64).tolist()
    for code, reason in enumerate(REASONS, start=1):
        flagged = maps.flags == code
        out[f"flag_{reason}_voxels"] = int(flagged.sum())
        out[f"flag_{reason}_wrong"] = int((flagged & errors).sum())
    return out


def evaluate(
    model_path: Path, cases: list[ValidationCase], config: PredictConfig, draws: int, seed: int
) -> dict:
    model = load_model(model_path, device="cpu")
    rng = np.random.default_rng(seed)
    per_case = []
    for case in cases:
        maps = case_maps(model, case, config)
        row = {"case": case.name, "dice": mean_foreground_dice(maps.labels, maps.truth, model.num_classes)}
        row.update(slice_figures(maps, model.num_classes, rng, draws))
        row.update(region_figures(maps, model.num_classes, rng, draws))
        row.update(voxel_figures(maps, model.num_classes))
        per_case.append(row)
    keys = [k for k in per_case[0] if k != "case"]
    summary = {
        k: float(np.mean([c[k] for c in per_case])) for k in keys if not k.startswith(("flag_", "band_"))
    }
    voxels, wrong = (np.sum([c[f"band_{w}"] for c in per_case], axis=0) for w in ("voxels", "wrong"))
    summary["error_rate_by_uncertainty_tenth"] = [
        float(w / v) if v else None for w, v in zip(wrong, voxels, strict=True)
    ]
    for reason in REASONS:
        voxels = sum(c[f"flag_{reason}_voxels"] for c in per_case)
        wrong = sum(c[f"flag_{reason}_wrong"] for c in per_case)
        summary[f"flag_{reason}_voxels_per_volume"] = voxels / len(per_case)
        summary[f"flag_{reason}_precision"] = wrong / voxels if voxels else float("nan")
    return {"summary": summary, "cases": per_case}


def gain_share(summary: dict, k: int, name: str) -> float:
    """The share of the perfect ranking's Dice gain that ``name``'s first k slices reach."""
    perfect = summary[f"slices{k}_perfect"] - summary["dice"]
    return (summary[f"slices{k}_{name}"] - summary["dice"]) / perfect if perfect > 0 else float("nan")


def model_table(label: str, summary: dict) -> list[str]:
    s, pct = summary, lambda v: f"{100 * v:.1f}"
    lines = [
        f"**{label}** (wrong voxels: {100 * s['error_fraction']:.2f}% of a volume; Dice before review "
        f"{pct(s['dice'])})",
        "",
        "| the reviewer is pointed to | Dice after | share of the perfect ranking's gain | share of the volume |",
        "|---|---|---|---|",
        f"| nothing | {pct(s['dice'])} | | 0% |",
        f"| the 1% most uncertain voxels ({pct(s['voxels_uncertainty_recall'])}% of the wrong voxels) | "
        f"{pct(s['voxels_uncertainty'])} | | 1% |",
        f"| the 1% most suspicious voxels, uncertainty and shape flags "
        f"({pct(s['voxels_suspicious_recall'])}% of the wrong voxels) | {pct(s['voxels_suspicious'])} | | 1% |",
    ]
    for k in SLICE_COUNTS:
        share = f"{pct(s[f'slices{k}_share'])}%"
        lines += [
            f"| the tool's first {k} slice(s) | {pct(s[f'slices{k}_tool'])} | {pct(gain_share(s, k, 'tool'))}% | {share} |",
            f"| {k} slice(s) with the most summed uncertainty | {pct(s[f'slices{k}_uncertainty'])} | "
            f"{pct(gain_share(s, k, 'uncertainty'))}% | {share} |",
            f"| {k} slice(s) with the most wrong voxels (perfect) | {pct(s[f'slices{k}_perfect'])} | 100% | {share} |",
            f"| {k} random slice(s) | {pct(s[f'slices{k}_random'])} | {pct(gain_share(s, k, 'random'))}% | {share} |",
        ]
    for n in REGION_COUNTS:
        share = f"{100 * s[f'regions{n}_share']:.2f}%"
        lines += [
            f"| the first {n} listed region(s)' boxes ({pct(s[f'regions{n}_recall'])}% of the wrong voxels) | "
            f"{pct(s[f'regions{n}_tool'])} | | {share} |",
            f"| the same regions, {n} with the most wrong voxels (perfect order) | {pct(s[f'regions{n}_perfect'])} | | |",
            f"| {n} random listed region(s) | {pct(s[f'regions{n}_random'])} | | |",
        ]
    reasons = ", ".join(f"{r} {s[f'top5_{r}']:.1f}" for r in ("uncertainty", *REASONS) if s[f"top5_{r}"] > 0)
    flags = ", ".join(
        f"{r} {s[f'flag_{r}_voxels_per_volume']:.0f} voxels ({pct(s[f'flag_{r}_precision'])}% wrong)"
        for r in REASONS
        if s[f"flag_{r}_voxels_per_volume"] > 0
    )
    lines += [
        "",
        f"The first region spans {s['region1_slices']:.1f} slice(s); {s['regions_listed']:.1f} regions listed per "
        f"volume; reasons of the first 5 (per volume): {reasons}. Shape flags per volume: {flags or 'none'}.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "ACDC")
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="A model to measure (repeatable).",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--tag", default="acdc_cpu")
    parser.add_argument("--random-draws", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="Only the first N volumes (a quick look).")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=JSON",
        help="PredictConfig fields, e.g. region_extent_mm=40",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = PredictConfig(nesting=list(ACDC_NESTING))
    for assignment in args.set:
        name, value = assignment.split("=", 1)
        setattr(config, name, json.loads(value))
    config.model_path = "(each --model)"  # validate() needs one; the models are loaded per label
    config.validate()
    cases = load_cases(args.data_root)[: args.limit or None]
    start = time.time()
    results, lines = {}, []
    for item in args.model:
        label, path = item.split("=", 1)
        results[label] = evaluate(Path(path), cases, config, args.random_draws, args.seed)
        results[label]["model"] = path
        lines += model_table(label, results[label]["summary"])
        print("\n".join(model_table(label, results[label]["summary"])), flush=True)
    command = shown_command(COMMAND, argv if argv is not None else sys.argv[1:])
    header = [
        f"# Review benchmark ({args.tag}): {len(cases)} validation volumes",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; {time.time() - start:.0f} s. "
        f"Settings: {json.dumps({k: getattr(config, k) for k in ('region_threshold', 'min_region_mm3', 'region_slices', 'region_extent_mm', 'shape_flags', 'nesting')})}",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"review_{args.tag}.md").write_text("\n".join(header + lines))
    document = {"command": command, "cases": len(cases), "settings": config.__dict__, "models": results}
    (args.out / f"review_{args.tag}.json").write_text(json.dumps(document, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
