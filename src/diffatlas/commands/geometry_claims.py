"""``diffatlas geometry-claims``: Park et al.'s claims measured, from the geometry result files.

Reads the tables the other geometry commands wrote and writes one row per (claim, measure)
with value, 95% interval, n, criterion and verdict (``--out``, CSV) and the same as Markdown
(``--md``, default the CSV's name with ``.md``); see :mod:`diffatlas.geometry.claims`. A table
not given leaves its claims ``not measured``. No model is loaded.

Example::

    R=results/geometry/shapesworld
    diffatlas geometry-claims --meaning $R/meaning.csv --quality $R/edit_quality.csv \\
        --agreement $R/global_agreement.csv --lengths $R/path_lengths.csv --segments $R/path_segments.csv \\
        --samples $R/spectra_samples.csv --out $R/claims.csv
"""

from __future__ import annotations

import argparse

from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("geometry-claims", __doc__)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--meaning", default=None, help="meaning.csv of geometry-meaning (per-edit judge table)")
    ap.add_argument("--quality", default=None, help="edit_quality.csv of geometry-meaning (per edited image)")
    ap.add_argument("--agreement", default=None, help="global_agreement.csv of geometry-meaning")
    ap.add_argument("--lengths", default=None, help="path_lengths.csv of geometry-paths")
    ap.add_argument("--segments", default=None, help="path_segments.csv of geometry-paths")
    ap.add_argument("--samples", default=None, help="spectra_samples.csv of geometry-measures")
    ap.add_argument("--out", required=True, help="output claims.csv")
    ap.add_argument("--md", default=None, help="output Markdown (default: --out with .md)")
    args = ap.parse_args(argv)

    from diffatlas.geometry.claims import run_claims

    table = run_claims(args.out, meaning=args.meaning, quality=args.quality, agreement=args.agreement,
                       lengths=args.lengths, segments=args.segments, samples=args.samples, out_md=args.md)
    for r in table.itertuples():
        result(f"{r.claim:<20} {r.verdict:<13} {r.measure}: {r.value:.4g} [{r.low:.4g}, {r.high:.4g}] n={r.n}")
    return 0
