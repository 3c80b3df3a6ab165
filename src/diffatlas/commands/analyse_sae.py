"""``diffatlas analyse-sae``: measure and mine a trained SAE again, in one streaming pass.

Reads the SAE written by ``train-sae`` (``--sae``: its directory), streams the (layer,
timestep) of ``--store`` through it chunk by chunk (memory independent of the number of
samples) and writes ``metrics.json`` and ``latents.parquet`` — the same files and keys as
``train-sae`` — into ``--out`` (atomically). Use it to re-mine an SAE after changing the
mining settings (``top_n``, ``mine_on``, ``rank_by``, ...), or to mine a store too large for
memory. The SAE's input scale, samples mode and train/validation split (seed and fraction,
recorded in its ``cfg.json``) are reused, so the validation metrics are those of training.

Settings: the SAE's own ``sae`` config (from its ``cfg.json``), overridden by
``--config-json`` / ``--set``.

Example::

    diffatlas analyse-sae --sae results/sae/shapesworld/shapesworld/mid/t50 \\
        --store results/activations/shapesworld/shapesworld/t50.zarr --out /tmp/mid_t50 --set top_n=20
"""

from __future__ import annotations

import argparse

from diffatlas.logs import result
from diffatlas.runner import Runner
from diffatlas.sae.config import SAEConfig

RUNNER = Runner("analyse-sae", __doc__, section=SAEConfig, device=True, threads=True)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", required=True, help="directory of a trained SAE (sae.safetensors + cfg.json)")
    ap.add_argument("--store", required=True, help="activation store holding the SAE's layer and timestep")
    ap.add_argument("--layer", default=None, help="layer to read (default: the SAE's own)")
    ap.add_argument("--timestep", default=None, type=int, help="timestep to read (default: the SAE's own)")
    ap.add_argument("--out", required=True, help="output directory for metrics.json and latents.parquet")
    args = ap.parse_args(argv)
    device = RUNNER.setup(args)

    from diffatlas.sae.analysis import analyse_saved

    metrics = analyse_saved(
        args.sae, args.store, args.out, RUNNER.section_dict(args), layer=args.layer, timestep=args.timestep, device=device
    )
    lab = metrics["labels"]
    result(
        f"{args.out}: fve {metrics['fve']:.3f} l0 {metrics['l0']:.1f} dead {metrics['dead_fraction']:.3f} "
        f"dense {metrics['dense_fraction']:.3f} | top-{lab['n_top_latents']} latents: purity fine {lab['purity_fine']:.3f} "
        f"coarse {lab['purity_coarse']:.3f} | {metrics['analysis']['samples_per_second']:.0f} samples/s"
    )
    return 0
