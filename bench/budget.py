"""The demo's time budget per stage, from a run's Snakemake benchmark files.

    python bench/budget.py [--results results] [--per-rule]

Same as ``diffatlas budget``; kept here beside the other speed measurements.
"""

import sys

from diffatlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["budget", *sys.argv[1:]]))
