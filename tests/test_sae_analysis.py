"""Metrics and latent meaning: post-TopK codes, streaming top-n, label statistics, figures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from diffatlas.sae import analysis
from diffatlas.sae.config import SAEArch, SAEConfig
from diffatlas.sae.model import TopKSAE
from diffatlas.sae.train import SAEData

torch.set_num_threads(1)


def _data(x: np.ndarray, fine=None, coarse=None, is_val=None, scale=1.0) -> SAEData:
    """SAEData from raw vectors x [N, P, d] with optional labels (codes) and split."""
    n = x.shape[0]
    fine = np.zeros(n, np.int64) if fine is None else np.asarray(fine)
    coarse = np.zeros(n, np.int64) if coarse is None else np.asarray(coarse)
    return SAEData(
        x=x.astype(np.float32),
        sample_ids=np.arange(1000, 1000 + n),
        is_val=np.ones(n, bool) if is_val is None else is_val,
        scale=scale,
        fine=fine,
        coarse=coarse,
        fine_classes=[f"f{i}" for i in range(int(fine.max()) + 1)],
        coarse_classes=[f"c{i}" for i in range(int(coarse.max()) + 1)],
    )


# -- label statistics ---------------------------------------------------------------------------
def test_label_statistics_known_values():
    codes = np.array([[0, 0, 1, 1], [0, 0, 1, 2], [3, 3, 3, 3]])
    np.testing.assert_allclose(analysis.sigma_label(codes), [math.sqrt(1 / 3), np.std([0, 0, 1, 2], ddof=1), 0.0])
    np.testing.assert_allclose(analysis.purity(codes), [0.5, 0.5, 1.0])
    np.testing.assert_allclose(analysis.label_entropy(codes), [1.0, 1.5, 0.0])
    np.testing.assert_array_equal(analysis.majority(codes), [0, 0, 3])


def test_purity_and_entropy_are_invariant_to_relabelling_but_sigma_is_not():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 6, size=(200, 10))
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(6)
        relabelled = perm[codes]
        np.testing.assert_allclose(analysis.purity(relabelled), analysis.purity(codes))
        np.testing.assert_allclose(analysis.label_entropy(relabelled), analysis.label_entropy(codes))
    # σ of integer ids depends on the numbering: half class 0 / half class 1, then 1 renamed 5
    row = np.array([[0] * 5 + [1] * 5])
    renamed = np.where(row == 1, 5, row)
    assert analysis.sigma_label(row)[0] == pytest.approx(np.std([0] * 5 + [1] * 5, ddof=1))
    assert analysis.sigma_label(renamed)[0] == pytest.approx(5 * analysis.sigma_label(row)[0])
    assert analysis.purity(renamed)[0] == analysis.purity(row)[0] == 0.5


def test_chance_statistics_match_the_exact_expectation():
    codes = np.arange(1000) % 2  # two balanced classes
    chance = analysis.chance_stats(codes, top_n=2, draws=4000, seed=1)
    p_same = 2 * (500 / 1000) * (499 / 999)
    assert chance["purity"] == pytest.approx(p_same * 1.0 + (1 - p_same) * 0.5, abs=0.01)
    assert chance["entropy"] == pytest.approx((1 - p_same) * 1.0, abs=0.02)
    assert analysis.chance_stats(np.zeros(50, int), top_n=10)["purity"] == 1.0


# -- streaming top-n ----------------------------------------------------------------------------
def test_top_tracker_matches_a_full_sort():
    rng = np.random.default_rng(0)
    acts = rng.random((137, 9)) * (rng.random((137, 9)) < 0.3)  # mostly zeros
    acts[:, 8] = 0.0
    acts[[3, 50], 8] = [0.2, 0.7]  # latent 8 fires on two samples only
    tracker = analysis.TopTracker(9, top_n=5)
    start = 0
    for size in [1, 40, 7, 64, 25]:
        tracker.update(torch.from_numpy(acts[start : start + size]).float(), torch.arange(start, start + size))
        start += size
    assert start == 137
    for j in range(9):
        pos = np.nonzero(acts[:, j] > 0)[0]
        order = pos[np.argsort(-acts[pos, j])][:5]
        ids = tracker.ids[j].numpy()
        np.testing.assert_array_equal(ids[: len(order)], order)
        assert (ids[len(order) :] == -1).all()
        np.testing.assert_allclose(tracker.values[j, : len(order)].numpy(), acts[order, j], rtol=1e-6)
        assert int(tracker.n_active[j]) == len(pos)
        assert float(tracker.max[j]) == pytest.approx(acts[:, j].max(), rel=1e-6)
        mean = acts[pos, j].mean() if len(pos) else 0.0
        assert float(tracker.mean_active()[j]) == pytest.approx(mean, rel=1e-6)


def test_rank_latents_and_curves():
    score = np.array([0.5, 2.0, 2.0, 9.0, 1.0])
    n_active = np.array([50, 11, 30, 10, 12])
    order = analysis.rank_latents(score, n_active, min_active=10, top_n=10)
    np.testing.assert_array_equal(order, [1, 2, 4, 0])  # latent 3 fires on 10 (not > 10); tie 1/2 by index
    table = pd.DataFrame({"rank": [3, 0, 1, -1, 2]})
    for gran in ("fine", "coarse"):
        for name in analysis.STATS:
            table[f"{name}_{gran}"] = [4.0, 1.0, 2.0, 100.0, 3.0]
    cur = analysis.curves(table)
    np.testing.assert_array_equal(cur["n_top"], [1, 2, 3, 4])
    np.testing.assert_allclose(cur["purity_fine"], [1.0, 1.5, 2.0, 2.5])


# -- metrics on post-TopK codes -----------------------------------------------------------------
def _max_of_two_sae() -> TopKSAE:
    """d=2, n=3, k=1: latents 0, 1 read x₀, x₁; latent 2 reads (x₀+x₁)/2, which is always
    positive on positive data but never the largest, so after TopK it never fires."""
    sae = TopKSAE(SAEArch(d_in=2, n_latents=3, k=1, k_aux=1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]]))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae


def test_metrics_use_post_topk_codes():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 2.0, size=(40, 1, 2))
    data = _data(x)
    sae = _max_of_two_sae()
    rows = np.arange(40)
    rec = analysis.reconstruction_metrics(sae, data, rows, dense_threshold=0.1)
    assert rec["l0"] == 1.0  # == k
    assert rec["dead_fraction"] == pytest.approx(1 / 3)  # latent 2 never survives TopK
    tracker = analysis.mine_top(sae, data, rows, top_n=5)
    assert int(tracker.n_active[2]) == 0 and (tracker.ids[2] == -1).all()
    # the pre-TopK (ReLU) values would tell another story: latent 2 alive on every sample
    pre = torch.relu(sae.pre_acts(torch.from_numpy(x[:, 0]).float()))
    assert float((pre > 0).sum(1).float().mean()) == 3.0
    assert bool((pre[:, 2] > 0).all())
    # reconstruction: x̂ keeps only the larger coordinate
    x2 = x[:, 0]
    x_hat = np.where(x2[:, :1] >= x2[:, 1:], np.c_[x2[:, 0], np.zeros(40)], np.c_[np.zeros(40), x2[:, 1]])
    sse = ((x_hat - x2) ** 2).sum()
    sst = ((x2 - x2.mean(0)) ** 2).sum()
    assert rec["nmse"] == pytest.approx(sse / sst, rel=1e-5)
    assert rec["fve"] == pytest.approx(1 - sse / sst, rel=1e-5)
    # dense: latents 0 and 1 each fire on about half the samples (> 10 %)
    assert rec["dense_fraction"] == pytest.approx(2 / 3)


def test_analyse_against_brute_force_pooled_and_spatial():
    rng = np.random.default_rng(1)
    n, d = 60, 6
    fine = np.arange(n) % 3
    coarse = (np.arange(n) % 3 > 0).astype(int)
    sae = TopKSAE(SAEArch(d_in=d, n_latents=12, k=3, k_aux=3), seed=2)
    for positions in (1, 4):
        x = rng.normal(size=(n, positions, d)) + np.eye(d)[fine][:, None, :] * 3
        is_val = np.zeros(n, bool)
        is_val[::4] = True
        data = _data(x, fine, coarse, is_val=is_val, scale=0.7)
        cfg = SAEConfig(k=3, expansion=2, top_n=4, min_active=4, top_latents=5)
        metrics, latents = analysis.analyse(sae, data, cfg)
        # brute force: dense post-TopK codes of every vector, then per-sample max over positions
        with torch.no_grad():
            vec = torch.from_numpy((x.reshape(-1, d) * 0.7).astype(np.float32))
            z = sae.codes(vec).numpy().reshape(n, positions, -1)
            x_hat = sae(vec).x_hat.numpy().reshape(n, positions, d)
        xv = (x * 0.7)[is_val].reshape(-1, d)
        sse = ((x_hat[is_val].reshape(-1, d) - xv) ** 2).sum()
        assert metrics["nmse"] == pytest.approx(sse / ((xv - xv.mean(0)) ** 2).sum(), rel=1e-4)
        assert metrics["l0"] == pytest.approx((z[is_val] > 0).sum() / is_val.sum() / positions)
        per_sample = z.max(axis=1)
        for row in latents.itertuples():
            j = row.latent
            pos = np.nonzero(per_sample[:, j] > 0)[0]
            top = pos[np.argsort(-per_sample[pos, j])][:4]
            assert list(row.top_sample_ids) == list(data.sample_ids[top])
            assert row.n_active == len(pos)
            if len(top) == 4:
                assert row.purity_fine == pytest.approx(analysis.purity(fine[top][None])[0])
                assert row.sigma_label_coarse == pytest.approx(np.std(coarse[top], ddof=1))
        ranked = latents[latents["rank"] >= 0].sort_values("rank")
        n_top = metrics["labels"]["n_top_latents"]
        assert n_top == min(5, len(ranked))
        assert metrics["labels"]["purity_fine"] == pytest.approx(ranked["purity_fine"].head(n_top).mean())
        assert metrics["labels"]["sigma_label_fine"] == pytest.approx(ranked["sigma_label_fine"].head(n_top).mean())
        # bootstrap over the top latents: brackets their mean, inside their range
        for key in ("purity_fine", "sigma_label_coarse"):
            head = ranked[key].head(n_top)
            low, high = metrics["labels"][f"{key}_ci95"]
            assert head.min() - 1e-12 <= low <= head.mean() <= high <= head.max() + 1e-12


# -- figures ------------------------------------------------------------------------------------
def _summary() -> pd.DataFrame:
    rows = []
    for model in ("m1", "m2"):
        for li, layer in enumerate(("mid", "up_ft0")):
            for t in (50, 500):
                rows.append(
                    {"model": model, "dataset": "toy", "layer": layer, "timestep": t, "fve": 0.9 - li * 0.1,
                     "n_top_latents": 10, "sigma_label_fine": 1.0 + li + t / 1000, "sigma_label_coarse": 0.5,
                     "purity_fine": 0.5 + li * 0.1 + t / 5000, "purity_coarse": 0.8,
                     "chance_purity_fine": 0.2, "chance_purity_coarse": 0.4,
                     "chance_sigma_label_fine": 3.0, "chance_sigma_label_coarse": 0.8}
                )
    return pd.DataFrame(rows)


def test_label_stats_figure_plots_the_summary_values():
    from diffatlas.sae.figures import plot_label_stats

    summary = _summary()
    one = summary[summary["model"] == "m1"]
    fig = plot_label_stats(one, by="layer")
    purity_ax = fig.axes[1]
    line = next(ln for ln in purity_ax.get_lines() if ln.get_label() == "timestep 500 (fine)")
    np.testing.assert_allclose(line.get_ydata(), [0.5 + 0.1, 0.6 + 0.1])
    fig = plot_label_stats(one, by="timestep")
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "layer up_ft0 (fine)")
    np.testing.assert_allclose(line.get_ydata(), [2.05, 2.5])
    with pytest.raises(Exception, match="allowed: layer, timestep"):
        plot_label_stats(one, by="model")
    # with intervals in the summary, each point gets its bar, spanning exactly the interval
    one = one.assign(purity_fine_ci_low=one["purity_fine"] - 0.05, purity_fine_ci_high=one["purity_fine"] + 0.1)
    fig = plot_label_stats(one, by="layer")
    spans = sorted(tuple(np.round(seg[:, 1], 6)) for c in fig.axes[1].containers for seg in c.lines[2][0].get_segments())
    expected = sorted((round(p - 0.05, 6), round(p + 0.1, 6)) for p in one["purity_fine"])
    assert spans == expected


def test_across_models_figure_averages_layers():
    from diffatlas.sae.figures import plot_across_models

    fig = plot_across_models(_summary())
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("m2"))
    np.testing.assert_allclose(line.get_xdata(), [50, 500])
    np.testing.assert_allclose(line.get_ydata(), [0.5 + 0.05 + 0.01, 0.5 + 0.05 + 0.1])
