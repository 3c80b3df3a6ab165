"""``diffatlas sae-summary``: one table row per trained SAE of a (model, dataset) grid.

Reads each run directory's ``metrics.json`` (or the file itself) and writes a CSV (or
Parquet, by suffix) with the reconstruction metrics, the label statistics of the top latents
(σ_label, purity, entropy; fine and coarse), each with its 95% bootstrap interval over
latents, and their chance levels.

Example::

    diffatlas sae-summary --out results/sae/shapesworld/shapesworld/summary.csv \\
        results/sae/shapesworld/shapesworld/mid/t50 results/sae/shapesworld/shapesworld/mid/t250
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffatlas.errors import UserError
from diffatlas.io import atomic_file
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("sae-summary", __doc__)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="SAE run directories (or their metrics.json)")
    ap.add_argument("--out", required=True, help="summary table: .csv or .parquet")
    args = ap.parse_args(argv)

    from diffatlas.sae.stats import summary_table

    out = Path(args.out)
    if out.suffix not in (".csv", ".parquet"):
        raise UserError(f"--out {out} must end in .csv or .parquet")
    table = summary_table(args.runs)
    with atomic_file(out) as tmp:
        table.to_csv(tmp, index=False) if out.suffix == ".csv" else table.to_parquet(tmp, index=False)
    show = table[["layer", "timestep", "fve", "l0", "dead_fraction"]].copy()
    # a run with fewer eligible latents than an interval needs has no interval; none at all, no value
    number = lambda v, fmt: "n/a" if v is None or v != v else format(v, fmt)
    for col in ("purity_fine", "purity_coarse", "sigma_label_fine"):
        show[col] = [f"{number(v, '.3f')} [{number(lo, '.2f')}, {number(hi, '.2f')}]" for v, lo, hi in
                     zip(table[col], table[f"{col}_ci_low"], table[f"{col}_ci_high"])]  # fmt: skip
    result(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0
