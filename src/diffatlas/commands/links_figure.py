"""``diffatlas links-figure``: the figure of one cross-method link.

* ``sae-daam --rows sae_daam.parquet --out FIG``: IoU of latent masks with DAAM word masks and
  of each with the true masks, per SAE run and attribute;
* ``directions --agreement directions_agreement.csv --out FIG``: agreement of the
  most-changed latent's label with the judge's factor, per SAE run, beside chance.
"""

from __future__ import annotations

import argparse

from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("links-figure", __doc__)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["sae-daam", "directions"])
    ap.add_argument("--rows", default=None, help="sae_daam.parquet (sae-daam)")
    ap.add_argument("--agreement", default=None, help="directions_agreement.csv (directions)")
    ap.add_argument("--out", required=True, help="output image (.png)")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)

    from diffatlas.links.figures import plot_directions, plot_sae_daam

    if args.kind == "sae-daam":
        if not args.rows:
            ap.error("sae-daam needs --rows")
        plot_sae_daam(args.rows, args.out, args.title)
    else:
        if not args.agreement:
            ap.error("directions needs --agreement")
        plot_directions(args.agreement, args.out, args.title)
    result(f"wrote {args.out}")
    return 0
