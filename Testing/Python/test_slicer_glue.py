"""The Slicer module's MRML glue on Slicer's real MRML libraries (PyPI slicer-core).

Uncertainty overlay display, regions to a table and markups, jump-to-region slice positions,
the live training plot, the parameter node (typed values, persistence with the scene, the
TrainConfig it fills), adding a corrected case - and the whole train / segment / rank flow
through the real worker process (``python -m buseg ...``), as the module runs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "BidirUncertaintySeg"))

slicer = pytest.importorskip("slicer", reason="needs PyPI slicer-core (Slicer's MRML in plain Python)")
from slicer_app import create_slicer_app  # noqa: E402
from test_slicer_files import add_segmentation, add_volume, synthetic, write_predict_outputs  # noqa: E402

from BidirUncertaintySegLib import engine, nodefiles, parameters, presenter, review, workflow  # noqa: E402
from BidirUncertaintySegLib.errors import ModuleError, PreviousTrainingError  # noqa: E402
from buseg.data.synthetic import CLASS_NAMES  # noqa: E402

pytestmark = pytest.mark.slicer
VIEWS = ("Red", "Yellow", "Green")


@pytest.fixture()
def app():
    return create_slicer_app()


@pytest.fixture()
def store(app):
    node = app.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "BidirUncertaintySeg")
    node.SetAttribute("ModuleName", "BidirUncertaintySeg")
    result = parameters.ParameterStore(node)
    result.setDefaults()
    return result


def uncertainty_volume(app, array):
    node = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "unc")
    slicer.util.updateVolumeFromArray(node, array.astype(np.float32))
    node.CreateDefaultDisplayNodes()
    return node


# --------------------------------------------------------------------------------------
# Uncertainty overlay


def test_uncertainty_is_a_thresholded_heat_map_foreground_over_the_input(app):
    case = synthetic()
    volume = add_volume(app.scene, case.image, "Case")
    heat = uncertainty_volume(app, np.random.default_rng(0).random(case.image.array.shape))

    review.showUncertaintyOverlay(app.scene, heat, volume, opacity=0.35, threshold=0.3)

    display = heat.GetDisplayNode()
    color = app.scene.GetNodeByID(display.GetColorNodeID())
    assert color.GetName() == review.HEAT_TABLE_NAME and color.GetNumberOfColors() == 256
    rgba = [0.0] * 4
    color.GetColor(0, rgba)
    assert rgba[:3] == pytest.approx(review.INFERNO_ANCHORS[0], abs=0.005)  # black ...
    color.GetColor(255, rgba)
    assert rgba[:3] == pytest.approx(review.INFERNO_ANCHORS[-1], abs=0.005)  # ... to pale yellow
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.3)
    assert display.GetUpperThreshold() == pytest.approx(1.0)
    for view in VIEWS:
        composite = app.slice_composite_node(view)
        assert composite.GetBackgroundVolumeID() == volume.GetID()
        assert composite.GetForegroundVolumeID() == heat.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.35)

    review.setOverlayOpacity(app.scene, heat, 0.8)
    review.setOverlayThreshold(heat, 0.6)
    assert all(app.slice_composite_node(v).GetForegroundOpacity() == pytest.approx(0.8) for v in VIEWS)
    assert display.GetLowerThreshold() == pytest.approx(0.6)
    review.showUncertaintyOverlay(app.scene, heat, volume)  # a second result reuses the table
    assert (
        sum(
            app.scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetName() == review.HEAT_TABLE_NAME
            for i in range(app.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))
        )
        == 1
    )


def test_slicers_inferno_is_used_when_the_colors_module_has_loaded_it(app):
    # The Colors module loads its color files as singletons named after the file (ID ...FileInferno.txt).
    inferno = slicer.vtkMRMLColorTableNode()
    inferno.SetName("Inferno")
    inferno.SetTypeToUser()
    inferno.SetNumberOfColors(2)
    inferno.SetSingletonTag(slicer.vtkMRMLColorLogic.GetFileColorNodeSingletonTag("Inferno.txt"))
    app.scene.AddNode(inferno)
    assert inferno.GetID() == "vtkMRMLColorTableNodeFileInferno.txt"
    assert review.heatColorNode(app.scene) is app.scene.GetNodeByID(inferno.GetID())


# --------------------------------------------------------------------------------------
# Regions, jump to a region


def regions_of(app, tmp_path, seed=6):
    case = synthetic(seed=seed)
    volume = add_volume(app.scene, case.image, "Case")
    uncertainty = np.zeros(case.image.array.shape)
    uncertainty[2:5, 3:9, 4:12] = 0.9  # a big, very uncertain block
    uncertainty[7:9, 20:23, 25:28] = 0.7  # a smaller one
    classes = [{"index": i + 1, "name": n, "color": (0.5, 0.5, 0.5)} for i, n in enumerate(CLASS_NAMES)]
    outputs = write_predict_outputs(tmp_path, "case", case.image, case.label.array, uncertainty, classes)
    return volume, engine.readRegions(outputs.regions).regions, outputs


def test_regions_become_a_table_and_locked_markups_at_their_centroids(app, tmp_path):
    _, regions, outputs = regions_of(app, tmp_path)
    assert len(regions) == 2 and regions[0].volumeMm3 > regions[1].volumeMm3
    raw = json.loads(outputs.regions.read_text())["regions"]

    table = review.regionsToTable(app.scene, regions)
    assert table.GetNumberOfRows() == 2
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == [
        c[0] for c in review.REGION_COLUMNS
    ]
    assert table.GetCellText(0, 0) == "1" and table.GetCellText(1, 0) == "2"
    assert table.GetCellText(0, 1) == ", ".join(raw[0]["classes"])
    assert float(table.GetCellText(0, 2)) == pytest.approx(raw[0]["volume_mm3"])
    assert float(table.GetCellText(1, 3)) == pytest.approx(raw[1]["mean_uncertainty"])
    assert review.regionPositionFromTable(table, 1) == pytest.approx(tuple(raw[1]["centroid_ras"]))
    assert table.GetLocked() and table.GetColumnUnitLabel("Volume") == "mm3"
    assert table.GetUseColumnTitleAsColumnHeader() and review.tableRowOfViewRow(table, 1) == 1
    table.SetUseColumnTitleAsColumnHeader(False)  # a view then shows the column names in its first row
    assert review.tableRowOfViewRow(table, 1) == 0
    table.SetUseColumnTitleAsColumnHeader(True)
    again = review.regionsToTable(app.scene, regions[:1], table, name="CT 2 uncertain regions")
    assert again is table and table.GetNumberOfRows() == 1 and table.GetName() == "CT 2 uncertain regions"
    review.regionsToTable(app.scene, regions, table)

    markups = review.regionsToMarkups(app.scene, regions)
    assert markups.GetNumberOfControlPoints() == 2
    for index, region in enumerate(regions):
        position = [0.0, 0.0, 0.0]
        markups.GetNthControlPointPosition(index, position)
        assert position == pytest.approx(list(region.centroidRas))
        assert markups.GetNthControlPointLabel(index) == f"R{region.rank}"
        assert markups.GetNthControlPointLocked(index)
    review.regionsToMarkups(app.scene, regions[:1], markups)  # a new result replaces the points
    assert markups.GetNumberOfControlPoints() == 1

    rois = review.regionsToRois(app.scene, regions, maxCount=1)
    center = [0.0, 0.0, 0.0]
    rois[0].GetCenter(center)
    assert center == pytest.approx(list(np.add(raw[0]["bbox_ras_min"], raw[0]["bbox_ras_max"]) / 2))
    assert list(rois[0].GetSize()) == pytest.approx(
        list(np.subtract(raw[0]["bbox_ras_max"], raw[0]["bbox_ras_min"]))
    )


@pytest.mark.parametrize("use_markups_logic", [True, False])
def test_jump_to_region_centers_every_slice_view_on_its_centroid(app, tmp_path, store, use_markups_logic):
    _, regions, _ = regions_of(app, tmp_path)
    table = review.regionsToTable(app.scene, regions)
    store.setNodeReference("RegionsTable", table)
    context = workflow.SlicerContext(
        app.scene, app.segmentations_logic, app.markups_logic if use_markups_logic else None
    )
    flow = workflow.Workflow(context, store)

    position = flow.jumpToRegionRow(1)
    assert position == pytest.approx(regions[1].centroidRas)
    for view in VIEWS:
        slice_to_ras = app.slice_node(view).GetSliceToRAS()
        origin = [slice_to_ras.GetElement(r, 3) for r in range(3)]
        normal = [slice_to_ras.GetElement(r, 2) for r in range(3)]
        assert origin == pytest.approx(list(regions[1].centroidRas), abs=1e-6)
        # The slice shown is the one through the centroid.
        assert app.slice_logics[view].GetSliceOffset() == pytest.approx(
            float(np.dot(normal, regions[1].centroidRas))
        )
    assert flow.jumpToRegionRow(5) is None  # no such row: nothing moves
    assert flow.jumpToRegionRow(0, viewRow=True) == pytest.approx(regions[0].centroidRas)


# --------------------------------------------------------------------------------------
# Training plot


def test_training_plot_fills_loss_and_validation_tables_with_one_series_per_curve(app):
    history = presenter.TrainingHistory()
    history.addLosses(10, {"total": 1.2, "supervised": 0.9})
    history.addLosses(20, {"total": 1.0, "supervised": 0.8, "url": 0.2})
    history.addValidation(20, {"dice": 0.55, "dice/core": 0.4})

    losses, validation, chart = review.updateTrainingPlot(app.scene, history)
    assert [losses.GetColumnName(i) for i in range(losses.GetNumberOfColumns())] == [
        "iteration",
        "total",
        "supervised",
        "url",
    ]
    assert slicer.util.arrayFromTableColumn(losses, "total").tolist() == [1.2, 1.0]
    assert math.isnan(slicer.util.arrayFromTableColumn(losses, "url")[0])
    assert slicer.util.arrayFromTableColumn(validation, "dice").tolist() == [0.55]
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert [(s.GetYColumnName(), s.GetTableNodeID()) for s in series] == [
        ("total", losses.GetID()),
        ("supervised", losses.GetID()),
        ("url", losses.GetID()),
        ("dice", validation.GetID()),
    ]
    assert all(s.GetXColumnName() == "iteration" for s in series)

    history.addLosses(30, {"total": 0.9, "supervised": 0.7, "url": 0.1})
    again = review.updateTrainingPlot(app.scene, history, losses, validation, chart)
    assert again == (losses, validation, chart)
    assert losses.GetNumberOfRows() == 3 and chart.GetNumberOfPlotSeriesNodes() == 4  # no duplicate series


# --------------------------------------------------------------------------------------
# Parameter node


def test_parameter_node_values_are_typed_and_checked(store):
    assert store.get("iterations") == 3000 and store.get("showMarkups") is True
    store.set("iterations", 120)
    store.set("learningRate", 0.005)
    store.set("method", "bcp")
    store.set("holdOutValidation", "true")
    assert store.get("iterations") == 120 and store.node.GetParameter("iterations") == "120"
    assert store.get("learningRate") == 0.005 and store.get("method") == "bcp"
    assert store.get("holdOutValidation") is True
    with pytest.raises(ModuleError, match="not one of"):
        store.set("method", "magic")
    with pytest.raises(ModuleError, match="not a valid int"):
        store.set("iterations", "many")
    store.node.SetParameter("method", "from-a-future-version")
    assert store.get("method") == parameters.parameter("method").default  # unknown stored value -> default


def test_settings_and_case_lists_persist_with_the_scene(app, store, tmp_path):
    volumes = [app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"V{i}") for i in range(3)]
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S0")
    store.set("iterations", 777)
    store.set("segmentUncertainty", "tta")
    store.setLabeledCases([(volumes[0], segmentation)])
    store.addUnlabeledVolume(volumes[1])
    store.addUnlabeledVolume(volumes[2])
    store.setNodeReference("InputVolume", volumes[2])
    app.scene.SetURL(str(tmp_path / "scene.mrml"))
    assert app.scene.Commit()

    reloaded = create_slicer_app()
    reloaded.scene.SetURL(str(tmp_path / "scene.mrml"))
    assert reloaded.scene.Import()
    node = reloaded.scene.GetFirstNodeByName("BidirUncertaintySeg")
    again = parameters.ParameterStore(node)
    assert again.get("iterations") == 777 and again.get("segmentUncertainty") == "tta"
    assert [(v.GetName(), s.GetName()) for v, s in again.labeledCases()] == [("V0", "S0")]
    assert [v.GetName() for v in again.unlabeledVolumes()] == ["V1", "V2"]
    assert again.nodeReference("InputVolume").GetName() == "V2"


def test_train_config_is_the_engines_config_filled_from_the_parameter_node(store, tmp_path):
    from buseg.config import TrainConfig

    store.set("method", "bcp")
    store.set("iterations", 40)
    store.set("patchSize", "64, 64")
    store.set("crlQuantile", 0.7)
    config = parameters.buildTrainConfig(
        store, tmp_path / "manifest.json", tmp_path / "run", overrides={"batchSize": 12}
    )
    assert isinstance(config, TrainConfig)
    assert config.method.name == "bcp" and config.optim.iterations == 40 and config.optim.batch_size == 12
    assert config.model.patch_size == [64, 64] and config.crl.quantile == 0.7
    assert config.data.labeled == str(tmp_path / "manifest.json") and config.out_dir == str(tmp_path / "run")
    assert config.validation_interval == 0  # no held-out case: nothing to validate on
    assert parameters.buildTrainConfig(store, "m.json", "o", hasValidation=True).validation_interval == 200

    # Ours' parts and CRL's weighting: the ablation's switches, from the panel or the console.
    store.set("crlWeighting", "foreground")
    store.set("urlEnabled", False)
    config = parameters.buildTrainConfig(store, "m.json", "o", overrides={"crlEnabled": False})
    assert (config.url.enabled, config.crl.enabled, config.crl.weighting) == (False, False, "foreground")
    with pytest.raises(ModuleError, match="crlWeighting: 'softest' is not one of discard"):
        parameters.buildTrainConfig(store, "m.json", "o", overrides={"crlWeighting": "softest"})
    crl_fields = {f.name: f for f in dataclasses.fields(type(TrainConfig().crl))}
    assert (
        crl_fields["weighting"].metadata["choices"] == parameters.CRL_WEIGHTING_CHOICES
    )  # every one, in order

    # The panel's defaults are the engine's, except the documented overrides.
    defaults = TrainConfig()
    for p in parameters.PARAMETERS:
        if p.config and not p.config.startswith("predict.") and p.config not in parameters.PANEL_OVERRIDES:
            section, _, key = p.config.rpartition(".")
            expected = getattr(getattr(defaults, section) if section else defaults, key)
            value = p.default if p.config != "model.patch_size" else parameters.parseIntegers(p.default, "x")
            assert value == expected, p.name

    store.set("dimension", "3d")  # two patch numbers for a 3D network: the engine's own check says why
    with pytest.raises(ModuleError, match="patch-size needs 3 numbers"):
        parameters.buildTrainConfig(store, "m.json", "o")
    with pytest.raises(ModuleError, match="Unknown training option"):
        parameters.buildTrainConfig(store, "m.json", "o", overrides={"regionThreshold": 0.2})
    store.set("patchSize", "64 64 x")
    with pytest.raises(ModuleError, match="whole numbers"):
        parameters.buildTrainConfig(store, "m.json", "o")


def test_job_readiness_explains_what_is_missing(app, store, tmp_path):
    assert store.trainProblem().startswith("Add at least one labeled case")
    volume = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "V")
    store.addLabeledCase(volume, app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S"))
    assert "unlabeled" in store.trainProblem()
    store.set("method", "supervised")
    assert store.trainProblem() is None
    assert store.segmentProblem() == "Select the volume to segment."
    store.setNodeReference("InputVolume", volume)
    store.set("modelPath", str(tmp_path / "missing.pt"))
    assert store.segmentProblem().startswith("Model file not found")
    (tmp_path / "model.pt").write_bytes(b"x")
    store.set("modelPath", str(tmp_path / "model.pt"))
    assert store.segmentProblem() is None
    assert store.rankProblem() == "Add unlabeled volumes to rank."


def test_add_corrected_case_moves_the_volume_to_the_labeled_set(app, store):
    context = workflow.SlicerContext(app.scene, app.segmentations_logic)
    flow = workflow.Workflow(context, store)
    case = synthetic()
    volumes = [add_volume(app.scene, case.image, f"V{i}") for i in range(2)]
    result = add_segmentation(app.scene, case.label.array, volumes[1], CLASS_NAMES)
    store.addUnlabeledVolume(volumes[0])
    store.addUnlabeledVolume(volumes[1])
    store.setNodeReference("OutputSegmentation", result)

    assert flow.addCorrectedCase(volumes[1], result) is True
    assert store.labeledCases() == [(volumes[1], result)]
    assert store.unlabeledVolumes() == [volumes[0]]
    assert store.nodeReference("OutputSegmentation") is None  # the next segmentation will not overwrite it
    assert flow.addCorrectedCase(volumes[1], result) is False  # adding twice changes nothing
    assert not store.addUnlabeledVolume(volumes[1])  # a labeled volume cannot become unlabeled again
    empty = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    with pytest.raises(ModuleError, match="has no segments"):
        flow.addCorrectedCase(volumes[0], empty)


def test_training_refuses_a_folder_with_a_previous_training(app, store, tmp_path):
    flow = workflow.Workflow(workflow.SlicerContext(app.scene, app.segmentations_logic), store)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / engine.MODEL_FILE).write_bytes(b"old")
    with pytest.raises(PreviousTrainingError, match="holds a previous training"):
        flow.prepareTraining([], outDir=tmp_path / "run")
    assert not (tmp_path / "run" / workflow.INPUTS_FOLDER).exists()
    assert engine.resumable(tmp_path / "run") is False
    (tmp_path / "run" / engine.LAST_CHECKPOINT).write_bytes(b"newer")
    os.utime(tmp_path / "run" / engine.MODEL_FILE, (1_000_000, 1_000_000))  # the model is older
    assert engine.resumable(tmp_path / "run") is True
    assert engine.resumeCommand(tmp_path / "run")[:2] == ["train", "--resume"]
    with pytest.raises(ModuleError, match="No training to resume"):
        flow.resumeTraining()
    os.utime(tmp_path / "run" / engine.LAST_CHECKPOINT, (1_000, 1_000))  # the model is newer: it finished
    with pytest.raises(ModuleError, match="No interrupted training to resume in"):
        flow.resumeTraining(tmp_path / "run")


# --------------------------------------------------------------------------------------
# The whole flow through the worker process


@pytest.mark.slow
def test_train_segment_review_rank_through_the_worker(app, store, tmp_path):
    """What the module does, with the real worker (`python -m buseg`) on the CPU: a few iterations."""
    from buseg.data.synthetic import make_case, rotation_direction

    rng = np.random.default_rng(2)
    cases = [
        make_case(rng, (8, 32, 32), spacing_mm=(1.2, 1.2, 3.0), direction=rotation_direction(12 * i))
        for i in range(4)
    ]
    volumes = [add_volume(app.scene, c.image, f"Case {i}") for i, c in enumerate(cases)]
    segmentations = [
        add_segmentation(app.scene, cases[i].label.array, volumes[i], CLASS_NAMES) for i in range(2)
    ]
    for volume in volumes[2:]:
        store.addUnlabeledVolume(volume)
    store.setLabeledCases(list(zip(volumes[:2], segmentations, strict=True)))
    store.set("device", "cpu")
    context = workflow.SlicerContext(
        app.scene,
        app.segmentations_logic,
        app.markups_logic,
        runsFolder=tmp_path / "runs",
        workFolder=tmp_path / "work",
    )
    flow = workflow.Workflow(context, store)
    panel = presenter.Presenter()
    for kind in presenter.JOB_KINDS:
        panel.setInputsReady(kind, None)

    # Train: nodes -> files + manifest + TrainConfig JSON -> `buseg train` in the background.
    panel.jobStarting(presenter.TRAIN)
    job = flow.startTraining(
        store.labeledCases(),
        store.unlabeledVolumes(),
        overrides={"iterations": 4, "pretrainIterations": 2, "batchSize": 4, "patchSize": "32 32"},
    )
    job.eventListeners.append(panel.handleEvent)
    job.endListeners.append(
        lambda j: panel.workerEnded(
            j.result.status, exitCode=j.result.exitCode, message=j.result.message, importsResults=False
        )
    )
    assert panel.view.buttonLabels[presenter.TRAIN] == presenter.CANCEL_LABEL
    job.wait(timeout=240)
    assert job.succeeded, job.failureMessage() + job.worker.log[-3000:]
    model = Path(job.value)
    assert model.is_file() and store.get("modelPath") == str(model)
    assert store.get("lastRunFolder") == str(model.parent)
    exports = [e for e in job.events if e["event"] == "export"]  # one case per poll, before the worker
    assert [e["index"] for e in exports] == [1, 2, 3, 4] and job.events[: len(exports)] == exports
    assert job.events[len(exports)]["event"] == "started" and job.events[-1]["event"] == "finished"
    assert panel.view.state == presenter.IDLE and panel.history.lossIterations[-1] == 6
    config = json.loads((model.parent / workflow.INPUTS_FOLDER / workflow.CONFIG_NAME).read_text())
    assert config["optim"]["iterations"] == 4 and config["device"] == "cpu"

    # Segment: the results come back as nodes, displayed for review.
    job = flow.startSegmentation(volumes[3], model)
    job.wait(timeout=240)
    assert job.succeeded, job.failureMessage() + job.worker.log[-3000:]
    result = job.value
    assert [name for _, name, _ in nodefiles.segmentsOf(result.segmentationNode)] == list(CLASS_NAMES)
    reference = result.segmentationNode.GetNodeReference(
        result.segmentationNode.GetReferenceImageGeometryReferenceRole()
    )
    assert reference is volumes[3]
    assert np.allclose(nodefiles.ijkToRas(result.uncertaintyNode), nodefiles.ijkToRas(volumes[3]), atol=1e-4)
    values = slicer.util.arrayFromVolume(result.uncertaintyNode)
    assert values.shape == cases[3].image.array.shape and values.min() >= 0.0 and values.max() <= 1.0
    assert app.slice_composite_node("Red").GetForegroundVolumeID() == result.uncertaintyNode.GetID()
    assert store.nodeReference("RegionsTable").GetNumberOfRows() == len(result.regions)
    assert store.nodeReference("RegionsMarkups").GetNumberOfControlPoints() == len(result.regions)
    assert store.nodeReference("OutputSegmentation") is result.segmentationNode

    assert not job.outDir.exists()  # the work folder goes once its results are in the scene

    # A new result for the same volume replaces the result nodes instead of piling up new ones.
    count = app.scene.GetNumberOfNodes()
    job = flow.startSegmentation(volumes[3], model)
    job.wait(timeout=240)
    again = job.value
    assert (
        again.segmentationNode is result.segmentationNode and again.uncertaintyNode is result.uncertaintyNode
    )
    assert again.regionsTable is result.regionsTable and app.scene.GetNumberOfNodes() == count

    # Batch: a folder of files, outputs in a folder of the user's; nothing is loaded.
    folder = tmp_path / "batch"
    nodefiles.exportVolume(volumes[2], folder / "ct_2.nrrd")
    nodes = app.scene.GetNumberOfNodes()
    batch = flow.segmentFiles(folder, tmp_path / "batch_out", model)
    batch.wait(timeout=240)
    assert batch.succeeded, batch.failureMessage()
    assert list(batch.value) == ["ct_2"] and not batch.value["ct_2"].missing()
    assert app.scene.GetNumberOfNodes() == nodes
    assert "--overwrite" not in batch.worker.argv  # files in the user's folder are never replaced silently

    # Review done: the corrected case joins the labeled set.
    assert flow.addCorrectedCase(volumes[3], result.segmentationNode)
    assert len(store.labeledCases()) == 3

    # Next case: rank the unlabeled volumes; the first becomes the volume to segment.
    job = flow.startRanking(store.unlabeledVolumes(), model)
    job.wait(timeout=240)
    assert job.succeeded, job.failureMessage() + job.worker.log[-3000:]
    ranked = job.value
    assert sorted(r.volumeNode.GetName() for r in ranked) == ["Case 2"]
    assert store.nodeReference("InputVolume") is ranked[0].volumeNode
    assert store.nodeReference("RankingTable").GetNumberOfRows() == 1


def test_a_failing_worker_reports_the_engines_message(app, store, tmp_path):
    """A file that is not a model: the worker's error event becomes the job's message (no traceback)."""
    import torch

    context = workflow.SlicerContext(
        app.scene, app.segmentations_logic, runsFolder=tmp_path / "runs", workFolder=tmp_path / "work"
    )
    flow = workflow.Workflow(context, store)
    volume = add_volume(app.scene, synthetic().image, "Case")
    bad = tmp_path / "model.pt"
    torch.save({"weights": {}}, bad)  # a torch file, but not a buseg model
    job = flow.startSegmentation(volume, bad)
    job.wait(timeout=120)
    assert not job.succeeded and job.result.status == "failed"
    message = job.failureMessage()
    assert str(bad) in message and "not a buseg model file" in message and "Traceback" not in message
    assert (job.outDir / workflow.WORKER_LOG).is_file()
    with pytest.raises(ModuleError, match="Segment did not succeed"):
        job.raiseForFailure()
