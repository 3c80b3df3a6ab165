"""Paths between two latents and their semantic length (Park et al., NeurIPS 2023).

Three paths from ``x(1)`` to ``x(2)``, each cut into ``L`` segments (the paper: 30):

* **lerp** - ``(1 - s) x(1) + s x(2)`` at ``s = l / L``;
* **slerp** - along the great circle, norms interpolated linearly
  (:func:`~diffatlas.geometry.measures.slerp`);
* **geodesic shooting** - in each segment ``l = 1..L``: take the chord ``h(x(2)) − h(x_cur)``
  in H, project it onto the current tangent space ``T_h`` (the basis ``u`` at ``x_cur``) and
  renormalise (:func:`~diffatlas.geometry.editing.parallel_transport`), map it to X through
  the basis, ``v = Σ_i (u·u_i)/σ_i v_i`` renormalised (:func:`~diffatlas.geometry.editing.h_to_x`),
  and step ``x_cur += (||x(2) − x_cur|| / (L − l + 1)) v``: the remaining Euclidean distance in
  X over the remaining segments. The last step lands on ``x(2)`` itself (the path must end
  there; the step it replaces would in general miss it).

The semantic length of a path is ``Σ_l D_geo(T_h(l), T_h(l+1))``
(:func:`~diffatlas.geometry.measures.semantic_path_length`), so every one of the ``L + 1``
points needs its own basis. All pairs and all three paths advance in lockstep: the points
of step ``l`` (3 per pair) go through one :func:`~diffatlas.geometry.jacobian.top_singular`
call, warm-started from step ``l - 1``'s bases (consecutive points are close, so a warm
start converges in one or two rounds where a cold one takes five or more). The ends are
shared by the three paths. The basis at ``x(2)`` is solved twice, from two independent
random starts: D_geo between the two is the *noise floor* of one segment at the basis
tolerance, reported beside the lengths (a segment shorter than it is not resolved).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from diffatlas.errors import UserError
from diffatlas.geometry.editing import h_to_x, parallel_transport
from diffatlas.geometry.jacobian import PullbackBasis, top_singular
from diffatlas.geometry.measures import grassmann_distances, lerp, semantic_path_length, slerp

log = logging.getLogger(__name__)

METHODS = ("lerp", "slerp", "geodesic")
"""The three paths, in table order."""


@dataclass
class SemanticPaths:
    """Result of :func:`semantic_paths` for P pairs and L segments.

    points: method -> [P, L+1, C, H, W]; segment_lengths: method -> [P, L] D_geo of each
    segment; lengths: method -> [P] their sum (the semantic path length); h_steps: method ->
    [P, L] Euclidean steps ``||Δh||`` (a plain reference, not the paper's measure);
    floor: [P] D_geo between two independent solves of the basis at ``x(2)``;
    converged: every basis call reached its tolerance.
    """

    points: dict[str, torch.Tensor]
    segment_lengths: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor]
    h_steps: dict[str, torch.Tensor]
    floor: torch.Tensor
    converged: bool


def check_endpoints(x1: torch.Tensor, x2: torch.Tensor) -> None:
    """UserError when a pair's ends coincide (a path of length zero has no direction)."""
    if x1.shape != x2.shape:
        raise UserError(f"path endpoints have shapes {tuple(x1.shape)} and {tuple(x2.shape)}; they must match")
    same = ((x1 - x2).reshape(x1.shape[0], -1).norm(dim=1) == 0).nonzero().flatten().tolist()
    if same:
        raise UserError(f"path pair(s) {same} have identical endpoints x(1) = x(2); a semantic path needs two "
                        "distinct latents (check geometry.seed and the pair ids)")


def _rows(b: PullbackBasis, sl: slice) -> PullbackBasis:
    return PullbackBasis(b.v[sl], b.s[sl], b.u[sl], b.residuals[sl], b.iterations, b.converged)


def geodesic_direction(basis: PullbackBasis, chord: torch.Tensor) -> torch.Tensor:
    """The geodesic-shooting direction in X: the H chord [P, d] projected onto ``T_h`` and mapped back (unit)."""
    return h_to_x(parallel_transport(chord.to(basis.u.dtype), basis.u), basis)


@torch.no_grad()
def _h(fmap, x: torch.Tensor) -> torch.Tensor:
    return fmap(x).detach()


def semantic_paths(fmap, x1: torch.Tensor, x2: torch.Tensor, segments: int, n: int, *,
                   basis_kwargs: dict[str, Any] | None = None, generator: torch.Generator | None = None,
                   methods: tuple[str, ...] = METHODS) -> SemanticPaths:
    """lerp, slerp and geodesic-shooting paths from ``x1`` to ``x2`` [P, C, H, W] and their lengths.

    fmap: the pullback map f: x -> h (a :class:`~diffatlas.geometry.jacobian.PullbackMap`);
    segments: L; n: tangent-space dimension; basis_kwargs: keyword arguments of
    :func:`top_singular` (tol, max_iters, ...); generator: RNG of the cold starts.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"path methods {list(methods)} are not allowed; allowed: a non-empty subset of {list(METHODS)}")
    if not isinstance(segments, int) or segments < 1:
        raise UserError(f"geometry.path_segments = {segments!r} is not allowed; allowed: an integer >= 1")
    check_endpoints(x1, x2)
    kw = dict(basis_kwargs or {})
    P, L = x1.shape[0], segments
    s = torch.linspace(0, 1, L + 1, device=x1.device, dtype=torch.float64)
    fixed = {"lerp": lerp, "slerp": slerp}
    points = {m: torch.stack([fixed[m](x1[p], x2[p], s) for p in range(P)]) for m in methods if m in fixed}

    b1 = top_singular(fmap, x1, n, generator=generator, **kw)
    b2 = top_singular(fmap, x2, n, generator=generator, **kw)
    b2_again = top_singular(fmap, x2, n, generator=generator, **kw)
    floor = grassmann_distances(b2.u, b2_again.u)
    h1, h2 = _h(fmap, x1), _h(fmap, x2)
    converged = b1.converged and b2.converged and b2_again.converged

    us = {m: [b1.u] for m in methods}
    hs = {m: [h1] for m in methods}
    geo = "geodesic" in methods
    cur, cur_basis, h_cur, geo_pts = x1, b1, h1, [x1]
    order = [m for m in methods if m in fixed] + (["geodesic"] if geo else [])
    warm = torch.cat([b1.v] * len(order))
    for l in range(1, L):
        if geo:
            v = geodesic_direction(cur_basis, h2 - h_cur).to(cur.dtype)
            remaining = (x2 - cur).reshape(P, -1).norm(dim=1)
            cur = cur + (remaining / (L - l + 1)).view(-1, *([1] * (cur.ndim - 1))) * v
            geo_pts.append(cur)
        pts = torch.cat([points[m][:, l] for m in order if m in fixed] + ([cur] if geo else []))
        b = top_singular(fmap, pts, n, init=warm, generator=generator, **kw)
        converged = converged and b.converged
        warm = b.v
        h = _h(fmap, pts)
        for j, m in enumerate(order):
            sl = slice(j * P, (j + 1) * P)
            us[m].append(b.u[sl])
            hs[m].append(h[sl])
        if geo:
            cur_basis, h_cur = _rows(b, slice((len(order) - 1) * P, len(order) * P)), hs["geodesic"][-1]
        log.debug("path step %d/%d: %d rounds", l, L, b.iterations)
    if geo:
        geo_pts.append(x2)  # the last step lands on x(2)
        points["geodesic"] = torch.stack(geo_pts, dim=1)
    seg, lengths, h_steps = {}, {}, {}
    for m in methods:
        us[m].append(b2.u)
        hs[m].append(h2)
        lengths[m], seg[m] = semantic_path_length(torch.stack(us[m], dim=1))
        hh = torch.stack(hs[m], dim=1).to(torch.float64)
        h_steps[m] = (hh[:, 1:] - hh[:, :-1]).norm(dim=-1)
    return SemanticPaths(points={m: points[m] for m in methods}, segment_lengths=seg, lengths=lengths,
                         h_steps=h_steps, floor=floor, converged=converged)
