"""Data-source plug-ins: one reader per place training data can come from.

:mod:`~buseg.data.sources.folders` reads the user's folders and manifests (the generic source);
:mod:`~buseg.data.sources.acdc` and :mod:`~buseg.data.sources.la` read the public benchmarks'
HDF5 layouts (with :mod:`~buseg.data.sources.hdf5`). Which sources exist is
:mod:`buseg.catalogs.data_sources`.
"""
