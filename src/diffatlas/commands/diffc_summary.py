"""``diffatlas diffc-summary``: one table (CSV) of every Diff-C job's test metrics.

Example::

    diffatlas diffc-summary --out results/diffc/summary.csv results/diffc/*/*/*/t*/metrics.json

One row per (model, dataset, layer, timestep, granularity, method), accuracies with 95%
Wilson intervals; see diffatlas.diffc.summary.COLUMNS. Prints the best layer x timestep of
each granularity and method.
"""

from __future__ import annotations


from diffatlas.diffc.summary import best_cells, build_summary
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
    for r in best_cells(table).itertuples(index=False):
        result(
            f"best {r.model}/{r.dataset} {r.granularity} {r.method}: {r.layer} t={r.timestep} accuracy {r.accuracy:.3f} "
            f"[{r.accuracy_ci_low:.2f}, {r.accuracy_ci_high:.2f}] (n={r.n_test}; {r.n_tied} other cells inside the interval)"
        )
    return 0
