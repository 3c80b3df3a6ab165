"""Geometry measures: principal-angle distances, lerp/slerp, path length, radial PSD."""

from __future__ import annotations

import math

import pytest
import torch

from diffatlas.geometry.measures import (
    grassmann_distance,
    lerp,
    max_grassmann_distance,
    path_length,
    principal_angles,
    radial_psd,
    slerp,
)


def _orthonormal(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64)).Q.T


def test_distance_zero_for_equal_spaces_any_basis():
    a = _orthonormal(4, 50, 0)
    rot = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).Q
    b = rot @ a  # another basis of the same space, scaled rows too
    assert grassmann_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert grassmann_distance(a, 3.0 * b) == pytest.approx(0.0, abs=1e-6)


def test_distance_symmetric_and_bounded():
    a, b = _orthonormal(3, 40, 2), _orthonormal(3, 40, 3)
    d_ab, d_ba = grassmann_distance(a, b), grassmann_distance(b, a)
    assert d_ab == pytest.approx(d_ba, rel=1e-9)
    assert 0 < d_ab <= max_grassmann_distance(3) + 1e-9


def test_distance_known_angles():
    # Lines at 30 degrees in a plane: one principal angle of pi/6.
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6), 0.0]])
    assert grassmann_distance(a, b) == pytest.approx(math.pi / 6, rel=1e-6)
    # Planes sharing e1, second vectors e2 vs e3: angles (0, pi/2).
    p = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    q = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    assert principal_angles(p, q).tolist() == pytest.approx([0.0, math.pi / 2], abs=1e-6)
    assert grassmann_distance(p, q) == pytest.approx(math.pi / 2, rel=1e-6)


def test_slerp_keeps_the_norm_of_gaussian_endpoints():
    g = torch.Generator().manual_seed(0)
    d = 3 * 32 * 32
    a, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    s = torch.linspace(0, 1, 31)
    sp, lp = slerp(a, b, s), lerp(a, b, s)
    assert torch.allclose(sp[0], a, atol=1e-5) and torch.allclose(sp[-1], b, atol=1e-5)
    norms = sp.norm(dim=1)
    expected = (1 - s) * a.norm() + s * b.norm()
    assert torch.allclose(norms, expected, rtol=1e-5)
    assert ((norms / math.sqrt(d)) - 1).abs().max() < 0.05  # on the Gaussian shell
    mid = lp[15].norm() / (0.5 * (a.norm() + b.norm()))
    assert mid.item() == pytest.approx(math.sqrt(0.5), abs=0.03)  # lerp cuts through the interior


def test_path_length_of_a_line():
    a, b = torch.zeros(5), torch.ones(5)
    pts = lerp(a, b, torch.linspace(0, 1, 11))
    assert path_length(pts) == pytest.approx(math.sqrt(5), rel=1e-9)


def test_radial_psd_peaks_at_the_frequency():
    H = W = 32
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    for k in (1, 4, 9):
        v = torch.cos(2 * math.pi * k * xx / W)[None].repeat(3, 1, 1)
        psd = radial_psd(v)
        assert psd.shape == (H // 2 + 1,)
        assert int(psd.argmax()) == k


# ----------------------------------------------------------------------------- Park et al.'s D_geo and path length
def test_d_geo_of_linear_maps_is_the_chosen_principal_angles():
    """Tangent spaces of f_k(x) = A_k x are span(U_k); built with principal angles θ, D_geo = sqrt(Σ θ²)."""
    from diffatlas.geometry.jacobian import top_singular
    from geometry_oracles import LinearMap, matrix, orthonormal_columns, subspaces_with_angles

    thetas = [0.05, 0.4, 1.3]
    u1, u2 = subspaces_with_angles(12, thetas, 0)
    sig = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    a = torch.stack([matrix(u1, sig, orthonormal_columns(20, 3, 1)), matrix(u2, sig, orthonormal_columns(20, 3, 2))])
    x = torch.randn(2, 20, dtype=torch.float64)
    b = top_singular(LinearMap(a), x, 3, oversample=2, tol=1e-10, max_iters=50, generator=torch.Generator().manual_seed(0))
    want = math.sqrt(sum(t * t for t in thetas))
    assert grassmann_distance(b.u[0], b.u[1]) == pytest.approx(want, abs=1e-8)
    from diffatlas.geometry.measures import grassmann_distances

    assert float(grassmann_distances(b.u[:1], b.u[1:])[0]) == pytest.approx(want, abs=1e-8)


def test_semantic_path_length_of_a_rotating_plane():
    """span{cos φ e1 + sin φ e2, e3}: consecutive D_geo = |Δφ|, length = total rotation."""
    from diffatlas.geometry.measures import semantic_path_length

    phis = torch.tensor([0.0, 0.1, 0.35, 0.5, 0.9], dtype=torch.float64)
    e = torch.eye(5, dtype=torch.float64)
    u = torch.stack([torch.stack([torch.cos(p) * e[0] + torch.sin(p) * e[1], e[2]]) for p in phis])  # [5, 2, 5]
    total, seg = semantic_path_length(u[None])
    assert seg[0].tolist() == pytest.approx([0.1, 0.25, 0.15, 0.4], abs=1e-10)
    assert float(total[0]) == pytest.approx(0.9, abs=1e-10)
