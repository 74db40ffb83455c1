"""A benchmark's scratch directory: created in the temporary directory, removed afterwards."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def run_in_workdir(prefix: str, args: argparse.Namespace, run: Callable[[argparse.Namespace, Path], int]) -> int:
    """``run(args, work)`` in a fresh directory, kept only with ``args.keep`` (series take ~1 GB)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return run(args, work)
    finally:
        if args.keep:
            print(f"working directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
