"""The project's benchmarks: training speed, inference speed, segmentation quality, review guidance,
the annotation loop and the GPU check (docs/benchmarks.md, docs/speed.md).

Not part of the engine's wheel (that holds ``buseg`` only). Each script runs from the repository
root as a module of this package, with the engine installed (``make install``)::

    .venv/bin/python -m benchmarks.quality --help
    .venv/bin/python -m benchmarks.speed --preset cpu

The scripts import each other as ``benchmarks.<name>`` and the engine as ``buseg``; none of them
edits the import path. Results go to ``benchmarks/results/``.
"""
