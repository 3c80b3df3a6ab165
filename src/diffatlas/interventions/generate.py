"""Generation with and without an intervention: DDIM with CFG from the diffusion core, same seeds.

The sampler is the one a diffusers DDIM pipeline runs (η = 0), written with the core's pieces
(:mod:`diffatlas.models.diffusion`): the inference timesteps of a ``DDIMScheduler`` built from
the model's scheduler config (``set_timesteps(steps)``: its spacing and ``steps_offset``), the
batch ``[uncond rows, cond rows]`` through ``handle.model_output``, :func:`cfg_split`, and
``NoiseSchedule.ddim_step`` down to the clean end. Each image's starting noise comes from its
own seeded generator (:func:`diffatlas.geometry.sampling.initial_noise`), so the baseline and
the intervened run start from the same x_T bit for bit.

Artifact (:func:`run`, a directory written atomically):

* ``images.safetensors``: ``baseline`` / ``intervened`` uint8 ``[N, H, W, 3]``;
  ``baseline_x0`` / ``intervened_x0`` float32 ``[N, C, h, w]`` (the clean denoiser-space
  samples, before the VAE);
* ``intervention.json``: model, layer (alias and module path), timestep window and the
  sampler timesteps inside it, the intervention (latent, mode, α / value, direction, where,
  CFG branch), the SAE (path, samples, granularity, provenance), seed, prompts, steps,
  guidance, device, dtype, and how many denoiser passes the hook edited.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from diffatlas.activations.layers import ResolvedLayer, resolve_layers
from diffatlas.errors import UserError
from diffatlas.interventions.edit import SteeringSAE
from diffatlas.interventions.hook import InterventionHook
from diffatlas.interventions.spec import Intervention
from diffatlas.models.diffusion import CLEAN, cfg_batch, cfg_split, check_time, uses_cfg

log = logging.getLogger(__name__)

IMAGES = "images.safetensors"
INFO = "intervention.json"


def sampler_timesteps(handle: Any, steps: int) -> list[int]:
    """The DDIM inference timesteps (training scale, descending) for ``steps`` steps."""
    from diffusers import DDIMScheduler

    if int(steps) < 1:
        raise UserError(f"steps = {steps} is not allowed; allowed: an integer >= 1")
    sched = DDIMScheduler.from_config(handle.scheduler.config)
    sched.set_timesteps(int(steps))
    return [int(t) for t in sched.timesteps]


def check_window(handle: Any, spec: Intervention, steps: int, model: str) -> list[int]:
    """The sampler timesteps inside the window; UserError when the window leaves the schedule or holds none."""
    if handle.time_convention != "step":
        raise UserError(f"model {model!r}: interventions need a DDPM-family scheduler (integer training steps); "
                        f"{type(handle.scheduler).__name__} counts sigmas")
    T = handle.num_train_timesteps
    for key in ("t_max", "t_min"):
        check_time(getattr(spec, key), "step", T, f"intervention window {key}", model)
    ts = sampler_timesteps(handle, steps)
    inside = [t for t in ts if spec.in_window(t)]
    if not inside:
        raise UserError(f"intervention window t{spec.t_max}..t{spec.t_min} of model {model!r} holds none of the sampler's "
                        f"{steps} timesteps {ts}; allowed: a window containing at least one of them")
    return inside


def _cat_cond(a: dict[str, Any], b: dict[str, Any], n: int) -> dict[str, Any]:
    """Conditioning of ``[a rows, b rows]``, each broadcast to ``n`` rows (nested dicts for SDXL)."""
    out: dict[str, Any] = {}
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, dict):
            out[k] = _cat_cond(va, vb, n)
        else:
            out[k] = torch.cat([va.expand(n, *va.shape[1:]) if va.shape[0] == 1 else va,
                                vb.expand(n, *vb.shape[1:]) if vb.shape[0] == 1 else vb])
    return out


@torch.no_grad()
def sample(handle: Any, prompts: list[str], *, seed: int, steps: int, guidance_scale: float,
           hook: InterventionHook | None = None, start: tuple[int, torch.Tensor] | None = None,
           stop: int | None = None) -> torch.Tensor:
    """Clean denoiser-space samples ``[N, C, h, w]`` for ``prompts`` (one image each), DDIM η = 0.

    With ``hook``, the hook is live for the whole run (it picks its own window and rows).
    ``stop = i`` returns the state x before the i-th sampler step instead; ``start = (i, x)``
    resumes from it. Runs that differ only by an edit whose window starts at step i share the
    steps before it this way, bit for bit (same prompts in the same order: the same batch).
    """
    from diffatlas.geometry.sampling import initial_noise

    n = len(prompts)
    ts = sampler_timesteps(handle, steps)
    guided = uses_cfg(guidance_scale)
    cond = handle.conditioning(list(prompts))
    if guided:
        cond = _cat_cond(handle.conditioning([""]), cond, n)  # unconditional rows first
    first, x = (0, initial_noise(handle, n, seed)) if start is None else (int(start[0]), start[1].clone())
    last = len(ts) if stop is None else int(stop)

    def run_steps(x: torch.Tensor) -> torch.Tensor:
        for i, t in enumerate(ts):
            if not first <= i < last:
                continue
            out = handle.model_output(cfg_batch(x) if guided else x, t, cond).to(x.dtype)
            if guided:
                out = cfg_split(out, guidance_scale)
            x = handle.schedule.ddim_step(out, x, t, ts[i + 1] if i + 1 < len(ts) else CLEAN)
        return x

    if hook is None:
        return run_steps(x)
    with hook:
        return run_steps(x)


def resolve_layer(handle: Any, layer: str) -> ResolvedLayer:
    """One layer (alias or exact module path) of the model; a glob matching several is refused."""
    found = resolve_layers(handle.denoiser, [layer])
    if len(found) != 1:
        raise UserError(f"layer {layer!r} matches {len(found)} modules; an intervention edits one layer: name one of "
                        f"{', '.join(x.module_path for x in found[:8])}")
    return found[0]


def prepare(handle: Any, sae_dir: str | Path, layer: str, spec: Intervention, *, model: str, steps: int,
            guidance_scale: float) -> tuple[InterventionHook, SteeringSAE, ResolvedLayer, list[int]]:
    """Every check before any generation: layer, SAE (model, layer, latent), window. Returns the hook."""
    resolved = resolve_layer(handle, layer)
    sae = SteeringSAE.load(sae_dir, device=handle.device)
    sae.check(latent=spec.latent, model=model, layer=resolved.name, module_path=resolved.module_path)
    inside = check_window(handle, spec, steps, model)
    t_sae = sae.cfg.get("timestep")
    if t_sae is not None and not spec.in_window(int(t_sae)):
        log.warning("SAE %s was trained at timestep %s, outside the window t%d..t%d", sae.path, t_sae, spec.t_max, spec.t_min)
    hook = InterventionHook(handle.denoiser, resolved, spec, sae, guided=uses_cfg(guidance_scale))
    return hook, sae, resolved, inside


def run(handle: Any, sae_dir: str | Path, layer: str, spec: Intervention, prompts: list[str], out: str | Path, *,
        model: str, seed: int = 0, steps: int = 20, guidance_scale: float = 3.0) -> dict[str, Any]:
    """Generate ``prompts`` without and with the intervention (same seeds) and write the artifact."""
    from safetensors.torch import save_file

    from diffatlas.geometry.sampling import decode_uint8
    from diffatlas.io import atomic_dir, write_json

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise UserError("intervene: give at least one prompt")
    hook, sae, resolved, inside = prepare(handle, sae_dir, layer, spec, model=model, steps=steps, guidance_scale=guidance_scale)
    t0 = time.perf_counter()
    base = sample(handle, prompts, seed=seed, steps=steps, guidance_scale=guidance_scale)
    t1 = time.perf_counter()
    edited = sample(handle, prompts, seed=seed, steps=steps, guidance_scale=guidance_scale, hook=hook)
    t2 = time.perf_counter()
    info = {
        "model": model,
        "model_info": handle.describe(),
        "layer": resolved.name,
        "module_path": resolved.module_path,
        "time_convention": "step (training scale, inclusive window)",
        "window": {"t_max": spec.t_max, "t_min": spec.t_min, "sampler_timesteps_inside": inside,
                   "sampler_timesteps": sampler_timesteps(handle, steps)},
        "intervention": spec.to_dict(),
        "direction_note": {"unit": "W_dec[j] / |W_dec[j]|", "atom": "W_dec[j] / input_scale"}[spec.direction]
        if spec.mode == "steer" else None,
        "cfg": {"guidance_scale": float(guidance_scale), "guided": uses_cfg(guidance_scale),
                "batch_layout": "[uncond rows, cond rows]", "branch": spec.cfg_branch},
        "sae": {"path": str(sae.path), "samples": sae.cfg.get("samples"), "granularity": sae.granularity,
                "pooling": sae.pooling, "input_scale": sae.scale, "n_latents": sae.n_latents, "k": sae.sae.k,
                "atom_norm": float(sae.sae.W_dec[spec.latent].detach().norm()),
                **{k: sae.cfg.get(k) for k in ("model", "layer", "module_path", "timestep", "conditioning", "prompt", "store")}},
        "seed": int(seed),
        "noise": "diffatlas.geometry.sampling.initial_noise(handle, n, seed): one seeded generator per image",
        "prompts": prompts,
        "steps": int(steps),
        "sampler": "DDIM eta=0 (diffusion core), timesteps of DDIMScheduler.from_config(model scheduler)",
        "device": str(handle.device),
        "dtype": str(handle.dtype).replace("torch.", ""),
        "passes": hook.passes,
        "edited_passes": hook.edited_passes,
        "seconds": {"baseline": t1 - t0, "intervened": t2 - t1},
        "changed_images": int((base != edited).flatten(1).any(1).sum()),
    }
    with atomic_dir(out) as tmp:
        save_file(
            {"baseline": torch.from_numpy(decode_uint8(handle, base)).contiguous(),
             "intervened": torch.from_numpy(decode_uint8(handle, edited)).contiguous(),
             "baseline_x0": base.float().cpu().contiguous(), "intervened_x0": edited.float().cpu().contiguous()},
            str(Path(tmp) / IMAGES), metadata={"format": "diffatlas-intervention"},
        )
        write_json(Path(tmp) / INFO, info)
    return info
