"""One module per ``dicom-node`` subcommand.

Each module defines ``NAME`` and ``HELP`` (strings), ``add_arguments(parser)`` and
``run(args) -> int``. Heavy imports belong inside ``run`` so that ``dicom-node --help`` is fast.
"""
