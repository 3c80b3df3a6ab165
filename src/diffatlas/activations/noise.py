"""Noising clean inputs to a training-scale timestep: seeded forward noise and DDIM inversion.

Forward noising is ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε``. The noise ``ε`` of each
(sample id, timestep, draw) comes from its own CPU ``torch.Generator`` whose seed is a hash
of ``(seed, sample_id, timestep, draw)``, so a sample gets the same noise bit for bit whatever
the batch size, the batch order or the device the model runs on.

DDIM inversion runs the deterministic DDIM update backwards, from the clean input (ᾱ = 1)
up to the target timestep, through the equally spaced training timesteps of a ``steps``-step
grid that lie below the target, then one step onto the target (:func:`inversion_path`)::

    ε   = eps(x, t_cur)
    x0̂  = (x - sqrt(1 - ᾱ_cur) ε) / sqrt(ᾱ_cur)
    x   = sqrt(ᾱ_next) x0̂ + sqrt(1 - ᾱ_next) ε

The first step evaluates ε at timestep 0 on the clean input (ᾱ_cur = 1, so x0̂ = x).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch


def noise_seed(seed: int, sample_id: int, timestep: int, draw: int = 0) -> int:
    """A 63-bit generator seed, a stable hash of (seed, sample id, timestep, draw)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(sample_id)}:{int(timestep)}:{int(draw)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_noise(
    sample_ids: Sequence[int],
    timestep: int,
    shape: Sequence[int],
    seed: int,
    draw: int = 0,
) -> torch.Tensor:
    """Standard normal noise [B, *shape] float32 on CPU, one generator per sample."""
    out = torch.empty((len(sample_ids), *shape), dtype=torch.float32, device="cpu")
    gen = torch.Generator(device="cpu")
    for i, sid in enumerate(sample_ids):
        gen.manual_seed(noise_seed(seed, sid, timestep, draw))
        torch.randn(tuple(shape), generator=gen, dtype=torch.float32, device="cpu", out=out[i])
    return out


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: float) -> torch.Tensor:
    """Forward process: ``sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε`` (shapes [B, C, h, w])."""
    a = float(alpha_bar_t)
    return x0 * (a**0.5) + noise.to(x0.device, x0.dtype) * ((1.0 - a) ** 0.5)


def inversion_path(target: int, steps: int, num_train_timesteps: int) -> list[int]:
    """Timesteps DDIM inversion visits from the clean input to ``target``.

    The regular grid ``stride, 2 stride, ...`` (``stride = T // steps``) below the target,
    then the target itself. The path depends on the target alone, so a sample's activations
    at t do not change when other timesteps are extracted with it.
    """
    if steps < 1:
        raise ValueError("inversion steps must be >= 1")
    stride = max(1, num_train_timesteps // steps)
    return [g for g in range(stride, num_train_timesteps, stride) if g < target] + [int(target)]


CLEAN = -1
"""Start of an inversion path: the clean input, with ᾱ = 1."""


def ddim_invert(
    eps_fn: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    path: Sequence[int],
    alphas_cumprod: torch.Tensor | np.ndarray,
    start: int = CLEAN,
) -> torch.Tensor:
    """DDIM-invert ``x`` (at timestep ``start``, or :data:`CLEAN`) through the timesteps ``path``.

    ``path`` ascends and lies above ``start``; an empty path returns ``x``. Running a path in
    pieces (each piece starting where the last ended) gives the same result as one call.
    ``eps_fn(x [B,C,h,w], t) -> ε`` is the model's noise prediction at training timestep
    ``t``. Scalars are float64; tensors keep the dtype of ``x``.
    """
    ab = np.asarray(alphas_cumprod.detach().cpu() if isinstance(alphas_cumprod, torch.Tensor) else alphas_cumprod, dtype=np.float64)
    t_cur = int(start)
    a_cur = 1.0 if t_cur == CLEAN else float(ab[t_cur])
    for t_next in path:
        if t_next <= t_cur:
            raise ValueError(f"inversion path must ascend above {t_cur}, got {t_next}")
        a_next = float(ab[t_next])
        eps = eps_fn(x, max(t_cur, 0)).to(x.dtype)
        x0_hat = (x - (1.0 - a_cur) ** 0.5 * eps) / a_cur**0.5
        x = a_next**0.5 * x0_hat + (1.0 - a_next) ** 0.5 * eps
        t_cur, a_cur = int(t_next), a_next
    return x
