"""``diffatlas sae-figures``: figures of the SAE stage, one per call.

Subcommands::

    vs-layer      --summary S.csv --out F.png      label statistics vs layer (line per timestep)
    vs-timestep   --summary S.csv --out F.png      label statistics vs timestep (line per layer)
    across-models --summary A.csv B.csv --out F.png   per model vs timestep (mean over layers)
    curves        --runs DIR... --out F.png        mean statistic over the top-N latents vs N
    training      --runs DIR... --out F.png        training curves (curve.csv) and how each run stopped
    gallery       --run DIR --dataset DATADIR --out F.png [--latents 8]
                                                   top-activating images of the top latents
"""

from __future__ import annotations

import argparse

import pandas as pd

from diffatlas.errors import UserError
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("sae-figures", __doc__)


def _read_table(path: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
    except FileNotFoundError:
        raise UserError(f"summary table not found: {path}; run sae-summary first") from None


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="figure", required=True)
    for name in ("vs-layer", "vs-timestep"):
        p = sub.add_parser(name)
        p.add_argument("--summary", required=True)
        p.add_argument("--out", required=True)
    p = sub.add_parser("across-models")
    p.add_argument("--summary", required=True, nargs="+")
    p.add_argument("--out", required=True)
    p = sub.add_parser("curves")
    p.add_argument("--runs", required=True, nargs="+", help="SAE run directories (each with latents.parquet)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("training")
    p.add_argument("--runs", required=True, nargs="+", help="SAE run directories (each with curve.csv and metrics.json)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("gallery")
    p.add_argument("--run", required=True, help="SAE run directory (with latents.parquet)")
    p.add_argument("--dataset", required=True, help="dataset directory the store was extracted from")
    p.add_argument("--latents", type=int, default=8, help="number of top latents (rows)")
    p.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from pathlib import Path

    from diffatlas.plotting import save_figure
    from diffatlas.sae import figures
    from diffatlas.sae.stats import curves

    if args.figure in ("vs-layer", "vs-timestep"):
        fig = figures.plot_label_stats(_read_table(args.summary), by=args.figure.split("-")[1])
    elif args.figure == "across-models":
        fig = figures.plot_across_models(pd.concat([_read_table(s) for s in args.summary], ignore_index=True))
    elif args.figure == "curves":
        tables = {}
        for run in args.runs:
            path = Path(run) / "latents.parquet"
            if not path.exists():
                raise UserError(f"{path} not found; run train-sae first")
            tables[figures.run_label(run)] = curves(pd.read_parquet(path))
        fig = figures.plot_label_curves(tables)
    elif args.figure == "training":
        import json

        runs = {}
        for run in args.runs:
            curve, metrics = Path(run) / "curve.csv", Path(run) / "metrics.json"
            if not curve.exists() or not metrics.exists():
                raise UserError(f"{curve if not curve.exists() else metrics} not found; run train-sae first")
            converged = bool(json.loads(metrics.read_text()).get("training", {}).get("converged", False))
            runs[figures.run_label(run)] = (pd.read_csv(curve), converged)
        fig = figures.plot_training(runs)
    else:
        if args.latents < 1:
            raise UserError(f"--latents {args.latents} is not allowed; allowed: an integer >= 1")
        path = Path(args.run) / "latents.parquet"
        if not path.exists():
            raise UserError(f"{path} not found; run train-sae first")
        fig = figures.plot_gallery(
            pd.read_parquet(path), args.dataset, n_latents=args.latents, title=f"top latents of {figures.run_label(args.run)}"
        )
    save_figure(fig, args.out)
    result(args.out)
    return 0
