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
The formulas live in the diffusion core (:mod:`diffatlas.models.diffusion`): ``add_noise``,
``ddim_invert`` and ``CLEAN`` are re-exported from there; ε is the model's true noise
prediction (``ModelHandle.predict_noise`` converts v- and x0-predictions).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from diffatlas.models.diffusion import CLEAN, add_noise, ddim_invert

__all__ = ["CLEAN", "add_noise", "ddim_invert", "inversion_path", "noise_seed", "sample_noise"]


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
