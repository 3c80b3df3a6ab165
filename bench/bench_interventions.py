"""Cost of an intervention during generation: time with the hook / without, side by side in one run.

    python bench/bench_interventions.py                     # ShapesWorld model if present, else its architecture, random weights
    python bench/bench_interventions.py --model resources/models/shapesworld --layer mid --prompts 16 --steps 20 --repeats 3
    python bench/bench_interventions.py --family sd          # a tiny SD-structured model (diffatlas.models.tiny)
    python bench/bench_interventions.py --size sd15 --layer up_ft1 --prompts 1 --steps 1 --repeats 2
                                                             # Stable Diffusion 1.5 at its real size, random weights

Both sides run :func:`diffatlas.interventions.generate.sample` on the same prompts, seeds and
steps with CFG; the intervened side edits the layer at every step on both CFG branches with
a TopK SAE of ``--expansion`` × C latents (k = ``--k``; random weights: the cost does not
depend on what the latents mean). Measured edits: ``steer`` at every position (no SAE pass),
``steer`` where the latent is active and ``ablate`` (both encode every position through the
SAE). ``--size sd15`` builds SD1.5's published architecture with random weights
(:mod:`diffatlas.models.fullsize`, float16 on disk under ``--model-cache``, reused; loaded in
float32): speed depends on the architecture, not on the weights. ``--latent-size`` runs the
denoiser on a smaller latent than the model's own (cheaper; both sides alike). Runs alternate (plain, each edit, plain, ...) after a warm-up; the ratio of medians of
wall-clock and of process CPU time is printed per edit. Target (issue 20): ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_daam import build_model, prompts  # noqa: E402  (same default model and prompts as the DAAM bench)

EDITS = {
    "steer-all": {"mode": "steer", "alpha": 4.0},
    "steer-active": {"mode": "steer", "alpha": 4.0, "where": "active"},
    "ablate": {"mode": "ablate"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--family", default=None, help="bench a tiny model of this family instead (sd, pixel, dit, ...)")
    parser.add_argument("--size", default=None, help="bench a full-size random model of this size instead (sd15, sd2v)")
    parser.add_argument("--model-cache", default=None, help="where --size's model is written once and reused "
                        "(default: <tmp>/diffatlas_bench_<size>)")
    parser.add_argument("--latent-size", type=int, default=None, help="denoiser input side (default: the model's own)")
    parser.add_argument("--edits", nargs="+", default=list(EDITS), choices=list(EDITS))
    parser.add_argument("--layer", default="mid")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=0, help="latent edited; -1: the one active at the most positions of "
                        "the probe pass (an edit that changes something; the old default 0 is usually inactive)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from diffatlas.interventions.generate import prepare, resolve_layer, sample
    from diffatlas.interventions.spec import Intervention
    from diffatlas.models.loader import load_model
    from diffatlas.sae.config import SAEArch
    from diffatlas.sae.model import TopKSAE

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_intervene_"))
    if args.family:
        from diffatlas.models.tiny import make_tiny_model

        model = str(make_tiny_model(args.family, tmp / "model"))
    elif args.size:
        from diffatlas.models.fullsize import make_full_size_model

        cache = Path(args.model_cache or Path(tempfile.gettempdir()) / f"diffatlas_bench_{args.size}")
        if not (cache / "model_index.json").exists():
            make_full_size_model(args.size, cache, dtype=torch.float16)
        model = str(cache)
    else:
        model = build_model(args)
    handle = load_model(model, device=args.device)
    if args.latent_size:
        handle.latent_size = int(args.latent_size)
    ps = prompts(args.prompts) if handle.family != "dit" else ["red circle"] * args.prompts
    layer = resolve_layer(handle, args.layer)

    # channels of the layer, from one pass
    seen = {}

    def keep(m, i, o):
        seen["x"] = o[0] if isinstance(o, tuple) else o

    h = dict(handle.denoiser.named_modules())[layer.module_path].register_forward_hook(keep)
    x = torch.zeros(1, handle.latent_channels, handle.latent_size, handle.latent_size, device=handle.device)
    handle.model_output(x, 500, handle.conditioning([ps[0]]))
    h.remove()
    d = seen["x"].shape[-1] if seen["x"].ndim == 3 else seen["x"].shape[1]
    sae = TopKSAE(SAEArch(d_in=d, n_latents=args.expansion * d, k=min(args.k, args.expansion * d - 1), k_aux=32))
    sae.save(tmp / "sae", {"model": "bench", "layer": layer.name, "module_path": layer.module_path, "samples": "spatial",
                           "input_scale": 1.0})

    latent = args.latent
    if latent < 0:
        x = seen["x"]
        v = x.flatten(2).transpose(1, 2) if x.ndim == 4 else x
        with torch.no_grad():
            latent = int(sae.codes(v.reshape(-1, d).float()).gt(0).sum(0).argmax())
    hooks = {}
    edits = {name: EDITS[name] for name in args.edits}
    for name, kw in edits.items():
        spec = Intervention(latent=latent, t_max=handle.num_train_timesteps - 1, t_min=0, **kw)
        hooks[name] = prepare(handle, tmp / "sae", args.layer, spec, model="bench", steps=args.steps,
                              guidance_scale=args.guidance)[0]

    def run(name: str) -> None:
        sample(handle, ps, seed=0, steps=args.steps, guidance_scale=args.guidance, hook=hooks.get(name))

    sides = ["plain", *edits]
    for name in sides:  # warm-up
        run(name)
    wall: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    for _ in range(args.repeats):
        for name in sides:
            t0, c0 = time.perf_counter(), time.process_time()
            run(name)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {s: (statistics.median(wall[s]), statistics.median(cpu[s])) for s in sides}
    print(f"model {model} ({handle.family}), layer {layer.name} ({layer.module_path}, C = {d}), SAE n = {args.expansion * d}, "
          f"k = {sae.k}, latent {latent}; {args.prompts} prompts x {args.steps} steps, latent side {handle.latent_size}, CFG {args.guidance}, {args.device}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"  plain        wall {med['plain'][0]:.3f} s  cpu {med['plain'][1]:.3f} s")
    for name in edits:
        w, c = med[name]
        print(f"  {name:12s} wall {w:.3f} s  cpu {c:.3f} s  ratio wall {w / med['plain'][0]:.3f}  cpu {c / med['plain'][1]:.3f}"
              f"  (edited {hooks[name].edited_passes} of {hooks[name].passes} passes)")
    print("target (issue 20): ratio <= 1.10")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
