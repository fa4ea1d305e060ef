"""The network and its files: architectures, model files, uncertainty from probabilities.

:mod:`~buseg.model.networks` builds the 2D U-Net and 3D V-Net, :mod:`~buseg.model.checkpoint`
writes and safely reads model files and training checkpoints, and
:mod:`~buseg.model.uncertainty` turns a network's class probabilities into uncertainty (the
measures of :mod:`buseg.catalogs.measures`). Training and prediction both build on it.
"""
