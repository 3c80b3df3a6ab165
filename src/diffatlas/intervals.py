"""95% intervals for every number the workflow compares (numpy only, no torch).

* :func:`wilson` — the Wilson score interval of a rate k/n. Accuracies on a test split of
  ~100 images move by ±0.1 from sampling alone; the normal ("Wald") interval fails near 0
  and 1 and at small n, Wilson's stays inside [0, 1] and keeps close to its nominal cover.
* :func:`bootstrap_mean` — a percentile bootstrap interval of a mean (resampling the units
  the mean runs over, e.g. SAE latents), for statistics that are not a count of successes.
* :func:`spread` — mean, sample standard deviation, min and max over repeated runs (seeds):
  variation from the training itself, which an interval over test images does not see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> list[float]:
    """95% Wilson score interval [low, high] of the rate ``k / n``; NaNs when ``n == 0``."""
    if n == 0:
        return [float("nan"), float("nan")]
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k = {k} successes out of n = {n}")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, mid - half), min(1.0, mid + half)]


def bootstrap_mean(values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval [low, high] of the mean of ``values`` (NaNs dropped).

    Resamples the values with replacement ``n_boot`` times; NaNs when fewer than 2 values.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return [float(low), float(high)]


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample std (ddof=1; 0 for one value), min and max of repeated results."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        raise ValueError("spread of no values")
    return {
        "n": int(len(v)),
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
    }
