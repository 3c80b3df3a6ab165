"""Set measures of binary masks and the statistics every DAAM table uses.

IoU, the one-sided intersection |a ∩ b| / |b| (IoD and IoH of the DAAM paper, §4, are this
with b = the dependent's or the head's mask), the centre-prior baseline map and the 95%
confidence half-width of a mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two bool masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def intersection_over(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |b|: how much of ``b`` is covered by ``a`` (NaN when ``b`` is empty)."""
    area = b.sum()
    return float(np.logical_and(a, b).sum() / area) if area else float("nan")


def centre_prior(shape: tuple[int, int], sigma_frac: float = 0.25) -> np.ndarray:
    """Isotropic Gaussian at the image centre, σ = ``sigma_frac`` × side.  -> float32 [H, W]."""
    h, w = shape
    y = (np.arange(h) + 0.5) / h - 0.5
    x = (np.arange(w) + 0.5) / w - 0.5
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma_frac**2)).astype(np.float32)


def ci95(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return float(1.96 * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
