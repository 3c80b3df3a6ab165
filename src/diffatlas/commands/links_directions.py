"""``diffatlas links-directions``: which SAE latents change along each pullback direction, and do their labels match the judge?

The edited images of the ``--geometry`` timestep directories (x0-normalised one-step edits)
go through ``--model`` with the extraction hooks at each ``--runs`` SAE run's layer and
timestep (as its store was extracted); the SAE encodes them, and per direction the latents
whose codes change most are compared with the factor ``--meaning`` (meaning_summary.csv)
assigns to it. Writes one row per (run, geometry timestep, direction) (``--table``) and the
agreement rates with 95% Wilson intervals and chance (``--agreement``). Settings: the
``links`` config section (edit mode, noise draws, latents per direction, seed). See
:mod:`diffatlas.links.directions`.

Example::

    diffatlas links-directions --model resources/models/shapesworld --model-name shapesworld \\
        --runs results/sae/shapesworld/shapesworld/mid/t50 --geometry results/geometry/shapesworld/t999 \\
        --meaning results/geometry/shapesworld/meaning_summary.csv \\
        --table results/links/shapesworld/shapesworld/directions.csv \\
        --agreement results/links/shapesworld/shapesworld/directions_agreement.csv
"""

from __future__ import annotations

import argparse

from diffatlas.links.config import LinksConfig
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("links-directions", __doc__, section=LinksConfig, model="required", device=True, threads=True)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="SAE run directories")
    ap.add_argument("--geometry", nargs="+", required=True, help="geometry timestep directories (edits.safetensors)")
    ap.add_argument("--meaning", required=True, help="the geometry stage's meaning_summary.csv")
    ap.add_argument("--table", required=True, help="output CSV, one row per (run, geometry timestep, direction)")
    ap.add_argument("--agreement", required=True, help="output CSV, agreement per run and pooled")
    ap.add_argument("--record", default=None, help="output JSON: provenance and settings")
    ap.add_argument("--noise-draws", type=int, default=None, help="forward-noise draws per edit sample (overrides links.noise_draws)")
    args = ap.parse_args(argv)
    cfg = RUNNER.config(args, {"noise_draws": args.noise_draws})
    handle = RUNNER.load_model(args)

    from diffatlas.links.directions import run

    _, agree = run(handle, args.runs, args.geometry, args.meaning, args.table, args.agreement, links=cfg, device=handle.device,
                   model_name=RUNNER.model_name(args), record=args.record)
    for r in agree.itertuples():
        where = "pooled" if r.layer == "all" else f"{r.layer} t{r.timestep}"
        result(f"{r.measure} change, {where}: most-changed latent's attribute = judge's factor {r.k}/{r.n} = {r.agreement:.2f} "
               f"[{r.low:.2f}, {r.high:.2f}] ({r.interval}, {r.n_directions} directions; chance {r.chance:.2f}; {r.not_scored} directions not scored)")
    return 0
