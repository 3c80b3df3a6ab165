"""``diffatlas geometry-paths``: semantic path length of lerp vs slerp between Gaussian latents.

For ``path_pairs`` pairs of x_T ~ N(0, I) (seeded, disjoint from the analysed samples), cuts
the linear and the spherical path into ``path_segments`` pieces and measures their length
in H (the pooled ``layer`` output at ``global_timestep``). Writes the per-pair table
``--out`` (CSV) and a summary next to it (same name, ``.json``).

Example::

    diffatlas geometry-paths --model resources/models/shapesworld --model-name shapesworld \\
        --out results/geometry/shapesworld/path_lengths.csv --set path_pairs=20
"""

from __future__ import annotations

import argparse

from diffatlas.geometry.config import GeometryConfig
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("geometry-paths", __doc__, section=GeometryConfig, model="required", device=True, threads=True)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="CSV table (results/geometry/{model}/path_lengths.csv)")
    args = ap.parse_args(argv)

    cfg = RUNNER.config(args)

    from diffatlas.geometry.run import run_paths

    handle = RUNNER.load_model(args)
    s = run_paths(handle, cfg, args.out, RUNNER.model_name(args))
    result(
        f"{args.out}: {s['pairs']} pairs, {s['segments']} segments at t={s['timestep']}: H length lerp "
        f"{s['h_length_mean']['lerp']:.4g} slerp {s['h_length_mean']['slerp']:.4g} (slerp/lerp {s['slerp_over_lerp_mean']:.3f}); "
        f"min norm ratio lerp {s['min_norm_ratio_mean']['lerp']:.3f} slerp {s['min_norm_ratio_mean']['slerp']:.3f}"
    )
    return 0
