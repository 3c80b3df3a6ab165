"""``diffatlas geometry-meaning``: which ShapesWorld factor each semantic direction changes.

Judges every edited image of every ``--runs`` directory against the unedited result of the
same sample with the world's judge (position, size, colour, shape, object count) and writes
the per-edit table (``--out``), the per-direction summary (``--summary``), the
semantic-vs-random-direction ablation (``--ablation``) and the plain-vs-x0-normalised image
quality (objects found, background blobs, saturation) per image (``--quality``) and per
(timestep, strength, mode) with 95% intervals (``--quality-summary``). With ``--global-dir``
it also judges the global-direction edits and writes their agreement across samples
(``--agreement``). No model is loaded.

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
    ap.add_argument("--quality", default=None, help="output CSV, one row per one-step edited image "
                    "(default edit_quality.csv beside --summary)")
    ap.add_argument("--quality-summary", default=None, help="output CSV, per (timestep, strength, mode) "
                    "(default edit_quality_summary.csv beside --summary)")
    ap.add_argument("--global-dir", default=None, help="geometry global directory (global.safetensors) to judge")
    ap.add_argument("--agreement", default=None, help="output CSV of the global directions' judge agreement "
                    "(default global_agreement.csv beside --summary; needs --global-dir)")
    args = ap.parse_args(argv)
    if args.agreement and not args.global_dir:
        ap.error("--agreement needs --global-dir (the geometry-global output directory)")

    from pathlib import Path

    from diffatlas.geometry.meaning import run_global_agreement, run_meaning

    summary = run_meaning(args.runs, args.out, args.summary, args.ablation, args.quality, args.quality_summary)
    if args.global_dir:
        table = run_global_agreement(args.global_dir, args.agreement or Path(args.summary).with_name("global_agreement.csv"))
        pooled = table.iloc[-1]
        result(f"global directions: judge agreement {int(pooled.k)}/{int(pooled.n)} = {pooled.agreement:.2f} "
               f"[{pooled.low:.2f}, {pooled.high:.2f}]")
    for row in summary.itertuples():
        result(f"t={row.timestep} {row.mode:<10} v{row.direction + 1}: {row.dominant:<8} "
              f"(position {row.position_changed:.2f} size {row.size_changed:.2f} colour {row.colour_changed:.2f} "
              f"shape {row.shape_changed:.2f} count {row.count_changed:.2f})")
    return 0
