"""The memory check made before a large allocation: training images, a prediction's maps, a working grid.

It lives apart from the training data (:mod:`buseg.data`), prediction (:mod:`buseg.prediction.case`) and
resampling (:mod:`buseg.data.resample`) that all use it, so that none imports another for it.
"""

from __future__ import annotations

from pathlib import Path

from buseg.errors import ResourceError

# The share of the memory available now that one allocation may take: the rest is left for the
# process's other arrays and for the rest of the machine.
MEMORY_FRACTION = 0.7
SMALLER_IMAGES_HINT = "use fewer or smaller (cropped, downsampled) images"


def check_memory(
    required_bytes: float,
    what: str,
    *,
    path: str | Path | None = None,
    hint: str = SMALLER_IMAGES_HINT,
    fraction: float = MEMORY_FRACTION,
) -> None:
    """A ResourceError saying ``what`` (a plural subject: "the 2 training images") need
    ``required_bytes``, when that is more than ``fraction`` of the memory available now.

    The error names ``path`` (the file whose content asks for that much, e.g. a model whose working
    spacing makes a huge grid) and suggests ``hint``.
    """
    import psutil

    available = psutil.virtual_memory().available
    if required_bytes > fraction * available:
        raise ResourceError(
            f"{what} need about {required_bytes / 2**30:.1f} GiB in memory, more than "
            f"{fraction:.0%} of the {available / 2**30:.1f} GiB available",
            path=path,
            hint=hint,
        )
