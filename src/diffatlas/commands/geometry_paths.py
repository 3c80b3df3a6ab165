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

from diffatlas.geometry.config import add_config_args, config_from_args
from diffatlas.io import pick_device, set_threads
from diffatlas.logs import result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="diffatlas geometry-paths", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (diffusers layout) or cached hub id")
    ap.add_argument("--model-name", default=None, help="name recorded in the artifacts (default: --model)")
    ap.add_argument("--out", required=True, help="CSV table (results/geometry/{model}/path_lengths.csv)")
    add_config_args(ap)
    args = ap.parse_args(argv)

    set_threads(args.threads)
    cfg = config_from_args(args.config_json, args.set)
    device = pick_device(args.device)

    from diffatlas.geometry.run import run_paths
    from diffatlas.models.loader import load_model

    handle = load_model(args.model, device=device)
    s = run_paths(handle, cfg, args.out, args.model_name or args.model)
    result(
        f"{args.out}: {s['pairs']} pairs, {s['segments']} segments at t={s['timestep']}: H length lerp "
        f"{s['h_length_mean']['lerp']:.4g} slerp {s['h_length_mean']['slerp']:.4g} (slerp/lerp {s['slerp_over_lerp_mean']:.3f}); "
        f"min norm ratio lerp {s['min_norm_ratio_mean']['lerp']:.3f} slerp {s['min_norm_ratio_mean']['slerp']:.3f}"
    )
    return 0
