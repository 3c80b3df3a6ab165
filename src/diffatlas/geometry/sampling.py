"""Deterministic DDIM between any two training timesteps, with the model's own schedule.

The geometry stage needs DDIM segments that start or stop at arbitrary training timesteps
(``T-1 -> t`` to reach the point whose basis is computed, ``t -> clean`` after an edit), while
a diffusers scheduler only steps on its fixed inference grid. So the update is written out
with the diffusion core's step (:mod:`diffatlas.models.diffusion`), from the scheduler's own
``alphas_cumprod``, ``prediction_type`` (epsilon, v or sample), ``clip_sample`` /
``clip_sample_range`` and final ᾱ (``set_alpha_to_one``), exactly as ``DDIMScheduler.step``
with ``eta = 0`` and ``use_clipped_model_output=True`` computes it::

    x0̂ = predicted clean sample (clipped if the scheduler clips)
    ε̂  = noise re-derived from the clipped x0̂: (x_t - sqrt(ᾱ_t) x0̂) / sqrt(1 - ᾱ_t)
    x_s = sqrt(ᾱ_s) x0̂ + sqrt(1 - ᾱ_s) ε̂

Re-deriving ε̂ (diffusers' ``use_clipped_model_output=True``, which ShapesWorldPipeline passes
too) keeps the step consistent: a clipped x0̂ next to the model's own ε̂ pushes the sample
against the guided change under strong guidance (colours flip on the ShapesWorld model).

A segment ``t -> s`` takes ``max(1, round(steps · (t - s) / T))`` equal steps, so one
``ddim_steps`` setting means the same step size everywhere.
"""

from __future__ import annotations

import numpy as np
import torch

from diffatlas.activations.noise import sample_noise
from diffatlas.models.diffusion import CLEAN, cfg_combine, clip_x0, eps_x0, uses_cfg

__all__ = ["CLEAN", "Denoiser", "alpha_at", "decode_uint8", "initial_noise", "segment", "split_prediction", "to_uint8"]


def alpha_at(handle, t: int) -> float:
    """ᾱ_t on the training scale; ``t = CLEAN`` gives the scheduler's final ᾱ."""
    return handle.schedule.alpha_bar(int(t))


def segment(t_from: int, t_to: int, steps: int, num_train_timesteps: int) -> list[int]:
    """Timesteps visited from ``t_from`` down to ``t_to`` (``CLEAN`` allowed), both included."""
    if t_to >= t_from:
        return [t_from]
    span = t_from - t_to
    n = max(1, int(round(steps * span / num_train_timesteps)))
    pts = np.linspace(t_from, t_to, n + 1).round().astype(int).tolist()
    out = [pts[0]]
    for p in pts[1:]:
        if p != out[-1]:
            out.append(p)
    return out


def split_prediction(handle, out: torch.Tensor, x: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output at ᾱ = ``a`` -> (ε̂, x0̂), by the scheduler's ``prediction_type``."""
    return eps_x0(out, x, a, handle.schedule.prediction_type)


class Denoiser:
    """Noise / x0 predictions of a model at one prompt, with optional CFG, in batches.

    ``cond`` / ``uncond`` come from ``handle.conditioning``; ``guidance_scale <= 1`` runs the
    conditional pass only. ``amp``: autocast dtype of the passes (None = the weights' own);
    outputs come back in the input's dtype, so the DDIM arithmetic stays in float32.
    """

    def __init__(self, handle, prompt: str = "", guidance_scale: float = 1.0, batch_size: int = 64,
                 amp: torch.dtype | None = None) -> None:
        self.handle = handle
        self.amp = amp
        self.cond = handle.conditioning([prompt])
        self.guidance = float(guidance_scale)
        self.uncond = handle.conditioning([""]) if uses_cfg(self.guidance) else None
        self.batch_size = max(1, int(batch_size))

    @torch.no_grad()
    def output(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Raw model output for ``x`` [B, C, h, w] at training timestep ``t`` (CFG combined)."""
        from diffatlas.accel import autocast

        outs = []
        for chunk in x.split(self.batch_size):
            with autocast(x.device, self.amp):
                out = self.handle.model_output(chunk, int(t), self.cond).to(x.dtype)
                if self.uncond is not None:
                    out_u = self.handle.model_output(chunk, int(t), self.uncond).to(x.dtype)
            if self.uncond is not None:
                out = cfg_combine(out_u, out, self.guidance)
            outs.append(out)
        return torch.cat(outs)

    @torch.no_grad()
    def eps_x0(self, x: torch.Tensor, t: int, clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x0̂) at ``t``; x0̂ clipped like the scheduler clips it unless ``clip=False``."""
        a = alpha_at(self.handle, t)
        eps, x0 = split_prediction(self.handle, self.output(x, t), x, a)
        r = self.handle.schedule.clip_sample_range
        if not clip or r is None:
            return eps, x0
        x0_clipped = clip_x0(x0, r)  # and the noise that goes with it (module docstring)
        return eps_x0(x0_clipped, x, a, "sample")[0], x0_clipped

    @torch.no_grad()
    def ddim(self, x: torch.Tensor, t_from: int, t_to: int, steps: int) -> torch.Tensor:
        """DDIM (η = 0) from ``x`` at ``t_from`` down to ``t_to`` (``CLEAN`` = the clean sample)."""
        path = segment(int(t_from), int(t_to), steps, self.handle.num_train_timesteps)
        for t, s in zip(path[:-1], path[1:]):
            x = self.handle.schedule.ddim_step(self.output(x, t), x, t, s)
        return x


def initial_noise(handle, n: int, seed: int, first_id: int = 0) -> torch.Tensor:
    """x_T [n, C, h, w] ~ N(0, I), sample ``i`` from its own seeded generator (batch-independent)."""
    shape = (handle.latent_channels, handle.latent_size, handle.latent_size)
    ids = list(range(first_id, first_id + n))
    return sample_noise(ids, handle.num_train_timesteps, shape, seed).to(handle.device, handle.dtype)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decode_uint8(handle, x0: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Clean denoiser-space samples -> uint8 images [B, H, W, 3] (VAE decode for latent models)."""
    return np.concatenate([to_uint8(handle.decode(c)) for c in x0.split(batch_size)]) if len(x0) else np.zeros(
        (0, handle.image_size, handle.image_size, 3), np.uint8
    )

