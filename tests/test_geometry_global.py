"""Global directions: matching of permuted, sign-flipped local bases; ū in H mapped to X per sample."""

from __future__ import annotations

import numpy as np
import torch

from diffatlas.geometry.global_directions import global_directions, global_to_x, match_directions
from diffatlas.geometry.jacobian import top_singular
from geometry_oracles import LinearMap, matrix, orthonormal_columns


def test_recovers_shared_directions_from_permuted_noisy_bases():
    g = torch.Generator().manual_seed(0)
    n, d, samples = 4, 300, 6
    truth = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64)).Q.T  # [n, d]
    local, perms, signs = [], [], []
    rng = np.random.default_rng(0)
    for _ in range(samples):
        perm = rng.permutation(n)
        sign = rng.choice([-1.0, 1.0], size=n)
        noisy = truth + 0.15 * torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
        q = torch.linalg.qr(noisy.T).Q.T  # an orthonormal local basis near the truth
        q = q * torch.sign((q * noisy).sum(1, keepdim=True))
        local.append(q[perm] * torch.tensor(sign)[:, None])
        perms.append(perm)
        signs.append(sign)
    res = global_directions(torch.stack(local))
    # Each global direction is one true direction up to sign (the order follows sample 0).
    cos = (res.directions @ truth.T).abs()
    assert cos.max(dim=1).values.min().item() > 0.99
    assert sorted(cos.argmax(dim=1).tolist()) == list(range(n))
    assert res.cos.min().item() > 0.95
    # Matching undoes the permutation: the local direction matched to global i is the same true one.
    for s in range(samples):
        back = res.aligned[s] @ truth.T
        assert (back.abs().argmax(dim=1) == cos.argmax(dim=1)).all()


def test_match_directions_simple_case():
    ref = torch.eye(3)
    local = torch.stack([-ref[2], ref[0], ref[1]])
    perm, signs = match_directions(ref, local)
    assert perm.tolist() == [1, 2, 0]
    assert signs.tolist() == [1, 1, -1]


def test_global_direction_on_linear_maps_matches_the_closed_form():
    """f_s(x) = A_s x with A_s = U_s diag(σ_s) V_sᵀ of rank n: J = A_s, T_h = span(U_s).

    The samples' tangent spaces are noisy copies of one space, with the shared directions in a
    different order (σ ranks them differently) per sample. Oracles: ū_c = normalised mean of
    the samples' (sign-aligned) c-th shared direction; v̄ = pinv(A_s) ū normalised (the
    minimum-norm x with A_s x = the projection of ū onto span(U_s)); kept = ||U_sᵀ ū||.
    """
    n, d, D, N = 3, 10, 30, 5
    u0 = orthonormal_columns(d, n, 0)
    g = torch.Generator().manual_seed(1)
    a, u_true = [], []
    for s in range(N):
        u_s = torch.linalg.qr(u0 + 0.1 * torch.randn(d, n, generator=g, dtype=torch.float64)).Q
        u_s = u_s * torch.sign((u_s * u0).sum(0))  # column c stays near u0[:, c]
        sig = torch.tensor([4.0, 2.5, 1.0], dtype=torch.float64)[torch.randperm(n, generator=g)]
        a.append(matrix(u_s, sig, orthonormal_columns(D, n, 10 + s)))
        u_true.append(u_s)
    a = torch.stack(a)
    x = torch.randn(N, 1, 5, 6, generator=g, dtype=torch.float64)
    basis = top_singular(LinearMap(a), x, n, oversample=2, tol=1e-9, max_iters=50, generator=g)
    assert basis.converged

    res = global_directions(basis.u)
    oracle = torch.stack(u_true).mean(0)
    oracle = oracle / oracle.norm(dim=0)  # [d, n]
    cos = (res.directions @ oracle).abs()  # rows: global directions in the code's order
    assert sorted(cos.argmax(dim=1).tolist()) == list(range(n))
    assert cos.max(dim=1).values.min().item() > 1 - 1e-9

    for s in range(N):
        vb, kept = global_to_x(res.directions, basis.u[s], basis.s[s], basis.v[s])
        assert vb.shape == (n, 1, 5, 6)
        want = (torch.linalg.pinv(a[s]) @ res.directions.T).T
        want = want / want.norm(dim=1, keepdim=True)
        assert torch.allclose(vb.reshape(n, -1), want, atol=1e-8)
        assert torch.allclose(kept, (res.directions @ u_true[s]).norm(dim=1), atol=1e-8)
        assert (kept < 1).all() and (kept > 0.9).all()  # nearly, but not exactly, in each tangent space
