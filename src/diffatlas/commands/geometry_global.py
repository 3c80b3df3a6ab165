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

from diffatlas.geometry.config import GeometryConfig
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("geometry-global", __doc__, section=GeometryConfig, model="required", device=True, threads=True)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--basis", required=True, help="geometry output directory at global_timestep")
    ap.add_argument("--out", required=True, help="output directory (results/geometry/{model}/global)")
    args = ap.parse_args(argv)

    cfg = RUNNER.config(args)

    from diffatlas.geometry.run import run_global

    handle = RUNNER.load_model(args)
    meta = run_global(handle, cfg, args.basis, args.out, RUNNER.model_name(args))
    result(
        f"{args.out}: {meta['n_samples']} samples at t={meta['timestep']}; mean cos local-global "
        f"{[round(c, 3) for c in meta['mean_cos']]}; kept in tangent spaces {[round(k, 3) for k in meta['mean_kept']]}"
    )
    return 0
