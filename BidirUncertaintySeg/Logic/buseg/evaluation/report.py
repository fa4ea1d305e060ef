"""The demo's report: the comparison table (terminal, markdown) and ``report.png``.

``report.png`` is one figure: for one test volume, two axial slices with the image, the
ground truth, both models' predictions and our model's uncertainty heat map with the
flagged regions outlined (numbered as in ``regions.json``: 1 = review first); below, the
training curves (validation Dice and training loss over iterations, from each run's
``history.json``) and the metric table.

matplotlib is used through its Agg canvas only (no pyplot): nothing here picks a GUI
backend, so the engine stays free of Qt inside Slicer as well.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from buseg.files.safe_files import atomic_path
from buseg.metrics import dice_per_class

# Colors of the two methods in curves and table headers (ours stands out).
METHOD_COLORS = {"supervised": "#5b7fa6", "buarl": "#e0663a"}
SHARED_COLOR = "#9a9a9a"
REGION_COLOR = "#3fe0ff"
OUTLINED_REGIONS = 10  # the first regions of regions.json are outlined, the first few numbered
NUMBERED_REGIONS = 5


# --------------------------------------------------------------------------------------
# The comparison table


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f}"


def _mm(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def comparison_rows(comparison: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(method titles, rows of (label, one value per method)) - the table every view shares."""
    methods = comparison["methods"]
    keys = list(methods)
    budget = comparison["review_budget_fraction"]
    shared = comparison["shared"]
    classes = list(methods[keys[0]]["test"]["classes"])
    rows: list[tuple[str, list[str]]] = [
        (
            f"Dice % (mean of {len(classes)} classes)",
            [_pct(methods[k]["test"]["mean"]["dice"]) for k in keys],
        ),
    ]
    rows += [
        (f"  {name}", [_pct(methods[k]["test"]["classes"][name]["dice"]) for k in keys]) for name in classes
    ]
    rows += [
        ("Jaccard %", [_pct(methods[k]["test"]["mean"]["jaccard"]) for k in keys]),
        ("HD95 mm", [_mm(methods[k]["test"]["mean"]["hd95_mm"]) for k in keys]),
        ("ASD mm", [_mm(methods[k]["test"]["mean"]["asd_mm"]) for k in keys]),
        (
            f"Errors in the {_pct(budget, 0)}% most uncertain voxels",
            [f"{_pct(methods[k]['review']['review_error_recall'], 0)}%" for k in keys],
        ),
        ("Dice % after fixing those voxels", [_pct(methods[k]["review"]["review_dice_after"]) for k in keys]),
        (
            "Best validation Dice % (iteration)",
            [
                f"{_pct(methods[k]['training']['best_validation_dice'])} ({methods[k]['training']['best_iteration']})"
                if methods[k]["training"]["best_validation_dice"] is not None
                else "-"
                for k in keys
            ],
        ),
        (
            "Iterations: shared + own (batch)",
            [
                f"{shared['iterations']}+{methods[k]['training']['branch_iterations']} "
                f"({methods[k]['training']['batch_size']})"
                for k in keys
            ],
        ),
        (
            # Older comparisons (before the demo fixed its precision) do not say it.
            f"Training time{f' ({precision})' if (precision := comparison.get('precision')) else ''}: shared + own",
            [f"{shared['seconds']:.0f}+{methods[k]['training']['branch_seconds']:.0f} s" for k in keys],
        ),
    ]
    return [methods[k]["title"] for k in keys], rows


def format_comparison(comparison: dict[str, Any]) -> str:
    """The table for the terminal."""
    titles, rows = comparison_rows(comparison)
    label_width = max(len(label) for label, _ in rows) + 2
    widths = [max(len(t), *(len(v[i]) for _, v in rows)) + 3 for i, t in enumerate(titles)]
    cases = len(comparison["cases"])
    header = f"{f'Test volumes: {cases} (never seen in training)':<{label_width}}" + "".join(
        f"{t:>{w}}" for t, w in zip(titles, widths, strict=True)
    )
    lines = [header, "-" * len(header)]
    lines += [
        f"{label:<{label_width}}" + "".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True))
        for label, values in rows
    ]
    return "\n".join(lines)


def write_comparison_markdown(path: Path, comparison: dict[str, Any]) -> Path:
    titles, rows = comparison_rows(comparison)
    lines = [
        f"| {len(comparison['cases'])} test volumes | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(titles),
    ]
    lines += ["| " + label.strip() + " | " + " | ".join(values) + " |" for label, values in rows]
    with atomic_path(path, overwrite=True) as temp:
        temp.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------
# Slices


def _listed_region_masks(
    uncertainty: np.ndarray, regions: list[dict[str, Any]], threshold: float
) -> list[tuple[int, np.ndarray]]:
    """(rank, voxel mask) of each listed region: its box's voxels above the threshold (review regions
    are cut per slice and tile, so the box holds the region's uncertain voxels), or the whole box for
    a shape flag's region (a confident miss: no voxel there is uncertain)."""
    masks = []
    for region in regions:
        low, high = region["bbox_ijk_min"][::-1], region["bbox_ijk_max"][::-1]  # (k, j, i) = numpy order
        box = tuple(slice(a, b + 1) for a, b in zip(low, high, strict=True))
        mask = np.zeros(uncertainty.shape, dtype=bool)
        by_uncertainty = region.get("reason", "uncertainty") == "uncertainty"
        mask[box] = uncertainty[box] > threshold if by_uncertainty else True
        masks.append((int(region["id"]), mask))
    return masks


def choose_slices(
    truth: np.ndarray, ours: np.ndarray, regions: list[dict[str, Any]]
) -> list[tuple[int, str]]:
    """Two axial slices (numpy z) worth showing, and why: most structure; our top flagged region."""
    area = (truth > 0).sum(axis=(1, 2))
    first = int(area.argmax())
    second, why = None, ""
    for region in regions:
        k = round(region["centroid_ijk"][2])
        if k != first:
            second, why = k, f"through flagged region {region['id']} (review first)"
            break
    if second is None:
        errors = (ours != truth).sum(axis=(1, 2))
        errors[first] = -1
        second, why = int(errors.argmax()), "with the most errors of ours"
    return [(first, "with the most structure"), (second, why)]


def _overlay(
    ax: Any, image: np.ndarray, labels: np.ndarray | None, colors: dict[int, Any], aspect: float
) -> None:
    ax.imshow(image, cmap="gray", aspect=aspect, interpolation="nearest")
    if labels is not None:
        rgba = np.zeros((*labels.shape, 4))
        for value, color in colors.items():
            rgba[labels == value] = (*color, 0.55)
        ax.imshow(rgba, aspect=aspect, interpolation="nearest")
        for value, color in colors.items():
            if (labels == value).any():
                ax.contour(labels == value, levels=[0.5], colors=[color], linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])


def _dice(prediction: np.ndarray, truth: np.ndarray, values: list[int]) -> float:
    """Mean Dice over the label ``values`` (a class absent from both counts as 1)."""
    return float(np.mean(dice_per_class(prediction, truth, values)))


# --------------------------------------------------------------------------------------
# The figure


def _load_case(out_dir: Path, method: str, case: str) -> dict[str, Any]:
    from buseg.files.images import read_image, read_label

    folder = out_dir / "predictions" / method
    summary = json.loads((folder / "summary.json").read_text())
    entry = next(c for c in summary["cases"] if c["case"] == case)
    regions = json.loads((folder / entry["outputs"]["regions"]).read_text())
    return {
        "labels": read_label(folder / entry["outputs"]["label"]).array,
        "uncertainty": read_image(folder / entry["outputs"]["uncertainty"]).array,
        "regions": regions,
        "classes": summary["classes"],
        "threshold": summary["config"]["region_threshold"],
    }


def _history(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


@dataclass
class _CaseView:
    """What the slice panels show of one test volume: image, truth, both models' outputs, flagged regions."""

    image: np.ndarray
    truth: np.ndarray
    cases: dict[str, dict[str, Any]]  # method -> _load_case
    classes: list[dict[str, Any]]  # the foreground classes
    colors: dict[int, tuple[float, ...]]  # label value -> color
    region_masks: list[tuple[int, np.ndarray]]
    slices: list[tuple[int, str]]
    aspect: float
    window: tuple[float, float]  # intensities shown from black to white

    @classmethod
    def load(cls, comparison: dict[str, Any], out_dir: Path, case: str) -> _CaseView:
        from buseg.files.images import read_image, read_label

        image_volume = read_image(out_dir / "data" / "test" / "images" / f"{case}.nii.gz")
        image = image_volume.array
        truth = read_label(out_dir / "data" / "test" / "labels" / f"{case}.nii.gz").array
        cases = {m: _load_case(out_dir, m, case) for m in comparison["methods"]}
        ours = cases["buarl"]
        classes = [c for c in ours["classes"] if c["index"] > 0]
        regions = ours["regions"]["regions"]
        spacing = image_volume.spacing_mm
        low, high = np.percentile(image, [0.5, 99.5])
        return cls(
            image=image,
            truth=truth,
            cases=cases,
            classes=classes,
            colors={int(c["label_value"]): tuple(c["color"]) for c in classes},
            region_masks=_listed_region_masks(
                ours["uncertainty"], regions[:OUTLINED_REGIONS], ours["threshold"]
            ),
            slices=choose_slices(truth, ours["labels"], regions),
            aspect=spacing[1] / spacing[0],  # rows are y, columns x
            window=(low, high),
        )

    @property
    def ours(self) -> dict[str, Any]:
        return self.cases["buarl"]

    @property
    def supervised(self) -> dict[str, Any]:
        return self.cases["supervised"]

    def shown(self, k: int) -> np.ndarray:
        """Axial slice ``k`` of the image, windowed to 0..1."""
        low, high = self.window
        return np.clip((self.image[k] - low) / max(high - low, 1e-6), 0, 1)

    def column_titles(self) -> list[str]:
        values = list(self.colors)
        return [
            "Image",
            "Ground truth",
            f"Supervised (volume Dice {_pct(_dice(self.supervised['labels'], self.truth, values))}%)",
            f"Ours (volume Dice {_pct(_dice(self.ours['labels'], self.truth, values))}%)",
            "Ours: uncertainty, flagged regions",
        ]


class _ReportFigure:
    """``report.png``, drawn part by part from the top: heading, slice rows, legend, curves and table."""

    def __init__(self, comparison: dict[str, Any], view: _CaseView, case: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.comparison = comparison
        self.view = view
        self.case = case
        self.figure = Figure(figsize=(15, 12), dpi=100, facecolor="white")
        FigureCanvasAgg(self.figure)
        self.grid = self.figure.add_gridspec(
            4,
            5,
            height_ratios=[1, 1, 0.12, 1.05],
            hspace=0.2,
            wspace=0.05,
            left=0.045,
            right=0.94,
            top=0.865,
            bottom=0.05,
        )

    def draw(self) -> None:
        self._heading()
        titles = self.view.column_titles()
        for row, (k, why) in enumerate(self.view.slices):
            self._slice_row(row, k, why, titles if row == 0 else None)
        self._legend()
        bottom = self.grid[3, :].subgridspec(1, 3, width_ratios=[1.55, 1.0, 1.75], wspace=0.22)
        curves = self.figure.add_subplot(bottom[0])
        losses = self.figure.add_subplot(bottom[1])
        _draw_training_curves(curves, losses, self.comparison)
        _draw_metric_table(self.figure.add_subplot(bottom[2]), self.comparison)

    def save(self, path: Path) -> None:
        with atomic_path(path, overwrite=True) as temp:
            self.figure.savefig(temp, format="png", dpi=100, facecolor="white")

    def _heading(self) -> None:
        comparison = self.comparison
        self.figure.text(
            0.045,
            0.965,
            "buseg demo: semi-supervised segmentation with voxel-wise uncertainty",
            fontsize=16,
            fontweight="bold",
            ha="left",
        )
        ours_training = comparison["methods"]["buarl"]["training"]
        description = (
            f"Synthetic 3D volumes with known truth; test volume {self.case} was never seen in training. Both "
            f"models: 2D U-Net, {ours_training['iterations']} iterations of batch {ours_training['batch_size']} "
            f"(plan '{comparison['plan']}', seed {comparison['seed']}, "
            f"{comparison.get('precision', 'precision not recorded')}), the first "
            f"{comparison['shared']['iterations']} shared. Then ours learns from the labeled and the unlabeled "
            "volumes (copy-paste self-training with uncertainty-aware region learning); the supervised "
            "baseline from the labeled volumes only."
        )
        # Wrapped to the figure's width: the precision made the first line run off the page.
        self.figure.text(
            0.045,
            0.937,
            textwrap.fill(description, width=165),
            fontsize=10.5,
            color="#333333",
            ha="left",
            va="top",
            linespacing=1.5,
        )

    def _slice_row(self, row: int, k: int, why: str, titles: list[str] | None) -> None:
        """One slice: image, truth, both predictions; then our uncertainty. ``titles`` for the first row only."""
        view = self.view
        shown = view.shown(k)
        panels = [None, view.truth[k], view.supervised["labels"][k], view.ours["labels"][k]]
        for column, labels in enumerate(panels):
            ax = self.figure.add_subplot(self.grid[row, column])
            _overlay(ax, shown, labels, view.colors, view.aspect)
            if titles is not None:
                ax.set_title(titles[column], fontsize=11.5)
            if column == 0:
                ax.set_ylabel(f"slice k={k}\n{why}", fontsize=10)
        self._uncertainty_panel(row, k, shown, titles[4] if titles is not None else None)

    def _uncertainty_panel(self, row: int, k: int, shown: np.ndarray, title: str | None) -> None:
        view = self.view
        ax = self.figure.add_subplot(self.grid[row, 4])
        ax.imshow(shown, cmap="gray", aspect=view.aspect, interpolation="nearest")
        heat = ax.imshow(
            np.ma.masked_less(view.ours["uncertainty"][k], 0.02),
            cmap="inferno",
            vmin=0,
            vmax=1,
            alpha=0.85,
            aspect=view.aspect,
            interpolation="nearest",
        )
        _outline_regions(ax, view.region_masks, k)
        ax.set_xticks([])
        ax.set_yticks([])
        if title is not None:
            ax.set_title(title, fontsize=11.5)
        bar_axes = ax.inset_axes([1.04, 0.0, 0.05, 1.0])
        bar = self.figure.colorbar(heat, cax=bar_axes)
        bar.ax.tick_params(labelsize=8.5)
        if row == 1:
            bar.set_label("uncertainty (normalised entropy)", fontsize=9)

    def _legend(self) -> None:
        from matplotlib.patches import Patch

        view = self.view
        legend = [
            Patch(facecolor=color, label=c["name"])
            for c, color in zip(view.classes, view.colors.values(), strict=True)
        ]
        legend.append(
            Patch(
                facecolor="none",
                edgecolor=REGION_COLOR,
                linewidth=1.5,
                label=f"flagged region (uncertainty > {view.ours['threshold']:g}), the first {NUMBERED_REGIONS} "
                "numbered in review order",
            )
        )
        legend_axes = self.figure.add_subplot(self.grid[2, :])
        legend_axes.axis("off")
        legend_axes.legend(handles=legend, loc="center", ncol=len(legend), frameon=False, fontsize=10.5)


def _outline_regions(ax: Any, region_masks: list[tuple[int, np.ndarray]], k: int) -> None:
    """The listed regions that cross slice ``k``, outlined; the first :data:`NUMBERED_REGIONS` numbered."""
    for rank, mask in region_masks:
        if mask[k].any():
            ax.contour(mask[k], levels=[0.5], colors=[REGION_COLOR], linewidths=1.3)
            if rank <= NUMBERED_REGIONS:
                ys, xs = np.nonzero(mask[k])
                ax.text(
                    min(xs.max() + 1.5, mask.shape[2] - 2),
                    max(ys.min(), 1),
                    str(rank),
                    color=REGION_COLOR,
                    fontsize=11,
                    fontweight="bold",
                    va="top",
                )


def _draw_training_curves(curves: Any, losses: Any, comparison: dict[str, Any]) -> None:
    """Validation Dice (``curves``) and training loss (``losses``) of the shared start and both branches."""
    start = comparison["shared"]["iterations"]
    join = _plot_shared_start(curves, losses, comparison["shared"])
    for method, info in comparison["methods"].items():
        _plot_branch(curves, losses, method, info, start, join)
    for ax in (curves, losses):
        ax.axvline(start, color="#888888", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
        ax.set_xlabel("iteration")
    curves.text(start, 97, " two branches from here", fontsize=9, color="#555555", va="top")
    curves.set_ylim(0, 100)
    curves.set_ylabel("validation Dice %")
    curves.set_title("Validation Dice during training (star: the model kept)", fontsize=11.5)
    curves.legend(loc="lower right", fontsize=9.5)
    losses.set_title("Training loss (each method's own terms)", fontsize=11.5)
    losses.set_ylim(bottom=0)


def _plot_shared_start(curves: Any, losses: Any, shared: dict[str, Any]) -> tuple[int, float] | None:
    """The shared start's curves; returns its last validation point (where the branches' curves begin)."""
    history = _history(shared["history"])
    validation = history.get("validation", [])
    if validation:
        curves.plot(
            [v["iteration"] for v in validation],
            [100 * v["dice"] for v in validation],
            "-o",
            color=SHARED_COLOR,
            label="shared supervised start",
            markersize=3.5,
            linewidth=1.8,
        )
    loss = history.get("losses", [])
    if loss:
        losses.plot(
            [v["iteration"] for v in loss],
            [v["total"] for v in loss],
            color=SHARED_COLOR,
            linewidth=1.2,
        )
    return (shared["iterations"], 100 * validation[-1]["dice"]) if validation else None


def _plot_branch(
    curves: Any, losses: Any, method: str, info: dict[str, Any], start: int, join: tuple[int, float] | None
) -> None:
    """One method's curves after the shared start, its kept model starred."""
    training = info["training"]
    history = _history(training["history"])
    color, title = METHOD_COLORS.get(method, "black"), info["title"]
    validation = history.get("validation", [])
    if validation:
        x = [start + v["iteration"] for v in validation]
        y = [100 * v["dice"] for v in validation]
        if join is not None:  # the branch starts from the shared start's last weights
            x, y = [join[0], *x], [join[1], *y]
        curves.plot(x, y, "-o", color=color, label=title, markersize=3.5, linewidth=1.8)
        best = training["best_iteration"]
        if best is not None:
            curves.plot(
                [best],
                [100 * training["best_validation_dice"]],
                "*",
                color=color,
                markersize=14,
                markeredgecolor="black",
                markeredgewidth=0.6,
            )
    loss = history.get("losses", [])
    if loss:
        losses.plot(
            [start + v["iteration"] for v in loss],
            [v["total"] for v in loss],
            color=color,
            linewidth=1.2,
            label=title,
        )


def _draw_metric_table(table_ax: Any, comparison: dict[str, Any]) -> None:
    # Labels as the first column, so that the table stays inside its axes.
    table_ax.axis("off")
    methods = list(comparison["methods"])
    method_titles, rows = comparison_rows(comparison)
    table = table_ax.table(
        cellText=[[label.replace("  ", "    "), *values] for label, values in rows],
        colLabels=["", *method_titles],
        bbox=[0.0, 0.0, 1.0, 1.0],
        colWidths=[0.56, 0.22, 0.22],
        cellLoc="right",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9.5)
    for (r, c), cell in table.get_celld().items():
        cell.set_edgecolor("#dddddd")
        if c == 0:
            cell.set_text_props(ha="left")
            cell.PAD = 0.03
        if r == 0 and c > 0:
            cell.set_text_props(color="white", fontweight="bold", ha="center")
            cell.set_facecolor(METHOD_COLORS.get(methods[c - 1], "#444444"))
        elif r == 0:
            cell.set_edgecolor("white")
    table_ax.set_title(f"Test metrics, mean over {len(comparison['cases'])} held-out volumes", fontsize=11.5)


def write_report(path: Path, comparison: dict[str, Any], out_dir: Path, case: str) -> Path:
    """Draw ``report.png`` (see the module docstring) for test ``case``; returns its path."""
    report = _ReportFigure(comparison, _CaseView.load(comparison, out_dir, case), case)
    report.draw()
    report.save(path)
    return path


# --------------------------------------------------------------------------------------
# Opening the result in 3D Slicer


SLICER_SCRIPT = '''"""Show the buseg demo's result in 3D Slicer: Slicer --python-script {script_name}

Loads the test image, our model's segmentation (.seg.nrrd) and its uncertainty map
(shown over the image with a heat map), and lists the flagged regions.
"""
import json
from pathlib import Path

import slicer

demo = Path({out_dir!r})
image = slicer.util.loadVolume(str(demo / {image!r}))
segmentation = slicer.util.loadSegmentation(str(demo / {segmentation!r}))
uncertainty = slicer.util.loadVolume(str(demo / {uncertainty!r}), properties={{"name": "{case} uncertainty"}})
heat = slicer.mrmlScene.GetNodeByID(slicer.vtkMRMLColorLogic.GetFileColorNodeID("Inferno.txt"))
if heat is not None:
    uncertainty.GetDisplayNode().SetAndObserveColorNodeID(heat.GetID())
uncertainty.GetDisplayNode().SetAutoWindowLevel(False)
uncertainty.GetDisplayNode().SetWindowLevelMinMax(0.0, 1.0)
slicer.util.setSliceViewerLayers(background=image, foreground=uncertainty, foregroundOpacity=0.4, fit=True)
for region in json.loads((demo / {regions!r}).read_text())["regions"][:5]:
    print("region", region["id"], "at RAS", [round(v, 1) for v in region["centroid_ras"]],
          "mm:", round(region["volume_mm3"]), "mm3, mean uncertainty", round(region["mean_uncertainty"], 2))
'''


def write_slicer_script(path: Path, out_dir: Path, case: str) -> Path:
    """``open_in_slicer.py``: loads the demo's test image, segmentation and uncertainty map in Slicer."""
    folder = Path("predictions") / "buarl" / case
    text = SLICER_SCRIPT.format(
        script_name=path.name,
        out_dir=str(out_dir),
        case=case,
        image=str(Path("data") / "test" / "images" / f"{case}.nii.gz"),
        segmentation=str(folder / f"{case}.seg.nrrd"),
        uncertainty=str(folder / f"{case}_uncertainty.nii.gz"),
        regions=str(folder / "regions.json"),
    )
    with atomic_path(path, overwrite=True) as temp:
        temp.write_text(text)
    return path
