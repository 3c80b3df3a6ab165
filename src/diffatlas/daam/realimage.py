"""DAAM on real images: noise (or invert) an image, then denoise it with its caption while tracing.

Generated images have no true masks; dataset images do. To get word maps for a dataset
image we put it on the model's trajectory and let the model denoise it with its caption:

* ``mode="noise"``: ``x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε`` at ``t_start`` (training scale,
  fixed ε from ``seed`` and the sample id), then DDIM from ``t_start`` down to 0;
* ``mode="invert"``: deterministic DDIM inversion from x0 up to ``t_start`` with the caption
  (not traced), then the same DDIM denoising.

The DDIM steps are the model's schedule (``steps`` evenly spaced training timesteps, as
``DDIMScheduler`` spaces them) restricted to ``t <= t_start``, taken with the diffusion core
(:mod:`diffatlas.models.diffusion`: the model's ``prediction_type``, clipping and final ᾱ),
so any text-conditioned diffusers model works, latent or pixel, ε- or v-predicting. The
inversion reads each step's noise at the level it starts from (as extraction's inversion
does). Only the denoising pass is traced; with ``guidance > 1`` it runs CFG with
``[uncond, cond]`` rows and the conditional rows are the ones recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffatlas.daam.processor import DEFAULT_LAYERS
from diffatlas.daam.trace import AttentionTracer, CFGLayout, TracedRun, build_word_maps, check_text_model, describe, text_window
from diffatlas.errors import UserError
from diffatlas.models.diffusion import CLEAN, cfg_batch, cfg_split, ddim_invert, images_to_tensor, uses_cfg

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


def invert_to_start(handle: Any, x0: torch.Tensor, ts: Sequence[int], cond: dict[str, Any]) -> torch.Tensor:
    """Deterministic DDIM inversion of clean ``x0`` up to ``ts[0]`` through the ascending grid ``ts``.

    The core's inversion (:func:`diffatlas.models.diffusion.ddim_invert`), with the model's
    true noise prediction under the caption (v- and x0-predicting models converted).
    """
    return ddim_invert(lambda z, t: handle.predict_noise(z, t, cond), x0, sorted(ts), handle.ddpm_alphas("DAAM real-image mode"))


def trace_real_images(
    handle: Any,
    images: np.ndarray,
    captions: Sequence[str],
    *,
    sample_ids: Sequence[int] | None = None,
    t_start: int = 400,
    steps: int = 20,
    mode: str = "noise",
    guidance: float = 1.0,
    seed: int = 0,
    layers: str | Sequence[str] = DEFAULT_LAYERS,
    time_resolved: bool = False,
    batch_size: int = 16,
    model_name: str | None = None,
) -> TracedRun:
    """Word maps of real ``images`` (uint8 [N, H, W, 3]) for their ``captions``.

    Maps come out at the images' own size (H, W), so they line up with the dataset's masks.
    An image without a caption is a :class:`UserError` naming its sample id.
    """
    check_text_model(handle, model_name)
    if handle.time_convention != "step":
        raise UserError(
            f"daam real-image mode (daam.datasets) noises and denoises with DDIM; model {model_name or handle.model_id!r} "
            f"is a flow-matching {handle.family} model; allowed: DDPM-family models here, and prompt sets "
            "(daam-generate) for flow-matching models"
        )
    if mode not in MODES:
        raise UserError(f"daam real-image mode {mode!r} is not allowed; allowed: {', '.join(MODES)}")
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
    ts = ddim_timesteps(handle.num_train_timesteps, steps, t_start)
    dev = handle.device
    tok = handle.tokenizers[0]
    window = text_window(handle)
    out_hw = (int(images.shape[1]), int(images.shape[2]))
    tracer = AttentionTracer(handle.denoiser, layers, time_resolved, model_name or handle.model_id)
    maps, items, per_step = [], [], []
    do_cfg = uses_cfg(guidance)
    uncond = handle.conditioning([""]) if do_cfg else None
    with tracer, torch.no_grad():
        for start in range(0, len(images), batch_size):
            sl = slice(start, start + batch_size)
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
                    x = invert_to_start(handle, x0, ts, cond)
            tracer.reset()
            for i, t in enumerate(ts):
                if do_cfg:
                    both = {"encoder_hidden_states": torch.cat([uncond["encoder_hidden_states"].expand(b, -1, -1), cond["encoder_hidden_states"]])}
                    if "added_cond_kwargs" in cond:
                        both["added_cond_kwargs"] = {
                            k: torch.cat([uncond["added_cond_kwargs"][k].expand(b, *v.shape[1:]), v]) for k, v in cond["added_cond_kwargs"].items()
                        }
                    out = cfg_split(handle.model_output(cfg_batch(x), t, both), guidance)
                else:
                    out = handle.model_output(x, t, cond)
                x = handle.schedule.ddim_step(out, x, t, ts[i + 1] if i + 1 < len(ts) else CLEAN)
            layout = CFGLayout.batched(b, do_cfg, source="trace_real_images")
            raw = tracer.collect(layout)
            maps.extend(build_word_maps(raw, batch_caps, tok, out_hw, window))
            items.extend({"sample_id": sid, "prompt_index": start + j, "image_index": 0, "seed": seed} for j, sid in enumerate(ids[sl]))
            if time_resolved:
                per_step.append((start, raw))
            last = raw
    info = {
        "mode": f"real-{mode}",
        "model": handle.describe(),
        "t_start": int(t_start),
        "alpha_bar_start": float(handle.ddpm_alphas("DAAM real-image mode")[t_start]),
        "timesteps": ts,
        "alpha_bar": [float(handle.ddpm_alphas("DAAM real-image mode")[t]) for t in ts],
        "steps": steps,
        "guidance": float(guidance),
        "cfg": do_cfg,
        "seed": seed,
        "layers": list([layers] if isinstance(layers, str) else layers),
        "map_size": list(out_hw),
        "aggregation": "sum over heads, layers, timesteps per resolution; bicubic upsampling; clamp >= 0; sum over resolutions",
        "trace": describe(last),
        "time_resolved": bool(time_resolved),
    }
    return TracedRun(images.copy(), maps, items, info, per_step)
