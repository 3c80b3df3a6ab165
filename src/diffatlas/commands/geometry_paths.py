"""``diffatlas geometry-paths``: semantic path length of lerp, slerp and geodesic shooting.

For ``path_pairs`` pairs of x_T ~ N(0, I) (seeded, disjoint from the analysed samples), cuts
the linear path, the spherical path and a geodesic-shooting path into ``path_segments``
pieces, computes the tangent space T_h (top ``n_directions`` u's of the pooled ``layer`` at
``global_timestep``) at every point, and sums Park et al.'s D_geo between consecutive ones.
Writes the per-pair table ``--out`` (CSV), the per-segment lengths ``--segments`` and a
summary next to ``--out`` (same name, ``.json``).

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
    ap.add_argument("--segments", default=None,
                    help="CSV of every segment's D_geo (default: path_segments.csv beside --out)")
    args = ap.parse_args(argv)

    cfg = RUNNER.config(args)

    from diffatlas.geometry.run import run_paths

    handle = RUNNER.load_model(args)
    s = run_paths(handle, cfg, args.out, RUNNER.model_name(args), segments_csv=args.segments)
    mean = s["semantic_length_mean"]
    result(
        f"{args.out}: {s['pairs']} pairs, {s['segments']} segments at t={s['timestep']}: semantic length (Σ D_geo) "
        f"lerp {mean['lerp']:.4g} slerp {mean['slerp']:.4g} geodesic {mean['geodesic']:.4g} "
        f"(slerp/lerp {s['slerp_over_lerp_mean']:.3f}; segment noise floor {s['segment_floor_mean']:.3g}); "
        f"min norm ratio lerp {s['min_norm_ratio_mean']['lerp']:.3f} slerp {s['min_norm_ratio_mean']['slerp']:.3f}"
    )
    return 0
