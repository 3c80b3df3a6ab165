"""The edit maths on a layer's activations, and the checks that an SAE fits the hooked layer.

Activations arrive as ``[B, P, C]``: B rows of the batch, P positions (h·w map cells or DiT
tokens; 1 for a vector layer), C channels. The SAE sees ``x · input_scale`` (``cfg.json``), so
with ``a_j = W_dec[j]`` (a row of the stored decoder) and the code ``z_j`` of a vector:

* steer:  ``x' = x + α d``, ``d = a_j / |a_j|`` (direction ``unit``) or ``a_j / input_scale``
  (direction ``atom``);
* clamp:  ``x' = x + decode(z') − decode(z)`` with ``z'`` = ``z`` but ``z'_j = value``.
  The SAE's decoder is linear in the code, so this difference is ``(value − z_j) a_j`` in the
  SAE's space, ``(value − z_j) a_j / input_scale`` in the layer's: the reconstruction error
  ``x − decode(z)`` is kept, and where ``z_j`` already equals ``value`` nothing changes.

**Granularity** follows what the SAE was trained on (``cfg.json`` ``samples``):

* ``spatial``: one vector per position; the code is read and edited position by position.
* ``pooled``: one vector per image, the layer's map pooled over positions (``cfg.json``
  ``pooling``: mean or sum). The code is read from the pooled vector and the edit of the
  pooled vector, ``Δ = (value − z_j) a_j / input_scale``, is spread evenly over the positions
  (``Δ`` each for mean pooling, ``Δ / P`` for sum pooling), so the pooled vector moves by
  exactly ``Δ``. "Where active" means "in images whose pooled code has j active". Steering
  adds ``α d`` at every position, which moves a mean-pooled vector by exactly ``α d``.

Rows and positions an edit does not touch keep their values bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffatlas.errors import UserError
from diffatlas.interventions.spec import Intervention
from diffatlas.sae.model import CONFIG, TopKSAE

log = logging.getLogger(__name__)

GRANULARITIES = {"spatial": "position", "pooled": "image"}


@dataclass
class SteeringSAE:
    """An SAE read for intervening: the model, its ``cfg.json`` and where it came from.

    ``granularity``: ``"position"`` (spatial SAE) or ``"image"`` (pooled SAE);
    ``pooling``: how a pooled SAE's vectors were pooled (``mean`` / ``sum``).
    """

    sae: TopKSAE
    cfg: dict[str, Any]
    path: Path
    scale: float
    granularity: str
    pooling: str = "mean"
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> "SteeringSAE":
        directory = Path(directory)
        if not (directory / CONFIG).is_file():
            raise UserError(f"no SAE at {directory}: {CONFIG} is missing; expected a train-sae output directory")
        sae, cfg = TopKSAE.load(directory, device=device)
        samples = cfg.get("samples", "pooled")
        if samples not in GRANULARITIES:
            raise UserError(f"SAE {directory / CONFIG}: samples = {samples!r} is not known; allowed: {', '.join(GRANULARITIES)}")
        pooling = cfg.get("pooling") or "mean"
        if pooling not in ("mean", "sum"):
            raise UserError(f"SAE {directory / CONFIG}: pooling = {pooling!r} is not known; allowed: mean, sum")
        scale = float(cfg.get("input_scale", 1.0))
        if not scale > 0:
            raise UserError(f"SAE {directory / CONFIG}: input_scale = {scale!r} must be > 0")
        if samples == "pooled":
            log.warning(
                "SAE %s was trained on %s-pooled vectors (samples: pooled): its codes are read per image and clamp/ablate "
                "edits are spread evenly over positions; train with sae.samples: spatial to edit position by position",
                directory, pooling,
            )
        return cls(sae.eval(), cfg, directory, scale, GRANULARITIES[samples], pooling)

    @property
    def n_latents(self) -> int:
        return self.sae.arch.n_latents

    @property
    def d_in(self) -> int:
        return self.sae.arch.d_in

    # -- checks against the hooked model -------------------------------------------------
    def check(self, *, latent: int, model: str, layer: str, module_path: str) -> None:
        """UserError when latent j is out of range or the SAE was trained on another model/layer."""
        where = self.path / CONFIG
        if not 0 <= int(latent) < self.n_latents:
            raise UserError(f"latent {latent} is out of range for SAE {self.path} ({self.n_latents} latents); "
                            f"allowed: 0..{self.n_latents - 1}")
        trained_model = self.cfg.get("model")
        if trained_model is None:
            log.warning("SAE %s records no model; cannot check it was trained on %r", where, model)
        elif str(trained_model) != str(model):
            raise UserError(f"SAE {where} was trained on model {trained_model!r}, but the hooked model is {model!r}; "
                            f"use an SAE of this model (or pass --model-name {trained_model} if it is the same model)")
        trained_layer, trained_path = self.cfg.get("layer"), self.cfg.get("module_path")
        if trained_layer is not None and str(trained_layer) not in (layer, module_path) and trained_path != module_path:
            raise UserError(f"SAE {where} was trained on layer {trained_layer!r} (module {trained_path}), but the hooked "
                            f"layer is {layer!r} (module {module_path}); allowed: {trained_layer!r}")
        if trained_path is not None and trained_path != module_path:
            raise UserError(f"SAE {where} was trained on module {trained_path!r}, but layer {layer!r} of the hooked "
                            f"model is module {module_path!r}")

    def check_channels(self, channels: int, layer: str) -> None:
        if channels != self.d_in:
            raise UserError(f"SAE {self.path / CONFIG} takes vectors of d_in = {self.d_in} channels, but layer {layer!r} "
                            f"outputs {channels} channels")

    # -- tensors ---------------------------------------------------------------------------
    def atom(self, j: int, like: torch.Tensor) -> torch.Tensor:
        """Decoder atom a_j = W_dec[j] ``[C]`` (float32, on ``like``'s device), cached."""
        key = f"atom{j}{like.device}"
        if key not in self._cache:
            self._cache[key] = self.sae.W_dec[int(j)].detach().to(like.device, torch.float32)
        return self._cache[key]

    def direction(self, j: int, kind: str, like: torch.Tensor) -> torch.Tensor:
        """The steering direction ``[C]`` in the layer's raw units (module docstring)."""
        a = self.atom(j, like)
        return a / torch.linalg.vector_norm(a) if kind == "unit" else a / self.scale

    def code(self, v: torch.Tensor, j: int) -> torch.Tensor:
        """z_j of raw vectors ``v [..., C]`` -> ``[...]`` (float32): the post-TopK code of latent j."""
        flat = v.reshape(-1, v.shape[-1]).to(torch.float32) * self.scale
        vals, idx = self.sae.encode(flat)
        return (vals * (idx == int(j))).sum(-1).reshape(v.shape[:-1])


def pooled(x: torch.Tensor, how: str) -> torch.Tensor:
    """``[B, P, C]`` -> ``[B, C]`` pooled over positions, float32."""
    return x.mean(1, dtype=torch.float32) if how == "mean" else x.sum(1, dtype=torch.float32)


def edit_delta(x: torch.Tensor, rows: torch.Tensor, spec: Intervention, sae: SteeringSAE) -> torch.Tensor | None:
    """The change to add to activations ``x [B, P, C]`` on rows ``rows [B]`` (bool), or None for none.

    The result is ``[B, P, C]`` float32, zero off the edited rows / positions; ``None`` means
    nothing changes anywhere (so the caller leaves ``x`` untouched).
    """
    j = spec.latent
    if spec.mode == "steer":
        if spec.is_noop():
            return None
        d = spec.alpha * sae.direction(j, spec.direction, x)  # [C]
        if spec.where == "all":
            mask = rows[:, None].expand(x.shape[0], x.shape[1])
        else:
            mask = _active(x, rows, j, sae)
        if not bool(mask.any()):
            return None
        return mask[..., None].to(torch.float32) * d
    # clamp / ablate through the SAE: Δz_j a_j / input_scale, the SAE's error term kept
    if sae.granularity == "position":
        z = sae.code(x, j)  # [B, P]
        sel = rows[:, None] & ((z > 0) if spec.where == "active" else torch.ones_like(z, dtype=torch.bool))
        dz = torch.where(sel, spec.target - z, torch.zeros_like(z))
        spread = 1.0
    else:
        z = sae.code(pooled(x, sae.pooling), j)  # [B]
        sel = rows & ((z > 0) if spec.where == "active" else torch.ones_like(z, dtype=torch.bool))
        dz = torch.where(sel, spec.target - z, torch.zeros_like(z))[:, None].expand(x.shape[0], x.shape[1])
        spread = 1.0 if sae.pooling == "mean" else 1.0 / x.shape[1]
    if not bool((dz != 0).any()):
        return None
    return dz[..., None] * (sae.atom(j, x) * (spread / sae.scale))


def _active(x: torch.Tensor, rows: torch.Tensor, j: int, sae: SteeringSAE) -> torch.Tensor:
    """Where latent j is active, ``[B, P]`` bool, on rows ``rows`` only (per the SAE's granularity)."""
    if sae.granularity == "position":
        return rows[:, None] & (sae.code(x, j) > 0)
    return (rows & (sae.code(pooled(x, sae.pooling), j) > 0))[:, None].expand(x.shape[0], x.shape[1])


def apply_delta(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x + delta`` in x's dtype, with every element where ``delta`` is 0 kept bit for bit."""
    return torch.where(delta != 0, x + delta.to(x.dtype), x)
