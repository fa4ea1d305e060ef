"""Training: the one loop (:mod:`~buseg.training.loop`) and the methods plugged into it.

Each method of :mod:`buseg.training.methods` (supervised, mean teacher, BCP, ours with its
ablations) is a small object with a ``step``; the loop owns everything else - data sampling,
the EMA teacher, validation with :func:`buseg.prediction.windows.predict_probabilities`,
checkpoints, the learning-rate schedule, progress events. :mod:`~buseg.training.losses`,
:mod:`~buseg.training.copy_paste` and :mod:`~buseg.training.distributed` are its parts.
"""
