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
    def _cached(self, key: str, make) -> torch.Tensor:
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = make()
        return self._cache[key]

    def atom(self, j: int, like: torch.Tensor) -> torch.Tensor:
        """Decoder atom a_j = W_dec[j] ``[C]`` (float32, on ``like``'s device), cached."""
        return self._cached(f"atom{j}{like.device}", lambda: self.sae.W_dec[int(j)].detach().to(like.device, torch.float32))

    def direction(self, j: int, kind: str, like: torch.Tensor) -> torch.Tensor:
        """The steering direction ``[C]`` in the layer's raw units (module docstring)."""
        a = self.atom(j, like)
        return a / torch.linalg.vector_norm(a) if kind == "unit" else a / self.scale

    def _encoder(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_enc ``[n, C]``, effective bias ``b_enc − W_enc b_pre`` ``[n]``) on ``device`` in ``dtype``, cached."""
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            W = self.sae.W_enc.detach().to(device, torch.float32)
            b = self.sae.b_enc.detach().to(device, torch.float32) - W @ self.sae.b_pre.detach().to(device, torch.float32)
            return W.to(dtype), b.to(dtype)
        return self._cached(f"enc{device}{dtype}", make)

    def code(self, v: torch.Tensor, j: int | torch.Tensor, where: torch.Tensor | None = None, *,
             gather: bool | None = None) -> torch.Tensor:
        """z_j of raw vectors ``v [..., C]`` -> ``[...]`` (float32): the post-TopK code of latent j.

        ``j``: one latent, or a long tensor of ``v``'s leading shape (each vector its own latent).
        Only latent j's code is needed, so the SAE is not decoded and no TopK is taken:
        ``z_j = ReLU(pre_j)`` when j is among the k largest pre-activations (fewer than k
        latents have a strictly larger one; with exact ties TopK's own pick is arbitrary), else
        0. Where ``pre_j <= 0`` the code is 0 whatever the ranking, so the full pre-activations
        (the one costly product, ``[N, C] x [C, n]``) are computed only at the candidate
        vectors ``pre_j > 0`` (and ``where``, a bool mask of ``v``'s leading shape: vectors
        never edited). Gathering the candidates needs their count on the host, so it is done
        where that is free (``gather``: default on CPU); on an accelerator every vector is
        ranked, in the activation's dtype, with no host sync.
        """
        shape = v.shape[:-1]
        flat = v.reshape(-1, v.shape[-1])
        W32, b32 = self._encoder(flat.device, torch.float32)
        xs = flat.to(torch.float32) * self.scale
        if isinstance(j, torch.Tensor):
            jv = j.to(flat.device, torch.long).expand(shape).reshape(-1)  # [N]
            pre_j = (xs * W32[jv]).sum(-1) + b32[jv]
        else:
            jv = torch.full((flat.shape[0],), int(j), dtype=torch.long, device=flat.device)
            pre_j = xs @ W32[int(j)] + b32[int(j)]  # [N], float32
        cand = pre_j > 0
        if where is not None:
            cand = cand & where.reshape(-1)
        if gather is None:
            gather = flat.device.type == "cpu"
        k = self.sae.k
        if gather:
            idx = cand.nonzero().squeeze(1)
            z = torch.zeros_like(pre_j)
            if idx.numel():
                pre = torch.nn.functional.linear(xs.index_select(0, idx), W32, b32)  # [m, n]
                rank = (pre > pre.gather(1, jv.index_select(0, idx)[:, None])).sum(1)  # latents strictly above j
                z[idx] = torch.where(rank < k, pre_j.index_select(0, idx), torch.zeros_like(rank, dtype=z.dtype))
            return z.reshape(shape)
        dtype = flat.dtype if flat.device.type != "cpu" and flat.dtype in (torch.float16, torch.bfloat16) else torch.float32
        W, b = self._encoder(flat.device, dtype)
        pre = torch.nn.functional.linear(xs.to(dtype), W, b)
        rank = (pre > pre.gather(1, jv[:, None])).sum(1)
        return torch.where(cand & (rank < k), pre_j, torch.zeros_like(pre_j)).reshape(shape)


def pooled(x: torch.Tensor, how: str) -> torch.Tensor:
    """``[B, P, C]`` -> ``[B, C]`` pooled over positions, float32."""
    return x.mean(1, dtype=torch.float32) if how == "mean" else x.sum(1, dtype=torch.float32)


def edit_delta(x: torch.Tensor, rows: torch.Tensor, spec: Intervention, sae: SteeringSAE) -> torch.Tensor | None:
    """The change to add to activations ``x [B, P, C]`` on rows ``rows [B]`` (bool), or None for none.

    The result is ``[B, P, C]`` in x's dtype, zero off the edited rows / positions; ``None``
    means the spec changes nothing whatever the activations (α = 0 steering). No host sync:
    whether anything changed stays on the device (:func:`changed`).
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
        return mask[..., None].to(x.dtype) * d.to(x.dtype)
    # clamp / ablate through the SAE: Δz_j a_j / input_scale, the SAE's error term kept (no decode:
    # decode(z') − decode(z) is Δz_j a_j, the decoder being linear in the code)
    active_only = spec.where == "active"
    if sae.granularity == "position":
        sel = rows[:, None].expand(x.shape[0], x.shape[1])
        z = sae.code(x, j, where=sel)  # 0 off the edited rows (never ranked there)
        if active_only:
            sel = sel & (z > 0)
        dz = torch.where(sel, spec.target - z, torch.zeros_like(z))
        spread = 1.0
    else:
        z = sae.code(pooled(x, sae.pooling), j, where=rows)  # [B]
        sel = rows & (z > 0) if active_only else rows
        dz = torch.where(sel, spec.target - z, torch.zeros_like(z))[:, None].expand(x.shape[0], x.shape[1])
        spread = 1.0 if sae.pooling == "mean" else 1.0 / x.shape[1]
    return (dz[..., None] * (sae.atom(j, x) * (spread / sae.scale))).to(x.dtype)


def _active(x: torch.Tensor, rows: torch.Tensor, j: int, sae: SteeringSAE) -> torch.Tensor:
    """Where latent j is active, ``[B, P]`` bool, on rows ``rows`` only (per the SAE's granularity)."""
    if sae.granularity == "position":
        sel = rows[:, None].expand(x.shape[0], x.shape[1])
        return sel & (sae.code(x, j, where=sel) > 0)
    return (rows & (sae.code(pooled(x, sae.pooling), j, where=rows) > 0))[:, None].expand(x.shape[0], x.shape[1])


def changed(delta: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: does ``delta`` change anything (kept on the device: no host sync)."""
    return (delta != 0).any()


def apply_delta(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x + delta`` in x's dtype and memory layout, with every element where ``delta`` is 0 kept bit for bit.

    The layout matters: ``delta`` arrives as a strided view of ``[B, P, C]``, and a result laid
    out like it (channels last) would make the next convolution round differently even where
    nothing changed.
    """
    return torch.where(delta != 0, x + delta.to(x.dtype), x, out=torch.empty_like(x))
