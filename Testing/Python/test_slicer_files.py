"""The Slicer module's files: nodes to worker files and back on Slicer's real MRML, and the module's own files.

MRML nodes, storage nodes and the segmentations logic come from PyPI ``slicer-core``, set up
as the application sets them up (``slicer_app.py``). The files written here are read back
with the engine's own readers (``buseg.files.images``, ``buseg.data``), so a geometry or class-name
mismatch between the module and the engine fails a test. The second part checks what the
extension build needs: every widget the module uses is in the .ui with the right class,
every file is listed in the CMakeLists, the icon is a 128x128 PNG.
"""

from __future__ import annotations

import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "BidirUncertaintySeg"
sys.path.insert(0, str(MODULE_DIR))

slicer = pytest.importorskip("slicer", reason="needs PyPI slicer-core (Slicer's MRML in plain Python)")
import vtk  # noqa: E402
from slicer_app import create_slicer_app  # noqa: E402

from BidirUncertaintySegLib import engine, nodefiles, parameters  # noqa: E402
from BidirUncertaintySegLib.errors import ModuleError  # noqa: E402
from buseg.data.synthetic import CLASS_NAMES, make_case, rotation_direction  # noqa: E402
from buseg.files.images import Volume, read_image, read_label, write_image, write_segmentation  # noqa: E402

pytestmark = pytest.mark.slicer


@pytest.fixture()
def app():
    return create_slicer_app()


def add_volume(scene, volume: Volume, name: str, className: str = "vtkMRMLScalarVolumeNode"):
    """A volume node with the geometry of a buseg Volume (as loading the file in Slicer gives)."""
    node = scene.AddNewNodeByClass(className, name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(volume.ijk_to_ras()))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array))
    node.CreateDefaultDisplayNodes()
    return node


def add_segmentation(scene, labels: np.ndarray, reference, names, colors=None, order=None):
    """A segmentation node with one segment per name (value n+1 of ``labels``), added in ``order``."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "temp")
    labelmap.CopyOrientation(reference)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{reference.GetName()} segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    for index in order or range(len(names)):
        segmentId = segmentation.GetSegmentation().AddEmptySegment(
            "", names[index], (colors or [(0.5, 0.5, 0.5)] * len(names))[index]
        )
        slicer.util.updateVolumeFromArray(labelmap, (labels == index + 1).astype(np.uint8))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap, segmentation, ids
        )
    nodefiles.removeNodes(scene, labelmap)
    return segmentation


def synthetic(seed=0, shape=(10, 28, 36), angle=25.0, spacing=(0.8, 1.1, 2.5)):
    return make_case(
        np.random.default_rng(seed),
        shape,
        spacing_mm=spacing,
        direction=rotation_direction(angle),
        origin=(-31.0, 12.5, 40.0),
    )


def test_volume_export_keeps_geometry_and_leaves_the_users_storage_node_alone(app, tmp_path):
    case = synthetic()
    node = add_volume(app.scene, case.image, "CT chest")
    storage = node.CreateDefaultStorageNode()
    app.scene.AddNode(storage)
    storage.SetFileName("/users/own/place.nrrd")
    node.SetAndObserveStorageNodeID(storage.GetID())

    path = nodefiles.exportVolume(node, tmp_path / "ct.nrrd")
    image = read_image(path)
    assert np.allclose(image.ijk_to_ras(), nodefiles.ijkToRas(node), atol=1e-5)
    assert np.allclose(image.ijk_to_ras(), case.image.ijk_to_ras(), atol=1e-5)  # rotated, anisotropic, offset
    assert np.array_equal(image.array, case.image.array.astype(np.float32))
    assert node.GetStorageNode().GetFileName() == "/users/own/place.nrrd"


def test_segmentation_export_lies_on_the_volume_grid_with_the_class_values(app, tmp_path):
    case = synthetic(seed=1)
    volume = add_volume(app.scene, case.image, "Case 1")
    # Segments added in another order than the class table: values must follow the names.
    segmentation = add_segmentation(app.scene, case.label.array, volume, CLASS_NAMES, order=[2, 0, 1])
    classes = [{"value": i + 1, "name": n, "color": [1, 0, 0]} for i, n in enumerate(CLASS_NAMES)]
    nodes_before = app.scene.GetNumberOfNodes()

    counts = nodefiles.exportSegmentation(app.scene, segmentation, volume, tmp_path / "label.nrrd", classes)

    label = read_label(tmp_path / "label.nrrd")
    assert read_image(nodefiles.exportVolume(volume, tmp_path / "image.nrrd")).same_grid(label) is None
    assert np.array_equal(label.array, case.label.array)
    assert counts == {n: int((case.label.array == i + 1).sum()) for i, n in enumerate(CLASS_NAMES)}
    assert app.scene.GetNumberOfNodes() == nodes_before  # temporary nodes (and their color tables) removed


def test_labelmap_node_becomes_segments_named_by_its_color_table(app):
    case = synthetic(seed=2)
    labelmap = add_volume(app.scene, case.label, "Case 2 label", "vtkMRMLLabelMapVolumeNode")
    colors = labelmap.GetDisplayNode().GetColorNode()
    segmentation = nodefiles.segmentationFromLabelmap(app.scene, labelmap)
    names = [name for _, name, _ in nodefiles.segmentsOf(segmentation)]
    assert names == [colors.GetColorName(v) for v in (1, 2, 3)]


def test_training_export_writes_a_manifest_the_engine_reads(app, tmp_path):
    from buseg.config import TrainConfig
    from buseg.data.cases import cases_from_manifest
    from buseg.data.sources.folders import load_files

    cases = [synthetic(seed=s, angle=10.0 * s) for s in range(4)]
    volumes = [
        add_volume(app.scene, c.image, name)
        for c, name in zip(cases, ["Pat 1", "Pat 1", "Pat/2 é", "Unl"], strict=True)
    ]  # duplicate and odd names
    colors = [(0.9, 0.1, 0.1), (0.1, 0.9, 0.1), (0.1, 0.1, 0.9)]
    seg0 = add_segmentation(app.scene, cases[0].label.array, volumes[0], CLASS_NAMES, colors)
    seg1 = add_segmentation(app.scene, cases[1].label.array, volumes[1], CLASS_NAMES, colors, order=[1, 2, 0])
    labelmap = add_volume(app.scene, cases[2].label, "Pat 2 label", "vtkMRMLLabelMapVolumeNode")

    exported = nodefiles.exportTrainingData(
        app.scene,
        tmp_path / "inputs",
        [(volumes[0], seg0), (volumes[2], labelmap), (volumes[1], seg1)],
        [volumes[3]],
        validationCount=1,
    )

    # Classes in order of first appearance: the segments' names, then the label map's color names.
    colorNames = [labelmap.GetDisplayNode().GetColorNode().GetColorName(v) for v in (1, 2, 3)]
    assert [c["name"] for c in exported.classes] == [*CLASS_NAMES, *colorNames]
    assert exported.labeledCases == ["Pat_1", "Pat_2"] and exported.validationCases == ["Pat_1_2"]
    manifest = json.loads(exported.manifestPath.read_text())
    assert manifest["classes"][0] == {"value": 1, "name": "shell", "color": [0.9, 0.1, 0.1]}
    listed = cases_from_manifest(exported.manifestPath)
    assert len(listed.labeled) == 2 and len(listed.unlabeled) == 1 and len(listed.validation) == 1

    # The engine's loader accepts the export, and a class keeps its value in every case
    # ('core' is segment 3 of seg1 but value 2 in both label files).
    config = TrainConfig()
    config.data.labeled = str(exported.manifestPath)
    config.model.dimension, config.model.patch_size = "3d", [16, 16, 16]
    data = load_files(config, log=lambda text: None)
    assert [c["name"] for c in data.classes[1:]] == [*CLASS_NAMES, *colorNames]
    assert np.array_equal(read_label(listed.labeled[0].label).array, cases[0].label.array)
    assert np.array_equal(read_label(listed.validation[0].label).array, cases[1].label.array)
    assert np.array_equal(
        read_label(listed.labeled[1].label).array,
        np.where(cases[2].label.array > 0, cases[2].label.array + 3, 0),
    )

    seg3 = add_segmentation(app.scene, cases[3].label.array, volumes[3], ["shell", "tumour"])
    with pytest.raises(ModuleError, match=r"Validation case 'Unl' has segment\(s\) tumour"):
        nodefiles.exportTrainingData(
            app.scene, tmp_path / "bad", [(volumes[0], seg0), (volumes[3], seg3)], validationCount=1
        )


def test_export_refuses_bad_input_naming_the_node(app, tmp_path):
    case = synthetic(seed=3)
    volume = add_volume(app.scene, case.image, "Liver CT")
    empty = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Empty seg")
    empty.GetSegmentation().AddEmptySegment("", "liver")
    labelmap = add_volume(app.scene, case.label, "Mask", "vtkMRMLLabelMapVolumeNode")
    twice = add_segmentation(app.scene, case.label.array, volume, ["a", "a", "b"])

    with pytest.raises(ModuleError, match="'Empty seg' has no labeled voxels"):
        nodefiles.exportTrainingData(app.scene, tmp_path / "a", [(volume, empty)])
    with pytest.raises(ModuleError, match="'Mask' is a label map"):
        nodefiles.exportVolume(labelmap, tmp_path / "b.nrrd")
    with pytest.raises(ModuleError, match="'Liver CT' is listed twice"):
        nodefiles.exportTrainingData(app.scene, tmp_path / "c", [(volume, twice)], [volume])
    with pytest.raises(ModuleError, match="two segments named 'a'"):
        nodefiles.exportTrainingData(app.scene, tmp_path / "d", [(volume, twice)])
    with pytest.raises(ModuleError, match="at least 2 labeled cases"):
        nodefiles.exportTrainingData(app.scene, tmp_path / "e", [(volume, labelmap)], validationCount=1)
    assert not (tmp_path / "a" / nodefiles.MANIFEST_NAME).exists()


def write_predict_outputs(
    folder: Path, case_name: str, reference: Volume, labels: np.ndarray, uncertainty: np.ndarray, classes
) -> engine.PredictOutputs:
    """The four files of one case, written by the engine's own writers (as buseg predict does)."""
    from buseg.prediction.regions import find_regions, regions_document

    outputs = engine.PredictOutputs.forCase(folder, case_name)
    outputs.folder.mkdir(parents=True)
    write_image(reference, outputs.label, array=labels)
    write_segmentation(labels, reference, classes, outputs.segmentation)
    write_image(reference, outputs.uncertainty, array=uncertainty.astype(np.float32))
    regions = find_regions(
        uncertainty,
        reference,
        labels=labels,
        class_names=["background"] + [c["name"] for c in classes],
        threshold=0.5,
        min_region_mm3=0.0,
    )
    outputs.regions.write_text(json.dumps(regions_document(regions, reference, case=case_name)))
    return outputs


def test_predict_outputs_load_as_named_colored_segments_on_the_input_geometry(app, tmp_path):
    case = synthetic(seed=4)
    volume = add_volume(app.scene, case.image, "Case 4")
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "patient pose")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    classes = [
        {"index": i + 1, "name": n, "color": c}
        for i, (n, c) in enumerate(
            zip(CLASS_NAMES, [(0.9, 0.2, 0.2), (0.2, 0.9, 0.2), (0.2, 0.2, 0.9)], strict=True)
        )
    ]
    uncertainty = np.random.default_rng(0).random(case.image.array.shape)
    outputs = write_predict_outputs(tmp_path, "case4", case.image, case.label.array, uncertainty, classes)

    segmentation = nodefiles.loadSegmentation(
        app.scene, app.segmentations_logic, outputs.segmentation, volume
    )
    segments = nodefiles.segmentsOf(segmentation)
    assert [name for _, name, _ in segments] == list(CLASS_NAMES)
    assert [tuple(round(v, 3) for v in color) for _, _, color in segments] == [
        tuple(c["color"]) for c in classes
    ]
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    assert segmentation.GetTransformNodeID() == transform.GetID()
    on_grid = nodefiles.segmentLabelArray(app.scene, segmentation, volume, [s[0] for s in segments])
    assert np.array_equal(on_grid, case.label.array)

    heat = nodefiles.loadUncertaintyVolume(app.scene, outputs.uncertainty, volume)
    assert np.allclose(nodefiles.ijkToRas(heat), nodefiles.ijkToRas(volume), atol=1e-5)
    assert np.allclose(slicer.util.arrayFromVolume(heat), uncertainty, atol=1e-6)
    assert heat.GetTransformNodeID() == transform.GetID()
    assert heat.GetName() == "Case 4 uncertainty"

    document = engine.readRegions(outputs.regions)
    assert document.regions and [r.rank for r in document.regions] == list(
        range(1, len(document.regions) + 1)
    )
    assert all(0.5 < r.meanUncertainty <= r.maxUncertainty <= 1.0 for r in document.regions)


def test_results_replace_the_segments_of_a_chosen_output_node(app, tmp_path):
    case = synthetic(seed=5)
    volume = add_volume(app.scene, case.image, "Case 5")
    classes = [{"index": 1, "name": "shell", "color": (1, 0, 0)}]
    outputs = write_predict_outputs(
        tmp_path,
        "case5",
        case.image,
        (case.label.array == 1).astype(np.uint8),
        np.zeros(case.image.array.shape),
        classes,
    )
    target = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My result")
    target.GetSegmentation().AddEmptySegment("", "old segment")
    count = app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

    node = nodefiles.loadSegmentation(
        app.scene, app.segmentations_logic, outputs.segmentation, volume, targetNode=target
    )
    assert node is target and node.GetName() == "My result"
    assert [name for _, name, _ in nodefiles.segmentsOf(node)] == ["shell"]
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count  # no extra node left behind


def test_engine_output_names_and_summary_are_read_in_one_place(tmp_path):
    outputs = engine.PredictOutputs.forCase(
        tmp_path, "ct", {"segmentation": "ct/ct.seg.nrrd", "uncertainty": "ct/ct_uncertainty.nii.gz"}
    )
    assert outputs.segmentation == tmp_path / "ct" / "ct.seg.nrrd"
    assert outputs.uncertainty == tmp_path / "ct" / "ct_uncertainty.nii.gz"
    assert outputs.regions == tmp_path / "ct" / "regions.json"
    (tmp_path / "summary.json").write_text(
        json.dumps(
            {
                "schema": "buseg-predict-summary",
                "schema_version": 1,
                "cases": [
                    {"case": "ct", "status": "ok", "outputs": {"segmentation": "ct/ct.seg.nrrd"}},
                    {"case": "bad", "status": "failed", "error": "unreadable"},
                ],
            }
        )
    )
    assert list(engine.readPredictSummary(tmp_path)) == ["ct"]
    (tmp_path / "regions.json").write_text(json.dumps({"schema": "buseg-regions", "schema_version": 2}))
    with pytest.raises(ModuleError, match="newer engine"):
        engine.readRegions(tmp_path / "regions.json")
    assert engine.caseName("/a/b/CT_1.nii.gz") == "CT_1" and engine.caseName("x.seg.nrrd") == "x"


# --------------------------------------------------------------------------------------
# The module's own files


UI_FILE = MODULE_DIR / "Resources" / "UI" / "BidirUncertaintySeg.ui"
MODULE_FILE = MODULE_DIR / "BidirUncertaintySeg.py"


def ui_widgets() -> dict[str, ET.Element]:
    widgets = {}
    for element in ET.parse(UI_FILE).getroot().iter("widget"):
        assert element.get("name") not in widgets, f"duplicate widget name {element.get('name')} in the .ui"
        widgets[element.get("name")] = element
    return widgets


def test_every_widget_the_module_uses_exists_in_the_ui_with_the_right_class():
    widgets = ui_widgets()
    expected = {p.widget: p.widgetClass for p in parameters.PARAMETERS if p.widget}
    expected.update({name: cls for name, cls in parameters.NODE_REFERENCES.values() if name})
    expected.update(
        {
            "labeledTableWidget": "QTableWidget",
            "unlabeledListWidget": "QListWidget",
            "regionsTableView": "qMRMLTableView",
            "rankingTableView": "qMRMLTableView",
            "progressBar": "QProgressBar",
            "advancedCollapsibleGroupBox": "ctkCollapsibleGroupBox",
        }
    )
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    for name in used:
        assert name in widgets, f"BidirUncertaintySeg.py uses self.ui.{name}, which the .ui does not have"
        if name.endswith("Button") and not name.endswith("CollapsibleButton"):
            expected.setdefault(name, "QPushButton")
        if name.endswith("Label"):
            expected.setdefault(name, "QLabel")
    for name, cls in expected.items():
        assert name in widgets, f"{name} is missing from the .ui"
        assert widgets[name].get("class") == cls, (
            f"{name} is a {widgets[name].get('class')} in the .ui, not a {cls}"
        )
        assert cls in parameters.WIDGET_BINDINGS or name not in {p.widget for p in parameters.PARAMETERS}
    assert {"trainButton", "segmentButton", "rankButton", "resumeButton"} <= used


def test_the_ui_opens_with_the_parameter_defaults():
    # Until the parameter node fills the widgets, the panel shows the .ui's own states; a changed
    # default must change them too, or the panel shows one setting and trains another.
    widgets = ui_widgets()
    checked = 0
    for p in parameters.PARAMETERS:
        element = widgets.get(p.widget)
        if p.widgetClass == "QCheckBox":
            state = element.find("property[@name='checked']/bool")
            assert (state is not None and state.text == "true") == p.default, p.name
            checked += 1
        elif p.widgetClass == "QComboBox" and p.choices:
            index = element.find("property[@name='currentIndex']/number")
            assert (int(index.text) if index is not None else 0) == p.choices.index(p.default), p.name
            checked += 1
    assert checked >= 8  # every switch and choice of the panel, not a vacuous loop


def test_combo_box_items_match_the_stored_choices_and_mrml_widgets_get_the_scene():
    widgets = ui_widgets()
    filledByTheModule = re.search(
        r"fillChoiceItems\(getattr\(self\.ui, p\.widget\), p\)", MODULE_FILE.read_text()
    )
    for p in parameters.PARAMETERS:
        if p.choices:
            items = [item.find("property/string").text for item in widgets[p.widget].findall("item")]
            # The method and uncertainty combo boxes are empty in the .ui; the module fills them from
            # the engine's catalogs.
            assert items == list(p.choiceLabels) or (not items and filledByTheModule), p.name
            assert len(p.choices) == len(p.choiceLabels)
    assert not widgets["methodComboBox"].findall("item") and filledByTheModule
    for measures in ("trainUncertaintyComboBox", "segmentUncertaintyComboBox"):
        assert not widgets[measures].findall("item")
    receivers = {
        c.findtext("receiver")
        for c in ET.parse(UI_FILE).getroot().iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    mrml = {
        name
        for name, element in widgets.items()
        if element.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView")
    }
    assert mrml and mrml <= receivers
    top = ET.parse(UI_FILE).getroot().find("widget")
    assert top.get("class") == "qMRMLWidget"


def cmake_listed(path: Path) -> set[str]:
    text = path.read_text()
    items = set()
    for block in re.findall(r"set\(\w+\n(.*?)\n\s*\)", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line:
                items.add(line.replace("${MODULE_NAME}", "BidirUncertaintySeg"))
    return items


def test_every_file_the_module_needs_is_listed_in_its_cmakelists():
    cmake = MODULE_DIR / "CMakeLists.txt"
    listed = cmake_listed(cmake)
    needed = {
        "BidirUncertaintySeg.py",
        "Resources/UI/BidirUncertaintySeg.ui",
        "Resources/Icons/BidirUncertaintySeg.png",
    }
    for folder, pattern in (
        ("BidirUncertaintySegLib", "*.py"),
        ("Logic/buseg", "*.py"),
        ("Logic/buseg", "*.json"),
    ):
        needed |= {
            str(p.relative_to(MODULE_DIR))
            for p in (MODULE_DIR / folder).rglob(pattern)
            if "__pycache__" not in p.parts
        }
    missing = sorted(needed - listed)
    assert not missing, f"add to {cmake} (scripts or resources): {', '.join(missing)}"
    stale = sorted(item for item in listed if not (MODULE_DIR / item).exists())
    assert not stale, f"{cmake} lists files that do not exist: {', '.join(stale)}"
    text = cmake.read_text()
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(
        r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\).*endif",
        text,
        flags=re.S,
    )


def test_extension_cmakelists_has_the_metadata_the_extensions_index_needs():
    text = (ROOT / "CMakeLists.txt").read_text()
    for variable in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
    ):
        assert re.search(rf'set\({variable} "[^"]+"\)', text), variable
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    assert "add_subdirectory(BidirUncertaintySeg)" in text
    assert text.index("include(${Slicer_EXTENSION_GENERATE_CONFIG})") < text.index(
        "include(${Slicer_EXTENSION_CPACK})"
    )
    icon_url = re.search(r'set\(EXTENSION_ICONURL "([^"]+)"\)', text).group(1)
    assert icon_url.endswith("BidirUncertaintySeg/Resources/Icons/BidirUncertaintySeg.png")


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "BidirUncertaintySeg.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
        colors = icon.convert("RGB").getcolors(128 * 128)
        assert colors is not None and len(colors) > 50  # a drawing, not a flat placeholder


def test_the_panel_greys_out_the_settings_the_chosen_method_ignores():
    inactive = parameters.inactiveParameters
    dependent = set(parameters.METHOD_DEPENDENT_PARAMETERS)
    assert all(parameters.parameter(name).widget for name in dependent)
    ours = {p.name: p.default for p in parameters.PARAMETERS} | {"crlEnabled": True}
    assert ours["method"] == "buarl" and inactive(ours) == set()  # both parts on: everything applies
    assert inactive(ours | {"urlEnabled": False}) == {"urlWeight", "urlQuantile"}
    assert inactive(ours | {"crlEnabled": False}) == {"crlWeighting", "crlQuantile"}
    neither = {"urlWeight", "urlQuantile", "crlWeighting", "crlQuantile", "trainUncertainty"}
    assert inactive(ours | {"urlEnabled": False, "crlEnabled": False}) == neither
    assert inactive(ours | {"method": "bcp"}) == dependent - {"unlabeledWeight"}
    assert inactive(ours | {"method": "mean-teacher"}) == dependent
    assert inactive(ours | {"method": "supervised"}) == dependent


class _ComboBox:
    """What fillChoiceItems uses of a QComboBox."""

    def __init__(self, items=()):
        self.items, self.currentIndex = list(items), 0

    @property
    def count(self):
        return len(self.items)

    def addItem(self, text):
        self.items.append(text)


def test_the_method_combo_box_lists_the_catalog_and_a_registered_method_needs_no_ui_edit():
    from buseg.catalogs import methods as catalog

    method = parameters.parameter("method")
    combo = _ComboBox()
    parameters.fillChoiceItems(combo, method)
    assert combo.items == [entry.label for entry in catalog.CATALOG.values()]
    assert method.choices[combo.currentIndex] == method.default == "buarl"
    listed = _ComboBox(["as the .ui lists it"])
    parameters.fillChoiceItems(listed, parameters.parameter("device"))
    assert listed.items == ["as the .ui lists it"]  # a combo box with .ui items is left alone
    entry = catalog.register(
        catalog.MethodEntry(
            "throwaway", "supervised", "Supervised", "Throw-away", "a test's", uses_unlabeled=False
        )
    )
    try:
        combo = _ComboBox()
        parameters.fillChoiceItems(combo, method)
        assert combo.items[-1] == "Throw-away" and method.choices[-1] == "throwaway"
        ours = {p.name: p.default for p in parameters.PARAMETERS} | {"method": "throwaway"}
        assert parameters.inactiveParameters(ours) == set(parameters.METHOD_DEPENDENT_PARAMETERS)
    finally:
        catalog.unregister(entry.name)
    assert "throwaway" not in method.choices


def test_the_panel_offers_no_research_option_and_the_help_lists_them_apart():
    """A method owns its research options (catalog ``research_options``): the panel offers the
    switches a user needs, and ``buseg train --help`` puts the ablations' variants in their own group."""
    from buseg.catalogs import methods as catalog
    from buseg.cli import build_parser
    from buseg.config import TrainConfig, to_dict

    research = {option for entry in catalog.CATALOG.values() for option in entry.research_options}
    assert "crl.threshold_mode" in research
    fields = set()
    for section, values in to_dict(TrainConfig()).items():
        if isinstance(values, dict):
            fields |= {f"{section}.{name}" for name in values}
    assert research <= fields  # every research option is a real configuration field
    offered = {p.config for p in parameters.PARAMETERS}
    assert not research & offered, sorted(research & offered)

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    groups = {group.title: {a.dest for a in group._group_actions} for group in train._action_groups}
    assert groups["research options of buarl"] == research
    assert not research & groups["crl options"] and "crl.enabled" in groups["crl options"]


def test_a_parameter_change_during_a_job_leaves_every_job_setting_locked():
    # Every parameter change re-runs the applicability update: it used to ignore the running job
    # and unlock the method's settings in the middle of a training.
    ours = {p.name: p.default for p in parameters.PARAMETERS} | {"crlEnabled": True}
    idle = parameters.settingsEnabled(ours, busy=False)
    assert idle["urlWeight"] and idle["method"] and idle["iterations"]
    assert not parameters.settingsEnabled(ours | {"method": "bcp"}, busy=False)["urlWeight"]
    busy = parameters.settingsEnabled(ours | {"urlEnabled": True}, busy=True)
    shown = {p.name for p in parameters.PARAMETERS if p.widget}
    assert set(busy) == shown
    assert {name for name, enabled in busy.items() if enabled} == set(parameters.DISPLAY_PARAMETERS)


def test_an_edit_writes_only_its_own_setting_not_the_stale_values_of_the_other_widgets(app):
    from types import SimpleNamespace

    node = app.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "BidirUncertaintySeg")
    store = parameters.ParameterStore(node)
    store.setDefaults()
    # What the widgets showed when the module was left ...
    widgets = {
        p.name: SimpleNamespace(**{parameters.WIDGET_BINDINGS[p.widgetClass][0]: None})
        for p in parameters.PARAMETERS
        if p.widget
    }
    for p in parameters.PARAMETERS:
        if p.widget:
            parameters.setWidgetValue(widgets[p.name], p, store.get(p.name))
    # ... then a background training set its model; the module is shown again and one setting edited.
    store.set("modelPath", "/runs/run-1/model.pt")
    widgets["iterations"].value = 123
    parameters.writeEditedSetting(store, "iterations", widgets["iterations"])
    assert store.get("iterations") == 123
    assert store.get("modelPath") == "/runs/run-1/model.pt"  # the stale path widget wrote nothing
    widgets["method"].currentIndex = parameters.parameter("method").choices.index("bcp")
    parameters.writeEditedSetting(store, "method", widgets["method"])
    assert store.get("method") == "bcp" and store.get("modelPath") == "/runs/run-1/model.pt"
    volume = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "V")
    parameters.writeSelectedNode(store, "InputVolume", SimpleNamespace(currentNode=lambda: volume))
    assert store.nodeReference("InputVolume") is volume and store.get("modelPath") == "/runs/run-1/model.pt"


def test_the_minimum_slicer_is_checked_when_the_module_loads_and_said_everywhere():
    import ast

    from BidirUncertaintySegLib import dependencies

    assert dependencies.MINIMUM_SLICER == (5, 10)
    for slicer_version, python_version in (((5, 8), (3, 9)), ((5, 6), (3, 9)), ((5, 4), (3, 9))):
        message = dependencies.slicerVersionProblem(slicer_version, python_version)
        assert "needs 3D Slicer 5.10 or newer" in message and "download.slicer.org" in message
        assert f"Python {python_version[0]}.{python_version[1]}" in message
    assert dependencies.slicerVersionProblem((5, 10), (3, 12)) is None
    assert dependencies.slicerVersionProblem((6, 0), (3, 12)) is None
    # The message must reach users of older Slicers: what the module loads parses on their Python 3.9.
    for path in [
        MODULE_DIR / "BidirUncertaintySeg.py",
        *sorted((MODULE_DIR / "BidirUncertaintySegLib").glob("*.py")),
    ]:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
    module = (MODULE_DIR / "BidirUncertaintySeg.py").read_text()
    assert "Slicer before 5.4" not in module and "setMasterVolumeNode" not in module  # the dead fallback
    assert module.count("slicerVersionProblem()") >= 3  # module, widget and logic check it
    assert "Slicer 5.10 or newer" in (ROOT / "docs" / "slicer.md").read_text()
    assert "Needs Slicer 5.10 or newer" in (ROOT / "CMakeLists.txt").read_text()


def test_the_engine_leaves_slicers_openmp_alone_and_the_pytest_suites_register_on_windows():
    import subprocess

    probe = (
        "import sys, types, os\n"
        "if sys.argv[1] == 'slicer': sys.modules['slicer'] = types.ModuleType('slicer')\n"
        "import buseg\n"
        "print(os.environ.get('OMP_WAIT_POLICY', '-'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(MODULE_DIR / "Logic")

    def policy(where):
        return subprocess.run(
            [sys.executable, "-c", probe, where], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()

    assert policy("slicer") == "-"  # inside Slicer's process (the module imports the engine)
    assert policy("worker") == "PASSIVE"  # the worker and the command line
    cmake = (ROOT / "Testing" / "CMakeLists.txt").read_text()
    assert ".venv/Scripts/python.exe" in cmake and ".venv/bin/python" in cmake
    assert "test_slicer_loop" in cmake
