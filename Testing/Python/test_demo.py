"""``buseg demo --quick`` end to end: every output, the report image, the comparison, no overwrite.

The demo runs once per module, as a real ``buseg`` process (the console entry point), so
that the whole pipeline is checked as a user starts it - including that it never imports a
GUI toolkit (matplotlib draws through its Agg canvas only).
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from buseg.cli import main
from buseg.errors import OutputError
from buseg.evaluation.demo import MARKER, QUICK, prepare_folder

# Run the demo through the CLI, then list the modules a GUI would have needed.
RUN_DEMO = """
import json, sys
from buseg.cli import main
code = main(sys.argv[1:])
gui = sorted({m.split('.')[0] for m in sys.modules} & {'qt', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'tkinter',
                                                       'slicer', 'vtk', 'vtkmodules', 'ctk'})
print('GUI_MODULES=' + json.dumps(gui))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo_output"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MPLBACKEND", None)  # matplotlib left to choose, as on a user's machine
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_DEMO,
            "demo",
            "--quick",
            "--out",
            str(out),
            "--progress",
            "plain",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return out, completed.stdout, completed.stderr


@pytest.mark.slow  # the module's demo run: ~15 s of CPU, more on a loaded machine
def test_writes_every_output(demo):
    out, _, _ = demo
    assert json.loads((out / MARKER).read_text())["status"] == "completed"
    data = out / "data"
    assert len(list((data / "labeled" / "images").glob("*.nii.gz"))) == QUICK.labeled
    assert len(list((data / "unlabeled").glob("*.nii.gz"))) == QUICK.unlabeled
    assert len(list((data / "validation" / "labels").glob("*.nii.gz"))) == QUICK.validation
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (data / "test" / "images").glob("*.nii.gz"))
    assert len(cases) == QUICK.test
    for method in ("buarl", "supervised"):
        run = out / "runs" / method
        for name in ("model.pt", "history.json", "config.json"):
            assert (run / name).is_file(), run / name
        assert json.loads((run / "config.json").read_text())["method"]["name"] == method
        assert json.loads((run / "history.json").read_text())["validation"], "no validation curve"
        for case in cases:
            folder = out / "predictions" / method / case
            for name in (
                f"{case}_label.nii.gz",
                f"{case}.seg.nrrd",
                f"{case}_uncertainty.nii.gz",
                "regions.json",
            ):
                assert (folder / name).is_file(), folder / name
        assert (out / "evaluation" / method / "metrics.csv").is_file()
    assert (out / "comparison.md").is_file()
    # Training used the unlabeled volumes for ours only.
    assert json.loads((out / "runs" / "buarl" / "config.json").read_text())["data"]["unlabeled"]
    assert not json.loads((out / "runs" / "supervised" / "config.json").read_text())["data"]["unlabeled"]


@pytest.mark.slow  # the module's demo run: ~15 s of CPU, more on a loaded machine
def test_runs_in_float32_on_every_cpu_and_says_so(demo):
    """The same figures on every CPU: no bfloat16 autocast where the CPU has it, and the terminal,
    comparison.json and the models' training configurations say which precision made them."""
    out, stdout, _ = demo
    assert "Precision: float32" in stdout
    assert json.loads((out / "comparison.json").read_text())["precision"] == "float32"
    assert "Training time (float32)" in stdout
    for run in ("shared-supervised", "buarl", "supervised"):
        assert json.loads((out / "runs" / run / "config.json").read_text())["optim"]["amp"] is False


@pytest.mark.slow  # the module's demo run: ~15 s of CPU, more on a loaded machine
def test_data_are_a_population_of_scans_and_branches_start_from_the_best_shared_weights(demo):
    from buseg.files.images import read_image

    out, _, _ = demo
    images = sorted((out / "data").rglob("*.nii.gz"))
    images = [p for p in images if "labels" not in p.parts]
    volumes = [read_image(p) for p in images]
    # Scanners differ: grids, slice spacings and intensity ranges are not one fixed protocol's.
    assert len({v.array.shape[1:] for v in volumes}) > 1
    assert len({round(v.spacing_mm[2], 3) for v in volumes}) > 1
    assert len({round(float(v.array.max())) for v in volumes}) > 1
    shared_best = out / "runs" / "shared-supervised" / "model.pt"
    for run in ("buarl", "supervised"):
        assert json.loads((out / "runs" / run / "config.json").read_text())["init_weights"] == str(
            shared_best
        )


@pytest.mark.slow  # the module's demo run: ~15 s of CPU, more on a loaded machine
def test_report_is_a_sensible_png(demo):
    from PIL import Image

    out, stdout, _ = demo
    path = out / "report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert 1000 <= width <= 3000 and 700 <= height <= 3000, (width, height)
    assert pixels.std() > 20, "the report looks blank"
    assert "report.png" in stdout


@pytest.mark.slow  # the module's demo run: ~15 s of CPU, more on a loaded machine
def test_prints_and_saves_the_comparison_of_both_methods(demo):
    out, stdout, _ = demo
    header = next(line for line in stdout.splitlines() if line.startswith("Test volumes:"))
    assert "supervised" in header and "ours (buarl)" in header
    dice_row = next(line for line in stdout.splitlines() if line.startswith("Dice % (mean"))
    assert len(dice_row.split()) >= 2 + 4  # the label, then one number per method
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["methods"]) == {"supervised", "buarl"}
    for method in comparison["methods"].values():
        assert 0.0 <= method["test"]["mean"]["dice"] <= 1.0
        assert 0.0 <= method["review"]["review_error_recall"] <= 1.0
        assert method["training"]["iterations"] == QUICK.total_iterations


@pytest.mark.slow  # the module's demo run: ~15 s of CPU, more on a loaded machine
def test_says_how_to_open_it_in_slicer(demo):
    out, stdout, _ = demo
    assert "3D Slicer" in stdout and str(out / "open_in_slicer.py") in stdout
    # The script, run with a stand-in for Slicer's API: it loads the files the demo wrote.
    slicer = mock.MagicMock()
    with mock.patch.dict(sys.modules, {"slicer": slicer}):
        runpy.run_path(str(out / "open_in_slicer.py"))
    loaded = [Path(c.args[0]) for c in slicer.util.loadVolume.call_args_list]
    loaded += [Path(c.args[0]) for c in slicer.util.loadSegmentation.call_args_list]
    assert len(loaded) == 3 and all(p.is_file() for p in loaded), loaded
    assert any(p.name.endswith(".seg.nrrd") for p in loaded)
    slicer.util.setSliceViewerLayers.assert_called_once()


@pytest.mark.slow  # the module's demo run: ~15 s of CPU, more on a loaded machine
def test_imports_no_gui_toolkit(demo):
    _, stdout, _ = demo
    line = next(line for line in stdout.splitlines() if line.startswith("GUI_MODULES="))
    assert json.loads(line.removeprefix("GUI_MODULES=")) == []


def test_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(out), "--progress", "none"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # --overwrite does not make a folder the demo did not write fair game either.
    (out / "data").mkdir()
    assert main(["demo", "--quick", "--out", str(out), "--progress", "none", "--overwrite"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["data", "notes.txt"]


def test_overwrite_removes_only_what_the_demo_wrote(tmp_path):
    out = tmp_path / "demo_output"
    (out / "data" / "test").mkdir(parents=True)
    (out / "report.png").write_bytes(b"old")
    (out / "my_notes.txt").write_text("keep me")
    (out / MARKER).write_text(json.dumps({"schema": "buseg-demo"}))
    with pytest.raises(OutputError, match="not empty"):
        prepare_folder(out, overwrite=False)
    prepare_folder(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt"]


def test_refuses_a_file_as_output_folder(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        prepare_folder(path, overwrite=True)


def test_the_terminal_names_the_parts_of_ours_the_defaults_train(crl_default):
    from buseg import config as config_module
    from buseg.evaluation import demo as demo_module

    assert demo_module.our_parts() == "URL"  # the default since the ACDC benchmark chose URL only
    crl_default(config_module, True)
    assert demo_module.our_parts() == "URL and CRL (concentration)"


@pytest.mark.slow  # the module's demo run: ~15 s of CPU, more on a loaded machine
def test_every_text_of_the_report_lies_inside_the_figure(demo):
    """The heading once ran off the right edge (the precision made its first line longer)."""
    from buseg.evaluation.report import _CaseView, _ReportFigure

    out, _, _ = demo
    comparison = json.loads((out / "comparison.json").read_text())
    case = sorted(c["case"] for c in comparison["cases"])[0]  # the case the demo's report shows
    # The full plan's figures are longer than the quick run's: the layout must hold for them.
    comparison["plan"], comparison["seed"] = "full", 12345
    comparison["methods"]["buarl"]["training"].update(iterations=10000, batch_size=24)
    comparison["shared"]["iterations"] = 6000
    report = _ReportFigure(comparison, _CaseView.load(comparison, out, case), case)
    report.draw()
    renderer = report.figure.canvas.get_renderer()
    width = report.figure.bbox.width
    for text in report.figure.texts:
        extent = text.get_window_extent(renderer)
        assert extent.x0 >= 0 and extent.x1 <= width, (text.get_text()[:60], extent.x1, width)
