"""Editing ``x_t`` along the local latent basis (Park et al., NeurIPS 2023, section 3.3).

Three ways to move a point ``x_t`` along a direction, each followed by DDIM to ``t = 0``:

* **one step**: ``x' = x_t + γ v_i`` (``v_i`` unit norm in x_t space, so ``γ`` is the
  Euclidean length of the move);
* **x0-normalised** (Park et al.'s normalised edit, the one their edit figures use): the
  one-step edit's predicted clean sample ``x0(x_t + γ v)`` is normalised, per image and per
  channel (RGB channels for pixel models, latent channels for latent models), to the mean and
  standard deviation of the *unedited* prediction ``x0(x_t)``, giving ``x0'``; then, exactly as
  the paper writes it, the unedited point is moved::

      x_t' = x_t + sqrt(ᾱ_t) / (1 - κ sqrt(1 - ᾱ_t)) · (x0' - x0(x_t))          (κ = 0.99)

  This is the first-order Taylor solution of ``x0(x_t') = x0'`` around ``x_t`` with the noise
  prediction's Jacobian taken as ``κ I``: ``x0(x_t + δ) ≈ x0(x_t) + δ (1 - κ sqrt(1 - ᾱ_t)) /
  sqrt(ᾱ_t)``. For a noise predictor that *is* ``ε(x) = κ x + c`` it is exact. The edit
  ``γ v`` reaches ``x_t'`` only through ``x0'``. ``κ`` must lie in [0, 1).

  We once wrote the same update from the edited point, ``x' = x + gain · (x0' - x0(x))`` with
  ``x = x_t + γ v``: identical for the linear ε above, but for a real network it keeps the
  whole ``γ v`` and adds the correction on top. It is not the paper's and did not earn a
  place as an option: on the ShapesWorld demo model at |γ| = 8 its images were judged
  plausible less often (t = 999: 3/12 vs 12/12 for the paper's form; t = 500: 6/12 vs 12/12)
  and it saturated more at t = 999 (share of RGB values at 0 or 255: 0.71 vs 0.61), less at
  t = 500 (0.26 vs 0.32). Both forms share one limit on that model
  (``scripts/diag_x0_normalise.py``): its ``x0`` is far more sensitive along the correction
  ``x0' - x0(x_t)`` than ``κ = 0.99`` assumes (measured slope 7-44 at t = 999 against the
  assumed 1.58; 1.8-9 against 0.18 at t = 500; at t = 100 0.3-1.6 against 0.72, where the
  step lands within 5% of ``x0'``), so at large t the first-order step overshoots ``x0'`` and
  the images saturate. The paper's κ is kept; the claims tables report what it measures.

  **Flow matching** (SD3, Flux; issue 21). Both cases are one formula for a forward process
  ``x_t = a x0 + b ε``: the predictions satisfy ``x_t = a x0̂ + b ε̂`` exactly, so
  ``x0̂(x) = (x - b ε̂(x)) / a`` and, with the noise prediction's Jacobian taken as ``κ I``,
  ``x0̂(x_t + δ) ≈ x0̂(x_t) + δ (1 - κ b) / a``; solving ``x0̂(x_t') = x0'`` gives
  ``x_t' = x_t + a / (1 - κ b) · (x0' - x0̂(x_t))`` (:func:`x0_update_gain`). DDPM:
  ``a = sqrt(ᾱ_t)``, ``b = sqrt(1 - ᾱ_t)`` (the paper's equation above, built on the DDIM
  prediction ``x0 = (x_t - sqrt(1 - ᾱ) ε) / sqrt(ᾱ)``). Flow: ``x_σ = (1 - σ) x0 + σ ε`` and
  the velocity ``v = ε - x0`` give ``x0̂ = x_σ - σ v`` and ``ε̂ = x_σ + (1 - σ) v``; since
  ``(1 - σ) x0̂ + σ ε̂ = x_σ``, ``x0̂ = (x_σ - σ ε̂) / (1 - σ)``: ``a = 1 - σ``, ``b = σ``, so it
  replaces the DDIM update by::

      x_σ' = x_σ + (1 - σ) / (1 - κ σ) · (x0' - x0̂(x_σ)),      x0̂(x) = x - σ v(x)

  exact for a velocity field whose noise prediction is ``ε̂(x) = κ x + c``, i.e.
  ``v(x) = ((κ - 1) x + c) / (1 - σ)`` (tests/test_geometry_flow.py). At σ = 1 the gain is 0:
  ``x_1`` is pure noise, ``x0̂ = x_1 - v`` has no part a move of ``x_1`` can set to first
  order under this assumption, and the x0-normalised edit returns the unedited point.
* **iterative (geodesic shooting)**: many small steps; after each, the basis is recomputed
  at the new point and the H-space direction ``u`` is parallel-transported: projected onto
  the new tangent space ``span(U')`` and renormalised; it is mapped back to X as the
  minimum-norm direction whose image under ``J`` (within the top-n subspace) is ``u``,
  ``v = Σ_i (u'_i · u) / σ'_i v'_i``, renormalised to unit length. The new basis is warm
  started from the previous one, so each step costs only a few subspace rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffatlas.errors import UserError
from diffatlas.geometry.config import GeometryConfig
from diffatlas.geometry.jacobian import PullbackBasis, PullbackMap, top_singular
from diffatlas.geometry.sampling import Denoiser, geometry_time, noise_coefficients

log = logging.getLogger(__name__)


def linear_edits(x: torch.Tensor, v: torch.Tensor, strengths: Sequence[float]) -> torch.Tensor:
    """``x + γ v`` for every direction and strength.

    x: [C, H, W] (one point); v: [m, C, H, W] unit directions; returns [m, S, C, H, W].
    """
    g = torch.as_tensor(list(strengths), dtype=x.dtype, device=x.device)
    return x[None, None] + g[None, :, None, None, None] * v[:, None]


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over space: x [B, C, H, W] -> ([B, C, 1, 1], [B, C, 1, 1])."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    sd = x.std(dim=(2, 3), keepdim=True)
    return mu, sd


def check_kappa(kappa: float) -> float:
    """``κ`` as a float in [0, 1), or a UserError naming ``geometry.kappa``."""
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not 0 <= kappa < 1:
        raise UserError(f"config geometry.kappa = {kappa!r} is not allowed; allowed: a number in [0, 1) "
                        "(the slope of the noise prediction in the first-order x0 update; Park et al. use 0.99)")
    return float(kappa)


def normalise_to(x0: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x0`` [B, C, H, W] given, per image and channel, the mean and std of ``ref`` [B or 1, C, H, W]."""
    mu, sd = channel_stats(x0)
    mu_r, sd_r = channel_stats(ref)
    return (x0 - mu) / sd.clamp_min(1e-8) * sd_r + mu_r


def x0_update_gain(a: float, b: float, kappa: float) -> float:
    """``a / (1 - κ b)``: the move in x_t per unit change of x0 (first order) for a forward process
    ``x_t = a x0 + b ε`` (module docstring): ``sqrt(ᾱ) / (1 - κ sqrt(1 - ᾱ))`` for DDPM,
    ``(1 - σ) / (1 - κ σ)`` for flow matching."""
    return float(a) / (1.0 - check_kappa(kappa) * float(b))


@torch.no_grad()
def x0_normalise(den: Denoiser, x_t: torch.Tensor, x_edit: torch.Tensor, t,
                 kappa: float = GeometryConfig.kappa) -> torch.Tensor:
    """Park et al.'s x0-normalised edit (module docstring): ``x_t' = x_t + gain · (x0' - x0(x_t))``.

    x_t: [B, C, H, W] unedited points (or [1, ...], shared by every edit of one sample);
    x_edit: [B, C, H, W] the one-step edits ``x_t + γ v`` at time ``t`` (the model's own: an
    int step, ``"s0.500"`` or a :class:`~diffatlas.models.diffusion.Time`). Returns ``x_t'``
    [B, C, H, W]. The predictions ``x0(.)`` come from the diffusion core
    (:meth:`Denoiser.eps_x0`, unclipped), whatever the model's prediction type or time
    convention (flow: ``x0 = x_σ - σ v``).
    """
    check_kappa(kappa)
    time = geometry_time(den.handle, t, "time")
    gain = x0_update_gain(*noise_coefficients(den.handle, time), kappa)
    _, x0_ref = den.eps_x0(x_t, time, clip=False)
    _, x0_e = den.eps_x0(x_edit, time, clip=False)
    return x_t + gain * (normalise_to(x0_e, x0_ref) - x0_ref)


def parallel_transport(u: torch.Tensor, u_basis: torch.Tensor) -> torch.Tensor:
    """Project H-space vectors onto a new tangent space and renormalise.

    u: [P, d] unit vectors; u_basis: [P, n, d] orthonormal rows spanning each new tangent
    space. Returns [P, d]: unit vectors in ``span(u_basis[p])``. A vector orthogonal to the
    new space (no transport possible) is replaced by the space's first basis vector.
    """
    coef = torch.einsum("pnd,pd->pn", u_basis, u)
    out = torch.einsum("pn,pnd->pd", coef, u_basis)
    norm = out.norm(dim=-1, keepdim=True)
    lost = norm[:, 0] <= 1e-12
    if bool(lost.any()):
        log.warning("parallel transport: %d vector(s) orthogonal to the new tangent space", int(lost.sum()))
        out[lost] = u_basis[lost, 0]
        norm[lost] = 1.0
    return out / norm


def h_to_x(u: torch.Tensor, basis: PullbackBasis) -> torch.Tensor:
    """Map tangent vectors in H back to unit directions in X.

    u: [P, d] (in span of ``basis.u[p]``); basis: P points. Returns [P, C, H, W]: the
    minimum-norm ``v`` in ``span(basis.v[p])`` with ``J v ∝ u``, unit length.
    """
    coef = torch.einsum("pnd,pd->pn", basis.u, u) / basis.s.clamp_min(torch.finfo(basis.s.dtype).tiny)
    v = torch.einsum("pn,pn...->p...", coef, basis.v)
    flat = v.reshape(v.shape[0], -1)
    return v / flat.norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (v.ndim - 1)))


@dataclass
class ShootResult:
    """Points along geodesic-shooting paths.

    points: [P, S, C, H, W] the point of each path after each recorded strength.
    strengths: the S recorded (positive) strengths; transport_cos: [P, S] cosine between the
    transported u and the previous u at each recorded point (1 = no turning).
    """

    points: torch.Tensor
    strengths: list[float]
    transport_cos: torch.Tensor


def geodesic_shoot(
    fmap: PullbackMap,
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    strengths: Sequence[float],
    substeps: int,
    *,
    n: int,
    basis_kwargs: dict | None = None,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ShootResult:
    """Iterative editing with parallel transport in H, several paths at once.

    x: [P, C, H, W] start points; u: [P, d] start directions in H; v: [P, C, H, W] the
    matching unit directions in X; strengths: increasing positive path lengths to record;
    substeps: steps between consecutive recorded strengths; n: basis size at each step;
    basis_kwargs: keyword arguments of :func:`top_singular` (tol, max_iters, ...);
    init: optional warm start [P, m, C, H, W] for the first recomputed basis;
    generator: RNG of the random columns that top up a warm start.
    """
    kw = dict(basis_kwargs or {})
    gs = [float(g) for g in strengths]
    if any(g <= 0 for g in gs) or sorted(gs) != gs:
        raise ValueError(f"strengths must be positive and increasing, got {gs}")
    substeps = max(1, int(substeps))
    points, coss = [], []
    prev_g, cur_x, cur_u, cur_v, warm = 0.0, x.detach().clone(), u.detach().clone(), v.detach().clone(), init
    n_steps = len(gs) * substeps
    step = 0
    for g in gs:
        delta = (g - prev_g) / substeps
        for _ in range(substeps):
            cur_x = cur_x + delta * cur_v
            step += 1
            if step == n_steps:
                cos = torch.ones(cur_u.shape[0], dtype=cur_u.dtype, device=cur_u.device)
                break  # the last point needs no new direction
            basis = top_singular(fmap, cur_x, n, init=warm, generator=generator, **kw)
            warm = basis.v
            new_u = parallel_transport(cur_u, basis.u)
            cos = (new_u * cur_u).sum(dim=-1)
            cur_u, cur_v = new_u, h_to_x(new_u, basis)
        points.append(cur_x.clone())
        coss.append(cos)
        prev_g = g
    return ShootResult(points=torch.stack(points, dim=1), strengths=gs, transport_cos=torch.stack(coss, dim=1))
