"""Global semantic directions: local bases of many samples, matched and averaged (t = T-1).

Park et al. observe that at the start of generation (t = T-1) the tangent spaces of
different samples nearly coincide, so one set of directions can edit every sample. Local
singular vectors are defined only up to sign and, where singular values are close, up to
order, so before averaging each sample's directions are *matched* to a reference set:

1. reference = sample 0's directions;
2. for every sample, the permutation and signs that maximise ``Σ_i |<g_i, v_π(i)>|`` (a
   linear assignment on the ``n × n`` matrix of absolute cosines), then the sign that makes
   each matched cosine positive;
3. global direction ``g_i`` = the normalised mean of the matched ``±v_π(i)``;
4. repeat 2-3 with the global directions as reference until the matching is stable.

A global direction is applied to a sample after projecting it onto that sample's tangent
space ``span(v_1..v_n)`` and renormalising (:func:`project_to_tangent`); the norm of the
projection before renormalising says how much of ``g_i`` the sample's local basis holds.
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


def project_to_tangent(g: torch.Tensor, basis_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project directions onto a sample's tangent space and renormalise.

    g: [m, D] directions; basis_v: [n, D] (or [n, C, H, W]) orthonormal local directions.
    Returns ``(projected [m, D] unit, kept [m])`` where ``kept`` is the norm of the projection
    of each unit ``g_i`` (1 = entirely inside the tangent space).
    """
    b = basis_v.reshape(basis_v.shape[0], -1).to(g.dtype)
    gu = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    proj = (gu @ b.T) @ b
    kept = proj.norm(dim=1)
    return proj / kept.clamp_min(1e-30)[:, None], kept
