"""The path-length figure plots what path_segments.csv holds.

A synthetic path_segments.csv (known per-segment D_geo) is drawn; the plotted lines and bars
are read back from the matplotlib Axes and compared with means and sums computed here with
pandas / numpy, independently of the figure code.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from diffatlas.cli import main as cli
from diffatlas.errors import UserError
from diffatlas.geometry.figures import FEW_PAIRS, path_lengths_plot, read_path_segments
from diffatlas.plotting import plt

METHODS = ("lerp", "slerp", "geodesic")


def synthetic_segments(pairs: int, segments: int, seed: int = 0) -> pd.DataFrame:
    """Lerp longest near the ends (a U profile), slerp flat, geodesic flat and lower, plus noise."""
    rng = np.random.default_rng(seed)
    s = (np.arange(segments) + 0.5) / segments
    profile = {"lerp": 1.0 + 4.0 * (s - 0.5) ** 2, "slerp": np.full(segments, 0.9), "geodesic": np.full(segments, 0.6)}
    rows = []
    for m in METHODS:
        for p in range(pairs):
            d = profile[m] + 0.1 * rng.standard_normal(segments) ** 2
            rows += [{"model": "toy", "timestep": 999, "pair": p, "method": m, "segment": k, "d_geo": float(d[k]),
                      "h_step": 1.0} for k in range(segments)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=1)  # row order must not matter


def by_gid(ax, prefix: str) -> dict[str, object]:
    return {a.get_gid(): a for a in ax.get_children() if (a.get_gid() or "").startswith(prefix)}


@pytest.mark.parametrize("pairs", [FEW_PAIRS - 2, FEW_PAIRS + 3])
def test_path_figure_plots_the_segment_means_and_totals(pairs):
    L = 6
    df = synthetic_segments(pairs, L)
    expected_mean = df.groupby(["method", "segment"])["d_geo"].mean()
    totals = df.groupby(["method", "pair"])["d_geo"].sum()
    ci = {m: [totals[m].mean() - 0.05, totals[m].mean() + 0.07] for m in METHODS}
    summary = {"model": "toy", "timestep": 999, "semantic_length_ci95": ci, "segment_floor_mean": 0.02}
    fig = path_lengths_plot(df, summary)
    ax, ax2 = fig.axes
    try:
        means = by_gid(ax, "mean:")
        assert set(means) == {f"mean:{m}" for m in METHODS}
        for m in METHODS:
            x, y = means[f"mean:{m}"].get_data()
            np.testing.assert_array_equal(x, np.arange(1, L + 1))
            np.testing.assert_allclose(y, expected_mean[m].sort_index().to_numpy(), rtol=1e-12)
        pair_lines = by_gid(ax, "pair:")
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        if pairs < FEW_PAIRS:
            assert len(pair_lines) == pairs * len(METHODS) and not bands
            for m in METHODS:
                for p in range(pairs):
                    want = df[(df.method == m) & (df.pair == p)].sort_values("segment")["d_geo"].to_numpy()
                    np.testing.assert_allclose(pair_lines[f"pair:{m}:{p}"].get_data()[1], want, rtol=1e-12)
        else:
            assert not pair_lines and len(bands) == len(METHODS)
            for m, band in zip(METHODS, bands):
                verts = band.get_paths()[0].vertices
                mean = expected_mean[m].sort_index().to_numpy()
                se = df[df.method == m].groupby("segment")["d_geo"].std().sort_index().to_numpy() / np.sqrt(pairs)
                for k in range(L):
                    ys = verts[np.isclose(verts[:, 0], k + 1), 1]
                    lo, hi = ys.min(), ys.max()
                    # A 95% interval of the mean: holds the mean, about 1.96 standard errors each side.
                    assert lo < mean[k] < hi
                    assert 0.3 * se[k] < hi - lo < 8 * se[k]
        # Totals: bar height = mean over pairs of Σ_l D_geo; dots = each pair's total; error bar = the summary's interval.
        bars = {c.patches[0].get_gid(): c for c in ax2.containers if hasattr(c, "patches")}
        for m in METHODS:
            bar = bars[f"total:{m}"].patches[0]
            assert bar.get_height() == pytest.approx(totals[m].mean(), rel=1e-12)
            dots = by_gid(ax2, f"totals:{m}")[f"totals:{m}"].get_data()[1]
            np.testing.assert_allclose(np.sort(dots), np.sort(totals[m].to_numpy()), rtol=1e-12)
            err = bars[f"total:{m}"].errorbar.lines[2][0].get_segments()[0]
            np.testing.assert_allclose(sorted(err[:, 1]), ci[m], rtol=1e-12)
        floor = [ln for ln in ax.get_lines() if np.all(np.asarray(ln.get_ydata()) == 0.02)]
        assert len(floor) == 1
    finally:
        plt.close(fig)


def test_path_figure_command_and_bad_input(tmp_path, capsys):
    df = synthetic_segments(2, 4)
    seg = tmp_path / "path_segments.csv"
    df.to_csv(seg, index=False)
    summary = tmp_path / "path_lengths.json"
    summary.write_text(json.dumps({"semantic_length_ci95": {m: [float("nan"), float("nan")] for m in METHODS}}))
    out = tmp_path / "fig" / "path_lengths.png"
    assert cli(["geometry-figures", "paths", "--segments", str(seg), "--summary", str(summary), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000

    df.drop(columns="d_geo").to_csv(tmp_path / "bad.csv", index=False)
    bad_out = tmp_path / "bad.png"
    assert cli(["geometry-figures", "paths", "--segments", str(tmp_path / "bad.csv"), "--out", str(bad_out)]) == 2
    assert "d_geo" in capsys.readouterr().err and not bad_out.exists()
    pd.concat([df, df]).to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(UserError, match="more than once"):
        read_path_segments(tmp_path / "twice.csv")
