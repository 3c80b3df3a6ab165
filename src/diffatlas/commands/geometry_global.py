"""``diffatlas geometry-global``: global directions from the local bases at t = T-1.

Matches every sample's local directions (sign and order) to a common reference, averages
them into global directions, projects them onto each sample's tangent space and applies
them to the first ``global_samples`` samples (denoised to t = 0). Reads the
``basis.safetensors`` of ``--basis`` (the ``geometry`` output at ``global_timestep``) and
writes ``global.safetensors`` and ``meta.json`` into ``--out``.

Example::

    diffatlas geometry-global --model resources/models/shapesworld --model-name shapesworld \\
        --basis results/geometry/shapesworld/t999 --out results/geometry/shapesworld/global
"""

from __future__ import annotations

import argparse

from diffatlas.geometry.config import add_config_args, config_from_args
from diffatlas.io import pick_device, set_threads
from diffatlas.logs import result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="diffatlas geometry-global", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (diffusers layout) or cached hub id")
    ap.add_argument("--model-name", default=None, help="name recorded in the artifacts (default: --model)")
    ap.add_argument("--basis", required=True, help="geometry output directory at global_timestep")
    ap.add_argument("--out", required=True, help="output directory (results/geometry/{model}/global)")
    add_config_args(ap)
    args = ap.parse_args(argv)

    set_threads(args.threads)
    cfg = config_from_args(args.config_json, args.set)
    device = pick_device(args.device)

    from diffatlas.geometry.run import run_global
    from diffatlas.models.loader import load_model

    handle = load_model(args.model, device=device)
    meta = run_global(handle, cfg, args.basis, args.out, args.model_name or args.model)
    result(
        f"{args.out}: {meta['n_samples']} samples at t={meta['timestep']}; mean cos local-global "
        f"{[round(c, 3) for c in meta['mean_cos']]}; kept in tangent spaces {[round(k, 3) for k in meta['mean_kept']]}"
    )
    return 0
