"""``diffatlas geometry``: pullback bases and edits of one model at one timestep.

Computes, for ``n_samples`` samples (x_T seeded per sample, DDIM to ``--timestep``), the
top ``n_directions`` singular triples of ``J = ∂h/∂x_t`` (h = the ``layer`` output pooled
over space; on SD3 / Flux a block's image-token stream, ``block{i}.image``), then edits each sample along its top directions (one-step, x0-normalised and
iterative with parallel transport) and denoises them to t = 0. Writes ``basis.safetensors``,
``edits.safetensors`` and ``meta.json`` into ``--out`` atomically.

Example::

    diffatlas geometry --model resources/models/shapesworld --model-name shapesworld \\
        --timestep 500 --out results/geometry/shapesworld/t500 --set n_directions=4
    diffatlas geometry --model resources/models/tiny-sd3 --model-name sd3 \
        --timestep s0.500 --out results/geometry/sd3/t500 --set layer=block0.image
"""

from __future__ import annotations

import argparse

from diffatlas.geometry.config import GeometryConfig
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("geometry", __doc__, section=GeometryConfig, model="required", device=True, threads=True)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timestep", required=True,
                    help="the model's own time: a training-scale step 0..T-1 (500), or for a flow-matching "
                         "model (SD3, Flux) a sigma 's0.500'")
    ap.add_argument("--out", required=True, help="output directory (results/geometry/{model}/t{timestep})")
    args = ap.parse_args(argv)

    cfg = RUNNER.config(args)

    from diffatlas.geometry.run import run_timestep

    handle = RUNNER.load_model(args)
    meta = run_timestep(handle, cfg, args.timestep, args.out, RUNNER.model_name(args))
    s = ", ".join(f"{x:.3g}" for x in meta["singular_values_mean"])
    where = (f"sigma {meta['sigma']:.3f} (t={meta['timestep']})" if meta["time_convention"] == "sigma"
             else f"t={meta['timestep']} (alpha_bar {meta['alpha_bar']:.3f})")
    result(
        f"{args.out}: {where} {meta['n_samples']} samples, "
        f"sigma (mean) [{s}], {meta['iterations']} rounds, converged {meta['converged']}, "
        f"max residual {meta['max_residual']:.1e}; times {', '.join(f'{k} {v:.1f}' for k, v in meta['timings'].items())}"
    )
    return 0
