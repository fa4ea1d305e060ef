"""The memory check made before a large allocation: training images, a prediction's maps.

It lives apart from the training data (:mod:`buseg.data`) and prediction (:mod:`buseg.inference`)
that both use it, so that neither imports the other for it.
"""

from __future__ import annotations

from .errors import ResourceError


def check_memory(required_bytes: int, what: str, *, fraction: float = 0.7) -> None:
    """A ResourceError saying ``what`` need ``required_bytes``, when that is more than ``fraction`` of
    the memory available now."""
    import psutil

    available = psutil.virtual_memory().available
    if required_bytes > fraction * available:
        raise ResourceError(
            f"{what} need about {required_bytes / 2**30:.1f} GiB in memory, more than "
            f"{fraction:.0%} of the {available / 2**30:.1f} GiB available",
            hint="use fewer or smaller (cropped, downsampled) images",
        )
