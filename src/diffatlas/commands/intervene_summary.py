"""``diffatlas intervene-summary``: which layers and times carry causal colour and shape latents.

    diffatlas intervene-summary --table results/intervene/shapesworld/summary.csv \\
        --figure results/figures/intervene/shapesworld/dose_response.png \\
        results/intervene/shapesworld/mid/t500 results/intervene/shapesworld/up_ft1/t500

Reads intervene-experiment directories (one per layer x timestep) and writes the summary table
(one row per layer, timestep and attribute; see :mod:`diffatlas.interventions.summary`) and the
dose-response figure (curves with 95% Wilson bands, latent vs random latent vs random direction).
"""

from __future__ import annotations

from pathlib import Path

from diffatlas.errors import UserError
from diffatlas.io import atomic_file
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("intervene-summary", __doc__)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser()
    ap.add_argument("runs", nargs="+", help="intervene-experiment output directories")
    ap.add_argument("--table", required=True, help="summary table (.csv)")
    ap.add_argument("--figure", required=True, help="dose-response figure (.png)")
    args = ap.parse_args(argv)
    if Path(args.table).suffix != ".csv":
        raise UserError(f"--table {args.table} must end in .csv")

    from diffatlas.interventions.summary import figure, read_cells, summary_table

    rates, verdicts, selection = read_cells(args.runs)
    table = summary_table(rates, verdicts, selection)
    with atomic_file(args.table) as tmp:
        table.to_csv(tmp, index=False)
    figure(rates, verdicts, selection, args.figure)
    result(f"{len(args.runs)} cells: {int(table['steer'].sum())} of {int(table['with_latent'].sum())} latents steer "
           f"-> {args.table}, {args.figure}")
    return 0
