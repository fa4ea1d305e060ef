"""``buseg demo``: the whole idea end to end on generated data, with a report.

One call, in-process, through the same APIs the commands use:

1. **data** - :func:`buseg.data.synthetic.write_population_dataset` writes 3D volumes with known
   truth (three structures) drawn from a population that varies as real scans of one structure
   vary between patients and scanners (:data:`buseg.data.synthetic.SCANNERS`: intensity scale and
   offset, contrast, noise, bias field, slice spacing and count, size, shape, position): a few
   labeled (a random draw, as a clinic's first labeled scans), more unlabeled, validation (model
   selection) and held-out test volumes, all from that population;
2. **training** (:func:`buseg.training.loop.train`) - a shared supervised start on the labeled
   volumes, then two branches of the same length from it: our method (``buarl``: copy-paste
   self-training with the unlabeled volumes and the engine's default parts, URL only since
   the ACDC benchmark chose it) and the supervised baseline
   (more of the same supervised training). Both end with the same number of iterations
   of the same batch size; the start is the engine's ``--init-weights``: the shared
   supervised pre-training's best weights on the validation volumes (as the engine's copy-paste
   recipe starts self-training from its best pre-trained model, docs/method.md);
3. **segmentation with uncertainty** - every test volume with both models, written as
   ``buseg predict`` writes them (:func:`buseg.prediction.predict_files.predict_files`): label map,
   ``.seg.nrrd``, uncertainty map, ``regions.json``;
4. **evaluation** - Dice, Jaccard, HD95, ASD against the known truth
   (:func:`buseg.evaluation.evaluate.evaluate_files`), and what a reviewer would gain by checking the
   most uncertain voxels (:func:`buseg.evaluation.simulated_review.simulate_review`);
5. **report** - ``comparison.md``/``.json``, ``report.png`` (:mod:`buseg.evaluation.report`) and
   ``open_in_slicer.py``.

The budget is fixed in iterations (:data:`FULL`), not in seconds, and every step runs in
float32 (mixed precision off: bfloat16 autocast where a CPU has it would change the figures),
so the same seed gives the same figures on every CPU; :data:`QUICK` is a smoke test of the
whole pipeline.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from buseg import __version__
from buseg.errors import Cancelled, OutputError
from buseg.events import EventSink, TerminalSink
from buseg.files.safe_files import write_json_atomic

MARKER = "demo.json"
MARKER_SCHEMA = "buseg-demo"
# What the demo writes into its folder; --overwrite removes exactly these, nothing else.
DEMO_ENTRIES = (
    "data",
    "runs",
    "predictions",
    "evaluation",
    "report.png",
    "comparison.md",
    "comparison.json",
    "open_in_slicer.py",
    MARKER,
)
METHODS = ("supervised", "buarl")
METHOD_TITLES = {"supervised": "supervised", "buarl": "ours (buarl)"}
REVIEW_BUDGET = 0.01  # fraction of each volume's voxels a reviewer checks (the most uncertain first)


@dataclass(frozen=True)
class DemoPlan:
    """Everything that sizes the demo: data, network, iteration budget."""

    name: str
    labeled: int
    unlabeled: int
    validation: int
    test: int
    population: str  # a key of synthetic.POPULATIONS: what varies between the generated scans
    patch_size: tuple[int, int]  # x y: 2D slices are resized to it
    base_channels: int
    batch_size: int
    shared_iterations: int  # the shared supervised start
    iterations: int  # each branch after it: ours (self-training) and supervised
    lr: float  # the shared start
    branch_lr: float  # both branches (SGD, constant)
    validation_interval: int
    log_interval: int

    @property
    def total_iterations(self) -> int:
        return self.shared_iterations + self.iterations


# The full demo (make demo): a few minutes on 2 CPU cores in float32, chosen by measurement
# (README, "The demo": about 0.15 CPU-seconds per iteration on one core). Batch 24 as the
# published recipe: with batch 8 (groups of 2 images) self-training lost the small structure
# within 100 iterations. A shared supervised start instead of each method's own: copy-paste
# pre-training needed about 800 iterations of batch 24 before its teacher found all three
# structures (and some seeds not even then). A small U-Net (8 base channels) keeps it to
# minutes. Branch learning rate 0.001: at 0.005 (the earlier demo's) self-training from the
# shared start threw the student off within 50-70 iterations (its validation Dice fell to 1-13 %
# at times, the teacher's from 63-77 % to 31-38 %, the satellite's to 3-23 %; seed 0 of the
# earlier population, two starts), at 0.001 the teacher rose steadily from 56 to 79 % in 100
# iterations (issue 33).
# Both branches use it, so that they differ only in what they learn from.
FULL = DemoPlan(
    name="full",
    labeled=3,
    unlabeled=12,
    validation=3,
    test=6,
    population="scanners",
    patch_size=(64, 64),
    base_channels=8,
    batch_size=24,
    shared_iterations=600,
    iterations=400,
    lr=0.01,
    branch_lr=0.001,
    validation_interval=50,
    log_interval=10,
)
# A smoke test of every step (tests, CI): seconds, and numbers that mean nothing.
QUICK = DemoPlan(
    name="quick",
    labeled=1,
    unlabeled=2,
    validation=1,
    test=1,
    population="tiny-scanners",
    patch_size=(32, 32),
    base_channels=8,
    batch_size=4,
    shared_iterations=3,
    iterations=4,
    lr=0.01,
    branch_lr=0.005,
    validation_interval=2,
    log_interval=2,
)


@dataclass
class DemoResult:
    out_dir: Path
    report_path: Path
    comparison: dict[str, Any]
    seconds: float


# --------------------------------------------------------------------------------------
# The output folder


def prepare_folder(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse a non-empty folder unless ``overwrite``; then remove only what an earlier demo wrote.

    ``--overwrite`` is accepted only for an empty folder or one an earlier demo wrote (it
    has ``demo.json``): a user's own ``data/`` folder is never deleted by mistake.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("exists and is not a folder", path=out_dir, hint="choose another --out")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if entries:
        if not overwrite:
            raise OutputError(
                f"is not empty ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''})",
                path=out_dir,
                hint="pass --overwrite to replace an earlier demo's outputs there, or choose another --out",
            )
        if not _is_demo_folder(out_dir):
            raise OutputError(
                f"is not empty and was not written by `buseg demo` (no {MARKER}); refusing to delete anything",
                path=out_dir,
                hint="choose an empty or new --out folder",
            )
        for name in DEMO_ENTRIES:
            path = out_dir / name
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
            except OSError as exc:
                raise OutputError(
                    f"cannot remove the earlier demo output: {exc.strerror or exc}", path=path
                ) from None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror or exc}", path=out_dir) from None


def _is_demo_folder(out_dir: Path) -> bool:
    try:
        return json.loads((out_dir / MARKER).read_text()).get("schema") == MARKER_SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------------------
# The steps


def make_data(out_dir: Path, plan: DemoPlan, seed: int) -> dict[str, Path]:
    from buseg.data.synthetic import POPULATIONS, write_population_dataset

    return write_population_dataset(
        out_dir / "data",
        labeled=plan.labeled,
        unlabeled=plan.unlabeled,
        test=plan.test,
        validation=plan.validation,
        population=POPULATIONS[plan.population],
        seed=seed,
    )


SHARED_RUN = "shared-supervised"
# Every step in float32 (no bfloat16 autocast where the CPU has it): the same figures on every CPU.
PRECISION = "float32"


def our_parts() -> str:
    """Which of our method's parts the engine's defaults train, as the terminal and report say it."""
    from buseg.config import TrainConfig

    defaults = TrainConfig()
    parts = ["URL"] if defaults.url.enabled else []
    if defaults.crl.enabled:
        parts.append(f"CRL ({defaults.crl.weighting})")
    return " and ".join(parts) if parts else "no uncertainty weighting (BCP)"


def train_config(
    run: str,
    folders: dict[str, Path],
    out_dir: Path,
    plan: DemoPlan,
    seed: int,
    device: str,
    init_weights: Path | None = None,
):  # -> TrainConfig (imported lazily: torch)
    """One training: the shared start (``run = SHARED_RUN``) or a branch ("buarl", "supervised") from it."""
    from buseg.config import TrainConfig

    config = TrainConfig()
    config.method.name = "supervised" if run == SHARED_RUN else run
    config.data.labeled = str(folders["labeled"])
    config.data.validation = str(folders["validation"])
    config.model.dimension = "2d"
    config.model.patch_size = list(plan.patch_size)
    config.model.base_channels = plan.base_channels
    config.optim.batch_size = plan.batch_size
    config.optim.pretrain_iterations = 0
    config.optim.amp = False  # PRECISION
    if run == SHARED_RUN:
        config.optim.iterations, config.optim.lr = plan.shared_iterations, plan.lr
        # A pre-training: the branches start from the student, as after copy-paste pre-training (an
        # EMA teacher of a run from scratch lags far behind it).
        config.method.model_weights = "student"
    else:
        config.optim.iterations, config.optim.lr = plan.iterations, plan.branch_lr
        config.init_weights = str(init_weights)
    if run == "buarl":
        config.data.unlabeled = str(folders["unlabeled"])
    config.validation_interval = plan.validation_interval
    config.checkpoint_interval = plan.total_iterations  # a resumable checkpoint at the end is enough here
    config.log_interval = plan.log_interval
    config.seed = seed
    config.device = device
    config.out_dir = str(out_dir / "runs" / run)
    return config.validate()


def review_figures(
    prediction_dir: Path, truth_dir: Path, cases: list[str], num_classes: int
) -> dict[str, float]:
    """Mean over the test volumes of :func:`buseg.evaluation.simulated_review.simulate_review` at :data:`REVIEW_BUDGET`."""
    from buseg.evaluation.simulated_review import simulate_review
    from buseg.files.images import read_image, read_label

    summary = json.loads((prediction_dir / "summary.json").read_text())
    outputs = {c["case"]: c["outputs"] for c in summary["cases"] if c.get("status") == "ok"}
    figures: list[dict[str, float]] = []
    for case in cases:
        labels = read_label(prediction_dir / outputs[case]["label"]).array
        uncertainty = read_image(prediction_dir / outputs[case]["uncertainty"]).array
        truth = read_label(truth_dir / "labels" / f"{case}.nii.gz").array
        figures.append(
            simulate_review(labels, truth, uncertainty, num_classes, budget_fraction=REVIEW_BUDGET)
        )
    return {key: float(np.nanmean([f[key] for f in figures])) for key in figures[0]}


def run_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    quick: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    events: EventSink | None = None,
    should_stop: Callable[[], bool] | None = None,
    stream: TextIO | None = None,
) -> DemoResult:
    """Run the demo into ``out_dir`` (see the module docstring); messages go to ``stream``.

    ``events`` receives the training and prediction events (a :class:`TerminalSink` draws
    the progress bars); ``should_stop`` is polled as in :func:`buseg.training.loop.train`.
    """
    _import_engine()
    demo = _DemoRun(
        Path(out_dir).expanduser().resolve(),
        plan=QUICK if quick else FULL,
        quick=quick,
        seed=seed,
        device=device,
        sink=events or EventSink(),
        should_stop=should_stop or (lambda: False),
        stream=stream or sys.stdout,
    )
    return demo.run(overwrite=overwrite)


def _import_engine() -> None:
    # Up front, before the folder is touched and the clock starts: a missing dependency (torch) fails
    # before anything is written, and the times the demo reports are its own, not the imports'.
    import importlib

    for module in (
        "config",
        "prediction.predict_files",
        "evaluation.evaluate",
        "evaluation.report",
        "training.loop",
    ):
        importlib.import_module(f"buseg.{module}")


class _DemoRun:
    """One run of the demo, in the steps the module docstring lists (the terminal numbers them 1-6)."""

    def __init__(
        self,
        out: Path,
        *,
        plan: DemoPlan,
        quick: bool,
        seed: int,
        device: str,
        sink: EventSink,
        should_stop: Callable[[], bool],
        stream: TextIO,
    ) -> None:
        self.out = out
        self.plan = plan
        self.quick = quick
        self.seed = seed
        self.device = device
        self.sink = sink
        self.should_stop = should_stop
        self.stream = stream
        self.start = time.perf_counter()
        self.marker: dict[str, Any] = {}

    def run(self, *, overwrite: bool) -> DemoResult:
        self._begin(overwrite)
        folders = self._make_data()
        runs = self._train_all(folders)
        comparison = self._segment_and_evaluate(folders, runs)
        table = self._write_comparison(comparison)
        case, report_path, script = self._write_report(comparison)
        seconds = self._finish(report_path)
        self._say("\n" + table)
        self._say(where_everything_is(self.out, case, script, seconds))
        return DemoResult(out_dir=self.out, report_path=report_path, comparison=comparison, seconds=seconds)

    def _say(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _check_stop(self) -> None:
        if self.should_stop():
            raise Cancelled("demo cancelled")

    def _end_phase(self) -> None:
        # A terminal sink draws one progress bar per job: close it before the next job starts.
        if isinstance(self.sink, TerminalSink):
            self.sink.close()

    def _begin(self, overwrite: bool) -> None:
        """The folder, and the marker that makes it a demo folder (``--overwrite`` may clear it later)."""
        prepare_folder(self.out, overwrite=overwrite)
        self.marker = {
            "schema": MARKER_SCHEMA,
            "schema_version": 1,
            "buseg_version": __version__,
            "status": "running",
            "seed": self.seed,
            "precision": PRECISION,
            "plan": asdict(self.plan),
        }
        write_json_atomic(self.out / MARKER, self.marker)
        self._say(f"buseg demo ({self.plan.name}) -> {self.out}")
        self._say(
            f"Precision: {PRECISION} throughout (mixed precision off, so that every CPU gives the same figures)"
        )
        if self.quick:
            self._say("Quick mode: a smoke test of every step on tiny data; its numbers mean nothing.")

    def _make_data(self) -> dict[str, Path]:
        plan = self.plan
        self._say(
            f"\n[1/6] Generating synthetic 3D volumes with known truth: {plan.labeled} labeled, {plan.unlabeled} "
            f"unlabeled, {plan.validation} validation, {plan.test} test, all drawn from one population of scans "
            "that differ as patients and scanners do (intensity scale, contrast, noise, bias field, slice spacing "
            "and count, size, shape and position of three structures)"
        )
        folders = make_data(self.out, plan, self.seed)
        self._check_stop()
        return folders

    def _training_steps(self) -> tuple[tuple[str, str], ...]:
        """(run, what the terminal says it is) of the three trainings, in order."""
        plan = self.plan
        net = f"2D U-Net at {plan.patch_size[0]}x{plan.patch_size[1]}, batch {plan.batch_size}"
        return (
            (
                SHARED_RUN,
                f"the shared supervised start: {plan.shared_iterations} iterations on the labeled volumes, {net}",
            ),
            (
                "buarl",
                f"ours (buarl) from it: {plan.iterations} iterations of copy-paste self-training with the "
                f"unlabeled volumes, {our_parts()}",
            ),
            (
                "supervised",
                f"the supervised baseline from it: {plan.iterations} more iterations on the labeled volumes",
            ),
        )

    def _train_all(self, folders: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Steps 2-4; per run its config, :func:`buseg.training.loop.train` result and seconds."""
        runs: dict[str, dict[str, Any]] = {}
        for step, (run, what) in enumerate(self._training_steps(), start=2):
            # The branches start from the shared start's best weights on the validation volumes (its
            # model.pt), as the engine's copy-paste recipe starts self-training from its best pre-trained
            # model: the last weights of a run at a constant learning rate can be a bad moment of it.
            init = runs[SHARED_RUN]["result"].model_path if run != SHARED_RUN else None
            runs[run] = self._train(step, run, what, folders, init)
        return runs

    def _train(
        self, step: int, run: str, what: str, folders: dict[str, Path], init: Path | None
    ) -> dict[str, Any]:
        from buseg.training.loop import train

        config = train_config(run, folders, self.out, self.plan, self.seed, self.device, init_weights=init)
        self._say(f"\n[{step}/6] Training {what}")
        train_start = time.perf_counter()
        try:
            result = train(config, events=self.sink, overwrite=True, should_stop=self.should_stop)
        finally:
            self._end_phase()
        seconds = time.perf_counter() - train_start
        best = (
            f"{100 * result.best_metric:.1f}% after {result.best_iteration} iterations"
            if result.best_metric is not None
            else "-"
        )
        self._say(f"      done in {_duration(seconds)}; best validation Dice {best}")
        return {"config": config, "result": result, "seconds": seconds}

    def _segment_and_evaluate(
        self, folders: dict[str, Path], runs: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """Step 5, both methods; returns the comparison (:func:`build_comparison`)."""
        self._say("\n[5/6] Segmenting the test volumes with uncertainty and evaluating against the truth")
        evaluations: dict[str, Any] = {}
        reviews: dict[str, dict[str, float]] = {}
        predictions: dict[str, Path] = {}
        for method in METHODS:
            self._check_stop()
            predictions[method], evaluations[method], reviews[method] = self._segment_and_evaluate_one(
                method, folders, runs[method]["result"].model_path
            )
        return build_comparison(self.plan, runs, evaluations, reviews, predictions, self.seed)

    def _segment_and_evaluate_one(
        self, method: str, folders: dict[str, Path], model_path: Path
    ) -> tuple[Path, Any, dict[str, float]]:
        """(prediction folder, :func:`buseg.evaluation.evaluate.evaluate_files` result, review figures) of one method."""
        from buseg.config import PredictConfig
        from buseg.evaluation.evaluate import evaluate_files
        from buseg.prediction.predict_files import predict_files

        predict = PredictConfig(
            model_path=str(model_path),
            out_dir=str(self.out / "predictions" / method),
            device=self.device,
            amp=False,  # PRECISION
        )
        try:
            predicted = predict_files(
                [folders["test"]], predict, events=self.sink, should_stop=self.should_stop
            )
        finally:
            self._end_phase()
        evaluation = evaluate_files(
            [predicted.out_dir],
            [folders["test"]],
            self.out / "evaluation" / method,
            should_stop=self.should_stop,
        )
        cases = [c["case"] for c in predicted.cases]
        num_classes = len(json.loads(predicted.summary_path.read_text())["classes"])
        return (
            predicted.out_dir,
            evaluation,
            review_figures(predicted.out_dir, folders["test"], cases, num_classes),
        )

    def _write_comparison(self, comparison: dict[str, Any]) -> str:
        """comparison.json and .md; returns the table for the terminal."""
        from buseg.evaluation.report import format_comparison, write_comparison_markdown

        write_json_atomic(self.out / "comparison.json", comparison)
        table = format_comparison(comparison)
        write_comparison_markdown(self.out / "comparison.md", comparison)
        return table

    def _write_report(self, comparison: dict[str, Any]) -> tuple[str, Path, Path]:
        """Step 6, for the first test volume; returns (that case, report.png, open_in_slicer.py)."""
        from buseg.evaluation.report import write_report, write_slicer_script

        self._say("\n[6/6] Writing the report")
        self._check_stop()
        case = sorted(c["case"] for c in comparison["cases"])[0]
        report_path = write_report(self.out / "report.png", comparison, self.out, case)
        script = write_slicer_script(self.out / "open_in_slicer.py", self.out, case)
        return case, report_path, script

    def _finish(self, report_path: Path) -> float:
        """Marks the folder's demo completed; returns the seconds the whole demo took."""
        seconds = time.perf_counter() - self.start
        self.marker.update(
            status="completed", seconds=seconds, report=str(report_path), comparison="comparison.json"
        )
        write_json_atomic(self.out / MARKER, self.marker)
        return seconds


def build_comparison(
    plan: DemoPlan,
    runs: dict[str, dict[str, Any]],
    evaluations: dict[str, Any],
    reviews: dict[str, dict[str, float]],
    predictions: dict[str, Path],
    seed: int,
) -> dict[str, Any]:
    """What comparison.json holds: per method the test metrics, review figures and training facts.

    Training figures count the shared supervised start in (iterations, seconds, the
    iteration of the best checkpoint), so that both methods show their whole budget.
    """
    shared = runs[SHARED_RUN]
    methods: dict[str, Any] = {}
    cases: set[str] = set()
    for method in METHODS:
        summary = evaluations[method].summary
        result = runs[method]["result"]
        cases |= {row.case for row in evaluations[method].rows}
        methods[method] = {
            "title": METHOD_TITLES[method],
            "test": {
                "mean": summary["mean"],
                "classes": {
                    name: {k: c[k] for k in ("dice", "jaccard", "hd95_mm", "asd_mm")}
                    for name, c in summary["classes"].items()
                },
            },
            "review": reviews[method],
            "training": {
                "iterations": shared["result"].iterations + result.iterations,
                "branch_iterations": result.iterations,
                "batch_size": plan.batch_size,
                "seconds": shared["seconds"] + runs[method]["seconds"],
                "branch_seconds": runs[method]["seconds"],
                "best_validation_dice": result.best_metric,
                "best_iteration": shared["result"].iterations + result.best_iteration
                if result.best_iteration is not None
                else None,
                "model": str(result.model_path),
                "history": str(result.out_dir / "history.json"),
            },
            "predictions": str(predictions[method]),
            "metrics_csv": str(evaluations[method].csv_path),
        }
    return {
        "schema": "buseg-demo-comparison",
        "schema_version": 1,
        "buseg_version": __version__,
        "plan": plan.name,
        "seed": seed,
        "precision": PRECISION,
        "review_budget_fraction": REVIEW_BUDGET,
        "shared": {
            "iterations": shared["result"].iterations,
            "seconds": shared["seconds"],
            "history": str(shared["result"].out_dir / "history.json"),
            "best_validation_dice": shared["result"].best_metric,
        },
        "cases": [{"case": c} for c in sorted(cases)],
        "methods": methods,
    }


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def where_everything_is(out: Path, case: str, script: Path, seconds: float) -> str:
    """The closing message: the files, and how to look at them in 3D Slicer."""
    pred = out / "predictions" / "buarl" / case
    image = out / "data" / "test" / "images" / f"{case}.nii.gz"
    return f"""
Done in {_duration(seconds)}. Everything is in {out}/
  report.png               slices (image, truth, both predictions, uncertainty and flagged regions),
                           training curves and the table above - open it first
  comparison.md/.json      the table above
  data/                    the generated volumes: labeled/, unlabeled/, validation/, test/ (with truth)
  runs/<run>/              model.pt (the model file), history.json (curves), config.json; runs:
                           shared-supervised (the common start), buarl (ours), supervised (the baseline)
  predictions/<method>/    per test case: <case>_label.nii.gz, <case>.seg.nrrd, <case>_uncertainty.nii.gz,
                           regions.json (flagged regions, most worth reviewing first)
  evaluation/<method>/     metrics.csv and metrics.json (Dice, Jaccard, HD95, ASD per case and class)

Open it in 3D Slicer:
  - drag and drop into Slicer: {image}
                                {pred / f"{case}.seg.nrrd"}
                                {pred / f"{case}_uncertainty.nii.gz"}
    (then in Volumes, give the uncertainty map the 'Inferno' lookup table and show it as foreground), or
  - run Slicer with the prepared script, which does all that:  Slicer --python-script {script}
  - or, with the extension installed, load {image.name} in the BidirUncertaintySeg module, choose the model
    {out / "runs" / "buarl" / "model.pt"} and press Segment (docs/slicer.md).
The same from the command line:  buseg predict {out / "data" / "test"} --model {out / "runs" / "buarl" / "model.pt"} \\
    --out predictions"""
