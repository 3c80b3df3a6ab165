"""Maps with known geometry for the geometry tests (issue 18's oracles).

A linear map ``f(x) = A x`` has ``J = A`` at every point, so its pullback basis is the SVD of
``A`` (built here from chosen factors), its tangent space in H is the column space of ``A``,
and principal angles between two such spaces are whatever the factors were built with.
"""

from __future__ import annotations

import torch


class LinearMap(torch.nn.Module):
    """``f(x)[s] = A_s x_s`` (A [N, d, D], one matrix per sample) or ``A x`` (A [d, D]).

    Stands in for :class:`~diffatlas.geometry.jacobian.PullbackMap` in ``top_singular``: it has
    ``check`` (nothing to check) and ``denoiser`` (itself: no attention modules to switch).
    """

    def __init__(self, a: torch.Tensor) -> None:
        from types import SimpleNamespace

        super().__init__()
        self.register_buffer("a", a)
        self.layer = SimpleNamespace(name="linear", module_path="linear")  # named in top_singular's errors
        self.pooling = "none"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self

    def check(self, x: torch.Tensor) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if self.a.ndim == 2:
            return flat @ self.a.T
        return torch.einsum("sdk,sk->sd", self.a, flat)


def orthonormal_columns(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def matrix(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``U diag(s) Vᵀ`` from factors U [d, n], s [n], V [D, n]."""
    return (u * s) @ v.T


def subspaces_with_angles(d: int, thetas: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two n-dimensional subspaces of R^d (orthonormal columns [d, n]) whose principal angles are ``thetas``."""
    n = len(thetas)
    q = orthonormal_columns(d, 2 * n, seed)
    th = torch.tensor(thetas, dtype=torch.float64)
    return q[:, :n], torch.cos(th) * q[:, :n] + torch.sin(th) * q[:, n:]
