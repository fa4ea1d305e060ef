"""The catalog of data sources: where training data can come from, and which plug-in reads each.

``--source`` choices and their help, the configuration's checks (``--data-root`` required, the
dimension a layout holds, whether its images carry a voxel spacing) and
:func:`buseg.data.training_data.load_training_data` all ask this catalog. The generic reader of
the user's folders and manifests is one entry; each public benchmark's layout (ACDC, LA) is
another, a plug-in beside it rather than a special case inside it. Like the other catalogs it
imports nothing of the engine: an entry names its reader by path, imported when data are loaded.

A new source is one module under :mod:`buseg.data.sources` with a reader
``(config, log) -> TrainingData`` plus one :class:`DataSource` registered below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from buseg.catalogs.catalog import Catalog


@dataclass(frozen=True)
class DataSource:
    """What the configuration needs to know about a data source without loading it."""

    name: str  # the --source value, as configs store it
    reader: str  # "package.module:function", called as function(config, log) -> TrainingData
    summary: str  # its description in --help
    dimension: str | None = None  # the only --dimension its data fit ("2d", "3d"), None: any
    needs_data_root: bool = False  # read from --data-root (a benchmark layout)
    has_spacing: bool = True  # its images carry a voxel spacing (--working-spacing-mm can resample)
    # The dotted config fields that only the sources listing them read ("data.labeled_count"):
    # --help groups them under these sources, and a run from another source refuses them.
    options: tuple[str, ...] = ()


DATA_SOURCES: Catalog[DataSource] = Catalog("data source")  # in the order the help lists them
register = DATA_SOURCES.register
unregister = DATA_SOURCES.unregister
data_source_names = DATA_SOURCES.names
data_source = DATA_SOURCES.entry


def data_source_help() -> str:
    """The ``--source`` help text: each source with its summary."""
    return "; ".join(f"'{s.name}': {s.summary}" for s in DATA_SOURCES.values()) + "."


def data_source_option_owners(option: str) -> tuple[str, ...]:
    """The sources that read the dotted config ``option``, when only some do (else empty)."""
    return tuple(s.name for s in DATA_SOURCES.values() if option in s.options)


def data_source_reader(source: DataSource) -> Callable[..., Any]:
    """The reader function of ``source``, imported now."""
    module_name, function_name = source.reader.split(":")
    return getattr(importlib.import_module(module_name), function_name)


_BENCHMARK_LAYOUT_OPTIONS = ("data.data_root", "data.labeled_count", "data.exclude_cases")

register(
    DataSource(
        "files",
        "buseg.data.sources.folders:load_files",
        "folders or a manifest of NIfTI/NRRD/MHA images and label maps (labels also .seg.nrrd)",
    )
)
register(
    DataSource(
        "acdc",
        "buseg.data.sources.acdc:load_acdc",
        "the ACDC benchmark layout under --data-root (HDF5 slices)",
        dimension="2d",
        needs_data_root=True,
        has_spacing=False,
        options=_BENCHMARK_LAYOUT_OPTIONS,
    )
)
register(
    DataSource(
        "la",
        "buseg.data.sources.la:load_la",
        "the LA benchmark layout under --data-root (HDF5 volumes)",
        dimension="3d",
        needs_data_root=True,
        options=_BENCHMARK_LAYOUT_OPTIONS,
    )
)
