"""Global semantic directions (Park et al., NeurIPS 2023): averaged in H, mapped to X per sample.

Park et al. observe that at the start of generation (t = T-1) the tangent spaces of
different samples nearly coincide, so one direction can edit every sample. Following the
paper, the averaging happens in H, on the tangent vectors ``u`` (the left singular vectors,
``u_i = J v_i / σ_i``), and each sample gets its own direction in X through its Jacobian:

1. **ū** - every sample's local directions ``u`` are *matched* to a reference set (its
   nearest directions: local singular vectors are defined only up to sign and, where singular
   values are close, up to order): the permutation and signs that maximise
   ``Σ_i |<g_i, u_π(i)>|`` (a linear assignment on the ``n × n`` matrix of absolute cosines);
   ``ū_i`` = the normalised mean of the matched ``±u_π(i)``; repeated with ``ū`` as the
   reference (sample 0's directions first) until the matching is stable
   (:func:`global_directions`, which matches any set of unit vectors);
2. **projection onto T_h** - ``ū`` is projected onto each sample's tangent space
   ``span(u_1..u_n)`` and renormalised; the norm before renormalising (``kept``) says how much
   of ``ū`` the sample's tangent space holds;
3. **v̄ through the Jacobian** - ``v̄ = Σ_i (ū·u_i)/σ_i v_i``, renormalised: the minimum-norm
   X direction whose image under ``J`` (restricted to the top-n subspace) is the projected
   ``ū`` (:func:`global_to_x`; the same map as the iterative edit's
   :func:`~diffatlas.geometry.editing.h_to_x`).

An earlier variant averaged and projected the ``v``'s in X; it is not the paper's and is gone
(the X directions of different samples need not line up even where their tangent spaces in H
do, since each ``v`` is shaped by its own Jacobian).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GlobalDirections:
    """Result of :func:`global_directions`.

    directions: [n, D] unit global directions; aligned: [N, n, D] each sample's matched,
    sign-fixed local directions; perm: [N, n] index of the local direction matched to each
    global one; signs: [N, n] ±1; cos: [N, n] cosine of each matched local direction with its
    global direction; rounds: matching rounds until stable.
    """

    directions: torch.Tensor
    aligned: torch.Tensor
    perm: torch.Tensor
    signs: torch.Tensor
    cos: torch.Tensor
    rounds: int


def match_directions(reference: torch.Tensor, local: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Permutation and signs taking ``local`` [n, D] onto ``reference`` [n, D].

    Returns ``(perm, signs)`` with ``perm[i]`` the row of ``local`` matched to reference row
    ``i`` and ``signs[i]`` its sign, maximising ``Σ_i |cos(ref_i, local_perm[i])|``.
    """
    from scipy.optimize import linear_sum_assignment

    ref = reference / reference.norm(dim=1, keepdim=True).clamp_min(1e-30)
    loc = local / local.norm(dim=1, keepdim=True).clamp_min(1e-30)
    c = (ref @ loc.T).double().cpu().numpy()  # [n, n]
    rows, cols = linear_sum_assignment(-np.abs(c))
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    signs = np.sign(c[np.arange(len(perm)), perm])
    signs[signs == 0] = 1
    return perm, signs.astype(np.int64)


def global_directions(v: torch.Tensor, max_rounds: int = 10) -> GlobalDirections:
    """Match and average local directions ``v`` [N, n, D] (or [N, n, C, H, W]) into global ones."""
    n_samples, n = v.shape[:2]
    flat = v.reshape(n_samples, n, -1).to(torch.float64)
    ref = flat[0]
    perms = np.tile(np.arange(n), (n_samples, 1))
    signs = np.ones((n_samples, n), dtype=np.int64)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        new_perms = np.empty_like(perms)
        new_signs = np.empty_like(signs)
        for s in range(n_samples):
            new_perms[s], new_signs[s] = match_directions(ref, flat[s])
        aligned = torch.stack(
            [flat[s][torch.from_numpy(new_perms[s])] * torch.from_numpy(new_signs[s]).to(flat)[:, None] for s in range(n_samples)]
        )
        mean = aligned.mean(dim=0)
        ref = mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-30)
        stable = rounds > 1 and np.array_equal(new_perms, perms) and np.array_equal(new_signs, signs)
        perms, signs = new_perms, new_signs
        if stable:
            break
    cos = torch.einsum("snd,nd->sn", aligned, ref)
    return GlobalDirections(
        directions=ref.to(v.dtype),
        aligned=aligned.to(v.dtype),
        perm=torch.from_numpy(perms),
        signs=torch.from_numpy(signs),
        cos=cos.to(v.dtype),
        rounds=rounds,
    )


def global_to_x(u_bar: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global H directions ``ū`` [m, d] as one sample's X directions (module docstring, steps 2-3).

    u: [n, d] the sample's orthonormal tangent basis in H; s: [n] its singular values;
    v: [n, C, H, W] (or [n, D]) its right singular vectors. Returns ``(v̄ [m, *v.shape[1:]]``
    unit, ``kept [m])``: ``kept`` the norm of each unit ``ū_j``'s projection onto ``span(u)``.
    """
    from diffatlas.geometry.editing import h_to_x, parallel_transport
    from diffatlas.geometry.jacobian import PullbackBasis

    m = u_bar.shape[0]
    ub = (u_bar / u_bar.norm(dim=1, keepdim=True).clamp_min(1e-30)).to(u.dtype)
    kept = (ub @ u.T).norm(dim=1)
    projected = parallel_transport(ub, u.expand(m, *u.shape))
    expand = lambda t: t.expand(m, *t.shape)  # noqa: E731 - one sample's basis for each of the m directions
    basis = PullbackBasis(v=expand(v), s=expand(s), u=expand(u), residuals=torch.zeros_like(expand(s)),
                          iterations=0, converged=True)
    return h_to_x(projected, basis), kept
