"""Label statistics of SAE latents and the grid summary: numpy / pandas only, no torch,
so the summary and figure commands start fast.

Rows are latents, columns a latent's top samples (their integer class ids):

* :func:`sigma_label` — Revelio's σ_label: the unbiased (ddof = 1) standard deviation of the
  class ids, as their released code computes it (``torch.std`` default). It depends on how
  classes are numbered (our ids: indices of the sorted class names).
* :func:`purity` (share of the majority label) and :func:`label_entropy` (bits): order-free,
  functions of a row's label counts (``*_of_counts``), so the same formulas serve the labels
  of every sample a latent fires on, counted while streaming.
* per dataset attribute (ShapesWorld: colour, shape, size, position) the order-free ones
  only (:data:`ORDER_FREE_STATS`): σ of arbitrary attribute codes means nothing;
* :func:`rank_latents` — Revelio's ranking: latents firing on more than ``min_active``
  samples, by mean activation when active (or max), descending; :func:`curves` — mean
  statistic over the first N ranked latents for every N;
* :func:`summary_table` — one row per trained SAE (metrics.json) of a grid, each top-latent
  statistic with its 95% bootstrap interval over latents (``{stat}_{gran}_ci_low/high``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffatlas.errors import UserError
from diffatlas.io import read_json


def sigma_label(codes: np.ndarray) -> np.ndarray:
    """Revelio's σ_label per row: unbiased std (ddof=1) of integer class ids. [m, t] -> [m]."""
    codes = np.asarray(codes, dtype=np.float64)
    if codes.shape[1] < 2:
        return np.full(codes.shape[0], np.nan)
    return codes.std(axis=1, ddof=1)


def label_counts(codes: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Per-row label counts: [m, t] integer class ids -> [m, n_classes] (default max id + 1)."""
    codes = np.asarray(codes, dtype=np.int64)
    if n_classes is None:
        n_classes = int(codes.max()) + 1 if codes.size else 1
    out = np.zeros((codes.shape[0], n_classes), dtype=np.int64)
    np.add.at(out, (np.repeat(np.arange(codes.shape[0]), codes.shape[1]), codes.ravel()), 1)
    return out


# The order-free statistics are functions of a row's label counts: the top samples' labels
# (counted by label_counts) and the labels of every sample a latent fires on (counted while
# streaming, see analysis.TopTracker) go through the same formulas.
def purity_of_counts(counts: np.ndarray) -> np.ndarray:
    """Share of the majority label per row of counts [m, C] -> [m] (NaN for an all-zero row)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, counts.max(axis=1, initial=0) / total, np.nan)


def majority_of_counts(counts: np.ndarray) -> np.ndarray:
    """Majority class id per row of counts [m, C] (lowest id on ties) -> [m]."""
    return np.asarray(counts).argmax(axis=1)


def entropy_of_counts(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of the label distribution per row of counts [m, C] -> [m]."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total > 0, counts / total, 0.0)
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return np.where(total[:, 0] > 0, terms.sum(axis=1), np.nan)


def purity(codes: np.ndarray) -> np.ndarray:
    """Share of the majority label per row (order-free). [m, t] -> [m]."""
    return purity_of_counts(label_counts(codes))


def majority(codes: np.ndarray) -> np.ndarray:
    """Majority class id per row (lowest id on ties). [m, t] -> [m]."""
    return majority_of_counts(label_counts(codes))


def label_entropy(codes: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of the labels per row (order-free). [m, t] -> [m]."""
    return entropy_of_counts(label_counts(codes))


#: Statistics that do not depend on how classes are numbered: the ones computed per dataset
#: attribute (colour, size, ...), whose class ids have no order at all.
ORDER_FREE_STATS = {"purity": purity, "entropy": label_entropy}
STATS = {"sigma_label": sigma_label, **ORDER_FREE_STATS}


def chance_draws(n: int, top_n: int, draws: int = 2000, seed: int = 0) -> np.ndarray | None:
    """``draws`` random sets of ``top_n`` of ``n`` rows, without replacement: [draws, top_n]
    (None when n < top_n). They depend on n alone, so every labelling of the same samples
    shares them (:func:`chance_stats`'s ``picks``)."""
    if n < top_n:
        return None
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(n, top_n, replace=False) for _ in range(draws)])


def chance_stats(codes: np.ndarray, top_n: int, draws: int = 2000, seed: int = 0,
                 picks: np.ndarray | None = None) -> dict[str, float]:
    """Expected statistics of ``top_n`` samples drawn at random without replacement from ``codes`` [N].

    ``picks``: the draws of :func:`chance_draws` for ``len(codes)`` (computed when not given)."""
    codes = np.asarray(codes)
    if picks is None:
        picks = chance_draws(len(codes), top_n, draws, seed)
    if picks is None:
        return {name: float("nan") for name in STATS}
    return {name: float(np.mean(fn(codes[picks]))) for name, fn in STATS.items()}


def rank_latents(score: np.ndarray, n_active: np.ndarray, min_active: int, top_n: int) -> np.ndarray:
    """Eligible latents (firing on > min_active and >= top_n samples), by score descending.

    Ties are broken by latent index, so the order is deterministic. Returns latent indices.
    """
    score = np.asarray(score, dtype=np.float64)
    n_active = np.asarray(n_active)
    eligible = np.nonzero((n_active > min_active) & (n_active >= top_n))[0]
    order = np.lexsort((eligible, -score[eligible]))
    return eligible[order]


def curves(latents: pd.DataFrame) -> pd.DataFrame:
    """Mean label statistics over the first N ranked latents, for N = 1..#eligible.

    Columns: n_top, and ``{stat}_{gran}`` for stat in sigma_label, purity, entropy and gran in
    fine, coarse. This is the paper's curve (σ averaged over top-N latents) on our ranking.
    """
    ranked = latents[latents["rank"] >= 0].sort_values("rank")
    out = {"n_top": np.arange(1, len(ranked) + 1)}
    for gran in ("fine", "coarse"):
        for name in STATS:
            col = ranked[f"{name}_{gran}"].to_numpy(dtype=np.float64)
            out[f"{name}_{gran}"] = np.cumsum(col) / out["n_top"]
    return pd.DataFrame(out)


# -- the grid summary ---------------------------------------------------------------------------
#: ``timestep`` is the training step, or a flow-matching model's scheduler timestep σ·T, with
#: ``sigma`` beside it (None for DDPM-family models, whose level is ``alpha_bar``).
SUMMARY_KEYS = ("model", "dataset", "layer", "timestep", "alpha_bar", "sigma", "samples", "d_in", "n_latents", "k", "seed")


def summary_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """Flatten one run's metrics.json into a summary-table row (per-attribute statistics as
    ``{stat}_{attribute}`` columns, like the label granularities')."""
    row = {key: metrics.get(key) for key in SUMMARY_KEYS}
    for key in ("nmse", "fve", "l0", "dead_fraction", "dense_fraction", "n_vectors"):
        row[key] = metrics.get(key)
    labels = metrics.get("labels", {})
    for key in ("rank_by", "top_n", "n_eligible", "n_top_latents", "n_classes_fine", "n_classes_coarse"):
        row[key] = labels.get(key)
    for gran in ("fine", "coarse"):
        for name in STATS:
            for prefix in ("", "chance_"):
                row[f"{prefix}{name}_{gran}"] = labels.get(f"{prefix}{name}_{gran}")
            ci = labels.get(f"{name}_{gran}_ci95") or [None, None]
            row[f"{name}_{gran}_ci_low"], row[f"{name}_{gran}_ci_high"] = ci
    for attr, stats in (labels.get("attributes") or {}).items():
        for name in ORDER_FREE_STATS:
            for prefix in ("", "chance_"):
                row[f"{prefix}{name}_{attr}"] = stats.get(f"{prefix}{name}")
            ci = stats.get(f"{name}_ci95") or [None, None]
            row[f"{name}_{attr}_ci_low"], row[f"{name}_{attr}_ci_high"] = ci
    row["train_seconds"] = metrics.get("train_seconds")
    return row


def summary_table(run_dirs: list[str]) -> pd.DataFrame:
    """One row per SAE run directory (each holding metrics.json), sorted by layer order then timestep."""
    if not run_dirs:
        raise UserError("no SAE runs given to summarise")
    rows = []
    for directory in run_dirs:
        path = Path(directory)
        path = path if path.name == "metrics.json" else path / "metrics.json"
        rows.append(summary_row(read_json(path)))
    table = pd.DataFrame(rows)
    # Keep layers in the order given (the config's order), timesteps ascending.
    layer_order = {layer: i for i, layer in enumerate(dict.fromkeys(table["layer"]))}
    table["_l"] = table["layer"].map(layer_order)
    return table.sort_values(["model", "dataset", "_l", "timestep"]).drop(columns="_l").reset_index(drop=True)
