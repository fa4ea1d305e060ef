"""``buseg rank``: the images the model is least sure about come first, with regions to look at."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from buseg.cli import main
from buseg.config import PredictConfig, TrainConfig
from buseg.data.synthetic import make_case, write_dataset
from buseg.errors import OutputError
from buseg.files.images import read_image, write_image
from buseg.prediction.case import predict_case
from buseg.prediction.ranking import case_statistics, rank_files
from buseg.training.loop import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model trained on noise level 0.08, and unlabeled images with less and much more noise."""
    root = tmp_path_factory.mktemp("rank")
    folders = write_dataset(root / "data", labeled=2, unlabeled=0, test=0, shape_zyx=(16, 48, 48), seed=3)
    config = TrainConfig()
    config.method.name = "supervised"
    config.data.labeled = str(folders["labeled"])
    config.model.patch_size = [48, 48]
    config.optim.iterations = 30
    config.optim.batch_size = 4
    config.out_dir = str(root / "run")
    config.validation_interval = 0
    config.method.model_weights = "student"  # an EMA teacher has barely moved after 30 iterations
    model = train(config).model_path
    rng = np.random.default_rng(11)
    pool = root / "pool"
    for name, noise in (("a_clean", 0.03), ("b_noisy", 0.3), ("c_very_noisy", 0.6)):
        write_image(make_case(rng, (16, 48, 48), noise=noise).image, pool / f"{name}.nii.gz")
    return model, pool


def test_the_noisiest_images_rank_first_with_the_default_and_the_mean_score(setup, tmp_path):
    model, pool = setup
    for score in ("dice-risk", "mean-uncertainty"):
        config = PredictConfig(model_path=str(model), out_dir=str(tmp_path / score))
        result = rank_files([pool], config, score_name=score)
        # The two noisy images before the clean one; between them the tiny model is unsure of
        # almost everything (mean uncertainty about 0.8 on both), so their order is not the point.
        assert {e["case"] for e in result.entries[:2]} == {"c_very_noisy", "b_noisy"}, score
        assert result.entries[2]["case"] == "a_clean", score
        assert [e["rank"] for e in result.entries] == [1, 2, 3]
        scores = [e["score"] for e in result.entries]
        assert scores == sorted(scores, reverse=True)


def test_statistics_are_those_of_the_prediction(setup, tmp_path):
    from buseg.model.checkpoint import load_model

    model_path, pool = setup
    config = PredictConfig(model_path=str(model_path), out_dir=str(tmp_path / "r"))
    entries = {e["case"]: e for e in rank_files([pool], config, top_regions=2).entries}
    prediction = predict_case(load_model(model_path), read_image(pool / "b_noisy.nii.gz"), config)
    stats = case_statistics(prediction, config.region_threshold)
    u, foreground = prediction.uncertainty_map, prediction.labels > 0
    errors = u[foreground | (u > config.region_threshold)].sum(dtype=np.float64)
    assert stats["dice_risk"] == pytest.approx(errors / (2 * foreground.sum() + errors))
    assert stats["mean_uncertainty"] == pytest.approx(float(u.mean()))
    assert entries["b_noisy"]["statistics"] == pytest.approx(stats)
    assert entries["b_noisy"]["top_regions"] == [r.to_dict() for r in prediction.regions.regions[:2]]


def test_cli_rank_prints_and_writes_the_ranking(setup, tmp_path, capsys):
    model, pool = setup
    out = tmp_path / "out"
    argv = [
        "rank",
        str(pool),
        "--model",
        str(model),
        "--out",
        str(out),
        "--progress",
        "none",
        "--num-threads",
        "1",
        "--save-predictions",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["rank", "case", "dice-risk"]
    with open(out / "ranking.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert printed[2].split()[:2] == ["1", rows[0]["case"]]
    assert [r["case"] for r in rows][2] == "a_clean" and rows[0]["rank"] == "1"
    document = json.loads((out / "ranking.json").read_text())
    assert document["score"] == "dice-risk" and len(document["cases"][0]["top_regions"]) <= 3
    assert (out / "a_clean" / "a_clean.seg.nrrd").is_file() and (out / "a_clean" / "regions.json").is_file()
    plain = [("plain" if a == "none" else a) for a in argv]
    assert main(plain) == 2  # ranking files exist: refused without --overwrite
    assert "exists already" in capsys.readouterr().err
    with pytest.raises(OutputError):
        rank_files([pool], PredictConfig(model_path=str(model), out_dir=str(out)))


def test_save_first_prediction_keeps_the_outputs_of_the_first_ranked_case_only(setup, tmp_path):
    # The images come in name order and the clean one, first, scores lowest: the outputs written
    # for it are replaced by a higher-scored case's, so one case's files are on disk at a time.
    model, pool = setup
    out = tmp_path / "out"
    config = PredictConfig(model_path=str(model), out_dir=str(out))
    result = rank_files([pool], config, save_first_prediction=True)
    first, *others = result.entries
    assert others[-1]["case"] == "a_clean"
    assert sorted(first["outputs"]) == ["label", "regions", "segmentation", "uncertainty"]
    assert all(Path(p).is_file() and Path(p).parent == out / first["case"] for p in first["outputs"].values())
    assert all(e["outputs"] == {} for e in others)
    assert sorted(p.name for p in out.iterdir()) == sorted([first["case"], "ranking.csv", "ranking.json"])
    written = json.loads((out / "ranking.json").read_text())["cases"]
    assert written[0]["outputs"] == first["outputs"] and written[1]["outputs"] == {}
