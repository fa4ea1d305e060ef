"""Inference: sliding windows as MONAI, slices along the training axis, bounded memory, OOM retry,
normalisation as in training, and uncertainty that means something (trained tiny model)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from model_files import model_metadata, write_untrained_model

from buseg.config import PredictConfig, TrainConfig
from buseg.data.preprocessing import normalize_intensity
from buseg.data.synthetic import rotation_direction, write_dataset
from buseg.errors import Cancelled, ConfigError, ResourceError
from buseg.files.images import Volume, read_image, read_label
from buseg.model.checkpoint import LoadedModel, load_model
from buseg.model.networks import build_network
from buseg.model.uncertainty import flip_sets, normalized_entropy
from buseg.prediction.case import largest_component_per_class, predict_case
from buseg.prediction.windows import predict_probabilities, probability_chunks
from buseg.training.loop import train


def _untrained(tmp_path, dimension="2d", *, dropout=True, patch=None, classes=3, seed=0) -> LoadedModel:
    metadata = model_metadata(
        [f"c{i}" for i in range(classes + 1)],
        dimension=dimension,
        colors=[[0.5, 0.5, 0.5]] * (classes + 1),
        patch_size=patch,
        dropout=dropout,
    )
    path = write_untrained_model(tmp_path / f"{dimension}_{dropout}_{seed}.pt", metadata, seed=seed)
    return load_model(path)


def _image(shape=(9, 40, 36), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.normal(100.0, 20.0, shape).astype(np.float32)
    array[2:7, 10:30, 8:28] += 80.0
    return Volume(array, (0.9, 1.1, 3.0), (12.0, -7.0, 30.0), rotation_direction(15))


# --------------------------------------------------------------------------------------
# How volumes are run


@pytest.mark.parametrize(
    ("patch", "stride"), [([32, 32, 16], None), ([32, 32, 16], [7, 9, 5]), ([48, 32, 48], None)]
)
def test_3d_windows_equal_monai_sliding_window_inference(patch, stride):
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    network = build_network("vnet", in_channels=1, num_classes=3, base_channels=4).eval()
    image = np.random.default_rng(1).random((37, 50, 45), dtype=np.float32)
    mine = predict_probabilities(
        network, image, dimension="3d", patch_size_xyz=patch, batch_size=3, stride_xyz=stride
    )
    roi = tuple(patch[::-1])
    overlap = 0.5 if stride is None else tuple(1 - s / r for s, r in zip(stride[::-1], roi, strict=True))
    with torch.no_grad():
        reference = sliding_window_inference(
            torch.from_numpy(image)[None, None],
            roi,
            3,
            lambda x: torch.softmax(network(x), 1),
            overlap=overlap,
            mode="gaussian",
        )[0]
    assert mine.shape == (3, 37, 50, 45)
    assert torch.allclose(mine, reference, atol=1e-6)


def test_3d_output_is_finished_slab_by_slab_not_held_whole():
    """Memory bound: the blended probabilities come in z-slabs no deeper than a window plus steps."""
    image = np.random.default_rng(0).random((100, 20, 20), dtype=np.float32)
    axis, chunks = probability_chunks(
        lambda x: torch.softmax(torch.cat([x, -x], 1), 1),
        image,
        dimension="3d",
        patch_size_xyz=[16, 16, 16],
        batch_size=2,
        overlap=0.5,
    )
    spans = [(a, b) for a, b, _ in chunks]
    assert axis == 0 and spans[0][0] == 0 and spans[-1][1] == 100
    assert all(b0 == a1 for (_, b0), (a1, _) in itertools.pairwise(spans))  # contiguous, in order
    assert len(spans) >= 10 and max(b - a for a, b in spans) <= 16


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_2d_runs_slices_along_the_training_axis(slice_axis):
    """With the patch equal to the plane size there is no resizing: probabilities are exactly the network's."""
    image = np.random.default_rng(0).normal(size=(6, 10, 14)).astype(np.float32)
    plane_zyx = [s for axis, s in enumerate(image.shape) if axis != 2 - slice_axis]
    seen_shapes = []

    def network(x):
        seen_shapes.append(tuple(x.shape[2:]))
        return torch.cat([x, -x, 0 * x], 1)

    probs = predict_probabilities(
        network, image, dimension="2d", patch_size_xyz=plane_zyx[::-1], slice_axis=slice_axis, batch_size=4
    )
    expected = torch.softmax(torch.from_numpy(np.stack([image, -image, 0 * image])), 0)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert set(seen_shapes) == {tuple(plane_zyx)}


def test_2d_resizes_to_the_training_size_and_back(tmp_path):
    model = _untrained(tmp_path, "2d", patch=[32, 48])
    image = _image()
    prediction = predict_case(model, image, PredictConfig(), keep_probabilities=True)
    probs = prediction.probabilities
    assert probs.shape == (4, *image.array.shape)
    assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert np.array_equal(prediction.labels, probs.argmax(axis=0))
    entropy = normalized_entropy(torch.from_numpy(probs)[None], dim=1)[0].numpy()
    assert np.allclose(prediction.uncertainty_map, entropy, atol=1e-5)
    assert prediction.uncertainty_map.dtype == np.float32
    assert prediction.seconds >= prediction.model_seconds > 0
    # The prediction keeps the image's geometry, not its voxels.
    assert prediction.reference.same_grid(image) is None and prediction.reference.array.strides == (0, 0, 0)


def test_normalisation_is_the_models_so_intensity_scale_does_not_matter(tmp_path):
    model = _untrained(tmp_path, "2d")
    image = _image()
    rescaled = image.with_array(image.array * 7.5 - 300.0)
    a, b = predict_case(model, image), predict_case(model, rescaled)
    assert np.array_equal(a.labels, b.labels)
    assert np.allclose(a.uncertainty_map, b.uncertainty_map, atol=1e-4)
    # ...and equal to the training loop's validation path on the normalised volume.
    probs = predict_probabilities(
        model.network,
        normalize_intensity(image.array, "minmax"),
        dimension="2d",
        patch_size_xyz=model.patch_size_xyz,
        slice_axis=2,
    ).numpy()
    top2 = np.sort(probs, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-4  # predict_case folds BatchNorm into the convolutions: rounding differs
    assert clear.mean() > 0.99 and np.array_equal(a.labels[clear], probs.argmax(0)[clear])


@pytest.mark.parametrize("dimension", ["2d", "3d"])
def test_inference_network_computes_the_same_and_keeps_dropout(dimension):
    from buseg.model.networks import has_dropout
    from buseg.prediction.case import inference_network

    torch.manual_seed(0)
    network = build_network(
        "unet2d" if dimension == "2d" else "vnet", in_channels=1, num_classes=3, base_channels=4
    )
    for module in network.modules():  # non-trivial running statistics, as after training
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    network.eval()
    fast = inference_network(network, dimension)
    x = torch.randn((2, 1, 32, 32) if dimension == "2d" else (1, 1, 16, 32, 32))
    with torch.no_grad():
        assert torch.allclose(fast(x), network(x), atol=1e-4)
    norms = (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    assert not any(isinstance(m, norms) for m in fast.modules())
    assert any(isinstance(m, norms) for m in network.modules())  # the caller's network is untouched
    assert has_dropout(fast)


@pytest.mark.parametrize("dimension", ["2d", "3d"])
def test_out_of_memory_is_retried_with_smaller_batches(tmp_path, dimension, monkeypatch):
    model = _untrained(tmp_path, dimension)
    image = _image(shape=(20, 40, 36))
    config = PredictConfig(sw_batch_size=4, slice_batch_size=8)
    expected = predict_case(model, image, config)
    original = type(model.network).forward
    batches = []

    def forward(self, x):
        batches.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, x)

    monkeypatch.setattr(type(model.network), "forward", forward)
    warnings = []
    retried = predict_case(model, image, config, warn=warnings.append)
    assert np.array_equal(retried.labels, expected.labels)
    assert np.allclose(retried.uncertainty_map, expected.uncertainty_map, atol=1e-5)
    halving = [8, 4, 2, 1] if dimension == "2d" else [4, 2, 1]
    assert batches[: len(halving)] == halving
    assert any("out of memory" in w for w in warnings)

    def always(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(model.network), "forward", always)
    with pytest.raises(ResourceError, match="even with one"):
        predict_case(model, image, config)


def test_window_batch_defaults_to_one_on_the_cpu_and_four_on_a_gpu():
    from buseg.prediction.case import window_batch_size

    assert window_batch_size(PredictConfig(), torch.device("cpu")) == 1
    assert window_batch_size(PredictConfig(), torch.device("cuda")) == 4
    assert window_batch_size(PredictConfig(sw_batch_size=3), torch.device("cpu")) == 3


def test_cancel_stops_between_batches(tmp_path):
    model = _untrained(tmp_path, "2d")
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        predict_case(
            model, _image(shape=(40, 40, 36)), PredictConfig(slice_batch_size=4), should_stop=should_stop
        )


def test_largest_component_keeps_one_blob_per_class():
    labels = np.zeros((5, 10, 10), dtype=np.uint8)
    labels[1:4, 1:5, 1:5] = 1  # big
    labels[1, 8, 8] = 1  # speck of class 1
    labels[3, 8, 1:3] = 2  # class 2: two blobs, the larger one stays
    labels[0, 0, 9] = 2
    out = largest_component_per_class(labels, 3)
    assert out[1, 8, 8] == 0 and out[0, 0, 9] == 0
    assert (out == 1).sum() == 48 and (out == 2).sum() == 2


def test_mc_dropout_needs_dropout_layers(tmp_path):
    model = _untrained(tmp_path, "2d", dropout=False)
    with pytest.raises(ConfigError, match="dropout"):
        predict_case(model, _image(), PredictConfig(uncertainty="mc-dropout"))


def test_tta_uses_flip_combinations_identity_first():
    assert flip_sets(2, 8) == [(), (2,), (3,), (2, 3)]
    assert len(flip_sets(3, 8)) == 8 and flip_sets(3, 3) == [(), (2,), (3,)]


# --------------------------------------------------------------------------------------
# Uncertainty with a trained tiny model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    folders = write_dataset(root / "data", labeled=2, unlabeled=0, test=1, shape_zyx=(16, 48, 48), seed=3)
    config = TrainConfig()
    config.method.name = "supervised"
    config.method.model_weights = "student"  # after 30 iterations the EMA teacher has barely moved
    config.data.labeled = str(folders["labeled"])
    config.model.patch_size = [48, 48]
    config.optim.iterations = 30
    config.optim.batch_size = 4
    config.out_dir = str(root / "run")
    config.validation_interval = 0
    result = train(config)
    image = read_image(folders["test"] / "images" / "test_000.nii.gz")
    truth = read_label(folders["test"] / "labels" / "test_000.nii.gz").array
    return load_model(result.model_path), image, truth


@pytest.mark.parametrize(("method", "samples"), [("entropy", 1), ("mc-dropout", 6), ("tta", 4)])
def test_uncertainty_is_higher_where_the_model_is_wrong(trained, method, samples):
    model, image, truth = trained
    prediction = predict_case(model, image, PredictConfig(uncertainty=method, samples=samples))
    wrong = prediction.labels != truth
    assert 0.001 < wrong.mean() < 0.5, "the tiny model should be partly right, partly wrong"
    u = prediction.uncertainty_map
    assert u[wrong].mean() > 3 * u[~wrong].mean()
    assert u.min() >= 0.0 and u.max() <= 1.0


def test_mc_dropout_t1_is_one_noisy_pass_and_more_passes_converge(trained):
    """As documented in buseg.model.uncertainty: T=1 is a single dropout pass (not the deterministic map);
    the map is reproducible for a seed, and the spread between seeds shrinks as T grows."""
    model, image, _ = trained

    def run(samples, seed):
        return predict_case(model, image, PredictConfig(uncertainty="mc-dropout", samples=samples, seed=seed))

    deterministic = predict_case(model, image, PredictConfig(uncertainty="entropy")).uncertainty_map
    one_a, one_b = run(1, 0).uncertainty_map, run(1, 1).uncertainty_map
    assert np.array_equal(one_a, run(1, 0).uncertainty_map)
    assert np.abs(one_a - deterministic).mean() > 1e-3
    many_a, many_b = run(8, 0).uncertainty_map, run(8, 1).uncertainty_map
    assert np.abs(many_a - many_b).mean() < 0.6 * np.abs(one_a - one_b).mean()
    assert not model.network.training and all(not m.training for m in model.network.modules())


# --------------------------------------------------------------------------------------
# Precision: bfloat16 autocast where the CPU runs it (BUSEG_CPU_BF16=1 opts in), float32 with --no-amp


def _forward_pair(dimension: str):
    """fp32 and bf16 logits of the full-width network (non-trivial BatchNorm statistics) on a fixed input."""
    from buseg.prediction.case import _forward_for, inference_network

    torch.manual_seed(0)
    network = build_network("unet2d" if dimension == "2d" else "vnet", in_channels=1, num_classes=4)
    for module in network.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    fast = inference_network(network.eval(), dimension)
    shape = (2, 1, 64, 64) if dimension == "2d" else (1, 1, 32, 32, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    with torch.inference_mode():
        return _forward_for(fast, cpu, False, dimension)(x), _forward_for(fast, cpu, True, dimension)(x)


@pytest.mark.parametrize("dimension", ["2d", "3d"])
def test_bf16_forward_is_within_tolerance_of_fp32(dimension, monkeypatch):
    """Stated tolerance: mean |bf16 - fp32| <= 1% and max <= 5% of the fp32 logits' std (measured 0.3%/1.3%
    for the U-Net, 0.4%/2.6% for the V-Net); softmax within 5e-3. The logits come back float32."""
    monkeypatch.setenv("BUSEG_CPU_BF16", "1")
    fp32, bf16 = _forward_pair(dimension)
    assert bf16.dtype == torch.float32
    difference, scale = (fp32 - bf16).abs(), fp32.std()
    assert difference.max() > 0, "bfloat16 did not run"
    assert difference.mean() <= 0.01 * scale and difference.max() <= 0.05 * scale
    assert (torch.softmax(fp32, 1) - torch.softmax(bf16, 1)).abs().max() <= 5e-3


@pytest.mark.parametrize("dimension", ["2d", "3d"])
@pytest.mark.parametrize("method", ["entropy", "mc-dropout", "tta"])
def test_every_network_pass_runs_under_bf16_autocast(tmp_path, dimension, method, monkeypatch):
    """2D slices, 3D windows, each MC-dropout and TTA pass: autocast on, bfloat16, when the CPU has it."""
    monkeypatch.setenv("BUSEG_CPU_BF16", "1")
    model = _untrained(tmp_path, dimension)
    states = []
    original = type(model.network).forward

    def recording(self, x):
        states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(self, x)

    monkeypatch.setattr(type(model.network), "forward", recording)
    predict_case(model, _image(), PredictConfig(uncertainty=method, samples=3, slice_batch_size=4))
    passes = 1 if method == "entropy" else 3
    assert len(states) >= passes * (3 if dimension == "2d" else 1)  # 9 slices in batches of 4: 3 batches
    assert all(state == (True, torch.bfloat16) for state in states)
    states.clear()
    predict_case(model, _image(), PredictConfig(uncertainty=method, samples=3, amp=False))
    assert states and not any(enabled for enabled, _ in states)


@pytest.mark.parametrize(("method", "samples"), [("entropy", 1), ("mc-dropout", 6), ("tta", 4)])
def test_bf16_uncertainty_maps_are_close_to_fp32(trained, method, samples, monkeypatch):
    """Stated tolerance: labels agree on >= 99% of voxels, mean |uncertainty difference| <= 0.01 (0..1 scale),
    and the maps are float32 with the same range."""
    model, image, _ = trained
    config = PredictConfig(uncertainty=method, samples=samples)
    fp32 = predict_case(model, image, config)
    monkeypatch.setenv("BUSEG_CPU_BF16", "1")
    bf16 = predict_case(model, image, config)
    assert bf16.uncertainty_map.dtype == np.float32
    difference = np.abs(bf16.uncertainty_map - fp32.uncertainty_map)
    assert 0 < difference.mean() <= 0.01
    assert (bf16.labels == fp32.labels).mean() >= 0.99


def test_no_amp_gives_the_float32_numbers_exactly(trained, monkeypatch):
    model, image, _ = trained
    config = PredictConfig(uncertainty="tta", samples=2, amp=False)
    reference = predict_case(model, image, config)  # float32 CPU (the suite's default)
    monkeypatch.setenv("BUSEG_CPU_BF16", "1")
    no_amp = predict_case(model, image, config)
    assert np.array_equal(no_amp.uncertainty_map, reference.uncertainty_map)
    assert np.array_equal(no_amp.labels, reference.labels)
    with_amp = predict_case(model, image, PredictConfig(uncertainty="tta", samples=2))
    assert not np.array_equal(with_amp.uncertainty_map, reference.uncertainty_map)


def test_class_argmax_equals_torch_argmax_with_the_first_maximum_winning_ties():
    """Pseudo-labels, validation and inference take the class argmax by a running maximum (faster on
    the CPU); it must give torch's labels, ties to the lowest class included."""
    import torch

    from buseg.model.uncertainty import class_argmax

    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(torch.randn(3, 4, 17, 19, generator=generator), dim=1)
    probabilities[:, 2] = probabilities[:, 1]  # exact ties between classes 1 and 2
    probabilities[0, :, 0, 0] = 0.25  # a four-way tie
    assert torch.equal(class_argmax(probabilities, torch.int64), probabilities.argmax(1))
    volume = probabilities[0]  # (C, z, y) as validation passes it, with a leading batch of one
    assert torch.equal(class_argmax(volume[None], torch.int64)[0], volume.argmax(0))


# --------------------------------------------------------------------------------------
# The catalog of uncertainty measures: one entry, and every list of measures has it


@pytest.fixture()
def throwaway_measure():
    """A measure registered in the catalog for one test, then removed: the entropy of the softmax of
    the logits halved (a 'temperature' of 2), two passes per input; it counts the batches it sees."""
    from buseg.catalogs import measures

    batches = []

    def tempered(network, forward, samples):
        def probabilities(x):
            batches.append(x.shape[0])
            return torch.softmax(forward(x).float() / 2, dim=1)

        return probabilities

    entry = measures.register(
        measures.UncertaintyMeasure(
            "throwaway",
            "Throw-away (a test's measure)",
            "a test's measure",
            tempered,
            passes=lambda samples, spatial_dims: 2,
        )
    )
    yield entry, batches
    measures.unregister(entry.name)


def _uncertainty_actions(parser):
    """The --uncertainty options of the parser's sub-commands, by command name."""
    found = {}
    for action in parser._actions:
        if isinstance(getattr(action, "choices", None), dict):  # the sub-commands
            for command, sub in action.choices.items():
                found.update((command, a) for a in sub._actions if "--uncertainty" in a.option_strings)
    return found


def test_a_measure_registered_in_the_catalog_is_offered_everywhere_and_predicts(tmp_path, throwaway_measure):
    import sys
    from pathlib import Path

    from buseg.cli import build_parser
    from buseg.config import from_dict

    entry, batches = throwaway_measure
    actions = _uncertainty_actions(build_parser())
    assert "throwaway" in actions["predict"].choices and "a test's measure" in actions["predict"].help
    assert "throwaway" not in actions["train"].choices  # not offered in training (in_training is off)
    config = from_dict(PredictConfig, {"model_path": "m.pt", "uncertainty": "throwaway"}).validate()
    train_config = TrainConfig()
    train_config.data.labeled, train_config.uncertainty.method = "x", "throwaway"
    with pytest.raises(ConfigError, match="--uncertainty must be one of entropy, mc-dropout in training"):
        train_config.validate()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "BidirUncertaintySeg"))
    from BidirUncertaintySegLib import parameters

    segment = parameters.parameter("segmentUncertainty")
    assert segment.choiceLabels[segment.choices.index("throwaway")] == entry.label
    assert "throwaway" not in parameters.parameter("trainUncertainty").choices
    # A prediction with it runs its probability function and says what it cost.
    model, image = _untrained(tmp_path), _image()
    config.slice_batch_size = 4
    prediction = predict_case(model, image, config, keep_probabilities=True)
    assert (prediction.method, prediction.passes) == ("throwaway", 2)
    assert sum(batches) == image.array.shape[0]  # every slice, through the measure's function
    expected = normalized_entropy(torch.from_numpy(prediction.probabilities)[None], dim=1)[0].numpy()
    assert np.allclose(prediction.uncertainty_map, expected, atol=1e-6)
    entropy = predict_case(model, image, PredictConfig(uncertainty="entropy", slice_batch_size=4))
    assert np.all(prediction.uncertainty_map >= entropy.uncertainty_map - 1e-6)  # softer at temperature 2
    assert (prediction.uncertainty_map > entropy.uncertainty_map + 1e-3).mean() > 0.5


def test_a_measure_not_in_the_catalog_is_refused_by_the_config_and_the_panel():
    from buseg.config import from_dict

    with pytest.raises(ConfigError, match=r"uncertainty: 'throwaway' is not one of entropy, mc-dropout, tta"):
        from_dict(PredictConfig, {"model_path": "m.pt", "uncertainty": "throwaway"})
    with pytest.raises(ConfigError, match="--uncertainty must be one of entropy, mc-dropout, tta"):
        PredictConfig(model_path="m.pt", uncertainty="throwaway").validate()
