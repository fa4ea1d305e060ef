"""Slicer's MRML scene and module logics, set up the way the application sets them up.

The tests of the module's MRML glue run on PyPI ``slicer-core``: Slicer's compiled MRML,
segmentations, volumes, markups and subject hierarchy libraries in plain Python, without
the Qt application. This helper does what ``qSlicerCoreApplication`` and the module
loaders do at start-up (the same steps as trame-slicer's ``SlicerApp``): an application
logic with the default color nodes, the module logics registered on it, the data module's
logic (removes display/storage nodes with their node), slice orientation presets, and the
three slice views (Red/Yellow/Green) created through ``vtkMRMLSliceLogic`` as slice widgets
do, so that slice and slice-composite nodes exist as in the application's default layout.

Not set up (needs files of a Slicer installation that slicer-core does not ship):
terminologies (the .term.json files) and the color files (Inferno, Viridis ...) that
``vtkSlicerColorLogic`` loads from Slicer's share folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import slicer
from vtkmodules.vtkCommonCore import vtkCollection

SLICE_VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))


@dataclass
class SlicerTestApp:
    scene: Any
    application_logic: Any
    volumes_logic: Any
    segmentations_logic: Any
    markups_logic: Any
    subject_hierarchy_logic: Any
    data_logic: Any
    slice_logics: dict[str, Any] = field(default_factory=dict)

    def slice_node(self, name: str) -> Any:
        return self.slice_logics[name].GetSliceNode()

    def slice_composite_node(self, name: str) -> Any:
        return self.slice_logics[name].GetSliceCompositeNode()


def create_slicer_app() -> SlicerTestApp:
    scene = slicer.vtkMRMLScene()

    # qSlicerCoreApplication::setMRMLScene adds one crosshair node.
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)

    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)
    application_logic.GetColorLogic().SetMRMLScene(scene)
    application_logic.GetColorLogic().AddDefaultColorNodes()
    slice_logic_collection = vtkCollection()
    application_logic.SetSliceLogics(slice_logic_collection)
    application_logic.SetViewLogics(vtkCollection())

    def register(logic: Any, name: str) -> Any:
        logic.SetMRMLApplicationLogic(application_logic)
        logic.SetMRMLScene(scene)
        application_logic.SetModuleLogic(name, logic)
        return logic

    data_logic = register(slicer.vtkSlicerDataModuleLogic(), "Data")
    volumes_logic = register(slicer.vtkSlicerVolumesLogic(), "Volumes")
    segmentations_logic = register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
    markups_logic = register(slicer.vtkSlicerMarkupsLogic(), "Markups")
    subject_hierarchy_logic = register(slicer.vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy")

    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    slice_logics = {}
    for name, orientation in SLICE_VIEWS:
        slice_logic = slicer.vtkMRMLSliceLogic()
        slice_logic.SetMRMLApplicationLogic(application_logic)
        slice_logic.SetMRMLScene(scene)
        slice_node = slice_logic.AddSliceNode(name)
        slice_node.SetOrientation(orientation)
        slice_logic_collection.AddItem(slice_logic)
        slice_logics[name] = slice_logic

    return SlicerTestApp(
        scene,
        application_logic,
        volumes_logic,
        segmentations_logic,
        markups_logic,
        subject_hierarchy_logic,
        data_logic,
        slice_logics,
    )
