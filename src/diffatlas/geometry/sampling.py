"""Deterministic sampling between any two times, with the model's own schedule and time.

A model's time is a :class:`~diffatlas.models.diffusion.Time` in its own convention: an integer
training step for DDPM-family schedulers (DDIM below), or σ in [0, 1] for flow-matching models
(SD3, Flux: the Euler step of the flow ODE, see "Flow matching" at the end).

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

Flow matching
-------------
For a flow-matching model the model output is the velocity ``v = ε - x0`` and a segment
``σ -> σ'`` (``CLEAN`` = σ 0) is Euler steps of the core's :func:`~diffatlas.models.diffusion.flow_step`
``x_σ' = x_σ + (σ' - σ) v`` over ``max(1, round(steps · (σ - σ')))`` equal steps (the same
share of ``ddim_steps`` as a step segment of the same fraction of the noise axis); no DDIM
formula is used on a flow model. Its clean estimate is ``x0 = x_σ - σ v`` (``flow_eps_x0``),
never clipped (``FlowMatchEulerDiscreteScheduler`` has no ``clip_sample``). Generation starts at
σ = 1 (pure noise, ``x_1 = ε``), a DDPM-family one at step T-1.
"""

from __future__ import annotations

import numpy as np
import torch

from diffatlas.activations.noise import sample_noise
from diffatlas.models.diffusion import (
    CLEAN,
    DDPM_NOISING_RULE,
    FLOW_NOISING_RULE,
    Time,
    cfg_combine,
    check_time,
    clip_x0,
    eps_x0,
    flow_eps_x0,
    flow_scheduler_timestep,
    flow_step,
    uses_cfg,
)

__all__ = ["CLEAN", "Denoiser", "alpha_at", "decode_uint8", "initial_noise", "segment", "split_prediction", "to_uint8",
           "geometry_time", "start_time", "time_index", "time_record", "noise_coefficients", "sigma_segment", "is_flow"]


def is_flow(handle) -> bool:
    """Whether ``handle``'s time is σ (flow matching: SD3, Flux) rather than an integer step."""
    return getattr(handle, "time_convention", "step") == "sigma"


def geometry_time(handle, t: "Time | str | int", where: str = "--timestep") -> Time:
    """``t`` (``500``, ``"t500"``, ``"s0.500"`` or a Time) checked against the model's own convention.

    UserError (naming ``where``, the model and what is allowed) for a sigma on a step model, a
    step on a flow model, or a step outside 0..T-1.
    """
    conv = "sigma" if is_flow(handle) else "step"
    return check_time(t, conv, None if conv == "sigma" else int(handle.num_train_timesteps), where,
                      str(getattr(handle, "model_id", "")))


def start_time(handle) -> Time:
    """Where generation starts: step T-1, or σ = 1 (pure noise) for a flow-matching model."""
    return Time.sigma(1.0) if is_flow(handle) else Time.step(int(handle.num_train_timesteps) - 1)


def time_index(handle, t: Time) -> int:
    """The integer that names ``t`` in paths and seeds: the step, or for σ the scheduler's
    timestep ``σ · T`` rounded (the name extraction gives a flow model's store: t500 for s0.500)."""
    if t.kind == "step":
        return int(t.value)
    return int(round(flow_scheduler_timestep(t.value, int(handle.num_train_timesteps))))


def time_record(handle, t: Time) -> dict:
    """What an artifact records of its time: the model's convention, the scheduler's timestep
    (σ · T for flow models), σ or ᾱ (NaN on the other axis), and the noising rule."""
    flow = t.kind == "sigma"
    return {
        "time": str(t),
        "time_convention": t.kind,
        "timestep": time_index(handle, t),
        "scheduler_timestep": flow_scheduler_timestep(t.value, int(handle.num_train_timesteps)) if flow else int(t.value),
        "sigma": float(t.value) if flow else float("nan"),
        "alpha_bar": float("nan") if flow else alpha_at(handle, t),
        "noising_rule": FLOW_NOISING_RULE if flow else DDPM_NOISING_RULE,
    }


def alpha_at(handle, t: "int | Time") -> float:
    """ᾱ_t on the training scale; ``t = CLEAN`` gives the scheduler's final ᾱ."""
    return handle.schedule.alpha_bar(t.value if isinstance(t, Time) else int(t))


def noise_coefficients(handle, t: Time) -> tuple[float, float]:
    """``(a, b)`` of the forward process ``x_t = a x0 + b ε`` at ``t``: ``(sqrt(ᾱ), sqrt(1 - ᾱ))``
    for a step, ``(1 - σ, σ)`` for flow matching."""
    if t.kind == "sigma":
        return 1.0 - float(t.value), float(t.value)
    a = alpha_at(handle, t)
    return float(np.sqrt(a)), float(np.sqrt(1.0 - a))


def sigma_segment(s_from: float, s_to: float, steps: int) -> list[float]:
    """σ values visited from ``s_from`` down to ``s_to`` (0 = clean), both included: equal Euler
    steps, ``max(1, round(steps · (s_from - s_to)))`` of them (``steps`` = steps over σ 1 -> 0)."""
    if s_to >= s_from:
        return [float(s_from)]
    n = max(1, int(round(steps * (s_from - s_to))))
    return [float(v) for v in np.linspace(float(s_from), float(s_to), n + 1)]


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

    Times are the model's own (:class:`Time`, or an int step / ``CLEAN`` for a step model; a
    float σ for a flow model); for a flow model the output is the velocity, CFG combines
    velocities (as diffusers' SD3 pipeline does).

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

    @property
    def flow(self) -> bool:
        return is_flow(self.handle)

    def _model_time(self, t: "Time | int | float") -> "int | float":
        """``t`` as the handle's ``model_output`` takes it: an int step, or a float σ."""
        if isinstance(t, Time):
            return float(t.value) if t.kind == "sigma" else int(t.value)
        return float(t) if self.flow else int(t)

    @torch.no_grad()
    def output(self, x: torch.Tensor, t: "Time | int | float") -> torch.Tensor:
        """Raw model output for ``x`` [B, C, h, w] at time ``t`` (CFG combined)."""
        from diffatlas.accel import autocast

        mt = self._model_time(t)
        outs = []
        for chunk in x.split(self.batch_size):
            with autocast(x.device, self.amp):
                out = self.handle.model_output(chunk, mt, self.cond).to(x.dtype)
                if self.uncond is not None:
                    out_u = self.handle.model_output(chunk, mt, self.uncond).to(x.dtype)
            if self.uncond is not None:
                out = cfg_combine(out_u, out, self.guidance)
            outs.append(out)
        return torch.cat(outs)

    @torch.no_grad()
    def eps_x0(self, x: torch.Tensor, t: "Time | int | float", clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x0̂) at ``t``; x0̂ clipped like the scheduler clips it unless ``clip=False``.

        Flow matching: ``ε̂ = x_σ + (1 - σ) v``, ``x0̂ = x_σ - σ v`` (the core's ``flow_eps_x0``), unclipped.
        """
        if self.flow:
            return flow_eps_x0(self.output(x, t), x, float(self._model_time(t)))
        a = alpha_at(self.handle, t)
        eps, x0 = split_prediction(self.handle, self.output(x, t), x, a)
        r = self.handle.schedule.clip_sample_range
        if not clip or r is None:
            return eps, x0
        x0_clipped = clip_x0(x0, r)  # and the noise that goes with it (module docstring)
        return eps_x0(x0_clipped, x, a, "sample")[0], x0_clipped

    @torch.no_grad()
    def ddim(self, x: torch.Tensor, t_from: "Time | int", t_to: "Time | int", steps: int) -> torch.Tensor:
        """Deterministic sampling from ``x`` at ``t_from`` down to ``t_to`` (``CLEAN`` = the clean sample):
        DDIM (η = 0) on a step model, Euler steps of the flow ODE on a flow model (module docstring)."""
        if self.flow:
            s_from = float(t_from.value if isinstance(t_from, Time) else t_from)
            s_to = 0.0 if (not isinstance(t_to, Time) and t_to == CLEAN) else float(t_to.value if isinstance(t_to, Time) else t_to)
            path = sigma_segment(s_from, s_to, steps)
            for s, s_next in zip(path[:-1], path[1:]):
                x = flow_step(self.output(x, s), x, s, s_next)
            return x
        t_from = t_from.value if isinstance(t_from, Time) else t_from
        t_to = t_to.value if isinstance(t_to, Time) else t_to
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

