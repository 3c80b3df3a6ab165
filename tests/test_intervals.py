"""The interval code against known cases: hand-computed Wilson bounds, scipy's Wilson interval,
and the bootstrap of a mean against the normal-theory interval it must approach."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from diffatlas.intervals import bootstrap_mean, spread, wilson


def test_wilson_50_of_100_is_0_40_to_0_60():
    # By hand: centre (0.5 + z²/200) / (1 + z²/100) = 0.5; half-width z·sqrt(0.0025 + z²/40000) / (1 + z²/100)
    # = 1.96 · 0.050951 / 1.038415 = 0.096170.
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.40383, abs=1e-4) and high == pytest.approx(0.59617, abs=1e-4)


@pytest.mark.parametrize("k, n", [(0, 10), (1, 10), (10, 10), (47, 48), (30, 48), (81, 102), (3, 7)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx([ci.low, ci.high], abs=1e-9)


def test_wilson_edge_cases():
    assert all(np.isnan(wilson(0, 0)))
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_bootstrap_mean_approaches_the_normal_interval():
    # For 400 draws the bootstrap percentile interval of the mean is close to mean ± 1.96 s/√n.
    v = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    low, high = bootstrap_mean(v, n_boot=4000, seed=0)
    half = 1.959964 * v.std(ddof=1) / np.sqrt(len(v))
    assert low == pytest.approx(v.mean() - half, abs=0.03)
    assert high == pytest.approx(v.mean() + half, abs=0.03)
    assert bootstrap_mean(v, seed=0) == bootstrap_mean(v, seed=0)  # seeded
    assert all(np.isnan(bootstrap_mean([1.0])))
    assert bootstrap_mean([2.0, 2.0, np.nan, 2.0]) == [2.0, 2.0]  # NaNs dropped; no spread, no width


def test_spread():
    s = spread([0.7, 0.8, 0.9])
    assert s == {"n": 3, "mean": pytest.approx(0.8), "std": pytest.approx(0.1), "min": 0.7, "max": 0.9}
    assert spread([0.5])["std"] == 0.0
