"""Park et al.'s ablation table (semantic vs random directions) on a hand-made meaning table."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy.stats import binomtest

from diffatlas.geometry.meaning import ablation


def _row(mode, strength, n_ref, n_edit, changed):
    """One judged edit; ``changed`` names the factors that changed (NaN factors when nothing is found)."""
    row = {"model": "m", "timestep": 500, "mode": mode, "sample": 0, "direction": 0, "strength": strength,
           "n_ref": n_ref, "n_edit": n_edit, "count_changed": float(n_ref != n_edit), "pixel_change": 0.1}
    for f in ("position", "size", "colour", "shape"):
        row[f"{f}_changed"] = math.nan if (n_ref == 0 or n_edit == 0) else float(f in changed)
    return row


def test_ablation_counts_and_wilson_intervals():
    rows = []
    # semantic, γ = 4: 7 edits with a changed factor, 2 unchanged, 1 with no object left; plus one
    # edit whose reference shows nothing (left out of n).
    rows += [_row("linear", 4.0, 1, 1, {"colour"}) for _ in range(6)] + [_row("linear", 4.0, 1, 2, set())]
    rows += [_row("linear", 4.0, 1, 1, set()) for _ in range(2)] + [_row("linear", 4.0, 1, 0, set())]
    rows += [_row("linear", 4.0, 0, 0, set())]
    # random, γ = 4: 1 changed factor, 3 no object, 1 unchanged
    rows += [_row("random", 4.0, 1, 1, {"position"})] + [_row("random", 4.0, 1, 0, set()) for _ in range(3)]
    rows += [_row("random", 4.0, 1, 1, set())]
    rows += [_row("normalised", 4.0, 1, 1, {"shape"})]  # not part of the ablation
    out = ablation(pd.DataFrame(rows)).set_index("mode")
    assert list(out.index) == ["linear", "random"]
    expect = {"linear": (10, 7, 1), "random": (5, 1, 3)}  # counted by hand
    for mode, (n, kf, kl) in expect.items():
        r = out.loc[mode]
        assert (r["n"], r["factor_k"], r["lost_k"]) == (n, kf, kl)
        assert r["factor_rate"] == pytest.approx(kf / n) and r["lost_rate"] == pytest.approx(kl / n)
        ci = binomtest(kf, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (r["factor_low"], r["factor_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
        ci = binomtest(kl, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (r["lost_low"], r["lost_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
        assert r["pixel_change"] == pytest.approx(0.1)
