"""Paths between latents (lerp, slerp, geodesic shooting) and their semantic length, on linear maps."""

from __future__ import annotations

import pytest
import torch

from diffatlas.errors import UserError
from diffatlas.geometry.measures import lerp
from diffatlas.geometry.paths import semantic_paths
from geometry_oracles import LinearMap, matrix, orthonormal_columns

torch.set_num_threads(1)
KW = dict(oversample=2, tol=1e-10, max_iters=50)


def _ends(P, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(P, *shape, generator=g, dtype=torch.float64), torch.randn(P, *shape, generator=g, dtype=torch.float64)


def test_injective_linear_map_geodesic_is_the_straight_line_and_every_length_is_zero():
    """f(x) = A x with A of full column rank: the chord A(x2 - x) lies in T_h = col(A) and maps
    back to x2 - x, so geodesic shooting walks the line; J is constant, so D_geo = 0 everywhere."""
    D, d, L = 6, 10, 5
    a = matrix(orthonormal_columns(d, D, 0), torch.linspace(3, 1, D, dtype=torch.float64), orthonormal_columns(D, D, 1))
    x1, x2 = _ends(2, (1, 2, 3), 2)
    res = semantic_paths(LinearMap(a), x1, x2, L, D, basis_kwargs=KW, generator=torch.Generator().manual_seed(0))
    s = torch.linspace(0, 1, L + 1, dtype=torch.float64)
    for p in range(2):
        assert torch.allclose(res.points["geodesic"][p], lerp(x1[p], x2[p], s), atol=1e-10)
        assert torch.allclose(res.points["lerp"][p], lerp(x1[p], x2[p], s))
    for m in ("lerp", "slerp", "geodesic"):
        assert res.segment_lengths[m].shape == (2, L)
        assert res.lengths[m].abs().max() < 1e-6
    # Euclidean H steps of a line under a linear map are equal: ||A (x2 - x1)|| / L each.
    step = (a @ (x2 - x1).reshape(2, -1).T).T.norm(dim=1) / L
    assert torch.allclose(res.h_steps["lerp"], step[:, None].expand(2, L), atol=1e-10)


def test_geodesic_shooting_step_on_a_rank_deficient_linear_map():
    """A = U S Vᵀ of rank n < D: the projected chord maps back to V Vᵀ (x2 - x), normalised (hand
    oracle: the pseudo-inverse); step = remaining distance / remaining segments; the end is x2."""
    n, D, d, L = 3, 8, 5, 4
    vv = orthonormal_columns(D, n, 1)
    a = matrix(orthonormal_columns(d, n, 0), torch.tensor([2.0, 1.5, 0.7], dtype=torch.float64), vv)
    x1, x2 = _ends(1, (D,), 3)
    res = semantic_paths(LinearMap(a), x1, x2, L, n, basis_kwargs=KW, generator=torch.Generator().manual_seed(0),
                         methods=("geodesic",))
    pinv = torch.linalg.pinv(a)
    cur = x1[0]
    want = [cur]
    for l in range(1, L):
        w = pinv @ (a @ (x2[0] - cur))  # = V Vᵀ (x2 - cur)
        cur = cur + (x2[0] - cur).norm() / (L - l + 1) * w / w.norm()
        want.append(cur)
    want.append(x2[0])
    assert torch.allclose(res.points["geodesic"][0], torch.stack(want), atol=1e-9)
    assert not torch.allclose(torch.stack(want)[1], lerp(x1[0], x2[0], torch.linspace(0, 1, L + 1))[1].double())
    assert list(res.points) == ["geodesic"]


def test_bad_path_input_is_a_clear_error():
    a = matrix(orthonormal_columns(4, 2, 0), torch.tensor([2.0, 1.0], dtype=torch.float64), orthonormal_columns(6, 2, 1))
    x1, x2 = _ends(2, (6,), 0)
    x2[1] = x1[1]
    with pytest.raises(UserError, match=r"pair\(s\) \[1\] have identical endpoints"):
        semantic_paths(LinearMap(a), x1, x2, 3, 2, basis_kwargs=KW)
    x1, x2 = _ends(1, (6,), 0)
    with pytest.raises(UserError, match="n_directions = 5.*only 4 rows"):  # n larger than the H dimension (d = 4)
        semantic_paths(LinearMap(a), x1, x2, 3, 5, basis_kwargs=KW)
    with pytest.raises(UserError, match="path methods"):
        semantic_paths(LinearMap(a), x1, x2, 3, 2, basis_kwargs=KW, methods=("spline",))


class GraphMap(LinearMap):
    """The non-linear map ``f(x) = (x, g(x))`` (x flattened, D values), ``g(x) = sin(a·x) + (b·x)²/2``.

    ``J = [I; ∇gᵀ]`` has full rank D, so T_h = col(J) is the tangent hyperplane of the graph of g,
    with normal ``ν = (-∇g, 1)``; two such D-dimensional hyperplanes of R^{D+1} meet in D - 1
    dimensions, so their only non-zero principal angle is the angle between the normals.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(torch.eye(a.numel(), dtype=torch.float64))
        self.register_buffer("va", a)
        self.register_buffer("vb", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        g = torch.sin(flat @ self.va) + 0.5 * (flat @ self.vb) ** 2
        return torch.cat([flat, g[:, None]], dim=1)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """ν(x) = (-∇g(x), 1) by hand: ∇g = cos(a·x) a + (b·x) b.  x [P, D] -> [P, D+1]."""
        grad = torch.cos(x @ self.va)[:, None] * self.va + (x @ self.vb)[:, None] * self.vb
        return torch.cat([-grad, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def test_semantic_length_on_a_curved_graph_is_the_turning_of_its_normal():
    """Non-linear oracle: every segment's D_geo (lerp, slerp and geodesic shooting alike) equals the
    angle between the graph's normals at the segment's two points, computed by hand from ∇g."""
    D, L = 3, 5
    fmap = GraphMap(torch.tensor([1.3, -0.4, 0.8], dtype=torch.float64), torch.tensor([0.2, 0.9, -0.5], dtype=torch.float64))
    x1, x2 = _ends(2, (1, 1, D), 4)
    res = semantic_paths(fmap, x1, x2, L, D, basis_kwargs=dict(oversample=0, tol=1e-10, max_iters=50),
                         generator=torch.Generator().manual_seed(0))
    for m in ("lerp", "slerp", "geodesic"):
        for p in range(2):
            nu = fmap.normal(res.points[m][p].reshape(L + 1, D))
            nu = nu / nu.norm(dim=1, keepdim=True)
            want = torch.arccos((nu[:-1] * nu[1:]).sum(1).abs().clamp(max=1.0))
            assert torch.allclose(res.segment_lengths[m][p], want, atol=1e-6), m
        assert res.lengths[m].min() > 1e-3  # the graph is curved: the test is not a zero-equals-zero check
