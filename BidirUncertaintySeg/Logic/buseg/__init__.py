"""buseg: semi-supervised segmentation with bidirectional uncertainty-aware region learning.

The engine of the BidirUncertaintySeg 3D Slicer extension, usable on its own from Python
and from the ``buseg`` command line. It imports neither Slicer nor Qt.

The engine is a package per pipeline stage (docs/architecture.md): :mod:`buseg.files`,
:mod:`buseg.model`, :mod:`buseg.data`, :mod:`buseg.prediction`, :mod:`buseg.training`,
:mod:`buseg.evaluation`, with :mod:`buseg.catalogs` the one place to register a method, an
uncertainty measure or a data source. Entry points: :mod:`buseg.config` (the typed
configuration), :func:`buseg.training.loop.train`, :func:`buseg.prediction.case.predict_case`
and :func:`buseg.prediction.predict_files.predict_files` (prediction with uncertainty and
regions), :mod:`buseg.metrics`, :mod:`buseg.client` (the background worker's client).
"""

import os
import sys

# OpenMP threads that spin while waiting make torch many times slower on a busy machine
# (measured: a BCP iteration 6.2 s -> 0.65 s with passive waiting while other jobs ran; see
# docs/speed.md); results are unchanged. It only takes effect if torch is not imported yet
# (the worker process), and a value the user set wins. Not inside Slicer's own process (the
# module imports the engine's pure-Python parts there): Slicer's OpenMP is not ours to tune.
if "slicer" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
