"""benchmarks/gpu_check.py on the CPU with --tiny: every part's logic, the time limits, the report.

The real run needs a CUDA GPU (docs/benchmarks.md, "GPU check"); here the same code runs at
tiny sizes, so that a GPU day finds a script that works the first time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import signal
import sys
import threading
import time

import psutil
import pytest
import torch

from benchmarks import gpu_check

FAKE_CUDA_TESTS = """
import pytest

@pytest.mark.cuda
def test_passes():
    pass

@pytest.mark.cuda
def test_fails():
    assert 1 == 2, "the card said no"

@pytest.mark.cuda
@pytest.mark.skip(reason="not on this card")
def test_skipped():
    pass

def test_not_marked_cuda():
    pass
"""


def _card_stem() -> str:
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"gpu_{gpu_check.safe_card_name(card)}-tiny"


def _no_exit(code: int) -> None:
    raise AssertionError(f"the watchdog fired (exit {code}) in a run that should fit its budget")


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    """One --tiny run of every part: (its JSON report, the markdown, the printed summary, exit code)."""
    root = tmp_path_factory.mktemp("gpu_check")
    tests = root / "cuda_tests"
    tests.mkdir()
    (tests / "test_fake_cuda.py").write_text(FAKE_CUDA_TESTS)
    (tests / "test_broken.py").write_text("import a_module_that_does_not_exist\n")
    (root / "no_data").mkdir()
    out = root / "out"
    argv = ["--tiny", "--out", str(out), "--data-root", str(root / "no_data"), "--cuda-tests", str(tests)]
    argv += ["--methods", "buarl", "supervised"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = gpu_check.main(argv, watchdog_exit=_no_exit)
    stem = _card_stem()
    report = json.loads((out / f"{stem}.json").read_text())
    return report, (out / f"{stem}.md").read_text(), printed.getvalue(), code


@pytest.mark.slow  # shares one --tiny run of every part (~30-70 s on 2 shared cores)
def test_tiny_check_completes_every_part_and_writes_both_files(tiny_check):
    report, markdown, _, code = tiny_check
    assert code == 0
    assert report["status"] == "complete", report["status"]
    assert [p["status"] for p in report["parts"].values()] == ["complete"] * 4
    assert report["tiny"] and report["targets"] == []  # tiny sizes say nothing about the targets
    for key in ("card", "torch", "cuda", "cudnn", "gpu_count"):
        assert key in report["machine"]
    for title in ("## CUDA tests", "## Training speed", "## Inference speed", "## 2-process DDP smoke test"):
        assert title in markdown


@pytest.mark.slow
def test_cuda_tests_part_reports_each_outcome_of_the_marked_tests_only(tiny_check):
    part = tiny_check[0]["parts"]["cuda_tests"]
    assert part["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    outcomes = {t["test"].split("::")[-1]: t for t in part["tests"]}
    assert set(outcomes) == {"test_passes", "test_fails", "test_skipped"}  # -m cuda: the unmarked one not run
    assert "the card said no" in outcomes["test_fails"]["detail"]
    assert "not on this card" in outcomes["test_skipped"]["detail"]
    # A file that cannot be imported is reported, and the other files' tests still ran.
    assert len(part["collection_errors"]) == 1 and "test_broken.py" in part["collection_errors"][0]


@pytest.mark.slow
def test_training_part_times_each_method_and_projects_the_published_run(tiny_check):
    part = tiny_check[0]["parts"]["training"]
    runs = {(r["dataset"], r["method"]): r for r in part["runs"]}
    assert set(runs) == {("acdc", "buarl"), ("acdc", "supervised"), ("la", "buarl"), ("la", "supervised")}
    for (dataset, _), run in runs.items():
        assert run["status"] == "complete" and run["timed_iterations"] == 1
        assert run["s_per_iteration_mean"] > 0
        iterations = {"acdc": 30000, "la": 15000}[dataset]
        assert run["published_iterations"] == iterations
        assert run["projected_minutes"] == pytest.approx(
            run["s_per_iteration_mean"] * iterations / 60, abs=0.06
        )
    assert all("not found" in what for what in part["data"].values())  # generated data, and said so


@pytest.mark.slow
def test_inference_part_times_acdc_la_and_ct_sized_volumes(tiny_check):
    rows = tiny_check[0]["parts"]["inference"]["rows"]
    assert [(r["volume"], r["method"]) for r in rows] == [
        ("ACDC volume", "entropy"),
        ("ACDC volume", "mc-dropout T=2"),
        ("LA volume", "entropy"),
        ("LA volume", "mc-dropout T=2"),
        ("CT-sized volume", "entropy"),
    ]
    for row in rows:
        assert row["status"] == "complete" and row["model_seconds_median"] > 0
    assert rows[0]["data"].startswith("generated") and rows[2]["data"].startswith("generated")


@pytest.mark.slow
def test_ddp_part_trains_two_gloo_processes(tiny_check):
    part = tiny_check[0]["parts"]["ddp"]
    assert part["passed"], part.get("problems")
    assert part["world_size"] == 2 and part["iterations_done"] == 4  # 2 pre-training + 2 self-training
    expected = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    assert part["backend"] == expected and "rank 0 of 2" in part["device_reason"]


@pytest.mark.slow
def test_summary_fits_one_screen_and_names_the_report(tiny_check):
    summary = tiny_check[2].split("GPU check on", 1)[1]
    assert len(summary.splitlines()) <= 30
    assert f"{_card_stem()}.md" in summary and "s/it" in summary and "ms" in summary


def test_a_small_budget_stops_the_parts_and_the_report_says_partial(tmp_path):
    fake = tmp_path / "test_fake_cuda.py"
    fake.write_text(FAKE_CUDA_TESTS)
    argv = ["--tiny", "--budget-seconds", "4", "--out", str(tmp_path / "out"), "--cuda-tests", str(fake)]
    assert gpu_check.main([*argv, "--data-root", str(tmp_path)], watchdog_exit=lambda code: None) == 0
    report = json.loads((tmp_path / "out" / f"{_card_stem()}.json").read_text())
    assert report["status"].startswith("partial") or report["status"].startswith("stopped by the watchdog")
    statuses = [p["status"] for p in report["parts"].values()]
    assert all(s != "complete" for s in statuses), statuses
    assert "partial" in (tmp_path / "out" / f"{_card_stem()}.md").read_text()


def test_a_training_run_stopped_at_its_limit_keeps_what_it_measured(tmp_path):
    profile = dataclasses.replace(gpu_check.PROFILES["tiny"], timed_iterations=10**6)
    setting = profile.settings["acdc"]
    data, _ = gpu_check.speed.load_data(setting, None)
    cpu = torch.device("cpu")
    start = time.perf_counter()
    run = gpu_check.time_training_run("supervised", setting, data, profile, cpu, tmp_path / "a", start + 6)
    assert run["stopped_at_limit"] and time.perf_counter() - start < 30
    assert 2 <= run["iterations_done"] < 10**6 and run["timed_iterations"] == run["iterations_done"] - 1
    assert run["s_per_iteration_mean"] > 0
    # No time at all: nothing measured, and still a row (not an exception).
    run = gpu_check.time_training_run(
        "supervised", setting, data, profile, cpu, tmp_path / "b", time.perf_counter()
    )
    assert run["stopped_at_limit"] and run["timed_iterations"] == 0 and run["s_per_iteration_mean"] is None


def test_a_prediction_stopped_at_its_limit_is_marked_partial(tmp_path):
    profile = gpu_check.PROFILES["tiny"]
    case = gpu_check.inference_cases(profile, None)[0]
    path = gpu_check.inference_speed.model_file(tmp_path / "m.pt", "2d", 4, [32, 32], "minmax")
    model = gpu_check.load_model(path)
    row = gpu_check.time_prediction(
        case, model, case.configs[0][1], 3, torch.device("cpu"), time.perf_counter()
    )
    assert row["repeats"] == 0 and row["status"] == "partial: 0 of 3 repeats in its time"


def test_the_watchdog_writes_the_report_and_ends_the_process(tmp_path):
    report = gpu_check.Report(tmp_path, "gpu_test", {"tiny": True, "command": "x", "started": "now"})
    report.data.update(budget_seconds=1.0, machine={"card": "test", "torch": "t", "cuda": "c"}, data_root="-")
    report.part("training")["status"] = "running"
    exits: list[int] = []
    with gpu_check.Watchdog(report, 0.05, exit=exits.append):
        deadline = time.time() + 10
        while not exits and time.time() < deadline:
            time.sleep(0.02)
    assert exits == [3]
    written = json.loads((tmp_path / "gpu_test.json").read_text())
    assert written["status"].startswith("stopped by the watchdog")
    assert written["parts"]["training"]["status"].startswith("partial")
    assert "stopped by the watchdog" in (tmp_path / "gpu_test.md").read_text()


def test_the_watchdog_ends_the_subprocess_of_the_part_that_overran(tmp_path):
    report = gpu_check.Report(tmp_path, "gpu_test", {"tiny": True, "command": "x", "started": "now"})
    report.data.update(budget_seconds=1.0, machine={"card": "test", "torch": "t", "cuda": "c"}, data_root="-")
    results: list[tuple] = []
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    part = threading.Thread(
        target=lambda: results.append(gpu_check.run_limited(sleeper, 60, gpu_check.clean_env()))
    )
    exits: list[int] = []
    with gpu_check.Watchdog(report, 1.0, exit=exits.append):
        part.start()
        part.join(timeout=30)
    assert exits == [3] and results, "the part's subprocess was still running 30 s after the watchdog fired"
    assert results[0][0] == -signal.SIGKILL and not gpu_check.RUNNING_GROUPS


def test_a_part_past_its_limit_is_killed_with_its_children():
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(child.pid, flush=True); time.sleep(60)"
    )
    start = time.perf_counter()
    exit_code, stdout, _, _ = gpu_check.run_limited([sys.executable, "-c", code], 3.0, gpu_check.clean_env())
    assert exit_code is None and time.perf_counter() - start < 20
    grandchild = int(stdout.split()[0])
    time.sleep(0.5)
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE


def test_targets_are_judged_on_a_full_run_and_shown_in_the_report():
    data = {
        "tiny": False,
        "command": "x",
        "started": "now",
        "wall_seconds": 400.0,
        "budget_seconds": 480.0,
        "status": "complete",
        "machine": {"card": "NVIDIA H100", "torch": "2.13", "cuda": "12.6"},
        "data_root": "-",
        "parts": {
            "training": {
                "title": "Training speed",
                "status": "complete",
                "runs": [
                    {
                        "dataset": "acdc",
                        "method": "bcp",
                        "label": "BCP",
                        "setting": "s",
                        "status": "complete",
                        "projected_minutes": 10.0,
                        "published_iterations": 30000,
                    },
                    {
                        "dataset": "acdc",
                        "method": "buarl",
                        "label": "ours",
                        "setting": "s",
                        "status": "complete",
                        "projected_minutes": 61.0,
                        "published_iterations": 30000,
                    },
                ],
            },
            "inference": {
                "title": "Inference speed",
                "status": "complete",
                "rows": [
                    {
                        "volume": "ACDC volume",
                        "method": "entropy",
                        "model_seconds_median": 0.04,
                        "shape_xyz": "s",
                        "data": "d",
                        "status": "complete",
                    },
                    {
                        "volume": "LA volume",
                        "method": "entropy",
                        "status": "not run: no time left",
                        "shape_xyz": "s",
                        "data": "d",
                    },
                ],
            },
        },
    }
    verdicts = gpu_check.target_verdicts(data)
    assert [(v["measured"], v["met"]) for v in verdicts] == [
        ("61.0 min", False),
        ("40.0 ms", True),
        ("not measured", None),
    ]
    data["targets"] = verdicts
    markdown = gpu_check.markdown(data)
    assert (
        "## Targets (issue 17)" in markdown
        and "| 61.0 min | no |" in markdown
        and "| not measured | - |" in markdown
    )


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("NVIDIA H200", "nvidia-h200"),
        ("NVIDIA GeForce RTX 4090 (Laptop)/x", "nvidia-geforce-rtx-4090-laptop-x"),
        ("", "unknown"),
    ],
)
def test_card_names_become_safe_file_names(name, safe):
    assert gpu_check.safe_card_name(name) == safe


@pytest.mark.parametrize(
    ("gpus", "backend", "device"),
    [(0, "gloo", "cpu"), (1, "gloo", "cpu"), (2, "nccl", "cuda"), (8, "nccl", "cuda")],
)
def test_ddp_uses_nccl_with_two_gpus_and_gloo_on_the_cpu_otherwise(gpus, backend, device):
    chosen_backend, chosen_device, why = gpu_check.ddp_plan(gpus)
    assert (chosen_backend, chosen_device) == (backend, device)
    assert ("one GPU" in why) == (gpus == 1)


def test_bad_arguments_are_refused_in_one_line_before_any_work(tmp_path, capsys):
    (tmp_path / "a_file").write_text("mine")
    cases = [
        ["--tiny", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")],
        ["--tiny", "--out", str(tmp_path / "a_file")],
        ["--tiny", "--budget-seconds", "0", "--out", str(tmp_path / "o2")],
    ]
    if not torch.cuda.is_available():
        cases.append(["--out", str(tmp_path / "o3")])  # the full sizes need a GPU
    for argv in cases:
        assert gpu_check.main(argv, watchdog_exit=_no_exit) == 2, argv
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and error.startswith("gpu_check:"), error
    assert (tmp_path / "a_file").read_text() == "mine"
    assert not any(
        (tmp_path / name).exists() and any((tmp_path / name).iterdir()) for name in ("o1", "o2", "o3")
    )


def test_the_methods_timed_are_the_catalogs_each_a_speed_configuration():
    from benchmarks import speed
    from buseg.catalogs.methods import CATALOG

    assert tuple(CATALOG) == gpu_check.METHODS and gpu_check.METHODS[0] == "buarl"  # ours first
    assert set(gpu_check.METHODS) <= set(speed.CONFIGURATIONS)
    assert gpu_check.METHOD_LABELS["buarl"] == "BUARL (ours)"
