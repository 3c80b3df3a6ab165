"""``diffatlas links-sae-daam``: SAE latent maps vs DAAM word maps vs true masks, on the same images.

For each ``--runs`` SAE run (with its ``--stores`` activation store, spatial maps needed),
every latent labelled with a caption word (majority colour/shape/size, purity >= links.min_purity) is
encoded position by position on the images of the DAAM real-image run ``--daam``, its map
upsampled and thresholded as DAAM's (the run's tau), and scored by IoU against the word's
DAAM mask and the object's true mask (``--dataset``). Writes one row per (run, latent, image)
(``--rows``, Parquet) and per (layer, timestep, latent, word) with 95% intervals
(``--summary``, CSV). See :mod:`diffatlas.links.sae_daam`.

Example::

    diffatlas links-sae-daam --runs results/sae/shapesworld/shapesworld/up_ft1/t50 \\
        --stores results/activations/shapesworld/shapesworld/t50.zarr \\
        --daam results/daam/shapesworld/real/shapesworld --dataset results/data/shapesworld \\
        --rows results/links/shapesworld/shapesworld/sae_daam.parquet \\
        --summary results/links/shapesworld/shapesworld/sae_daam_summary.csv
"""

from __future__ import annotations

import argparse

from diffatlas.links.config import LinksConfig
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("links-sae-daam", __doc__, section=LinksConfig, device=True, threads=True)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="SAE run directories")
    ap.add_argument("--stores", nargs="+", default=None, help="activation store of each run (default: recorded in cfg.json)")
    ap.add_argument("--daam", required=True, help="DAAM real-image output directory (daam-real)")
    ap.add_argument("--dataset", required=True, help="dataset directory (masks.npy, metadata.parquet)")
    ap.add_argument("--rows", required=True, help="output Parquet, one row per (run, latent, image)")
    ap.add_argument("--summary", required=True, help="output CSV, one row per (layer, timestep, latent, word)")
    ap.add_argument("--record", default=None, help="output JSON: provenance and settings")
    args = ap.parse_args(argv)
    cfg = RUNNER.config(args)
    device = RUNNER.setup(args)

    from diffatlas.links.sae_daam import pooled, run

    stores = args.stores or [None] * len(args.runs)
    rows, _ = run(args.runs, stores, args.daam, args.dataset, args.rows, args.summary, device=device, record=args.record,
                  cfg=cfg)
    if len(rows) == 0:
        result("no labelled latent names a word of the DAAM images' captions")
    for r in pooled(rows, seed=cfg.seed).itertuples():
        result(f"{r.layer} t{r.timestep} {r.attribute}: {r.latents} latents on {r.n_images} images ({r.n} pairs): IoU latent-DAAM {r.iou_sae_daam:.2f} "
               f"[{r.iou_sae_daam_low:.2f}, {r.iou_sae_daam_high:.2f}], latent-true {r.iou_sae_true:.2f} "
               f"[{r.iou_sae_true_low:.2f}, {r.iou_sae_true_high:.2f}], DAAM-true {r.iou_daam_true:.2f} "
               f"[{r.iou_daam_true_low:.2f}, {r.iou_daam_true_high:.2f}]")
    return 0
