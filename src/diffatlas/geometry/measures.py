"""Geometry measures: distances between tangent spaces, path lengths, spatial spectra.

* **Geodesic distance between tangent spaces** (Park et al.'s D_geo, points of a
  Grassmannian): with principal angles ``θ_k = arccos σ_k(A Bᵀ)`` between the orthonormalised
  row spaces of ``A`` and ``B`` - in the paper, the n-dimensional tangent spaces ``T_h`` in H,
  spanned by the ``u`` bases - ``D_geo(A, B) = sqrt(Σ_k θ_k²)`` (0 for the same space,
  symmetric, at most ``sqrt(n) π/2``).
* **Semantic path length** (Park et al.): a path between two latents cut into L segments
  (30 in the paper), ``Σ_l D_geo(T_h(l), T_h(l+1))`` over its points
  (:func:`semantic_path_length`; the paths and their bases: :mod:`diffatlas.geometry.paths`).
  Linear interpolation of two Gaussian latents cuts through the low-norm interior of the
  Gaussian shell (the midpoint has norm ~ ``1/√2`` of the ends); spherical interpolation
  (:func:`slerp`) stays on it. :func:`path_length` (``Σ ||h_{l+1} − h_l||``, Euclidean steps
  in H) is kept beside it as a plain reference; it is not the paper's measure.
* **Power spectral density** of directions: the radially averaged ``|FFT2|²`` of a
  direction's spatial map (summed over channels), per integer spatial frequency. Park et al.
  find low-frequency directions early in generation (large t) and high-frequency ones late;
  :func:`mean_frequency` (the spectral centroid) is the one number the trend table follows.
* **Flatness of the pullback spectrum** (Park et al.: the singular values flatten as t -> 0):
  :func:`spectral_flatness`, the geometric over the arithmetic mean of the energies ``σ_i²``
  (1 for equal singular values, -> 0 when one dominates), and :func:`top_energy_fraction`,
  the share ``Σ_{i<=k} σ_i² / Σ_i σ_i²`` of the top k.
* **Lerp's end-heavy segments** (:func:`end_over_middle`): mean segment length in the outer
  quarters of a path over that in its middle half.
"""

from __future__ import annotations

import math

import torch


# ----------------------------------------------------------------------------- tangent spaces
def _orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    a = a.reshape(a.shape[0], -1).to(torch.float64)
    return torch.linalg.qr(a.T).Q.T


def grassmann_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D_geo between row spaces, batched: a [..., p, D], b [..., q, D] -> [...] (float64).

    ``sqrt(Σ_k θ_k²)`` over the min(p, q) principal angles of each pair of spaces.
    """
    qa = torch.linalg.qr(a.to(torch.float64).transpose(-1, -2)).Q.transpose(-1, -2)
    qb = torch.linalg.qr(b.to(torch.float64).transpose(-1, -2)).Q.transpose(-1, -2)
    cos = torch.linalg.svdvals(qa @ qb.transpose(-1, -2)).clamp(0.0, 1.0)
    return torch.arccos(cos).norm(dim=-1)


def semantic_path_length(u_path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Park et al.'s semantic path length of paths given by their tangent bases.

    u_path: [..., L+1, n, d] the tangent basis in H at each of a path's L+1 points. Returns
    ``(length [...], segment lengths [..., L])`` with segment ``l`` = D_geo(T_h(l), T_h(l+1)).
    """
    seg = grassmann_distances(u_path[..., :-1, :, :], u_path[..., 1:, :, :])
    return seg.sum(-1), seg


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles [min(p, q)] (radians, ascending) between row spaces of a [p, ...], b [q, ...]."""
    qa, qb = _orthonormal_rows(a), _orthonormal_rows(b)
    cos = torch.linalg.svdvals(qa @ qb.T).clamp(-1.0, 1.0)
    return torch.arccos(cos).sort().values


def grassmann_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Geodesic distance ``sqrt(Σ θ_k²)`` between the row spaces of ``a`` and ``b``."""
    return float(principal_angles(a, b).norm())


# ----------------------------------------------------------------------------- interpolation
def lerp(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Linear interpolation; a, b: [...]; s: [S] -> [S, ...]."""
    s = s.to(a.device, a.dtype).view(-1, *([1] * a.ndim))
    return (1 - s) * a[None] + s * b[None]


def slerp(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation: directions along the great circle, norms interpolated linearly.

    a, b: [...]; s: [S] in [0, 1] -> [S, ...]. ``||slerp(s)|| = (1-s)||a|| + s||b||`` exactly,
    so the path keeps the norm of its (Gaussian) endpoints.
    """
    s = s.to(a.device, torch.float64)
    na, nb = a.norm().double(), b.norm().double()
    ua, ub = a.double() / na, b.double() / nb
    omega = torch.arccos((ua * ub).sum().clamp(-1.0, 1.0))
    shape = (-1, *([1] * a.ndim))
    if float(omega) < 1e-6:  # (anti-)parallel ends: directions barely move
        direction = lerp(ua, ub, s)
        direction = direction / direction.reshape(len(s), -1).norm(dim=1).view(shape)
    else:
        so = torch.sin(omega)
        w1 = (torch.sin((1 - s) * omega) / so).view(shape)
        w2 = (torch.sin(s * omega) / so).view(shape)
        direction = w1 * ua[None] + w2 * ub[None]
    radius = ((1 - s) * na + s * nb).view(shape)
    return (direction * radius).to(a.dtype)


def path_length(h: torch.Tensor) -> float:
    """Length ``Σ ||h_{k+1} − h_k||`` of a path sampled as h [S, ...]."""
    flat = h.reshape(h.shape[0], -1).to(torch.float64)
    return float((flat[1:] - flat[:-1]).norm(dim=1).sum())


# ----------------------------------------------------------------------------- spectra
def radial_psd(v: torch.Tensor) -> torch.Tensor:
    """Radially averaged power spectrum of spatial maps.

    v: [..., C, H, W]. The power ``|FFT2|²`` (orthonormal FFT, so Σ power = ||v||²) is summed
    over channels and averaged over rings of integer radius ``r = round(sqrt(fy² + fx²))`` in
    frequency units (cycles per image), up to the Nyquist radius ``min(H, W) // 2`` (the
    corners beyond it hold only partial rings). Returns [..., R] with R = min(H, W) // 2 + 1.
    """
    H, W = v.shape[-2:]
    f = torch.fft.fft2(v.to(torch.float64), norm="ortho")
    power = (f.real**2 + f.imag**2).sum(dim=-3)  # [..., H, W]
    fy = torch.fft.fftfreq(H, d=1.0 / H, device=v.device).abs()
    fx = torch.fft.fftfreq(W, d=1.0 / W, device=v.device).abs()
    r = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long()  # [H, W]
    n_bins = min(H, W) // 2 + 1
    keep = (r < n_bins).reshape(-1)
    flat = power.reshape(*power.shape[:-2], H * W)[..., keep]
    idx = r.reshape(-1)[keep]
    sums = torch.zeros(*flat.shape[:-1], n_bins, dtype=flat.dtype, device=flat.device).index_add_(-1, idx, flat)
    counts = torch.bincount(idx, minlength=n_bins).to(flat.dtype)
    return sums / counts


def mean_frequency(psd: torch.Tensor) -> torch.Tensor:
    """Spectral centroid of ring-averaged spectra [..., R]: ``Σ_r r P(r) / Σ_r P(r)``."""
    r = torch.arange(psd.shape[-1], dtype=psd.dtype, device=psd.device)
    return (psd * r).sum(-1) / psd.sum(-1).clamp_min(1e-300)


def spectral_flatness(s: torch.Tensor) -> torch.Tensor:
    """Flatness of singular values s [..., n] (> 0): ``exp(mean log σ²) / mean σ²`` in (0, 1] -> [...].

    The Wiener entropy of the energies σ_i²: 1 exactly when all σ_i are equal.
    """
    e = s.to(torch.float64) ** 2
    return torch.exp(torch.log(e.clamp_min(1e-300)).mean(-1)) / e.mean(-1).clamp_min(1e-300)


def top_energy_fraction(s: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Share of the energy in the top ``k`` singular values: s [..., n] (descending) -> [...]."""
    e = s.to(torch.float64) ** 2
    return e[..., :k].sum(-1) / e.sum(-1).clamp_min(1e-300)


def end_over_middle(seg):
    """Per path: mean segment length in the outer quarters over that in the middle half.

    seg: [P, L] segment lengths (numpy or torch) -> [P]; with L < 4 the outer "quarters" are
    the first and last segment. Above 1 when a path's segments are longest near its ends.
    """
    import numpy as np

    seg = np.asarray(seg, dtype=np.float64)
    L = seg.shape[1]
    q = max(1, L // 4)
    middle = seg[:, q:L - q] if L - 2 * q > 0 else seg
    ends = np.concatenate([seg[:, :q], seg[:, L - q:]], axis=1)
    return ends.mean(1) / np.maximum(middle.mean(1), 1e-300)


def max_grassmann_distance(n: int) -> float:
    """Largest possible distance between n-dimensional subspaces: sqrt(n) π/2."""
    return math.sqrt(n) * math.pi / 2
