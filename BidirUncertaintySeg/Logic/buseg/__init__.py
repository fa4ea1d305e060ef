"""buseg: semi-supervised segmentation with bidirectional uncertainty-aware region learning.

The engine of the BidirUncertaintySeg 3D Slicer extension, usable on its own from Python
and from the ``buseg`` command line. It imports neither Slicer nor Qt.

Entry points: :mod:`buseg.config` (the typed configuration), :func:`buseg.train.train`,
:mod:`buseg.inference` (prediction with uncertainty), :mod:`buseg.regions`,
:mod:`buseg.metrics`, :mod:`buseg.client` (the background worker's client).
"""

__version__ = "0.1.0"
