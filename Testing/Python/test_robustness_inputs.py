"""Inputs that once gave a silently wrong result, a traceback or a weak message (issue 15).

One test per class of docs/robustness.md ("Silently wrong results", "Tracebacks", "Weak"):
label values beyond 32 bits, sheared directions written as NIfTI, complex voxels, values
near the float32 limit, models with non-finite weights or outputs, two predictions into one
folder, OS-level errors on user paths (names too long, FIFOs, devices), deep JSON, damaged
summaries, numpy reprs in messages, singular directions, unreadable folder entries,
temporary files of an interrupted run, invalid counts and label values, non-Latin case
names, model metadata of any shape, and a signal during a prediction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from test_robustness import _case, _config, _labeled_folder, _load, _model_file, _predict_config

from buseg.cli import main
from buseg.data.preprocessing import normalize_intensity
from buseg.errors import InputError, ModelFileError, OutputError
from buseg.evaluation.evaluate import evaluate_files
from buseg.files.images import read_image, read_label, safe_case_name, write_image
from buseg.model.checkpoint import check_metadata_shape, load_model, save_checkpoint
from buseg.prediction.predict_files import collect_images, predict_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory) -> Path:
    return _model_file(tmp_path_factory.mktemp("model") / "model.pt", "2d")


def _write_array(array: np.ndarray, path: Path, like=None) -> Path:
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.SetSpacing(like.spacing_mm)
        image.SetOrigin(like.origin)
        image.SetDirection(like.direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _cli(*args: str) -> int:
    return main([*args, "--progress", "none"])


# --------------------------------------------------------------------------------------
# Silently wrong results


WIDE_LABELS = {
    "int64 2^32+3": (np.int64, 2**32 + 3),  # wrapped to 3 before
    "uint32 2^31+3": (np.uint32, 2**31 + 3),  # wrapped to a negative class before
    "int64 2^32+1": (np.int64, 2**32 + 1),
}


@pytest.mark.parametrize("kind", list(WIDE_LABELS))
def test_label_values_beyond_32_bits_are_refused_never_wrapped(tmp_path, kind):
    dtype, value = WIDE_LABELS[kind]
    case = _case()
    wide = case.label.array.astype(dtype)
    wide[wide == 1] = value
    path = _write_array(wide, tmp_path / "labels" / "a.nrrd", like=case.image)
    with pytest.raises(InputError, match=f"the value {value}, larger than the largest label value"):
        read_label(path)
    # Every reader of labels: training ...
    _labeled_folder(tmp_path, case.image)
    with pytest.raises(InputError, match=str(value)) as error:
        _load(_config(tmp_path))
    assert error.value.path == str(path)
    # ... and evaluation (the prediction side too).
    truth = tmp_path / "truth" / "a.nrrd"
    write_image(case.label, truth)
    with pytest.raises(InputError, match=str(value)):
        evaluate_files([path], [truth], tmp_path / "eval")
    # Values that fit keep their value (an int64 label map of 70000 is read as 70000, not wrapped).
    fits = (case.label.array > 0).astype(np.int64) * 70000
    assert read_label(_write_array(fits, tmp_path / "fits.nrrd")).array.max() == 70000


def test_benchmark_label_arrays_are_checked_in_their_own_type(tmp_path):
    from buseg.data.sources.hdf5 import class_indices

    label = np.zeros((2, 4, 4), dtype=np.int64)
    label[0, 0, 0] = 2**32 + 1  # 1 after a cast to uint8
    with pytest.raises(InputError, match=str(2**32 + 1)):
        class_indices(label, 3, tmp_path / "x.h5")
    label[0, 0, 0] = 4
    with pytest.raises(InputError, match="label value 4 is not a class"):
        class_indices(label, 3, tmp_path / "x.h5")


def test_a_sheared_direction_is_never_written_as_nifti(tmp_path, model_2d):
    image = _case().image
    sheared = np.eye(3)
    sheared[:, 1] = np.array([0.5, 1.0, 0.0]) / np.linalg.norm([0.5, 1.0, 0.0])  # y axis leans toward x
    image.direction = tuple(sheared.ravel())
    source = tmp_path / "in" / "sheared.nrrd"
    write_image(image, source)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="non-orthogonal") as error:
        predict_files([source], _predict_config(model_2d, out, output_format="nii.gz"))
    assert "nrrd" in error.value.hint
    assert not (out / "sheared").exists() or not any((out / "sheared").iterdir())
    # In the input's own format the geometry is kept exactly.
    result = predict_files([source], _predict_config(model_2d, tmp_path / "out2"))
    label = read_label(tmp_path / "out2" / result.cases[0]["outputs"]["label"])
    assert np.allclose(label.direction, image.direction, atol=1e-6)


@pytest.mark.parametrize("qform_code", [0, 1])
def test_a_sheared_nifti_sform_is_refused_not_replaced_by_the_qform(tmp_path, qform_code):
    import struct

    path = tmp_path / "sheared.nii"
    write_image(_case().image, path)
    header = bytearray(path.read_bytes())
    for row, values in enumerate([(1.0, 0.5, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0)]):
        header[280 + 16 * row : 296 + 16 * row] = struct.pack("<4f", *values)  # srow_x, srow_y, srow_z
    header[252:256] = struct.pack("<2h", qform_code, 2)  # qform_code, sform_code (aligned)
    path.write_bytes(bytes(header))
    # With a qform, ITK read the qform instead (identity here) with a warning only: voxels elsewhere.
    with pytest.raises(InputError, match=r"sform .* is sheared"):
        read_image(path)


CORRUPT_GEOMETRY = {
    "NaN origin (read as 0 before)": (
        "Offset = 0 0 0",
        "Offset = nan 0 0",
        "'Offset' is not a finite number",
    ),
    "absurd spacing": ("ElementSpacing = 1 1 1", "ElementSpacing = 1e300 1 1", "not a positive size"),
    "absurd origin": ("Offset = 0 0 0", "Offset = 1e12 0 0", "not a plausible position"),
}


@pytest.mark.parametrize("kind", list(CORRUPT_GEOMETRY))
def test_corrupt_geometry_in_a_header_is_refused_not_used(tmp_path, kind):
    before, after, message = CORRUPT_GEOMETRY[kind]
    path = _write_array(np.ones((4, 5, 6), np.float32), tmp_path / "a.mha")
    header = path.read_bytes()
    assert before.encode() in header
    path.write_bytes(header.replace(before.encode(), after.encode()))
    with pytest.raises(InputError, match=message):
        read_image(path)
    with pytest.raises(InputError, match=message):
        read_label(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_complex_images_are_refused_in_every_format(tmp_path, suffix):
    values = (np.random.default_rng(0).random((4, 6, 6)) * (1 + 1j)).astype(np.complex64)
    path = _write_array(values, tmp_path / f"complex{suffix}")
    # MetaImage stores complex voxels as two components: refused as such; the others say complex.
    with pytest.raises(InputError, match="complex voxel values" if suffix != ".mha" else "2 components"):
        read_image(path)
    with pytest.raises(InputError):
        read_label(path)


@pytest.mark.parametrize("mode", ["minmax", "zscore", "percentile"])
def test_normalisation_near_the_float32_limit_does_not_overflow(mode):
    array = np.zeros((4, 8, 8), dtype=np.float32)
    array[:1] = -3e38  # mean 1.5e38: x - mean and max - min both leave the float32 range
    array[1:] = 3e38
    normalized = normalize_intensity(array, mode)
    assert np.isfinite(normalized).all()
    assert normalized[0, 0, 0] < normalized[3, 0, 0]  # the two halves stay apart
    if mode != "zscore":
        assert normalized.min() == 0.0 and normalized.max() == 1.0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_with_non_finite_weights_is_refused_at_load(tmp_path, model_2d, value):
    payload = torch.load(model_2d, weights_only=True)
    name = next(k for k, v in payload["weights"].items() if v.is_floating_point() and v.numel() > 1)
    payload["weights"][name].view(-1)[0] = value
    corrupt = tmp_path / "corrupt.pt"
    save_checkpoint(corrupt, weights=payload["weights"], metadata=payload["metadata"])
    with pytest.raises(ModelFileError, match="NaN or infinite") as error:
        load_model(corrupt)
    assert name in str(error.value)
    image = tmp_path / "a.nrrd"
    write_image(_case().image, image)
    assert _cli("rank", str(image), "--model", str(corrupt), "--out", str(tmp_path / "rank")) == 2
    assert not (tmp_path / "rank" / "ranking.csv").exists()


def test_a_non_finite_network_output_is_an_error_not_a_certain_background(tmp_path):
    # An image near the float32 limit given to a model without normalisation: the network overflows.
    model = _model_file(tmp_path / "raw.pt", "2d", normalization="none")
    image = _case().image
    image.array = np.where(image.array > image.array.mean(), 3e38, -3e38).astype(np.float32)
    path = tmp_path / "in" / "huge.nrrd"
    write_image(image, path)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="output is not finite"):
        predict_files([path], _predict_config(model, out))
    assert not (out / "huge").exists()


def test_a_second_prediction_into_a_busy_folder_refuses(tmp_path, model_2d):
    image = tmp_path / "a.nrrd"
    write_image(_case().image, image)
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "buseg.lock").write_text(f"{other.pid}\nbuseg predict\n")
        for command in ("predict", "rank"):
            assert _cli(command, str(image), "--model", str(model_2d), "--out", str(out)) == 2
            assert sorted(p.name for p in out.iterdir()) == ["buseg.lock"]  # nothing written
        assert _cli("evaluate", "--pred", str(image), "--truth", str(image), "--out", str(out)) == 2
    finally:
        other.kill()
        other.wait()
    # The lock of a process that is gone is taken over; the lock goes when the run ends.
    assert _cli("predict", str(image), "--model", str(model_2d), "--out", str(out)) == 0
    assert (out / "a" / "a_label.nrrd").is_file() and not (out / "buseg.lock").exists()


def test_two_predictions_at_once_never_mix_their_outputs(tmp_path, model_2d):
    """Two real `buseg predict --overwrite` processes into one folder: the first is paused (SIGSTOP) while
    it writes, the second starts then - it refuses, where it used to replace the first one's files."""
    inputs = tmp_path / "in"
    for index in range(4):
        write_image(_case(index).image, inputs / f"c{index}.nrrd")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "buseg",
        "predict",
        str(inputs),
        "--model",
        str(model_2d),
        "--out",
        str(out),
    ]
    command += ["--progress", "none", "--num-threads", "1", "--overwrite"]
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while (
        not ((out / "buseg.lock").exists() or (out / "summary.json").exists()) and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2 and "is writing to this folder" in second.stderr, second.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [c["status"] for c in summary["cases"]] == ["ok"] * 4


# --------------------------------------------------------------------------------------
# Tracebacks: every OS-level error on a user path is the one-line error naming it


def _long(tmp_path: Path, suffix: str) -> Path:
    return tmp_path / ("x" * 300 + suffix)


def test_paths_longer_than_the_system_allows_are_one_line_errors(tmp_path, model_2d, caplog):
    image = tmp_path / "a.nrrd"
    write_image(_case().image, image)
    cases = {
        "input": [
            "predict",
            str(_long(tmp_path, ".nii.gz")),
            "--model",
            str(model_2d),
            "--out",
            str(tmp_path),
        ],
        "model": [
            "predict",
            str(image),
            "--model",
            str(_long(tmp_path, ".pt")),
            "--out",
            str(tmp_path / "o"),
        ],
        "out": ["predict", str(image), "--model", str(model_2d), "--out", str(_long(tmp_path, ""))],
        "evaluate out": [
            "evaluate",
            "--pred",
            str(image),
            "--truth",
            str(image),
            "--out",
            str(_long(tmp_path, "")),
        ],
        "config": ["predict", str(image), "--config", str(_long(tmp_path, ".json")), "--out", str(tmp_path)],
    }
    for name, args in cases.items():
        caplog.clear()
        assert _cli(*args) == 2, name
        text = caplog.text
        assert "Traceback" not in text and "x" * 300 in text, (name, text)
        assert "longer than the system allows" in text, (name, text)


def test_fifos_and_devices_named_like_images_are_refused_by_name(tmp_path, model_2d, caplog):
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    device = tmp_path / "zero.nrrd"
    device.symlink_to("/dev/zero")
    for path, what in ((fifo, "FIFO"), (device, "device")):
        with pytest.raises(InputError, match=what):
            read_image(path)
        caplog.clear()
        assert _cli("predict", str(path), "--model", str(model_2d), "--out", str(tmp_path / what)) == 2
        assert "Traceback" not in caplog.text and f": is a {what}" in caplog.text, caplog.text
    with pytest.raises(ModelFileError, match="FIFO"):
        load_model(fifo)
    # A NUL character (possible in a manifest or a summary, never on the command line): ValueError before.
    with pytest.raises(InputError, match="NUL character"):
        read_label(tmp_path / "a\x00b.nrrd")


def test_file_names_that_are_not_utf8_are_read_and_unusable_output_folders_refused(tmp_path, model_2d):
    # SimpleITK aborted the whole process (a C++ exception, exit 134, no message) on such a path:
    # each run is a subprocess so that the test reports it instead of dying with it.
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"case\xff.nrrd")
    write_image(_case().image, tmp_path / "plain.nrrd")
    os.replace(tmp_path / "plain.nrrd", raw)

    def predict(out: bytes) -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            "-m",
            "buseg",
            "predict",
            os.fsencode(folder),
            "--model",
            os.fsencode(model_2d),
        ]
        return subprocess.run(
            [*command, "--out", out, "--progress", "plain"], capture_output=True, timeout=300
        )

    done = predict(os.fsencode(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cases"][0]["status"] == "ok" and summary["cases"][0]["case"].startswith("case_")
    refused = predict(os.path.join(os.fsencode(tmp_path), b"out\xff"))
    assert refused.returncode == 2 and b"not valid UTF-8" in refused.stderr, refused.stderr[-2000:]


def _deep_json(depth: int) -> str:
    return '{"labeled": ' + "[" * depth + "]" * depth + "}"


def test_deeply_nested_json_is_refused_by_name(tmp_path, model_2d):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(_deep_json(100_000))
    config = _config(manifest)
    with pytest.raises(InputError, match="nested too deeply") as error:
        _load(config)
    assert error.value.path == str(manifest)
    image = tmp_path / "a.nrrd"
    write_image(_case().image, image)
    assert _cli("predict", str(image), "--config", str(manifest), "--out", str(tmp_path / "o")) == 2


SUMMARIES = {
    "cases not a list": {"cases": "a"},
    "class without a name": {"classes": [1]},
    "label value of the wrong type": {"classes": [{"index": 1, "name": "x", "label_value": "one"}]},
    "case without a label file": {"cases": [{"case": "a", "status": "ok", "outputs": {"label": 3}}]},
    "case not an object": {"cases": [["a"]]},
}


@pytest.mark.parametrize("kind", list(SUMMARIES))
def test_a_damaged_prediction_summary_given_to_evaluate_is_refused(tmp_path, kind):
    folder = tmp_path / "pred"
    folder.mkdir()
    summary = {"schema": "buseg-predict-summary", **SUMMARIES[kind]}
    (folder / "summary.json").write_text(json.dumps(summary))
    truth = tmp_path / "truth.nrrd"
    write_image(_case().label, truth)
    with pytest.raises(InputError, match="not a valid prediction summary") as error:
        evaluate_files([folder], [truth], tmp_path / "eval")
    assert error.value.path == str(folder / "summary.json")


# --------------------------------------------------------------------------------------
# Weak: messages, unreadable entries, leftovers, arguments, names


def test_geometry_messages_show_plain_numbers(tmp_path):
    case = _case()
    label = case.label
    label.origin = (-40.0, 0.0, 0.0)
    _labeled_folder(tmp_path, case.image, label)
    with pytest.raises(InputError, match=r"origin \(-40, 0, 0\) differs from \(-?[0-9.]+, ") as error:
        _load(_config(tmp_path))
    assert "np." not in str(error.value)


def test_a_singular_direction_is_named(tmp_path):
    header = (
        "NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 2 2 2\n"
        "space directions: (1,0,0) (1,0,0) (0,0,1)\nkinds: domain domain domain\nendian: little\n"
        "encoding: raw\nspace origin: (0,0,0)\n\n"
    )
    path = tmp_path / "singular.nrrd"
    path.write_bytes(header.encode() + bytes(32))
    with pytest.raises(InputError, match="direction matrix is singular"):
        read_image(path)


def _unreadable_entries(folder: Path) -> list[str]:
    (folder / "broken.nii.gz").symlink_to(folder / "missing.nii.gz")
    (folder / "loop.nrrd").symlink_to(folder / "loop.nrrd")
    os.mkfifo(folder / "pipe.mha")
    return ["broken", "loop", "pipe"]


def test_unreadable_entries_of_a_folder_are_listed_never_skipped_silently(tmp_path, model_2d):
    from buseg.prediction.ranking import rank_files

    folder = tmp_path / "in"
    write_image(_case().image, folder / "good.nrrd")
    bad = _unreadable_entries(folder)
    assert sorted(case for case, _ in collect_images([folder])) == sorted([*bad, "good"])
    with pytest.raises(InputError, match=r"3 of 4 case\(s\) could not be predicted: broken, loop, pipe"):
        predict_files([folder], _predict_config(model_2d, tmp_path / "out"))
    assert (tmp_path / "out" / "good" / "good_label.nrrd").is_file()
    # rank: the same rule (the others ranked and written, then an error listing the missing ones).
    with pytest.raises(InputError, match=r"3 of 4 image\(s\) could not be predicted.*broken, loop, pipe"):
        rank_files([folder], _predict_config(model_2d, tmp_path / "rank"))
    ranking = json.loads((tmp_path / "rank" / "ranking.json").read_text())
    assert [c["case"] for c in ranking["cases"]] == ["good"]
    assert sorted(f["case"] for f in ranking["failed"]) == bad
    # training: such an entry is an input that cannot be read, refused by name.
    case = _case()
    labeled = _labeled_folder(tmp_path / "labeled", case.image, case.label)
    unlabeled = tmp_path / "unlabeled"
    write_image(_case(1).image, unlabeled / "u.nrrd")
    os.mkfifo(unlabeled / "fifo.nrrd")
    with pytest.raises(InputError, match="FIFO") as error:
        _load(_config(labeled, unlabeled=unlabeled, method="bcp"))
    assert error.value.path == str(unlabeled / "fifo.nrrd")


def test_a_rerun_removes_the_temporary_files_of_an_interrupted_prediction(tmp_path, model_2d):
    image = tmp_path / "a.nrrd"
    write_image(_case().image, image)
    out = tmp_path / "out"
    assert _cli("predict", str(image), "--model", str(model_2d), "--out", str(out)) == 0
    leftovers = [
        out / "a" / ".buseg-tmp-a_label.nrrd.k2j4h5g6.nrrd",
        out / "a" / ".buseg-tmp-a.seg.nrrd.abcdefgh.seg.nrrd",
        out / ".buseg-tmp-summary.json.x1y2z3w4.json",
        out / ".buseg-tmp-write-test.q1w2e3r4",
        out / ".buseg-write-test.q1w2e3r4",  # the write probe of earlier versions
    ]
    for path in leftovers:
        path.write_bytes(b"half")
    keep = out / "a" / "notes.txt"
    keep.write_text("mine")
    assert _cli("predict", str(image), "--model", str(model_2d), "--out", str(out), "--overwrite") == 0
    assert not any(p.exists() for p in leftovers) and keep.read_text() == "mine"


def test_counts_and_label_values_are_checked(tmp_path, model_2d, capsys):
    image = tmp_path / "a.nrrd"
    write_image(_case().image, image)
    label = tmp_path / "a_label.nrrd"
    write_image(_case().label, label)
    for args in (
        ["rank", str(image), "--model", str(model_2d), "--top-regions", "-1"],
        ["evaluate", "--pred", str(label), "--truth", str(label), "--labels", "-1"],
        ["evaluate", "--pred", str(label), "--truth", str(label), "--labels", "0"],
        ["evaluate", "--pred", str(label), "--truth", str(label), "--labels", str(2**31)],
    ):
        with pytest.raises(SystemExit) as exit_info:
            _cli(*args, "--out", str(tmp_path / "o"))
        assert exit_info.value.code == 2, args
        assert args[-1] in capsys.readouterr().err
    # A label value that no file contains would give rows of empty scores that look like results.
    with pytest.raises(InputError, match=r"label value\(s\) 999 occur in no prediction"):
        evaluate_files([label], [label], tmp_path / "eval", label_values=[1, 999])
    assert not (tmp_path / "eval" / "metrics.csv").exists()


def test_numbers_that_are_not_finite_or_too_large_are_refused_by_flag(tmp_path, model_2d, caplog):
    image = tmp_path / "a.nrrd"
    write_image(_case().image, image)
    predict = ["predict", str(image), "--model", str(model_2d), "--out", str(tmp_path / "o")]
    for args, flag in (
        (["--min-region-mm3", "nan"], "--min-region-mm3"),  # accepted before: every comparison false
        (["--seed", str(10**20)], "--seed"),  # a traceback inside torch before
    ):
        caplog.clear()
        assert _cli(*predict, *args) == 2, args
        assert flag in caplog.text and "Traceback" not in caplog.text, caplog.text
    labeled = _labeled_folder(tmp_path / "data", _case().image, _case().label)
    caplog.clear()
    train = ["train", "--labeled", str(labeled), "--method", "supervised", "--out", str(tmp_path / "run")]
    assert _cli(*train, "--lr", "nan") == 2
    assert "--lr must be a finite number" in caplog.text and not (tmp_path / "run").exists()
    fifo = tmp_path / "pred" / "a.nii.gz"  # a prediction given as a file: a FIFO named like one
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="FIFO"):
        evaluate_files([fifo], [image], tmp_path / "eval")


def test_non_latin_case_names_stay_distinct(tmp_path):
    names = ["肝臓", "心臓", "сердце", "قلب", "🫀", "🫁", "a b", "a_b", "a?b"]
    folder = tmp_path / "in"
    for name in names:
        (folder / f"{name}.nrrd").parent.mkdir(exist_ok=True)
        (folder / f"{name}.nrrd").write_bytes(b"")
    cases = [case for case, _ in collect_images([folder])]
    assert len(set(cases)) == len(names)
    for name in ["肝臓", "心臓", "сердце", "قلب", "a_b"]:  # letters of any script stay as they are
        assert name in cases
    for case in cases:
        assert case == safe_case_name(case) and "/" not in case and not case.startswith(".")


# --------------------------------------------------------------------------------------
# Model metadata of any shape; a signal at any moment


def test_metadata_of_any_shape_are_refused_in_bounded_time(tmp_path, model_2d):
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="more than 200000 items"):
        check_metadata_shape({"notes": list(range(10**7))})
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ModelFileError, match="nested more than 32 levels"):
        check_metadata_shape({"notes": deep})
    with pytest.raises(ModelFileError, match="metadata hold a set"):
        check_metadata_shape({"notes": {1, 2}})
    assert time.perf_counter() - start < 5
    payload = torch.load(model_2d, weights_only=True)
    nested: list = []
    for _ in range(200):
        nested = [nested]
    path = tmp_path / "deep.pt"
    torch.save({"metadata": {**payload["metadata"], "notes": nested}, "weights": payload["weights"]}, path)
    with pytest.raises(ModelFileError, match="nested more than 32 levels"):
        load_model(path)
    # A pickled part too large to unpickle quickly is refused before unpickling.
    path = tmp_path / "large.pt"
    torch.save(
        {"metadata": {**payload["metadata"], "notes": "x" * (40 * 2**20)}, "weights": payload["weights"]},
        path,
    )
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="MiB"):
        load_model(path)
    assert time.perf_counter() - start < 2


def _opened_by(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_signal_stops_predict_at_once_even_while_the_model_file_is_read(tmp_path, model_2d):
    """SIGTERM while a (large) model file is unpickled and validated: exit 130 within seconds, and
    nothing half-written (no output of the case, no temporary file, no lock)."""
    payload = torch.load(model_2d, weights_only=True)
    slow = tmp_path / "slow.pt"
    notes = [f"n{i}" for i in range(800_000)]  # ~13 MiB pickled: seconds to unpickle
    torch.save({"metadata": {**payload["metadata"], "notes": notes}, "weights": payload["weights"]}, slow)
    image = tmp_path / "a.nrrd"
    write_image(_case().image, image)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "buseg",
            "predict",
            str(image),
            "--model",
            str(slow),
            "--out",
            str(out),
            "--progress",
            "plain",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not _opened_by(process.pid, slow) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    stopped = None  # seconds from the signal to the job's end ('finished: cancelled'), not the interpreter's
    lines = []
    for line in process.stderr:
        lines.append(line)
        if stopped is None and line.startswith("finished: cancelled"):
            stopped = time.monotonic() - sent
    assert process.wait(timeout=60) == 130, "".join(lines)
    assert stopped is not None and stopped < 1.5, (stopped, "".join(lines))
    assert not out.exists() or not any(out.rglob("*"))
