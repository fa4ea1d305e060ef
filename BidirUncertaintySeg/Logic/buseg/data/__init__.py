"""Data: from the user's files (or a benchmark layout) to what training and prediction compute on.

:mod:`~buseg.data.cases` finds the cases, the readers of :mod:`buseg.data.sources` turn them
into :class:`~buseg.data.training_data.TrainingData`; :mod:`~buseg.data.preprocessing`
normalises intensities, :mod:`~buseg.data.resample` moves images and maps between an image's
grid and a working grid, :mod:`~buseg.data.sampling` draws training patches and slices, and
:mod:`~buseg.data.synthetic` generates the volumes of the demo and the tests.
"""
