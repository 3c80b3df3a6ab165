"""``diffatlas diffc-summary``: one table (CSV) of every Diff-C job's test metrics.

Example::

    diffatlas diffc-summary --out results/diffc/summary.csv results/diffc/*/*/*/t*/metrics.json

One row per (model, dataset, layer, timestep, granularity, method); see
diffatlas.diffc.summary.COLUMNS.
"""

from __future__ import annotations


from diffatlas.diffc.summary import build_summary
from diffatlas.io import atomic_file
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("diffc-summary", __doc__)


def main(argv: list[str]) -> int:
    p = RUNNER.parser()
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("metrics", nargs="+", help="metrics.json files of train-diffc")
    args = p.parse_args(argv)
    table = build_summary(args.metrics)
    with atomic_file(args.out) as tmp:
        table.to_csv(tmp, index=False)
    result(f"wrote {args.out}: {len(table)} rows from {len(args.metrics)} jobs")
    return 0
