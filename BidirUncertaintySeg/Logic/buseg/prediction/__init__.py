"""Prediction: an image through a trained model to labels, uncertainty and regions to review.

The path of an image, one module per level:

* :mod:`~buseg.prediction.windows` - the network over a volume in slice batches or windows,
  blended, retried with fewer at out-of-memory; the probability function of the uncertainty
  measure (:mod:`buseg.catalogs.measures`); the backend (:mod:`~buseg.prediction.onnx_backend`);
* :mod:`~buseg.prediction.case` - one image: to the working grid and back, the maps, the
  clean-up, the flagged regions (:mod:`~buseg.prediction.regions`,
  :mod:`~buseg.prediction.shape_flags`);
* :mod:`~buseg.prediction.predict_files` - files in, files out (``buseg predict``);
  :mod:`~buseg.prediction.ranking` orders images by how much they need review (``buseg rank``).
"""
