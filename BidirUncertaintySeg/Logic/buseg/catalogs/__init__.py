"""The engine's catalogs: the one place where a method, an uncertainty measure or a data source is registered.

Every list of them - the configuration's choices and help, the command line, the Slicer panel's
combo boxes and settings, the learning-rate schedule, the benchmarks - derives from these
catalogs. They import nothing of the engine but name each plug-in's code by module path, so
that the configuration and the Slicer module read them without torch.
"""
