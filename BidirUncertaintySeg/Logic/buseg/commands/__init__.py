"""Sub-commands of the ``buseg`` command line (one module each: ``add_arguments`` and ``run``)."""
