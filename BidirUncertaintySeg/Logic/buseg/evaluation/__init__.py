"""Evaluation: how good a prediction is, and what a reviewer gains.

:mod:`~buseg.evaluation.evaluate` scores label-map files against the truth (``buseg evaluate``,
with :mod:`buseg.metrics`), :mod:`~buseg.evaluation.simulated_review` simulates a reviewer who
corrects the most uncertain voxels, :mod:`~buseg.evaluation.report` draws the demo's figure and
:mod:`~buseg.evaluation.demo` runs the whole idea on generated data (``buseg demo``).
"""
