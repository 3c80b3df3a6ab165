"""What a trained SAE does and what its latents mean — always on post-TopK codes.

Reconstruction metrics (validation split, one vector per SAE input — an image for pooled
samples, a position for spatial ones):

* ``nmse``: Σ|x − x̂|² / Σ|x − x̄|², x̄ the validation mean — the error relative to always
  predicting the mean (Gao et al.'s "normalised MSE"); ``fve`` = 1 − nmse, the fraction of
  variance explained. Both are invariant to the input scale.
* ``l0``: mean number of non-zero post-TopK codes per vector (k unless some of the top k are ≤ 0).
* ``dead_fraction``: share of latents that never fire on validation vectors.
* ``dense_fraction``: share of latents that fire on more than ``dense_threshold`` (default
  10 %) of validation vectors. With k of n latents firing, the average firing rate is k/n
  (6.25 % for k=32, n=512), so a latent above 10 % fires more than any "specialised" latent
  should on a balanced dataset.

Meaning of latents (on the samples of ``mine_on``; Revelio used the whole dataset):

* per latent, the ``top_n`` (10) samples with the highest activation, found by streaming over
  batches with a running top-n per latent (:class:`TopTracker`; never an N × n tensor). For
  spatial samples, an image's activation is its max over positions.
* ``sigma_label`` exactly as Revelio computes it (their released code, ``save_feature.py``):
  the *unbiased* standard deviation (ddof = 1) of the integer class ids of a latent's top-10
  samples; latents are ranked by their mean activation over the samples where they fire,
  among latents firing on more than 10 samples; the curve is the mean σ over the first N
  ranked latents. Our class ids are the indices of the *sorted* class names in the store, so
  σ is comparable in kind, not in value, with the paper's dataset-specific numbering.
  Differences, on purpose: statistics use post-TopK codes (the released code mines
  ReLU(pre-TopK) values), and the curve stops at the last eligible latent instead of padding
  with latents that have fewer than 10 active samples.
* Because σ of class ids changes when classes are renumbered, two order-free statistics:
  ``purity`` (share of the majority label among the top samples) and ``entropy`` (Shannon
  entropy of the labels, bits). Both for fine and coarse labels. ``chance_*`` gives the
  expected value for ``top_n`` samples drawn at random (no replacement), the floor to beat.
* Each summary statistic (the mean over the top ``top_latents`` latents) comes with a 95%
  bootstrap interval over those latents (``{stat}_{gran}_ci95``): with 100 latents or fewer a
  difference between layers can be sampling noise of which latents ranked on top.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch

from diffatlas.intervals import bootstrap_mean
from diffatlas.sae.config import SAEConfig
from diffatlas.sae.model import TopKSAE
from diffatlas.sae.stats import (  # noqa: F401  (re-exported: the label statistics live there)
    STATS,
    chance_stats,
    curves,
    label_entropy,
    majority,
    purity,
    rank_latents,
    sigma_label,
)

log = logging.getLogger(__name__)

#: Vectors encoded per chunk while streaming (bounds the [chunk, n] code tensor).
CHUNK_VECTORS = 2048


# -- streaming top-n per latent ----------------------------------------------------------------
class TopTracker:
    """Running top-``top_n`` activations per latent over batches of samples.

    Memory is n × (top_n + batch): each update concatenates the batch's activations with the
    kept ones and keeps the largest. Zero (inactive) activations are never kept, so a latent
    that fires on fewer than ``top_n`` samples keeps only those (id −1 elsewhere).
    Also counts, per latent, the samples where it fires, and the sum and max of its values.
    """

    def __init__(self, n_latents: int, top_n: int, device: torch.device | str = "cpu") -> None:
        self.top_n = top_n
        self.values = torch.full((n_latents, top_n), float("-inf"), device=device)
        self.ids = torch.full((n_latents, top_n), -1, dtype=torch.long, device=device)
        self.n_active = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.max = torch.zeros(n_latents, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, acts: torch.Tensor, ids: torch.Tensor) -> None:
        """acts [B, n] non-negative activations of B samples with ids [B]."""
        acts = acts.to(self.values)
        active = acts > 0
        self.n_active += active.sum(0)
        self.sum += acts.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, acts.amax(0).double())
        cand = acts.masked_fill(~active, float("-inf")).T  # [n, B]
        all_vals = torch.cat([self.values, cand], dim=1)
        all_ids = torch.cat([self.ids, ids.to(self.ids).expand(acts.shape[1], -1)], dim=1)
        k = min(self.top_n, all_vals.shape[1])
        vals, pos = all_vals.topk(k, dim=1)
        self.values = vals
        self.ids = all_ids.gather(1, pos)
        self.ids[~torch.isfinite(self.values)] = -1

    def mean_active(self) -> torch.Tensor:
        """Mean activation over the samples where the latent fires (0 if it never does)."""
        return torch.where(self.n_active > 0, self.sum / self.n_active.clamp_min(1), torch.zeros_like(self.sum))


def _chunks(rows: np.ndarray, positions: int) -> Iterator[np.ndarray]:
    per = max(1, CHUNK_VECTORS // positions)
    for start in range(0, len(rows), per):
        yield rows[start : start + per]


@torch.no_grad()
def reconstruction_metrics(
    sae: TopKSAE, data, rows: np.ndarray, dense_threshold: float = 0.1, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """NMSE, FVE, L0, dead and dense fractions of the SAE on the vectors of samples ``rows``."""
    n = sae.arch.n_latents
    sse = 0.0
    sum_x = torch.zeros(sae.arch.d_in, dtype=torch.float64)
    sum_sq = 0.0
    nnz = 0
    count = 0
    fires = torch.zeros(n, dtype=torch.long)
    for chunk in _chunks(rows, data.positions):
        x = torch.from_numpy(data.vectors(chunk)).to(device)
        vals, idx = sae.encode(x)  # post-TopK (ReLU after TopK) sparse codes [B, k]
        x_hat = sae.decode(vals, idx)
        on = vals > 0
        sse += float((x_hat - x).double().pow(2).sum())
        sum_x += x.double().sum(0).cpu()
        sum_sq += float(x.double().pow(2).sum())
        nnz += int(on.sum())
        fires += torch.bincount(idx[on], minlength=n).cpu()
        count += x.shape[0]
    mean = sum_x / count
    sst = sum_sq - count * float(mean.pow(2).sum())
    nmse = sse / sst if sst > 0 else float("nan")
    freq = fires.double() / count
    return {
        "n_vectors": count,
        "mse": sse / (count * sae.arch.d_in),
        "nmse": nmse,
        "fve": 1.0 - nmse,
        "l0": nnz / count,
        "k": sae.k,
        "dead_fraction": float((fires == 0).double().mean()),
        "dense_fraction": float((freq > dense_threshold).double().mean()),
        "dense_threshold": dense_threshold,
        "_freq": freq.numpy(),
    }


@torch.no_grad()
def mine_top(sae: TopKSAE, data, rows: np.ndarray, top_n: int, device: torch.device | str = "cpu") -> TopTracker:
    """Stream the samples ``rows`` through the SAE, keeping each latent's top-``top_n`` samples.

    Sample activation = its post-TopK code (pooled) or the max over its positions (spatial).
    Tracked ids are row indices into ``data`` (not dataset sample ids).
    """
    tracker = TopTracker(sae.arch.n_latents, top_n, device=device)
    p = data.positions
    for chunk in _chunks(rows, p):
        x = torch.from_numpy(data.vectors(chunk)).to(device)
        z = sae.codes(x).view(len(chunk), p, -1).amax(1)  # [B, n] per sample
        tracker.update(z, torch.from_numpy(chunk).to(device))
    return tracker


def label_table(tracker: TopTracker, data, cfg: SAEConfig, val_freq: np.ndarray | None = None) -> pd.DataFrame:
    """One row per latent: activity statistics, top samples, their labels and label statistics."""
    n = tracker.values.shape[0]
    ids = tracker.ids.cpu().numpy()
    vals = tracker.values.cpu().numpy()
    n_active = tracker.n_active.cpu().numpy()
    mean_act = tracker.mean_active().cpu().numpy()
    max_act = tracker.max.cpu().numpy()
    n_mined = int(_mine_rows(data, cfg).size)
    score = mean_act if cfg.rank_by == "mean" else max_act
    order = rank_latents(score, n_active, cfg.min_active, cfg.top_n)
    rank = np.full(n, -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    full = (ids >= 0).all(axis=1)
    table = {
        "latent": np.arange(n),
        "rank": rank,
        "eligible": rank >= 0,
        "n_active": n_active,
        "freq": n_active / max(1, n_mined),
        "mean_act": mean_act,
        "max_act": max_act,
        "val_freq": val_freq if val_freq is not None else np.full(n, np.nan),
        "top_sample_ids": [data.sample_ids[r[r >= 0]].tolist() for r in ids],
        "top_values": [v[np.isfinite(v)].tolist() for v in vals],
    }
    for gran, codes, classes in (("fine", data.fine, data.fine_classes), ("coarse", data.coarse, data.coarse_classes)):
        top_codes = np.where(ids >= 0, codes[np.clip(ids, 0, None)], -1)
        table[f"top_labels_{gran}"] = [[classes[c] if c < len(classes) else str(c) for c in r[r >= 0]] for r in top_codes]
        for name, fn in STATS.items():
            col = np.full(n, np.nan)
            if full.any():
                col[full] = fn(top_codes[full])
            table[f"{name}_{gran}"] = col
        maj = np.full(n, "", dtype=object)
        if full.any():
            maj[full] = [classes[c] if c < len(classes) else str(c) for c in majority(top_codes[full])]
        table[f"majority_{gran}"] = maj
    return pd.DataFrame(table)


def _mine_rows(data, cfg: SAEConfig) -> np.ndarray:
    if cfg.mine_on == "all":
        return np.arange(len(data.sample_ids))
    if cfg.mine_on == "validation":
        return np.nonzero(data.is_val)[0]
    return np.nonzero(~data.is_val)[0]


def analyse(sae: TopKSAE, data, cfg: SAEConfig, device: torch.device | str = "cpu") -> tuple[dict[str, Any], pd.DataFrame]:
    """Every metric of one SAE: (metrics dict for metrics.json, per-latent table for latents.parquet)."""
    sae.eval()
    val_rows = np.nonzero(data.is_val)[0]
    rec = reconstruction_metrics(sae, data, val_rows, cfg.dense_threshold, device=device)
    val_freq = rec.pop("_freq")
    mine_rows = _mine_rows(data, cfg)
    tracker = mine_top(sae, data, mine_rows, cfg.top_n, device=device)
    latents = label_table(tracker, data, cfg, val_freq=val_freq)
    cur = curves(latents)
    n_eligible = len(cur)
    n_top = min(cfg.top_latents, n_eligible)
    labels: dict[str, Any] = {
        "rank_by": cfg.rank_by,
        "min_active": cfg.min_active,
        "top_n": cfg.top_n,
        "mine_on": cfg.mine_on,
        "n_mined": int(len(mine_rows)),
        "n_eligible": n_eligible,
        "n_top_latents": n_top,
    }
    for gran, codes in (("fine", data.fine), ("coarse", data.coarse)):
        labels[f"n_classes_{gran}"] = int(len(np.unique(codes)))
        chance = chance_stats(codes[mine_rows], cfg.top_n, seed=cfg.seed)
        for name in STATS:
            key = f"{name}_{gran}"
            labels[key] = float(cur[key].iloc[n_top - 1]) if n_top > 0 else float("nan")
            top = latents.loc[(latents["rank"] >= 0) & (latents["rank"] < n_top), key]
            labels[f"{key}_ci95"] = bootstrap_mean(top.to_numpy(dtype=np.float64), seed=cfg.seed)
            labels[f"{key}_all"] = float(latents.loc[latents["eligible"], key].mean()) if n_eligible else float("nan")
            labels[f"chance_{key}"] = chance[name]
    # The paper's grid of N (every 100 latents), for a like-for-like curve.
    paper_n = [n for n in range(100, n_eligible + 1, 100)]
    labels["sigma_label_curve_fine"] = {str(n): float(cur["sigma_label_fine"].iloc[n - 1]) for n in paper_n}
    metrics = {
        "d_in": sae.arch.d_in,
        "n_latents": sae.arch.n_latents,
        "k_aux": sae.arch.k_aux,
        # Reconstruction metrics sit at the top level; all are on the validation split.
        "metrics_on": "validation split; post-TopK codes",
        **rec,
        "labels": labels,
    }
    log.info(
        "val nmse %.4f fve %.4f l0 %.2f dead %.3f dense %.3f; purity fine %.3f coarse %.3f (chance %.3f / %.3f)",
        rec["nmse"], rec["fve"], rec["l0"], rec["dead_fraction"], rec["dense_fraction"],
        labels["purity_fine"], labels["purity_coarse"], labels["chance_purity_fine"], labels["chance_purity_coarse"],
    )
    return metrics, latents
