"""``diffatlas geometry``: pullback bases and edits of one model at one timestep.

Computes, for ``n_samples`` samples (x_T seeded per sample, DDIM to ``--timestep``), the
top ``n_directions`` singular triples of ``J = ∂h/∂x_t`` (h = the ``layer`` output pooled
over space), then edits each sample along its top directions (one-step, x0-normalised and
iterative with parallel transport) and denoises them to t = 0. Writes ``basis.safetensors``,
``edits.safetensors`` and ``meta.json`` into ``--out`` atomically.

Example::

    diffatlas geometry --model resources/models/shapesworld --model-name shapesworld \\
        --timestep 500 --out results/geometry/shapesworld/t500 --set n_directions=4
"""

from __future__ import annotations

import argparse

from diffatlas.geometry.config import add_config_args, config_from_args
from diffatlas.io import pick_device, set_threads
from diffatlas.logs import result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="diffatlas geometry", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (diffusers layout) or cached hub id")
    ap.add_argument("--model-name", default=None, help="name recorded in the artifacts (default: --model)")
    ap.add_argument("--timestep", required=True, type=int, help="training-scale timestep 0..T-1")
    ap.add_argument("--out", required=True, help="output directory (results/geometry/{model}/t{timestep})")
    add_config_args(ap)
    args = ap.parse_args(argv)

    set_threads(args.threads)
    cfg = config_from_args(args.config_json, args.set)
    device = pick_device(args.device)

    from diffatlas.geometry.run import run_timestep
    from diffatlas.models.loader import load_model

    handle = load_model(args.model, device=device)
    meta = run_timestep(handle, cfg, args.timestep, args.out, args.model_name or args.model)
    s = ", ".join(f"{x:.3g}" for x in meta["singular_values_mean"])
    result(
        f"{args.out}: t={meta['timestep']} (alpha_bar {meta['alpha_bar']:.3f}) {meta['n_samples']} samples, "
        f"sigma (mean) [{s}], {meta['iterations']} rounds, converged {meta['converged']}, "
        f"max residual {meta['max_residual']:.1e}; times {', '.join(f'{k} {v:.1f}' for k, v in meta['timings'].items())}"
    )
    return 0
