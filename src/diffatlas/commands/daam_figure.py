"""``diffatlas daam-figure``: one DAAM figure from the tables/runs of daam-generate / daam-real.

    diffatlas daam-figure overlays --inputs results/daam/M/real/shapesworld --out results/figures/daam/M/overlays_real_shapesworld.png
    diffatlas daam-figure miou --inputs results/daam/M/real/shapesworld results/daam/M/prompts/captions --out .../miou.png
    diffatlas daam-figure relations --inputs DIR [DIR ...] --out .../relations.png
    diffatlas daam-figure entanglement --inputs results/daam/M/prompts/entanglement --out .../entanglement.png

overlays: each word's map over the first ``--items`` images of one run; miou: the mIoU table
(DAAM vs whole-image and centre-prior baselines, per source) and the threshold curve;
relations: mIoH vs mIoD per syntactic relation; entanglement: cohyponym and adjective-swap
results of an entanglement prompt set.
"""

from __future__ import annotations

from diffatlas.daam.config import DAAMConfig
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("daam-figure", __doc__, section=DAAMConfig)
KINDS = ("overlays", "miou", "relations", "entanglement")


def main(argv: list[str]) -> int:
    parser = RUNNER.parser()
    parser.add_argument("kind", choices=KINDS, help="which figure")
    parser.add_argument("--inputs", nargs="+", required=True, help="output directories of daam-generate / daam-real")
    parser.add_argument("--out", required=True, help="PNG path under results/figures/daam/")
    parser.add_argument("--items", type=int, default=None, help="overlays: images shown (default: daam.overlay_items)")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)

    from pathlib import Path

    import pandas as pd

    from diffatlas.daam import figures
    from diffatlas.daam.words import TracedRun
    from diffatlas.errors import UserError
    from diffatlas.io import read_json

    for d in args.inputs:
        if not Path(d, "eval.json").exists():
            raise UserError(f"{d} is not a finished daam-generate / daam-real output (no eval.json)")
    if args.kind == "overlays":
        if len(args.inputs) != 1:
            raise UserError("daam-figure overlays takes exactly one --inputs directory")
        n_items = RUNNER.config(args, {"overlay_items": args.items}).overlay_items
        # τ of the outline: the one the run was scored at (recorded from the config in eval.json).
        record = read_json(Path(args.inputs[0], "eval.json"))
        if "tau" not in record:
            raise UserError(f"{args.inputs[0]}/eval.json records no tau (made by an older diffatlas): re-run its DAAM job")
        tau = float(record["tau"])
        figures.overlay_grid(TracedRun.load(Path(args.inputs[0], "run")), args.out, tau, n_items, args.title)
    elif args.kind == "miou":
        figures.miou_figure(figures.read_tables(args.inputs, "summary.csv"), figures.read_tables(args.inputs, "threshold_curve.csv"), args.out, args.title)
    elif args.kind == "relations":
        figures.relation_figure(figures.read_tables(args.inputs, "relations.csv"), args.out, args.title)
    else:
        coh, swaps = figures.read_tables(args.inputs, "cohyponym.csv"), figures.read_tables(args.inputs, "adjective_swaps.csv")
        if coh.empty and swaps.empty:
            raise UserError(f"{', '.join(args.inputs)}: no entanglement tables (use a prompt set of kind entanglement)")
        figures.entanglement_figure(coh if len(coh) else pd.DataFrame(), swaps if len(swaps) else pd.DataFrame(), args.out, args.title)
    result(f"wrote {args.out}")
    return 0
