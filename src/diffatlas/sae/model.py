"""The TopK sparse autoencoder (Gao et al. 2024 recipe; the k-SAE of Revelio).

Maths, with d input channels and n latents::

    pre   = W_enc (x − b_pre) + b_enc                 [B, n]
    z     = ReLU(TopK_k(pre))                          [B, n], at most k non-zeros per row
    x̂     = W_dec z + b_pre                            [B, d]

Storage: ``W_enc`` is [n, d]; ``W_dec`` is stored as [n, d] too, **row j being the j-th
decoder column (atom)** of the maths above. That layout lets the decoder run as a sparse
gather-and-sum (``embedding_bag`` over the k selected rows) instead of a dense [B, n] @ [n, d]
product, and makes "encoder initialised as the decoder's transpose" a plain copy.

Training recipe pieces that live here, each tested against a brute-force reference:

* decoder atoms kept at unit norm (:meth:`TopKSAE.normalize_decoder_`) and the gradient
  component parallel to each atom removed before the optimiser step
  (:meth:`TopKSAE.project_decoder_grad_`), so Adam cannot grow atoms to shrink codes;
* ``b_pre`` initialised at the geometric median of a sample (:func:`geometric_median`,
  Weiszfeld iterations), which is robust to the heavy-tailed activations of diffusion models;
* the AuxK loss (:meth:`TopKSAE.loss`): the k_aux largest pre-activations among *dead*
  latents must reconstruct the residual ``e = x − x̂``, which gives dead latents a gradient.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffatlas.errors import UserError
from diffatlas.io import atomic_file, read_json, write_json
from diffatlas.sae.config import SAEArch

log = logging.getLogger(__name__)

WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 200, tol: float = 1e-7, eps: float = 1e-12) -> Tensor:
    """Point minimising the sum of Euclidean distances to the rows of ``x`` (Weiszfeld).

    x: [N, d] -> [d]. Starts from the mean; each step is the average of the points weighted
    by 1 / distance. A point that coincides with the iterate would get an infinite weight;
    distances are floored at ``eps`` (for well-separated data the effect is nil).
    Stops when the step is below ``tol`` × (1 + |y|).
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [N, d] tensor, got shape {tuple(x.shape)}")
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / torch.linalg.vector_norm(x - y, dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        step = torch.linalg.vector_norm(y_new - y)
        y = y_new
        if step <= tol * (1.0 + torch.linalg.vector_norm(y)):
            break
    return y


@dataclass
class SAEOutput:
    """Result of a forward pass. Shapes: x_hat [B, d]; vals, idx [B, k]; pre [B, n]."""

    x_hat: Tensor
    vals: Tensor  # post-ReLU values of the k selected latents (may contain zeros)
    idx: Tensor  # their indices
    pre: Tensor  # pre-activations of every latent (before TopK)


class TopKSAE(nn.Module):
    """TopK SAE with tied-at-init encoder, unit-norm decoder atoms and a learned b_pre."""

    def __init__(self, arch: SAEArch, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.arch = arch
        d, n = arch.d_in, arch.n_latents
        gen = torch.Generator().manual_seed(int(seed))
        atoms = torch.randn(n, d, generator=gen, dtype=torch.float64)
        atoms /= torch.linalg.vector_norm(atoms, dim=1, keepdim=True)
        self.W_dec = nn.Parameter(atoms.to(dtype))  # [n, d], row j = atom j (unit norm)
        self.W_enc = nn.Parameter(atoms.to(dtype).clone())  # [n, d]: the decoder's transpose at init
        self.b_enc = nn.Parameter(torch.zeros(n, dtype=dtype))
        self.b_pre = nn.Parameter(torch.zeros(d, dtype=dtype))

    @property
    def k(self) -> int:
        return self.arch.k

    # -- forward ----------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """W_enc (x − b_pre) + b_enc, [B, d] -> [B, n].

        Written as ``x W_encᵀ + (b_enc − W_enc b_pre)`` so that b_pre's gradient is a
        matrix-vector product rather than a second [B, n] × [n, d] matmul.
        """
        return F.linear(x, self.W_enc, self.b_enc - self.W_enc @ self.b_pre)

    def select(self, pre: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """ReLU(TopK(pre)) as (values [B, k], indices [B, k])."""
        vals, idx = pre.topk(k or self.k, dim=-1, sorted=False)
        return F.relu(vals), idx

    def decode(self, vals: Tensor, idx: Tensor, bias: bool = True) -> Tensor:
        """W_dec z (+ b_pre) from the sparse code (vals, idx) [B, k] -> [B, d]."""
        out = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
        return out + self.b_pre if bias else out

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.pre_acts(x)
        vals, idx = self.select(pre)
        return SAEOutput(self.decode(vals, idx), vals, idx, pre)

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Sparse post-TopK codes of x [B, d]: (values [B, k] after ReLU, indices [B, k])."""
        return self.select(self.pre_acts(x))

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Dense post-TopK codes z, [B, d] -> [B, n] (zeros off the top k)."""
        vals, idx = self.encode(x)
        return torch.zeros(x.shape[0], self.arch.n_latents, dtype=vals.dtype, device=vals.device).scatter_(1, idx, vals)

    # -- loss -------------------------------------------------------------------------------
    def loss(self, x: Tensor, dead: Tensor | None = None, aux_coef: float = 1.0 / 32.0) -> tuple[Tensor, dict[str, Any]]:
        """Training loss ``mse + aux_coef · aux`` on a batch x [B, d].

        mse: mean over elements of (x̂ − x)²; inputs are normalised so that E|x|² = d, hence
        predicting 0 costs about 1.
        aux (AuxK): with e = x − x̂ (no gradient through x̂) and the k_aux' = min(k_aux, #dead)
        largest pre-activations among the dead latents ``dead`` [n] (bool), ê = W_dec z_aux
        (no bias); aux = Σ(ê − e)² / Σe², the share of the residual the dead latents fail to
        explain. 0 when no latent is dead.
        Returns (loss, parts): parts holds the forward output, detached mse and aux, and n_dead (a tensor).
        """
        out = self(x)
        mse = (out.x_hat - x).pow(2).mean()
        aux = x.new_zeros(())
        n_dead = dead.sum() if dead is not None else torch.zeros((), dtype=torch.long, device=x.device)
        if dead is not None and aux_coef > 0:
            # No host synchronisation: k_aux is fixed and live latents are masked to -inf, so
            # with fewer than k_aux dead latents the extra picks are ReLU(-inf) = 0 and add
            # nothing (the same sum as taking min(k_aux, #dead)); with none dead, aux is 0.
            e = (x - out.x_hat).detach()
            masked = out.pre.masked_fill(~dead, float("-inf"))
            vals, idx = self.select(masked, self.arch.k_aux)
            e_hat = self.decode(vals, idx, bias=False)
            aux = (e_hat - e).pow(2).sum() / e.pow(2).sum().clamp_min(torch.finfo(e.dtype).tiny)
            aux = torch.where(n_dead > 0, aux, torch.zeros_like(aux))
        loss = mse + aux_coef * aux
        # Detached tensors, not floats: converting would synchronise a GPU at every step.
        return loss, {"out": out, "mse": mse.detach(), "aux": aux.detach(), "n_dead": n_dead}

    # -- constraints on the decoder ---------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every atom (row of W_dec) to unit norm."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from each atom's gradient its component along the (unit) atom: g ← g − (g·w) w."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        g.sub_((g * w).sum(1, keepdim=True) * w)

    # -- artifacts --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, meta: dict[str, Any]) -> None:
        """Write ``sae.safetensors`` (W_enc, b_enc, W_dec [n, d] rows = atoms, b_pre) and ``cfg.json``.

        ``meta`` must say how the inputs were normalised (``input_scale``) and where they came
        from (model, layer, timestep, ...); it is stored next to the architecture.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in self.named_parameters()}
        with atomic_file(directory / WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "diffatlas-topk-sae"})
        write_json(
            directory / CONFIG,
            {
                "d_in": self.arch.d_in,
                "n_latents": self.arch.n_latents,
                "k": self.arch.k,
                "k_aux": self.arch.k_aux,
                "layout": {"W_enc": "[n, d]", "b_enc": "[n]", "W_dec": "[n, d], row j = decoder column j", "b_pre": "[d]"},
                **meta,
            },
        )

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple["TopKSAE", dict[str, Any]]:
        """Read an SAE written by :meth:`save`; returns (model, cfg dict)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / WEIGHTS
        if not path.exists():
            raise UserError(f"no SAE at {directory}: {WEIGHTS} is missing; run train-sae first")
        cfg = read_json(directory / CONFIG)
        arch = SAEArch(d_in=int(cfg["d_in"]), n_latents=int(cfg["n_latents"]), k=int(cfg["k"]), k_aux=int(cfg["k_aux"]))
        sae = cls(arch)
        tensors = load_file(str(path), device="cpu")
        expected = {name for name, _ in sae.named_parameters()}
        if set(tensors) != expected:
            raise UserError(f"{path} holds tensors {sorted(tensors)}; expected {sorted(expected)}")
        sae.load_state_dict(tensors)
        return sae.to(device), cfg
