"""``diffatlas geometry-meaning``: which ShapesWorld factor each semantic direction changes.

Judges every edited image of every ``--runs`` directory against the unedited result of the
same sample with the world's judge (position, size, colour, shape, object count) and writes
the per-edit table (``--out``), the per-direction summary (``--summary``) and the
semantic-vs-random-direction ablation (``--ablation``). No model is loaded.

Example::

    diffatlas geometry-meaning --runs results/geometry/shapesworld/t999 results/geometry/shapesworld/t500 \\
        --out results/geometry/shapesworld/meaning.csv --summary results/geometry/shapesworld/meaning_summary.csv
"""

from __future__ import annotations

import argparse
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("geometry-meaning", __doc__)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="geometry output directories (one per timestep)")
    ap.add_argument("--out", required=True, help="output CSV, one row per edit")
    ap.add_argument("--summary", required=True, help="output CSV, one row per (timestep, mode, direction)")
    ap.add_argument("--ablation", default=None,
                    help="output CSV, semantic vs random directions per (timestep, strength); "
                         "default meaning_random.csv beside --summary")
    args = ap.parse_args(argv)

    from diffatlas.geometry.meaning import run_meaning

    summary = run_meaning(args.runs, args.out, args.summary, args.ablation)
    for row in summary.itertuples():
        result(f"t={row.timestep} {row.mode:<10} v{row.direction + 1}: {row.dominant:<8} "
              f"(position {row.position_changed:.2f} size {row.size_changed:.2f} colour {row.colour_changed:.2f} "
              f"shape {row.shape_changed:.2f} count {row.count_changed:.2f})")
    return 0
