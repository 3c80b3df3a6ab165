"""How much of a steering edit survives the next GroupNorm (the README's GroupNorm hypothesis).

    python bench/groupnorm_survival.py --sae results/intervene/shapesworld/sae/mid/t500 --layer mid

Hypothesis (README, interventions): a vector added at every position of a UNet layer is largely
removed by the GroupNorm that normalises the next block's input. GroupNorm subtracts, per sample
and group of channels, the mean over the group's channels *and all positions*, and divides by
that set's standard deviation. A vector ``v`` added at every position moves each group's mean by
the mean of ``v`` over the group's channels: only that part is removed, and the rest widens the
group's spread, so the division shrinks it (and the image's own content) as α grows.

Measured, on the model's own passes: the denoiser runs at a step of a DDIM trajectory (the
sampler of :mod:`diffatlas.interventions.generate`) without and with the library's
:class:`~diffatlas.interventions.hook.InterventionHook` at ``--layer``. The input of the first
``GroupNorm`` that runs after the layer is captured in both passes; their difference ``Δ`` is
the edit as the norm sees it (concatenated with the skip connection for an up block). The
norm's output change is computed by hand in float64 (per sample and group: mean and biased
variance over channels × positions, ``eps`` and the affine of the module; checked against the
module itself), and compared with the *linear response* ``γ ⊙ Δ / σ_g(x)``: what the edit would
become if the norm kept the unedited input's statistics. Reported per edit and α:

* ``survival`` = ||GN(x + Δ) − GN(x)|| / ||γ ⊙ Δ / σ_g(x)||  (1: nothing removed or shrunk);
* ``mean_removed`` = share of ||Δ||² that is the per-(group, sample) mean of Δ (what the mean
  subtraction alone removes);
* ``cos``: cosine between the output change and the linear response.

Edits: the chosen colour/shape latents' decoder directions (``intervene`` selection on the SAE's
latents.parquet, α × mean activation, as the judged experiment adds them) at every position
(``everywhere``) and only where the latent is active (``active``), and a Gaussian random
direction of the same norm everywhere. No numbers are asserted; the script prints a table.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np


def groupnorm64(x: np.ndarray, groups: int, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """GroupNorm by hand in float64: x [B, C, ...] -> same shape."""
    B, C = x.shape[:2]
    g = x.reshape(B, groups, -1).astype(np.float64)
    mu = g.mean(-1, keepdims=True)
    var = g.var(-1, keepdims=True)
    y = ((g - mu) / np.sqrt(var + eps)).reshape(x.shape)
    shape = (1, C) + (1,) * (x.ndim - 2)
    return y * weight.reshape(shape) + bias.reshape(shape)


def group_sigma(x: np.ndarray, groups: int, eps: float) -> np.ndarray:
    """σ per (sample, group) broadcast back to x's shape, float64."""
    B, C = x.shape[:2]
    g = x.reshape(B, groups, -1).astype(np.float64)
    s = np.sqrt(g.var(-1, keepdims=True) + eps)
    return np.broadcast_to(s, g.shape).reshape(x.shape)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resources/models/shapesworld")
    ap.add_argument("--sae", required=True, help="a spatial steering SAE of --layer (intervene_sae output)")
    ap.add_argument("--layer", default="mid")
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 4.0, 16.0, 64.0])
    ap.add_argument("--timesteps", type=int, nargs="+", default=[500, 800], help="sampler steps nearest these")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import pandas as pd
    import torch
    from torch import nn

    from diffatlas.data.shapesworld import COLOURS, SHAPES
    from diffatlas.interventions.edit import SteeringSAE
    from diffatlas.interventions.generate import resolve_layer, sample, sampler_timesteps
    from diffatlas.interventions.hook import InterventionHook
    from diffatlas.interventions.judged import select_latents
    from diffatlas.interventions.spec import Intervention
    from diffatlas.models.loader import load_model

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    handle = load_model(args.model)
    layer = resolve_layer(handle, args.layer)
    sae = SteeringSAE.load(args.sae)
    latents = pd.read_parquet(Path(args.sae) / "latents.parquet")
    chosen = pd.concat([select_latents(latents, "colour", COLOURS, 10), select_latents(latents, "shape", SHAPES, 10)])
    chosen = chosen[chosen["latent"] >= 0]
    rng = np.random.default_rng(args.seed)
    prompts = [f"a {COLOURS[i % len(COLOURS)]} {SHAPES[(i // len(COLOURS)) % len(SHAPES)]}" for i in range(args.prompts)]

    # the first GroupNorm to run after the layer: record the order of every module's forward
    modules = dict(handle.denoiser.named_modules())
    target = modules[layer.module_path]
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda m, i, n=n: order.append(n)) for n, m in modules.items()
               if isinstance(m, nn.GroupNorm) or m is target]
    ts = sampler_timesteps(handle, args.steps)
    cond = handle.conditioning(prompts)
    with torch.no_grad():
        handle.model_output(torch.zeros(1, handle.latent_channels, handle.latent_size, handle.latent_size), ts[0],
                            handle.conditioning(prompts[:1]))
    for h in handles:
        h.remove()
    after = order[order.index(layer.module_path) + 1:]
    # the layer's own GroupNorms run inside it (its pre-hook fires first): skip those under its path
    norm_name = next(n for n in after if not n.startswith(layer.module_path + "."))
    norm: nn.GroupNorm = modules[norm_name]
    print(f"model {args.model}, layer {layer.name} ({layer.module_path}); next GroupNorm: {norm_name} "
          f"({norm.num_groups} groups of {norm.num_channels // norm.num_groups} channels, eps {norm.eps}); "
          f"{args.prompts} prompts, DDIM {args.steps} steps, SAE {args.sae}")

    seen: dict[str, torch.Tensor] = {}
    cap = norm.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0].detach().clone()))
    w = norm.weight.detach().double().numpy() if norm.affine else np.ones(norm.num_channels)
    b = norm.bias.detach().double().numpy() if norm.affine else np.zeros(norm.num_channels)
    rows = []
    try:
        for t_want in args.timesteps:
            i = int(np.argmin([abs(t - t_want) for t in ts]))
            t = ts[i]
            x_t = sample(handle, prompts, seed=args.seed, steps=args.steps, guidance_scale=3.0, stop=i)
            with torch.no_grad():
                handle.model_output(x_t, t, cond)
            x0 = seen["x"].double().numpy()
            ref = norm(seen["x"]).double().numpy()
            hand0 = groupnorm64(x0, norm.num_groups, w, b, norm.eps)
            assert np.allclose(hand0, ref, atol=1e-4), "hand GroupNorm disagrees with the module"
            sig = group_sigma(x0, norm.num_groups, norm.eps)
            wb = w.reshape((1, -1) + (1,) * (x0.ndim - 2))
            for s in chosen.itertuples():
                W = sae.sae.W_dec[int(s.latent)].detach().float()
                norm_per_alpha = float(s.mean_act) * float(W.norm()) / sae.scale
                g = torch.from_numpy(rng.standard_normal(W.shape[0])).float()
                for alpha in args.alphas:
                    edits = {"everywhere": (int(s.latent), "all", None), "active": (int(s.latent), "active", None),
                             "random direction": (int(s.latent), "all", g / g.norm())}
                    for name, (j, where, direction) in edits.items():
                        spec = Intervention(latent=j, alpha=alpha * float(s.mean_act), direction="atom", where=where,
                                            t_max=999, t_min=0)
                        view = sae
                        if direction is not None:  # the random direction at the latent's norm, in raw units
                            from diffatlas.interventions.experiment import PerImageSAE

                            view = PerImageSAE.of(sae, [j], (direction * norm_per_alpha)[None])
                            spec = Intervention(latent=j, alpha=alpha, direction="unit", where=where, t_max=999, t_min=0)
                        with InterventionHook(handle.denoiser, layer, spec, view, guided=False):
                            with torch.no_grad():
                                handle.model_output(x_t, t, cond)
                        x1 = seen["x"].double().numpy()
                        d = x1 - x0
                        if not np.any(d):
                            rows.append({"t": t, "word": s.value, "latent": j, "alpha": alpha, "edit": name,
                                         "edited_share": 0.0})
                            continue
                        out = groupnorm64(x1, norm.num_groups, w, b, norm.eps) - hand0
                        lin = wb * d / sig
                        B = d.shape[0]
                        gm = d.reshape(B, norm.num_groups, -1)
                        mean_part = np.broadcast_to(gm.mean(-1, keepdims=True), gm.shape)
                        pos = d.reshape(B, d.shape[1], -1)
                        rows.append({
                            "t": t, "word": s.value, "latent": j, "alpha": alpha, "edit": name,
                            "edited_share": float(np.mean(np.abs(pos).sum(1) > 0)),
                            "survival": float(np.linalg.norm(out) / np.linalg.norm(lin)),
                            "mean_removed": float((mean_part ** 2).sum() / (gm ** 2).sum()),
                            "cos": float((out * lin).sum() / (np.linalg.norm(out) * np.linalg.norm(lin))),
                        })
    finally:
        cap.remove()
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    table = df.groupby(["t", "edit", "alpha"])[["edited_share", "survival", "mean_removed", "cos"]].median().round(3)
    print("median over the chosen latents (colour and shape words):")
    print(table.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
