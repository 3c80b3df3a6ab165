"""``diffatlas check-sae``: check one SAE's settings against an activation store, reading no data.

Fails (exit status 2, one line naming the setting) when ``train-sae`` with the same arguments
would fail on its settings: ``sae.k`` not below ``sae.expansion`` x the layer's channels, a
layer or timestep missing from the store, ``samples: spatial`` on a layer stored without maps.
Otherwise writes the architecture it would train (d_in, n_latents, k, k_aux) to ``--out``. The
workflow runs it on the submitting host before the GPU job ``train_sae`` (rule ``check_sae``).

Example::

    diffatlas check-sae --store results/activations/shapesworld/shapesworld/t50.zarr \\
        --layer mid --timestep 50 --config-json '{"k": 32, "expansion": 4}' --out arch.json
"""

from __future__ import annotations

import argparse

from diffatlas.logs import result
from diffatlas.runner import Runner
from diffatlas.sae.config import SAEConfig

RUNNER = Runner("check-sae", __doc__, section=SAEConfig)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="activation store, as for train-sae")
    ap.add_argument("--layer", required=True, help="layer name as stored (e.g. mid, up_ft1)")
    ap.add_argument("--timestep", required=True, type=int, help="training-scale timestep present in the store")
    ap.add_argument("--out", required=True, help="JSON file for the checked architecture")
    args = ap.parse_args(argv)

    cfg = RUNNER.config(args)

    from diffatlas.io import write_json
    from diffatlas.sae.preflight import check

    arch = check(args.store, args.layer, args.timestep, cfg)
    write_json(args.out, arch)
    result(f"{args.out}: layer {args.layer} t={args.timestep}: d_in {arch['d_in']}, n_latents {arch['n_latents']}, "
           f"k {arch['k']}, k_aux {arch['k_aux']} on {arch['n_samples']} samples x {arch['positions_per_sample']} positions")
    return 0
