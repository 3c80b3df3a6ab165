"""``diffatlas sae-spatial``: where each top k-SAE latent fires, position by position.

Encodes the stored spatial activations of the run's layer and timestep with its SAE, one
position at a time, and writes into the run directory ``spatial_maps.safetensors`` (the map
of each of the top ``sae.top_latents`` ranked latents on each of its top images) and
``spatial.json`` (the SAE's FVE on spatial vectors beside its FVE on what it was trained on,
and the provenance). See :mod:`diffatlas.sae.spatial`.

Example::

    diffatlas sae-spatial --run results/sae/shapesworld/shapesworld/up_ft1/t50 \\
        --store results/activations/shapesworld/shapesworld/t50.zarr
"""

from __future__ import annotations

import argparse

from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("sae-spatial", __doc__, device=True, threads=True)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="SAE run directory (results/sae/{model}/{dataset}/{layer}/t{timestep})")
    ap.add_argument("--store", default=None, help="activation store (default: the one recorded in the run's cfg.json)")
    ap.add_argument("--latents", type=int, default=None, help="ranked latents to map (default: the run's sae.top_latents)")
    args = ap.parse_args(argv)
    device = RUNNER.setup(args)

    from diffatlas.sae.spatial import run

    rec = run(args.run, args.store, args.latents, device=device)
    pos, trained = rec["per_position"], rec["trained_on"]
    result(
        f"{args.run}: {rec['n_latents_mapped']} latents mapped at {rec['map_shape'][0]}x{rec['map_shape'][1]}; "
        f"FVE per position {pos['fve']:.3f} (L0 {pos['l0']:.1f}) vs {trained['samples']} {trained['fve']}"
    )
    return 0
