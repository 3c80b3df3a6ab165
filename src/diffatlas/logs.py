"""Logging setup and progress bars that stay quiet in log files."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def setup_logging(level: int | str | None = None) -> None:
    """Log to stderr (Snakemake rules redirect it to the rule's ``log:`` file)."""
    level = level or os.environ.get("DIFFATLAS_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """A tqdm bar on a terminal; in a log file (stderr not a tty) it turns itself off."""
    disable = not sys.stderr.isatty() or os.environ.get("DIFFATLAS_NO_PROGRESS") == "1"
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False)


def result(text: object) -> None:
    """Write a command's result (paths, one-line summaries, tables) to stdout.

    The one place commands print: logs and progress go to stderr, so stdout carries only
    what a caller may read or pipe (e.g. the output path, or ``PASS``/``FAIL``).
    """
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()
