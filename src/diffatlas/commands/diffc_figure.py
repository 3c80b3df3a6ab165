"""``diffatlas diffc-figure``: one Diff-C figure from the summary table.

Examples::

    diffatlas diffc-figure --summary results/diffc/summary.csv --kind layer \\
        --model shapesworld --dataset shapesworld --out results/figures/diffc/shapesworld/shapesworld/accuracy_vs_layer.png
    diffatlas diffc-figure --summary results/diffc/summary.csv --kind models \\
        --dataset shapesworld --out results/figures/diffc/shapesworld/models_accuracy_vs_timestep.png

Kinds: ``layer`` (accuracy vs layer, a line per timestep), ``timestep`` (accuracy vs
timestep, a line per layer), ``models`` (accuracy vs timestep across models, best layer).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from diffatlas.errors import UserError
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("diffc-figure", __doc__)


def main(argv: list[str]) -> int:
    p = RUNNER.parser()
    p.add_argument("--summary", required=True, help="summary.csv written by diffc-summary")
    p.add_argument("--kind", required=True, choices=["layer", "timestep", "models"])
    p.add_argument("--model", default=None, help="model name (kinds layer and timestep)")
    p.add_argument("--dataset", required=True, help="dataset name")
    p.add_argument("--models", nargs="*", default=None, help="models to compare, in order (kind models; default: all)")
    p.add_argument("--out", required=True, help="image file (format from the suffix)")
    args = p.parse_args(argv)
    if not Path(args.summary).exists():
        raise UserError(f"summary table not found: {args.summary}; run diffc-summary first")
    df = pd.read_csv(args.summary, dtype={"model": str, "dataset": str, "layer": str, "granularity": str})

    from diffatlas.diffc import figures
    from diffatlas.plotting import save_figure

    if args.kind in ("layer", "timestep"):
        if not args.model:
            raise UserError(f"--kind {args.kind} needs --model")
        plot = figures.plot_vs_layer if args.kind == "layer" else figures.plot_vs_timestep
        fig = plot(df, args.model, args.dataset)
    else:
        fig = figures.plot_models(df, args.dataset, args.models)
    save_figure(fig, args.out)
    result(f"wrote {args.out}")
    return 0
