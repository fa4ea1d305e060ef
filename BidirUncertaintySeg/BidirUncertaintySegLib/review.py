"""Showing results for review: the uncertainty heat map, the flagged regions, jumping to them, the loss plot.

All of it is MRML (display nodes, slice composite nodes, table, markups and plot nodes), so
it runs in the Slicer application and on PyPI ``slicer-core`` alike; the widget only puts
a table view and a chart into the layout.

* Uncertainty overlay: the uncertainty volume is the **foreground** of every slice view
  (the input volume the background), colored by a heat map (Slicer's Inferno when the
  Colors module has loaded it, else an equivalent table made here), window 0..1, and
  voxels below the review threshold hidden with the display node's threshold - so only
  uncertain places are painted, at the chosen opacity.
* Regions: a table node (rank, class, volume, uncertainty, centroid R/A/S - the centroid
  columns make a row usable after the scene is saved and reloaded) and a point list with
  one locked control point per region; optionally one ROI per region for its bounding box.
* Jump: all slice views are centered on a region's centroid
  (``vtkSlicerMarkupsLogic.JumpSlicesToLocation``, or ``vtkMRMLSliceNode.JumpAllSlices``).
* Plot: losses and validation metrics in table nodes, one plot series per column, one chart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .engine import Region

INFERNO_COLOR_FILE = "Inferno.txt"  # one of the color files Slicer's Colors module loads at start-up
HEAT_TABLE_NAME = "Uncertainty heat map"
HEAT_TABLE_SINGLETON = "BidirUncertaintySegHeatMap"
# Inferno at 0, 1/8, ..., 1 (matplotlib's values): black - purple - red - orange - pale yellow.
INFERNO_ANCHORS = (
    (0.001, 0.000, 0.014),
    (0.129, 0.047, 0.291),
    (0.342, 0.062, 0.429),
    (0.541, 0.135, 0.415),
    (0.736, 0.216, 0.330),
    (0.894, 0.353, 0.194),
    (0.978, 0.558, 0.035),
    (0.975, 0.798, 0.206),
    (0.988, 0.998, 0.645),
)

REGION_COLUMNS = (
    ("Rank", "int", "", "1 = review first (largest sum of uncertainty)"),
    ("Class", "string", "", "Predicted class(es) in the region, most voxels first"),
    ("Volume", "double", "mm3", "Region volume"),
    ("Mean uncertainty", "double", "", "Mean normalised uncertainty (0..1) in the region"),
    ("Max uncertainty", "double", "", "Highest voxel uncertainty in the region"),
    ("R", "double", "mm", "Centroid, right"),
    ("A", "double", "mm", "Centroid, anterior"),
    ("S", "double", "mm", "Centroid, superior"),
    ("Reason", "string", "", "Why the region was flagged"),
)


def _slicer():
    import slicer

    return slicer


# --------------------------------------------------------------------------------------
# Uncertainty overlay


def heatColorNode(scene: Any) -> Any:
    """Slicer's Inferno color table if loaded, else this module's equivalent (made once per scene)."""
    slicer = _slicer()
    inferno = scene.GetNodeByID(slicer.vtkMRMLColorLogic.GetFileColorNodeID(INFERNO_COLOR_FILE))
    if inferno is not None:
        return inferno
    existing = scene.GetSingletonNode(HEAT_TABLE_SINGLETON, "vtkMRMLColorTableNode")
    if existing is not None:
        return existing
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(HEAT_TABLE_NAME)
    node.SetSingletonTag(HEAT_TABLE_SINGLETON)
    node.SetTypeToUser()
    count = 256
    node.SetNumberOfColors(count)
    node.GetLookupTable().SetTableRange(0, count - 1)
    for index in range(count):
        position = index / (count - 1) * (len(INFERNO_ANCHORS) - 1)
        low = min(int(position), len(INFERNO_ANCHORS) - 2)
        t = position - low
        rgb = [a + (b - a) * t for a, b in zip(INFERNO_ANCHORS[low], INFERNO_ANCHORS[low + 1], strict=True)]
        node.SetColor(index, f"{index / (count - 1):.3f}", *rgb, 1.0)
    scene.AddNode(node)
    return scene.GetSingletonNode(HEAT_TABLE_SINGLETON, "vtkMRMLColorTableNode") or node


def sliceCompositeNodes(scene: Any) -> list[Any]:
    """The slice views' composite nodes (which volumes each view shows)."""
    return [
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]


def setOverlayThreshold(uncertaintyNode: Any, threshold: float) -> None:
    """Hide voxels whose uncertainty is below ``threshold`` (0..1)."""
    display = uncertaintyNode.GetDisplayNode()
    display.AutoThresholdOff()
    display.SetApplyThreshold(1)
    display.SetThreshold(float(threshold), 1.0)


def setOverlayOpacity(scene: Any, uncertaintyNode: Any, opacity: float) -> None:
    """Foreground opacity of the views that show ``uncertaintyNode``."""
    for composite in sliceCompositeNodes(scene):
        if composite.GetForegroundVolumeID() == uncertaintyNode.GetID():
            composite.SetForegroundOpacity(float(opacity))


def showUncertaintyOverlay(
    scene: Any,
    uncertaintyNode: Any,
    backgroundNode: Any = None,
    *,
    opacity: float = 0.5,
    threshold: float = 0.2,
) -> None:
    """Show the uncertainty map as a heat-map foreground over ``backgroundNode`` in every slice view."""
    if uncertaintyNode.GetDisplayNode() is None:
        uncertaintyNode.CreateDefaultDisplayNodes()
    display = uncertaintyNode.GetDisplayNode()
    wasModifying = display.StartModify()
    display.SetAndObserveColorNodeID(heatColorNode(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetInterpolate(0)  # show voxels as they are: a reviewer judges borders
    setOverlayThreshold(uncertaintyNode, threshold)
    display.EndModify(wasModifying)
    slicer = _slicer()
    if getattr(slicer, "mrmlScene", None) is scene:  # the application's scene: Slicer's own helper
        slicer.util.setSliceViewerLayers(
            background=backgroundNode if backgroundNode is not None else "keep-current",
            foreground=uncertaintyNode,
            foregroundOpacity=float(opacity),
        )
        return
    for composite in sliceCompositeNodes(scene):  # another scene (setSliceViewerLayers knows only one)
        if backgroundNode is not None:
            composite.SetBackgroundVolumeID(backgroundNode.GetID())
        composite.SetForegroundVolumeID(uncertaintyNode.GetID())
        composite.SetForegroundOpacity(float(opacity))


# --------------------------------------------------------------------------------------
# Regions


def _newColumn(kind: str, name: str) -> Any:
    import vtk

    array = {"int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray, "string": vtk.vtkStringArray}[kind]()
    array.SetName(name)
    return array


def regionsToTable(
    scene: Any, regions: Sequence[Region], tableNode: Any = None, *, name: str = "Uncertain regions"
) -> Any:
    """Fill (or create) a table node with one row per region, best first."""
    if tableNode is None:
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    elif not tableNode.GetName().startswith(name):
        tableNode.SetName(scene.GenerateUniqueName(name))  # reused for another volume: say which
    wasModifying = tableNode.StartModify()
    table = tableNode.GetTable()
    table.Initialize()
    columns = [_newColumn(kind, title) for title, kind, _, _ in REGION_COLUMNS]
    for region in regions:
        values = (
            region.rank,
            ", ".join(region.classes) or "background",
            region.volumeMm3,
            region.meanUncertainty,
            region.maxUncertainty,
            *region.centroidRas,
            region.reason or "uncertainty",
        )
        for column, value in zip(columns, values, strict=True):
            column.InsertNextValue(value)
    for column in columns:
        table.AddColumn(column)
    for title, _, unit, description in REGION_COLUMNS:
        tableNode.SetColumnDescription(title, description)
        if unit:
            tableNode.SetColumnUnitLabel(title, unit)
    tableNode.SetUseColumnTitleAsColumnHeader(True)  # names as the header: view row n = table row n
    tableNode.SetLocked(True)  # a list to review, not to edit
    table.Modified()
    tableNode.EndModify(wasModifying)
    return tableNode


def tableRowOfViewRow(tableNode: Any, viewRow: int) -> int:
    """The table row a table view shows in ``viewRow`` (without column-title headers, the view's
    first row holds the column names)."""
    return viewRow if tableNode is None or tableNode.GetUseColumnTitleAsColumnHeader() else viewRow - 1


def regionPositionFromTable(tableNode: Any, row: int) -> tuple[float, float, float] | None:
    """The R/A/S centroid of a row of a regions table (works on a table reloaded with the scene)."""
    table = tableNode.GetTable() if tableNode is not None else None
    if table is None or not 0 <= row < table.GetNumberOfRows():
        return None
    values = []
    for name in ("R", "A", "S"):
        column = table.GetColumnByName(name)
        if column is None:
            return None
        values.append(float(column.GetValue(row)))
    return tuple(values)


def regionsToMarkups(
    scene: Any, regions: Sequence[Region], markupsNode: Any = None, *, name: str = "Uncertain regions"
) -> Any:
    """A point list with one locked point per region centroid, labeled R1, R2, ... (best first)."""
    if markupsNode is None:
        markupsNode = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
        markupsNode.CreateDefaultDisplayNodes()
    elif not markupsNode.GetName().startswith(name):
        markupsNode.SetName(scene.GenerateUniqueName(name))
    wasModifying = markupsNode.StartModify()
    markupsNode.RemoveAllControlPoints()
    for region in regions:
        index = markupsNode.AddControlPoint(list(region.centroidRas), f"R{region.rank}")
        markupsNode.SetNthControlPointDescription(
            index,
            f"{region.mainClass}, {region.volumeMm3:.0f} mm3, mean uncertainty {region.meanUncertainty:.2f}",
        )
        markupsNode.SetNthControlPointLocked(index, True)
    markupsNode.EndModify(wasModifying)
    return markupsNode


def regionsToRois(
    scene: Any, regions: Sequence[Region], *, maxCount: int = 10, namePrefix: str = "Region"
) -> list[Any]:
    """One ROI (the RAS bounding box) per region, for the first ``maxCount`` regions."""
    nodes = []
    for region in list(regions)[:maxCount]:
        roi = scene.AddNewNodeByClass(
            "vtkMRMLMarkupsROINode", scene.GenerateUniqueName(f"{namePrefix} {region.rank}")
        )
        roi.CreateDefaultDisplayNodes()
        roi.SetCenter(list(region.centerRas))
        roi.SetSize(list(region.sizeRas))
        roi.SetLocked(True)
        nodes.append(roi)
    return nodes


def placeUnderStudy(scene: Any, referenceNode: Any, *nodes: Any) -> None:
    """Put result nodes next to the volume they come from in the subject hierarchy (under its study,
    where the Data module shows them together); nothing moves when the volume is not in a folder."""
    shNode = _slicer().vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if shNode is None or referenceNode is None:
        return
    parent = shNode.GetItemParent(shNode.GetItemByDataNode(referenceNode))
    if not parent or parent == shNode.GetSceneItemID():
        return
    for node in nodes:
        if node is None:
            continue
        item = shNode.GetItemByDataNode(node)
        if item:
            shNode.SetItemParent(item, parent)
        else:  # no subject hierarchy plugins (slicer-core) made an item for the new node
            shNode.CreateItem(parent, node)


def jumpToPosition(scene: Any, positionRas: Sequence[float], markupsLogic: Any = None) -> None:
    """Center every slice view on ``positionRas`` (the slices pass through it)."""
    x, y, z = (float(v) for v in positionRas)
    if markupsLogic is not None:
        markupsLogic.JumpSlicesToLocation(x, y, z, True)
    else:
        slicer = _slicer()
        slicer.vtkMRMLSliceNode.JumpAllSlices(scene, x, y, z, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def jumpToRegion(scene: Any, region: Region, markupsLogic: Any = None) -> None:
    jumpToPosition(scene, region.centroidRas, markupsLogic)


# --------------------------------------------------------------------------------------
# Ranking of unlabeled volumes


RANKING_COLUMNS = (
    ("Rank", "int"),
    ("Volume", "string"),
    ("Score", "double"),
    ("Mean uncertainty", "double"),
    ("Flagged volume", "double"),
)


def rankingToTable(
    scene: Any, rows: Sequence[dict[str, Any]], tableNode: Any = None, *, name: str = "Next case ranking"
) -> Any:
    """Rows: {'rank', 'volume' (node name), 'score', 'meanUncertainty', 'flaggedMm3'}; best first."""
    if tableNode is None:
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    wasModifying = tableNode.StartModify()
    table = tableNode.GetTable()
    table.Initialize()
    keys = ("rank", "volume", "score", "meanUncertainty", "flaggedMm3")
    columns = [_newColumn(kind, title) for title, kind in RANKING_COLUMNS]
    for row in rows:
        for column, key, (_, kind) in zip(columns, keys, RANKING_COLUMNS, strict=True):
            value = row.get(key)
            if kind == "double":
                value = math.nan if value is None else float(value)
            column.InsertNextValue(value if kind != "string" else str(value))
    for column in columns:
        table.AddColumn(column)
    tableNode.SetColumnUnitLabel("Flagged volume", "mm3")
    tableNode.SetColumnDescription(
        "Score", "How much the model would learn from labeling this volume (higher = label first)"
    )
    tableNode.SetUseColumnTitleAsColumnHeader(True)
    tableNode.SetLocked(True)
    table.Modified()
    tableNode.EndModify(wasModifying)
    return tableNode


# --------------------------------------------------------------------------------------
# Training plot


def _fillTable(tableNode: Any, iterations: Sequence[int], columns: dict[str, Sequence[float]]) -> None:
    import vtk

    wasModifying = tableNode.StartModify()
    table = tableNode.GetTable()
    table.Initialize()
    x = vtk.vtkDoubleArray()
    x.SetName("iteration")
    for value in iterations:
        x.InsertNextValue(float(value))
    table.AddColumn(x)
    for key in sorted(columns, key=lambda k: (k != "total", k)):  # 'total' first, then by name
        column = vtk.vtkDoubleArray()
        column.SetName(key)
        for value in columns[key]:
            column.InsertNextValue(float(value) if value is not None else math.nan)
        table.AddColumn(column)
    table.Modified()
    tableNode.EndModify(wasModifying)


def _seriesFor(
    scene: Any, chart: Any, tableNode: Any, column: str, label: str, color: Sequence[float]
) -> Any:
    slicer = _slicer()
    for index in range(chart.GetNumberOfPlotSeriesNodes()):
        series = chart.GetNthPlotSeriesNode(index)
        if (
            series is not None
            and series.GetTableNodeID() == tableNode.GetID()
            and series.GetYColumnName() == column
        ):
            return series
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(label))
    series.SetAndObserveTableNodeID(tableNode.GetID())
    series.SetXColumnName("iteration")
    series.SetYColumnName(column)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    series.SetColor(*color)
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return series


SERIES_COLORS = (
    (0.85, 0.33, 0.31),
    (0.27, 0.51, 0.85),
    (0.35, 0.70, 0.40),
    (0.95, 0.55, 0.20),
    (0.62, 0.40, 0.80),
    (0.20, 0.75, 0.80),
    (0.50, 0.50, 0.50),
)


def updateTrainingPlot(
    scene: Any, history: Any, lossTable: Any = None, validationTable: Any = None, chart: Any = None
) -> tuple[Any, Any, Any]:
    """Fill the loss and validation tables from a :class:`~.presenter.TrainingHistory` and make sure
    every column has a series in the chart. Returns (lossTable, validationTable, chart)."""
    if lossTable is None:
        lossTable = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName("Training losses"))
    if validationTable is None:
        validationTable = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName("Validation"))
    if chart is None:
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName("Training"))
        chart.SetTitle("Training")
        chart.SetXAxisTitle("iteration")
        chart.SetYAxisTitle("loss / Dice")
    _fillTable(lossTable, history.lossIterations, history.losses)
    _fillTable(validationTable, history.validationIterations, history.validation)
    number = 0
    for key in sorted(history.losses, key=lambda k: (k != "total", k)):
        _seriesFor(scene, chart, lossTable, key, f"loss {key}", SERIES_COLORS[number % len(SERIES_COLORS)])
        number += 1
    for key in sorted(history.validation):
        if key == "dice" or "/" not in key:  # the mean; per-class curves would crowd the chart
            _seriesFor(
                scene,
                chart,
                validationTable,
                key,
                f"validation {key}",
                SERIES_COLORS[number % len(SERIES_COLORS)],
            )
            number += 1
    return lossTable, validationTable, chart
