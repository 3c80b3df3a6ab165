"""Global directions: matching of permuted, sign-flipped local bases; projection onto tangent spaces."""

from __future__ import annotations

import numpy as np
import torch

from diffatlas.geometry.global_directions import global_directions, match_directions, project_to_tangent


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


def test_projection_is_unit_and_tangent():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(50, 3, generator=g)).Q.T  # [3, 50]
    vecs = torch.randn(4, 50, generator=g)
    proj, kept = project_to_tangent(vecs, basis)
    assert torch.allclose(proj.norm(dim=1), torch.ones(4), atol=1e-5)
    resid = proj - (proj @ basis.T) @ basis
    assert resid.abs().max().item() < 1e-5
    assert (kept <= 1 + 1e-6).all()
    inside, kept_in = project_to_tangent(basis[:2] * 2.0, basis)
    assert torch.allclose(kept_in, torch.ones(2), atol=1e-5)
    assert torch.allclose(inside, basis[:2], atol=1e-5)
