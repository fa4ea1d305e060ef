"""``buseg predict`` and ``buseg evaluate`` end to end: outputs overlay the input exactly, events,
no silent overwrite, bad inputs, the real worker subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import slicerio
from model_files import model_metadata, write_untrained_model

from buseg import events as buseg_events
from buseg.cli import main
from buseg.config import PredictConfig
from buseg.data.synthetic import write_dataset
from buseg.errors import Cancelled
from buseg.files.images import Volume, read_image, read_label, write_image, write_segmentation
from buseg.model.checkpoint import load_model
from buseg.prediction.case import predict_case
from buseg.prediction.predict_files import predict_files

CLASSES = [
    ("background", 0),
    ("liver", 5),
    ("vessel", 10),
    ("tumour", 20),
]  # label values differ from indices


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    metadata = model_metadata(
        [name for name, _ in CLASSES],
        label_values=[value for _, value in CLASSES],
        colors=[[0.1 * i, 0.9 - 0.2 * i, 0.3] for i in range(len(CLASSES))],
    )
    return write_untrained_model(tmp_path_factory.mktemp("model") / "model.pt", metadata, zero_head_bias=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(
        tmp_path_factory.mktemp("data"), labeled=0, unlabeled=0, test=2, shape_zyx=(8, 40, 36)
    )


def _oblique_image(suffix: str, folder) -> tuple[Volume, object]:
    a, b = np.deg2rad(25), np.deg2rad(-35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rng = np.random.default_rng(4)
    array = rng.normal(50, 10, (7, 33, 27)).astype(np.float32)  # z, y, x all different
    array[2:5, 8:20, 5:15] += 60
    volume = Volume(array, (0.7, 1.3, 3.1), (-41.3, 17.2, 105.5), tuple((rz @ ry).ravel()))
    path = folder / f"oblique{suffix}"
    write_image(volume, path)
    return read_image(path), path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_outputs_overlay_the_input_exactly(tmp_path, model_path, suffix):
    image, path = _oblique_image(suffix, tmp_path)
    config = PredictConfig(model_path=str(model_path), out_dir=str(tmp_path / "out"), num_threads=1)
    result = predict_files([path], config)
    outputs = {k: tmp_path / "out" / v for k, v in result.cases[0]["outputs"].items()}
    assert (
        outputs["label"].name == f"oblique_label{suffix}"
        and outputs["uncertainty"].name == f"oblique_uncertainty{suffix}"
    )
    expected = predict_case(load_model(model_path), image, config)

    label = read_label(outputs["label"])
    uncertainty = read_image(outputs["uncertainty"])
    for written in (label, uncertainty):
        # Same size, spacing, origin and direction as the input file (NIfTI stores geometry in float32).
        assert written.same_grid(image, tolerance=1e-6 if suffix != ".nii.gz" else 1e-5) is None
    lut = {i: v for i, (_, v) in enumerate(CLASSES)}
    assert np.array_equal(label.array, np.vectorize(lut.get)(expected.labels))
    assert len(np.unique(label.array)) >= 2 and set(np.unique(label.array)) <= {0, 5, 10, 20}
    assert np.allclose(uncertainty.array, expected.uncertainty_map, atol=1e-6)
    assert uncertainty.array.min() >= 0.0 and uncertainty.array.max() <= 1.0

    # The Slicer segmentation: same voxel-to-LPS matrix, named and colored segments, same voxels.
    seg = slicerio.read_segmentation(str(outputs["segmentation"]))
    assert np.allclose(np.asarray(seg["ijkToLPS"]), image.ijk_to_lps(), atol=1e-5)
    assert [s["name"] for s in seg["segments"]] == [n for n, _ in CLASSES[1:]]
    assert np.allclose(seg["segments"][1]["color"], [0.2, 0.5, 0.3])
    voxels = np.asarray(seg["voxels"]).transpose(2, 1, 0)  # (i, j, k) -> numpy (z, y, x)
    for position, segment in enumerate(seg["segments"], start=1):
        assert np.array_equal(voxels == segment["labelValue"], expected.labels == position)
    assert read_label(outputs["segmentation"]).same_grid(image, tolerance=1e-5) is None

    regions = json.loads(outputs["regions"].read_text())
    assert regions["geometry"]["size_ijk"] == [27, 33, 7]
    assert np.allclose(regions["geometry"]["ijk_to_ras"], image.ijk_to_ras(), atol=1e-6)


def _events(text: str) -> list[dict]:
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    validate = getattr(buseg_events, "validate_event", None)
    for event in events:
        assert validate is None or validate(event) == [], (event, validate(event))
    return events


def test_cli_predicts_a_folder_with_events_and_never_overwrites_silently(tmp_path, model_path, data, capsys):
    out = tmp_path / "out"
    argv = [
        "predict",
        str(data["test"]),
        "--model",
        str(model_path),
        "--out",
        str(out),
        "--progress",
        "jsonl",
        "--num-threads",
        "1",
        "--max-regions",
        "5",
    ]
    assert main(argv) == 0
    events = _events(capsys.readouterr().out)
    assert events[0]["event"] == "started" and events[0]["total"] == 2 and events[0]["job"] == "predict"
    cases = [e for e in events if e["event"] == "case"]
    assert [(e["index"], e["total"], e["case"]) for e in cases] == [(1, 2, "test_000"), (2, 2, "test_001")]
    for event in cases:
        assert set(event["outputs"]) == {"label", "segmentation", "uncertainty", "regions"}
        assert all(os.path.isfile(p) for p in event["outputs"].values()) and event["seconds"] >= 0
    assert events[-1]["event"] == "finished" and events[-1]["status"] == "completed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema"] == "buseg-predict-summary" and [c["status"] for c in summary["cases"]] == [
        "ok",
        "ok",
    ]
    assert summary["config"]["max_regions"] == 5 and summary["classes"][2]["name"] == "vessel"

    label = out / "test_000" / "test_000_label.nii.gz"
    before = label.stat().st_mtime_ns
    assert main(argv) == 2
    events = _events(capsys.readouterr().out)
    error = next(e for e in events if e["event"] == "error")
    assert error["kind"] == "OutputError" and "--overwrite" in (error.get("hint") or "")
    assert events[-1]["status"] == "failed" and label.stat().st_mtime_ns == before
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()
    assert label.stat().st_mtime_ns != before


def test_a_bad_image_is_reported_and_the_others_are_written(tmp_path, model_path, data, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.nii.gz").write_bytes((data["test"] / "images" / "test_000.nii.gz").read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"this is not an image")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(folder),
            "--model",
            str(model_path),
            "--out",
            str(out),
            "--progress",
            "jsonl",
            "--num-threads",
            "1",
        ]
    )
    events = _events(capsys.readouterr().out)
    assert code == 2
    assert any(e["event"] == "warning" and "broken" in e["message"] for e in events)
    assert "broken" in next(e for e in events if e["event"] == "error")["message"]
    assert (out / "good" / "good_label.nii.gz").is_file() and not (out / "broken").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert {c["case"]: c["status"] for c in summary["cases"]} == {"broken": "failed", "good": "ok"}


def test_cancel_leaves_no_case_outputs(tmp_path, model_path, data):
    config = PredictConfig(model_path=str(model_path), out_dir=str(tmp_path / "out"))
    with pytest.raises(Cancelled):
        predict_files([data["test"]], config, should_stop=lambda: True)
    assert not (tmp_path / "out" / "test_000").exists()


def test_worker_subprocess_predicts(tmp_path, model_path, data):
    image = data["test"] / "images" / "test_001.nii.gz"
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "buseg",
            "predict",
            str(image),
            "--model",
            str(model_path),
            "--out",
            str(tmp_path),
            "--progress",
            "jsonl",
            "--num-threads",
            "1",
            "--uncertainty",
            "tta",
            "--samples",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 0, process.stderr
    events = _events(process.stdout)
    assert [e["event"] for e in events] == ["started", "case", "finished"]
    assert events[0]["config"]["uncertainty"] == "tta"
    assert (tmp_path / "test_001" / "test_001.seg.nrrd").is_file()


def test_cli_evaluates_predictions_against_label_maps_and_segmentations(tmp_path, model_path, data, capsys):
    preds = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(data["test"]),
                "--model",
                str(model_path),
                "--out",
                str(preds),
                "--progress",
                "none",
                "--num-threads",
                "1",
            ]
        )
        == 0
    )
    # Make the ground truth a copy of the predictions with one change, so the scores are known.
    truth_dir = tmp_path / "truth"
    for case in ("test_000", "test_001"):
        predicted = read_label(preds / case / f"{case}_label.nii.gz")
        truth = predicted.array.copy()
        if case == "test_001":
            truth[:] = 0
            truth[2:6, 10:30, 10:26] = 10  # a vessel the prediction may or may not have
        write_image(predicted, truth_dir / f"{case}_gt.nii.gz", array=truth)
        classes = [{"index": v, "name": n, "color": [0.5, 0.5, 0.5]} for n, v in CLASSES[1:]]
        write_segmentation(truth, predicted, classes, tmp_path / "truth_seg" / f"{case}.seg.nrrd")
    capsys.readouterr()
    assert (
        main(["evaluate", "--pred", str(preds), "--truth", str(truth_dir), "--out", str(tmp_path / "ev")])
        == 0
    )
    printed = capsys.readouterr().out
    assert "mean over classes" in printed and "vessel" in printed
    document = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rows = {(r["case"], r["class_name"]): r for r in document["cases"]}
    # test_000's truth is its prediction: every class present in it scores 1.
    present = [r for (case, _), r in rows.items() if case == "test_000" and r["empty"] == "none"]
    assert len(present) >= 2
    assert all(r["dice"] == 1.0 and r["jaccard"] == 1.0 and r["hd95_mm"] == 0.0 for r in present)
    assert rows[("test_001", "vessel")]["truth_voxels"] == 4 * 20 * 16
    # .seg.nrrd ground truth is matched to the predictions' classes by segment name: same numbers.
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(preds),
                "--truth",
                str(tmp_path / "truth_seg"),
                "--out",
                str(tmp_path / "ev2"),
                "--progress",
                "jsonl",
            ]
        )
        == 0
    )
    _events(capsys.readouterr().out)  # stdout holds only events with --progress jsonl
    again = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert again["summary"]["mean"] == document["summary"]["mean"]
