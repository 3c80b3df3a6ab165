"""DAAM on real images: noise (or invert) an image, then denoise it with its caption while tracing.

Generated images have no true masks; dataset images do. To get word maps for a dataset
image we put it on the model's trajectory and let the model denoise it with its caption.
Both time conventions of the diffusion core (:mod:`diffatlas.models.diffusion`) are served,
each with its own formulas from there:

DDPM-family models (integer training steps, ᾱ; start ``t_start``, config ``daam.real_t``):

* ``mode="noise"``: ``x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε`` at ``t_start`` (training scale,
  fixed ε from ``seed`` and the sample id), then DDIM from ``t_start`` down to 0;
* ``mode="invert"``: deterministic DDIM inversion from x0 up to ``t_start`` with the caption
  (not traced), then the same DDIM denoising.

  The DDIM steps are the model's schedule (``steps`` evenly spaced training timesteps, as
  ``DDIMScheduler`` spaces them) restricted to ``t <= t_start``, taken with the model's
  ``prediction_type``, clipping and final ᾱ, so any text-conditioned diffusers model works,
  latent or pixel, ε- or v-predicting.

Flow-matching models (SD3, Flux: σ in [0, 1]; start ``σ_start``, config ``daam.real_sigma``):

* ``mode="noise"``: ``x_σ = (1 - σ) x0 + σ ε`` at ``σ_start`` (the same fixed ε), then Euler
  steps of the flow ODE down to σ = 0;
* ``mode="invert"``: Euler flow inversion from x0 up to ``σ_start`` with the caption (not
  traced), then the same Euler denoising.

  The σ grid is the one the model's own pipeline would sample with ``steps`` steps (its
  ``FlowMatchEulerDiscreteScheduler``: shift, Flux's resolution-dependent shift and sigma
  spacing; :func:`flow_sigmas`), restricted to ``σ <= σ_start``.

Both inversions read each step's model output at the level they start from (as
extraction's inversion does) and run through the same grid as the denoising pass. Only the
denoising pass is traced; with ``guidance > 1`` it runs CFG with ``[uncond, cond]`` rows and
the conditional rows are the ones recorded. Flux is guidance-distilled: it has no negative
branch (its transformer embeds the guidance value), so every row is conditional.

The joint-attention transformers are traced by :mod:`diffatlas.daam.joint` (maps of the
image-token queries on the text keys inside the joint softmax); their word maps read the
family's text stream (SD3: CLIP, Flux: T5). Artifacts record σ, the scheduler's timestep σ·T,
the noising rule and the family, as daam-generate's ``info.json`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffatlas.daam import joint
from diffatlas.daam.processor import DEFAULT_LAYERS
from diffatlas.daam.trace import (
    AttentionTracer,
    CFGLayout,
    TracedRun,
    build_joint_word_maps,
    build_word_maps,
    check_text_model,
    describe,
    text_window,
)
from diffatlas.errors import UserError
from diffatlas.models.diffusion import (
    CLEAN,
    DDPM_NOISING_RULE,
    FLOW_NOISING_RULE,
    Time,
    cfg_batch,
    cfg_split,
    check_time,
    ddim_invert,
    flow_invert,
    flow_scheduler_timestep,
    flow_step,
    images_to_tensor,
    uses_cfg,
)

log = logging.getLogger(__name__)

MODES = ("noise", "invert")


def ddim_timesteps(num_train_timesteps: int, steps: int, t_start: int) -> list[int]:
    """Descending training timesteps ``<= t_start`` of a ``steps``-step DDIM schedule ("leading" spacing).

    The first one is ``t_start`` itself, so the image is noised exactly to the asked level.
    """
    if not 0 <= t_start < num_train_timesteps:
        raise UserError(f"daam real-image t_start = {t_start} is not allowed; allowed: 0..{num_train_timesteps - 1}")
    if steps < 1:
        raise UserError(f"daam real-image steps = {steps} is not allowed; allowed: >= 1")
    ratio = num_train_timesteps // steps
    grid = [t for t in range(0, num_train_timesteps, max(1, ratio)) if t < t_start]
    return [t_start, *sorted(grid, reverse=True)]


def flow_sigmas(handle: Any, steps: int, sigma_start: float) -> list[float]:
    """Descending σ ``<= sigma_start`` (and > 0) of the σ grid the model's pipeline samples
    with ``steps`` steps (:meth:`ModelHandle.flow_sigmas`); the first one is ``sigma_start``
    itself (the level the image is put at). The clean end σ = 0 is where the last step lands.
    """
    if steps < 1:
        raise UserError(f"daam real-image steps = {steps} is not allowed; allowed: >= 1")
    sigma_start = float(sigma_start)
    if not 0.0 < sigma_start <= 1.0:
        raise UserError(f"daam real-image sigma_start = {sigma_start} is not allowed; allowed: 0 < sigma <= 1")
    # strictly below the start (a grid point equal to it up to float32 is the start itself)
    below = [s for s in handle.flow_sigmas(steps) if 0.0 < s < sigma_start - 1e-6]
    return [sigma_start, *sorted(below, reverse=True)]


def invert_to_start(handle: Any, x0: torch.Tensor, ts: Sequence[int], cond: dict[str, Any]) -> torch.Tensor:
    """Deterministic DDIM inversion of clean ``x0`` up to ``ts[0]`` through the ascending grid ``ts``.

    The core's inversion (:func:`diffatlas.models.diffusion.ddim_invert`), with the model's
    true noise prediction under the caption (v- and x0-predicting models converted).
    """
    return ddim_invert(lambda z, t: handle.predict_noise(z, t, cond), x0, sorted(ts), handle.ddpm_alphas("DAAM real-image mode"))


def flow_invert_to_start(handle: Any, x0: torch.Tensor, sigmas: Sequence[float], cond: dict[str, Any]) -> torch.Tensor:
    """Euler flow inversion of clean ``x0`` (σ = 0) up to ``sigmas[0]`` through the ascending grid
    ``sigmas`` (:func:`diffatlas.models.diffusion.flow_invert`), velocity under the caption."""
    return flow_invert(lambda z, s: handle.model_output(z, float(s), cond), x0, sorted(sigmas), start=0.0)


def _cfg_conditioning(uncond: dict[str, Any], cond: dict[str, Any], b: int) -> dict[str, Any]:
    """The conditioning of a :func:`cfg_batch` batch: the (batch-1) unconditional rows first,
    then ``cond``'s ``b`` rows, for every tensor (nested dicts such as SDXL's added_cond_kwargs too)."""
    out: dict[str, Any] = {}
    for k, v in cond.items():
        u = uncond[k]
        if isinstance(v, dict):
            out[k] = _cfg_conditioning(u, v, b)
        elif torch.is_tensor(v):
            out[k] = torch.cat([u.expand(b, *v.shape[1:]), v])
        else:
            out[k] = v
    return out


def start_time(handle: Any, t_start: Any, model_name: str | None = None, where: str = "daam real-image start time") -> Time:
    """``t_start`` checked against the model's time convention: a training step for DDPM-family
    models, σ for flow-matching ones (a number in [0, 1] or ``"s0.600"``); else a UserError
    naming ``where`` (the config key it came from)."""
    label = model_name or handle.model_id
    if handle.time_convention == "sigma" and isinstance(t_start, float):
        t_start = Time.sigma(t_start)
    t = check_time(t_start, handle.time_convention, None, where, label)
    if t.kind == "step" and not 0 <= t.value < handle.num_train_timesteps:
        raise UserError(f"daam real-image t_start = {t.value} is not allowed; allowed: 0..{handle.num_train_timesteps - 1}")
    if t.kind == "sigma" and t.value <= 0:
        raise UserError(f"daam real-image sigma_start = {t.value} is not allowed for model {label!r}; allowed: 0 < sigma <= 1")
    return t


def trace_real_images(
    handle: Any,
    images: np.ndarray,
    captions: Sequence[str],
    *,
    sample_ids: Sequence[int] | None = None,
    t_start: int | float | str | Time = 400,
    steps: int = 20,
    mode: str = "noise",
    guidance: float = 1.0,
    seed: int = 0,
    layers: str | Sequence[str] = DEFAULT_LAYERS,
    time_resolved: bool = False,
    batch_size: int = 16,
    model_name: str | None = None,
    start_key: str = "daam real-image start time",
) -> TracedRun:
    """Word maps of real ``images`` (uint8 [N, H, W, 3]) for their ``captions``.

    ``t_start`` is in the model's time convention (:func:`start_time`): a training step (400,
    ``"t400"``) for DDPM-family models, σ (0.6, ``"s0.600"``) for flow-matching ones.
    Maps come out at the images' own size (H, W), so they line up with the dataset's masks.
    An image without a caption is a :class:`UserError` naming its sample id; ``start_key``
    names the config key ``t_start`` came from in errors.
    """
    check_text_model(handle, model_name)
    if mode not in MODES:
        raise UserError(f"daam real-image mode {mode!r} is not allowed; allowed: {', '.join(MODES)}")
    start = start_time(handle, t_start, model_name, start_key)
    flow = start.kind == "sigma"
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"daam real-image mode needs uint8 RGB images [N, H, W, 3], got {images.dtype} {images.shape}")
    captions = list(captions)
    ids = list(range(len(images))) if sample_ids is None else [int(s) for s in sample_ids]
    if len(captions) != len(images) or len(ids) != len(images):
        raise UserError(f"daam: {len(images)} images but {len(captions)} captions and {len(ids)} sample ids")
    for sid, cap in zip(ids, captions):
        if not isinstance(cap, str) or not cap.strip():
            raise UserError(
                f"daam real-image mode: sample {sid} has no caption; every image needs one (the maps are of its words)"
            )
    # The denoising grid (descending, first = the start) and the model's time at each point.
    ts: list[int] | list[float] = (
        flow_sigmas(handle, steps, start.value) if flow else ddim_timesteps(handle.num_train_timesteps, steps, start.value)
    )
    dev = handle.device
    out_hw = (int(images.shape[1]), int(images.shape[2]))
    tracer = AttentionTracer(handle.denoiser, layers, time_resolved, model_name or handle.model_id)
    if tracer.family is not None:
        # every caption's word layout first: a word a tokenisation lacks, or a caption past
        # T5's limit, fails before any denoising
        joint_layout = {c: joint.joint_prompt_tokens(handle, c) for c in dict.fromkeys(captions)}
    else:
        tok, window = handle.tokenizers[0], text_window(handle)
    # Flux is guidance-distilled: no negative branch, the guidance is an embedding.
    distilled = handle.family == "flux"
    do_cfg = uses_cfg(guidance) and not distilled
    if distilled and uses_cfg(guidance):
        log.warning("daam real-image mode: %s is a guidance-distilled Flux model (no negative branch); "
                    "real_guidance %.2f is not applied as CFG", model_name or handle.model_id, guidance)
    maps, items, per_step, recon = [], [], [], []
    uncond = handle.conditioning([""]) if do_cfg else None
    with tracer, torch.no_grad():
        for first in range(0, len(images), batch_size):
            sl = slice(first, first + batch_size)
            batch_caps = captions[sl]
            b = len(batch_caps)
            x0 = handle.encode_images(images_to_tensor(images[sl], handle.image_size, dev, handle.dtype))
            cond = handle.conditioning(batch_caps)
            if mode == "noise":
                noise = torch.stack(
                    [torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + sid)) for sid in ids[sl]]
                ).to(dev, x0.dtype)
                x = handle.add_noise(x0, noise, ts[0])
            else:
                with tracer.paused():
                    x = flow_invert_to_start(handle, x0, ts, cond) if flow else invert_to_start(handle, x0, ts, cond)
            tracer.reset()
            both = _cfg_conditioning(uncond, cond, b) if do_cfg else None
            for i, t in enumerate(ts):
                out = cfg_split(handle.model_output(cfg_batch(x), t, both), guidance) if do_cfg else handle.model_output(x, t, cond)
                if flow:
                    x = flow_step(out, x, t, ts[i + 1] if i + 1 < len(ts) else 0.0)
                else:
                    x = handle.schedule.ddim_step(out, x, t, ts[i + 1] if i + 1 < len(ts) else CLEAN)
            # how far the caption-conditioned trajectory lands from the image (denoiser space)
            recon.extend(((x.float() - x0.float()) ** 2).flatten(1).mean(1).sqrt().tolist())
            layout = CFGLayout.batched(b, do_cfg, source="trace_real_images")
            raw = tracer.collect(layout)
            if tracer.family is not None:
                maps.extend(build_joint_word_maps(raw, [joint_layout[c] for c in batch_caps], out_hw))
            else:
                maps.extend(build_word_maps(raw, batch_caps, tok, out_hw, window))
            items.extend({"sample_id": sid, "prompt_index": first + j, "image_index": 0, "seed": seed} for j, sid in enumerate(ids[sl]))
            if time_resolved:
                per_step.append((first, raw))
            last = raw
    info = {
        "mode": f"real-{mode}",
        "model": handle.describe(),
        "t_start": int(start.value) if not flow else str(start),
        "steps": steps,
        "guidance": float(guidance),
        "cfg": do_cfg,
        "seed": seed,
        "layers": list([layers] if isinstance(layers, str) else layers),
        "map_size": list(out_hw),
        "aggregation": "sum over heads, layers, timesteps per resolution; bicubic upsampling; clamp >= 0; sum over resolutions",
        "trace": describe(last),
        "time_resolved": bool(time_resolved),
        "reconstruction_rmse": [float(r) for r in recon],
    }
    if flow:
        T = int(handle.num_train_timesteps)
        info.update(joint.describe_joint(handle, tracer, last) if tracer.family is not None else {})
        info.update({
            "time_convention": "sigma",
            "noising_rule": FLOW_NOISING_RULE,
            "sigma_start": float(start.value),
            "scheduler_timestep_start": flow_scheduler_timestep(start.value, T),
            "sigmas": [float(s) for s in ts],
            "timesteps": [flow_scheduler_timestep(s, T) for s in ts],  # the scheduler's sigma * T
            "solver": "euler" + (" (after Euler flow inversion)" if mode == "invert" else ""),
            "guidance_distilled": distilled,
        })
    else:
        alphas = handle.ddpm_alphas("DAAM real-image mode")
        info.update({
            "time_convention": "step",
            "noising_rule": DDPM_NOISING_RULE,
            "alpha_bar_start": float(alphas[start.value]),
            "timesteps": ts,
            "alpha_bar": [float(alphas[t]) for t in ts],
            "solver": "ddim" + (" (after DDIM inversion)" if mode == "invert" else ""),
        })
    return TracedRun(images.copy(), maps, items, info, per_step)
