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
  spatial samples, an image's activation is its max over positions. Equal activations are
  ranked by sample order (the earlier sample first), whatever the batches.
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
* ``purity_active_*``, ``entropy_active_*``, ``majority_active_*`` (latents table only): the
  same statistics over *every* mined sample the latent fires on, from per-latent label counts
  accumulated while streaming — a check that a latent's top-10 is not a lucky draw.
* Per dataset attribute ``a`` (ShapesWorld: colour, shape, size, position; stored with the
  activations, see :mod:`diffatlas.activations.store`) the order-free statistics, named like
  the granularities': ``top_labels_a``, ``purity_a``, ``entropy_a``, ``majority_a`` over the
  top samples and ``purity_active_a``, ``entropy_active_a``, ``majority_active_a`` over every
  mined sample the latent fires on (no σ: attribute codes have no order). metrics.json has
  their summary under ``labels.attributes.a`` (n_classes, each statistic, its ``_ci95``,
  ``_all`` and ``chance_``, and the mean ``purity_active`` / ``entropy_active``).
* Each summary statistic (the mean over the top ``top_latents`` latents) comes with a 95%
  bootstrap interval over those latents (``{stat}_{gran}_ci95``): with 100 latents or fewer a
  difference between layers can be sampling noise of which latents ranked on top.

Everything above comes from ONE pass over the samples (:func:`stream`), read whole store
chunks at a time in sample order (:class:`StoreSamples`): memory is one chunk plus
O(latents × (top_n + classes)), independent of the number of samples N, apart from a few
scalars per sample (id, labels, split: ~30 bytes).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from diffatlas.errors import UserError
from diffatlas.intervals import bootstrap_mean
from diffatlas.logs import progress
from diffatlas.sae.config import SAEConfig
from diffatlas.sae.model import TopKSAE
from diffatlas.sae.stats import (  # noqa: F401  (re-exported: the label statistics live there)
    ORDER_FREE_STATS,
    STATS,
    chance_draws,
    chance_stats,
    curves,
    entropy_of_counts,
    label_entropy,
    majority,
    majority_of_counts,
    purity,
    purity_of_counts,
    rank_latents,
    sigma_label,
)

log = logging.getLogger(__name__)

#: Vectors per read when the samples are already in memory.
CHUNK_VECTORS = 2048
#: Elements of the dense [vectors, latents] code tensor of one step (32 MB in float32): the
#: vectors encoded at once are as many as fit, at most one read chunk.
CODE_BUDGET = 1 << 23
GRANULARITIES = ("fine", "coarse")


# -- the samples, chunk by chunk --------------------------------------------------------------
class Samples(Protocol):
    """What the analysis reads: per-sample scalars, and the vectors one chunk at a time.

    ``chunks()`` yields ``(start, x)``: x [B, P, d] float32, the normalised vectors of rows
    ``start .. start + B - 1``, every row once, in order.
    """

    sample_ids: np.ndarray  # [N] dataset sample ids
    is_val: np.ndarray  # [N] validation mask
    fine: np.ndarray  # [N] class ids
    coarse: np.ndarray
    fine_classes: list[str]
    coarse_classes: list[str]
    positions: int
    d: int
    # Optional: the dataset's categorical attributes, name -> (codes [N], class names).
    # attributes: dict[str, tuple[np.ndarray, list[str]]]

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]: ...


class StoreSamples:
    """The vectors of one (layer, timestep) of an :class:`~diffatlas.activations.store.ActivationStore`,
    read whole zarr chunks (shards, if the store has them) at a time, in sample order.

    ``samples``: ``pooled`` (one vector per image) or ``spatial`` (one per position of the
    stored map, [C, h, w] -> [h·w, C]). Vectors are multiplied by ``scale`` (the SAE's
    input scale); ``is_val`` is the SAE's validation mask over the store's samples.
    """

    def __init__(self, store: Any, layer: str, timestep: int, samples: str, *, scale: float, is_val: np.ndarray) -> None:
        if samples not in ("pooled", "spatial"):
            raise UserError(f"config sae.samples = {samples!r} is not allowed; allowed: pooled, spatial")
        from diffatlas.activations.loader import store_source

        # the loader's store reader (the one that lays out [B, P, C]), read a shard at a time
        self.source = store_source(store, layer, timestep, samples)
        self.where = self.source.where
        self.d, self.positions = int(self.source.item_shape[0]), int(self.source.positions)
        grid = getattr(self.source.array, "shards", None) or self.source.array.chunks
        self.rows_per_read = int(grid[1])
        self.scale = np.float32(scale)
        self.sample_ids = np.asarray(store.sample_ids)
        self.is_val = np.asarray(is_val, dtype=bool)
        if self.is_val.shape != self.sample_ids.shape:
            raise UserError(f"{self.where}: a validation mask of {self.is_val.shape} for {len(self.sample_ids)} samples")
        self.fine = np.asarray(store.group["label_code"][:], dtype=np.int64)
        self.coarse = np.asarray(store.group["coarse_label_code"][:], dtype=np.int64)
        self.fine_classes = list(store.attrs.get("label_classes", []))
        self.coarse_classes = list(store.attrs.get("coarse_label_classes", []))
        self.attributes = store.attributes()

    def __len__(self) -> int:
        return len(self.sample_ids)

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        n, step = len(self), self.rows_per_read
        for start in range(0, n, step):
            raw = self.source.read(start, start + step)  # [B, P, C]; the last read may be short
            b = raw.shape[0]
            finite = np.isfinite(raw).reshape(b, -1).all(axis=1)
            if not finite.all():
                bad = np.nonzero(~finite)[0]
                raise UserError(
                    f"{self.where} holds NaN/Inf values in samples {self.sample_ids[start + bad[:5]].tolist()}; "
                    "re-run extraction (float16 spatial maps overflow past 65504)"
                )
            # The same arithmetic as training (float32 cast, then the float32 scale).
            yield start, raw.astype(np.float32) * self.scale


class _FromSource:
    """:class:`Samples` over ``sae.train.SAEData``: its loader ``source`` (vectors in memory, or
    the store streamed) and ``scale``. In memory: CHUNK_VECTORS vectors a read; from a store:
    whole store chunks, so each is decoded once."""

    def __init__(self, data: Any) -> None:
        from diffatlas.activations.loader import ArraySource

        self.data = data
        for name in ("sample_ids", "is_val", "fine", "coarse", "fine_classes", "coarse_classes"):
            setattr(self, name, getattr(data, name))
        self.attributes = dict(getattr(data, "attributes", None) or {})
        src = data.source
        self.positions, self.d = int(src.positions), int(src.item_shape[0])
        self.step = max(1, CHUNK_VECTORS // self.positions) if isinstance(src, ArraySource) else int(src.chunk)

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        src, scale = self.data.source, np.float32(self.data.scale)
        for start in range(0, src.n, self.step):
            yield start, src.read(start, min(start + self.step, src.n)).astype(np.float32) * scale


def label_sets(data: Samples) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Every labelling of the samples, name -> (class ids [N], class names): the granularities
    fine and coarse, then the dataset's attributes (their names never clash: see
    :func:`diffatlas.data.dataset.check_attribute_names`)."""
    out = {g: (np.asarray(getattr(data, g)), list(getattr(data, f"{g}_classes"))) for g in GRANULARITIES}
    for name, (codes, classes) in (getattr(data, "attributes", None) or {}).items():
        out[name] = (np.asarray(codes, dtype=np.int64), list(classes))
    return out


def as_samples(data: Any) -> Samples:
    """``data`` itself if it reads chunk by chunk, else a reader over its loader source (SAEData)."""
    return data if hasattr(data, "chunks") else _FromSource(data)


# -- streaming top-n per latent ----------------------------------------------------------------
_ROW_BITS = 32
_ROW_MAX = (1 << _ROW_BITS) - 1


def _sort_keys(acts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One int64 key per (latent, sample) that orders by activation descending, then row
    ascending: the float32 bit pattern (monotone for values >= 0) in the high 32 bits,
    ``ROW_MAX - row`` in the low ones. Inactive entries (activation <= 0) get −1.

    acts [B, n] float32 >= 0, rows [B] -> keys [n, B]."""
    bits = acts.T.contiguous().view(torch.int32).to(torch.int64)
    keys = (bits << _ROW_BITS) | (_ROW_MAX - rows).unsqueeze(0)
    return keys.masked_fill_(~(acts.T > 0), -1)


class TopTracker:
    """Running top-``top_n`` samples per latent over batches of samples.

    The kept state is one int64 key per (latent, slot) (:func:`_sort_keys`): comparing keys
    compares activations, and equal activations by row (the earlier row wins), so the result
    is that of a full sort by (activation desc, row asc) whatever the batch sizes and order.
    A batch is first cut to its own top_n per latent, then merged with the kept ones: memory
    is n × (top_n + B), never N. Zero (inactive) activations are never kept, so a latent that
    fires on fewer than ``top_n`` samples keeps only those (row −1 elsewhere).
    Also accumulated per latent: the samples where it fires (``n_active``), the sum and max
    of its values, and — for each label set named in ``n_classes`` — the label counts of the
    samples where it fires (``label_counts[name]`` [n, classes]).
    """

    def __init__(
        self, n_latents: int, top_n: int, device: torch.device | str = "cpu", n_classes: dict[str, int] | None = None
    ) -> None:
        self.top_n = top_n
        self.n_latents = n_latents
        self.keys = torch.full((n_latents, top_n), -1, dtype=torch.int64, device=device)
        self.n_active = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.max = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.label_counts = {
            name: torch.zeros(n_latents, c, dtype=torch.long, device=device) for name, c in (n_classes or {}).items()
        }

    @property
    def values(self) -> torch.Tensor:
        """[n, top_n] kept activations, descending; −inf in empty slots."""
        vals = (self.keys >> _ROW_BITS).to(torch.int32).view(torch.float32)
        return vals.masked_fill(self.keys < 0, float("-inf"))

    @property
    def ids(self) -> torch.Tensor:
        """[n, top_n] rows of the kept samples; −1 in empty slots."""
        return torch.where(self.keys < 0, -1, _ROW_MAX - (self.keys & _ROW_MAX))

    @torch.no_grad()
    def update(self, acts: torch.Tensor, ids: torch.Tensor, labels: dict[str, torch.Tensor] | None = None) -> None:
        """acts [B, n] non-negative activations of B samples at rows ``ids`` [B] (0 <= row < 2³²);
        ``labels``: class ids [B] per label set named at construction."""
        acts = acts.to(device=self.keys.device, dtype=torch.float32)
        rows = ids.to(self.keys)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) > _ROW_MAX):
            raise ValueError(f"TopTracker rows must lie in [0, 2^{_ROW_BITS}); got {int(rows.min())}..{int(rows.max())}")
        active = acts > 0
        self.n_active += active.sum(0)
        self.sum += acts.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, acts.amax(0).double())
        if self.label_counts:
            sample, latent = active.nonzero(as_tuple=True)
        for name, counts in self.label_counts.items():
            cls = labels[name].to(self.keys)[sample]
            counts.view(-1).index_add_(0, latent * counts.shape[1] + cls, torch.ones_like(cls))
        keys = _sort_keys(acts, rows)  # [n, B]
        if keys.shape[1] > self.top_n:
            keys = keys.topk(self.top_n, dim=1).values
        self.keys = torch.cat([self.keys, keys], dim=1).topk(self.top_n, dim=1).values

    def mean_active(self) -> torch.Tensor:
        """Mean activation over the samples where the latent fires (0 if it never does)."""
        return torch.where(self.n_active > 0, self.sum / self.n_active.clamp_min(1), torch.zeros_like(self.sum))


# -- reconstruction metrics, accumulated -------------------------------------------------------
class Reconstruction:
    """Sums for NMSE / FVE / L0 / dead / dense over batches of vectors (on the device, no
    host synchronisation per batch). FVE uses the closed form SST = Σ|x|² − N |x̄|²."""

    def __init__(self, d: int, n_latents: int, device: torch.device | str = "cpu") -> None:
        self.d, self.n_latents = d, n_latents
        self.sse = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_x = torch.zeros(d, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.nnz = torch.zeros((), dtype=torch.long, device=device)
        self.fires = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """x, x_hat [B, d]; the post-TopK code (vals, idx) [B, k]."""
        on = vals > 0
        self.sse += (x_hat - x).double().pow(2).sum()
        xd = x.double()
        self.sum_x += xd.sum(0)
        self.sum_sq += xd.pow(2).sum()
        self.nnz += on.sum()
        self.fires += torch.bincount(idx[on], minlength=self.n_latents)
        self.count += x.shape[0]

    def metrics(self, k: int, dense_threshold: float) -> dict[str, Any]:
        count = self.count
        if count == 0:
            raise UserError("no validation vectors to measure the SAE on (sae.val_fraction gives none)")
        sse = float(self.sse)
        mean = self.sum_x.cpu() / count
        sst = float(self.sum_sq) - count * float(mean.pow(2).sum())
        nmse = sse / sst if sst > 0 else float("nan")
        fires = self.fires.cpu()
        freq = fires.double() / count
        return {
            "n_vectors": count,
            "mse": sse / (count * self.d),
            "nmse": nmse,
            "fve": 1.0 - nmse,
            "l0": int(self.nnz) / count,
            "k": k,
            "dead_fraction": float((fires == 0).double().mean()),
            "dense_fraction": float((freq > dense_threshold).double().mean()),
            "dense_threshold": dense_threshold,
            "_freq": freq.numpy(),
        }


# -- the one pass -------------------------------------------------------------------------------
@torch.no_grad()
def stream(
    sae: TopKSAE,
    data: Any,
    *,
    val: np.ndarray,
    mine: np.ndarray,
    top_n: int,
    device: torch.device | str = "cpu",
) -> tuple[Reconstruction, TopTracker]:
    """One pass over the samples: reconstruction sums on the ``val`` rows, the running top-n
    and label counts on the ``mine`` rows (boolean masks [N]); each vector is encoded once.

    Sample activation = its post-TopK code (pooled) or the max over its positions (spatial).
    Tracked ids are rows of ``data`` (not dataset sample ids).
    """
    data = as_samples(data)
    device = torch.device(device)
    n = sae.arch.n_latents
    sets = label_sets(data)
    n_classes = {g: max(len(classes), int(codes.max(initial=-1)) + 1, 1) for g, (codes, classes) in sets.items()}
    rec = Reconstruction(sae.arch.d_in, n, device=device)
    tracker = TopTracker(n, top_n, device=device, n_classes=n_classes)
    p = data.positions
    per = max(1, CODE_BUDGET // (n * p))  # samples encoded at once
    n_chunks = None
    if hasattr(data, "rows_per_read"):
        n_chunks = math.ceil(len(data.sample_ids) / data.rows_per_read)
    seen = 0
    for start, x in progress(data.chunks(), desc="analyse SAE", total=n_chunks):
        if start != seen:
            raise RuntimeError(f"samples read out of order: chunk at row {start}, expected {seen}")
        seen += x.shape[0]
        for s0 in range(0, x.shape[0], per):
            rows = np.arange(start + s0, start + min(s0 + per, x.shape[0]))
            v, m = val[rows], mine[rows]
            need = v | m
            if not need.any():
                continue
            xb = torch.from_numpy(np.ascontiguousarray(x[rows[need] - start])).to(device).reshape(-1, sae.arch.d_in)
            vals, idx = sae.encode(xb)  # post-TopK (ReLU after TopK) sparse codes [b·P, k]
            v, m, rows = v[need], m[need], rows[need]
            if v.any():
                vm = torch.from_numpy(np.repeat(v, p)).to(device)
                rec.update(xb[vm], sae.decode(vals[vm], idx[vm]), vals[vm], idx[vm])
            if m.any():
                z = torch.zeros(xb.shape[0], n, dtype=vals.dtype, device=device).scatter_(1, idx, vals)
                z = z.view(len(rows), p, n).amax(1)  # [b, n] per sample
                mm = torch.from_numpy(m).to(device)
                labels = {g: torch.from_numpy(codes[rows[m]]).to(device) for g, (codes, _) in sets.items()}
                tracker.update(z[mm], torch.from_numpy(rows[m]).to(device), labels)
    if seen != len(data.sample_ids):
        raise RuntimeError(f"read {seen} of {len(data.sample_ids)} samples")
    return rec, tracker


@torch.no_grad()
def reconstruction_metrics(
    sae: TopKSAE, data, rows: np.ndarray, dense_threshold: float = 0.1, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """NMSE, FVE, L0, dead and dense fractions of the SAE on the vectors of samples ``rows``."""
    data = as_samples(data)
    mask = np.zeros(len(data.sample_ids), bool)
    mask[rows] = True
    rec, _ = stream(sae, data, val=mask, mine=np.zeros_like(mask), top_n=1, device=device)
    return rec.metrics(sae.k, dense_threshold)


@torch.no_grad()
def mine_top(sae: TopKSAE, data, rows: np.ndarray, top_n: int, device: torch.device | str = "cpu") -> TopTracker:
    """Each latent's top-``top_n`` samples among ``rows`` (see :func:`stream`)."""
    data = as_samples(data)
    mask = np.zeros(len(data.sample_ids), bool)
    mask[rows] = True
    return stream(sae, data, val=np.zeros_like(mask), mine=mask, top_n=top_n, device=device)[1]


def _names(classes: list[str], codes: np.ndarray) -> list[str]:
    return [classes[c] if c < len(classes) else str(c) for c in codes]


def _row_names(classes: list[str], codes: np.ndarray, kept: np.ndarray) -> list[list[str]]:
    """Per row of codes [m, t], the names of its first ``kept[i]`` codes (one table lookup, then
    a slice per row: the labelled top samples are a prefix of each row)."""
    lookup = np.asarray(list(classes) + [str(c) for c in range(len(classes), int(codes.max(initial=0)) + 1)], dtype=object)
    named = lookup[np.clip(codes, 0, None)]
    return [row[:k].tolist() for row, k in zip(named, kept)]


def label_table(tracker: TopTracker, data, cfg: SAEConfig, n_mined: int, val_freq: np.ndarray | None = None) -> pd.DataFrame:
    """One row per latent: activity statistics, top samples, their labels and label statistics."""
    n = tracker.n_latents
    ids = tracker.ids.cpu().numpy()
    vals = tracker.values.cpu().numpy()
    n_active = tracker.n_active.cpu().numpy()
    mean_act = tracker.mean_active().cpu().numpy()
    max_act = tracker.max.cpu().numpy()
    score = mean_act if cfg.rank_by == "mean" else max_act
    order = rank_latents(score, n_active, cfg.min_active, cfg.top_n)
    rank = np.full(n, -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    full = (ids >= 0).all(axis=1)
    kept = (ids >= 0).sum(axis=1)  # tracked samples fill a prefix of each row
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
    for gran, (codes, classes) in label_sets(data).items():
        # σ for the granularities (Revelio's statistic); attributes get the order-free ones only.
        stats = STATS if gran in GRANULARITIES else ORDER_FREE_STATS
        top_codes = np.where(ids >= 0, codes[np.clip(ids, 0, None)], -1)
        table[f"top_labels_{gran}"] = _row_names(classes, top_codes, kept)
        for name, fn in stats.items():
            col = np.full(n, np.nan)
            if full.any():
                col[full] = fn(top_codes[full])
            table[f"{name}_{gran}"] = col
        maj = np.full(n, "", dtype=object)
        if full.any():
            maj[full] = _names(classes, majority(top_codes[full]))
        table[f"majority_{gran}"] = maj
        # Over every mined sample the latent fires on (counted while streaming).
        counts = tracker.label_counts[gran].cpu().numpy()
        fired = counts.sum(axis=1) > 0
        table[f"purity_active_{gran}"] = purity_of_counts(counts)
        table[f"entropy_active_{gran}"] = entropy_of_counts(counts)
        table[f"majority_active_{gran}"] = np.where(fired, np.asarray(_names(classes, majority_of_counts(counts)), dtype=object), "")
    return pd.DataFrame(table)


def mine_mask(is_val: np.ndarray, mine_on: str) -> np.ndarray:
    """Samples searched for top activations (``sae.mine_on``): all, validation or train."""
    if mine_on == "all":
        return np.ones_like(is_val, dtype=bool)
    if mine_on == "validation":
        return np.asarray(is_val, dtype=bool).copy()
    return ~np.asarray(is_val, dtype=bool)


def analyse(sae: TopKSAE, data, cfg: SAEConfig, device: torch.device | str = "cpu") -> tuple[dict[str, Any], pd.DataFrame]:
    """Every metric of one SAE in one pass over ``data`` (:class:`StoreSamples`, or anything
    :func:`as_samples` takes): (metrics dict for metrics.json, per-latent table for latents.parquet)."""
    sae.eval()
    data = as_samples(data)
    mine = mine_mask(data.is_val, cfg.mine_on)
    t0 = time.perf_counter()
    acc, tracker = stream(sae, data, val=data.is_val, mine=mine, top_n=cfg.top_n, device=device)
    seconds = time.perf_counter() - t0
    rec = acc.metrics(sae.k, cfg.dense_threshold)
    val_freq = rec.pop("_freq")
    n_mined = int(mine.sum())
    latents = label_table(tracker, data, cfg, n_mined, val_freq=val_freq)
    cur = curves(latents)
    n_eligible = len(cur)
    n_top = min(cfg.top_latents, n_eligible)
    labels: dict[str, Any] = {
        "rank_by": cfg.rank_by,
        "min_active": cfg.min_active,
        "top_n": cfg.top_n,
        "mine_on": cfg.mine_on,
        "n_mined": n_mined,
        "n_eligible": n_eligible,
        "n_top_latents": n_top,
    }
    # One set of random draws for every labelling (the draws depend on the sample count alone).
    picks = chance_draws(n_mined, cfg.top_n, seed=cfg.seed)
    for gran in GRANULARITIES:
        codes = getattr(data, gran)
        labels[f"n_classes_{gran}"] = int(len(np.unique(codes)))
        chance = chance_stats(codes[mine], cfg.top_n, seed=cfg.seed, picks=picks)
        for name in STATS:
            key = f"{name}_{gran}"
            labels[key] = float(cur[key].iloc[n_top - 1]) if n_top > 0 else float("nan")
            top = latents.loc[(latents["rank"] >= 0) & (latents["rank"] < n_top), key]
            labels[f"{key}_ci95"] = bootstrap_mean(top.to_numpy(dtype=np.float64), seed=cfg.seed)
            labels[f"{key}_all"] = float(latents.loc[latents["eligible"], key].mean()) if n_eligible else float("nan")
            labels[f"chance_{key}"] = chance[name]
    top_rows = (latents["rank"] >= 0) & (latents["rank"] < n_top)
    labels["attributes"] = {}
    for attr, (codes, classes) in label_sets(data).items():
        if attr in GRANULARITIES:
            continue
        chance = chance_stats(codes[mine], cfg.top_n, seed=cfg.seed, picks=picks)
        summary: dict[str, Any] = {"n_classes": int(len(np.unique(codes))), "classes": list(classes)}
        for name in ORDER_FREE_STATS:
            key = f"{name}_{attr}"
            top = latents.loc[top_rows, key].to_numpy(dtype=np.float64)
            # The mean over the first n_top ranked latents: the curves' value at n_top.
            summary[name] = float(top.mean()) if n_top > 0 else float("nan")
            summary[f"{name}_ci95"] = bootstrap_mean(top, seed=cfg.seed)
            summary[f"{name}_all"] = float(latents.loc[latents["eligible"], key].mean()) if n_eligible else float("nan")
            summary[f"chance_{name}"] = chance[name]
            active = latents.loc[top_rows, f"{name}_active_{attr}"].to_numpy(dtype=np.float64)
            summary[f"{name}_active"] = float(np.nanmean(active)) if n_top > 0 and np.isfinite(active).any() else float("nan")
        labels["attributes"][attr] = summary
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
        "analysis": {
            "passes": 1,
            "samples": len(data.sample_ids),
            "rows_per_read": getattr(data, "rows_per_read", None),
            "seconds": seconds,
            "samples_per_second": len(data.sample_ids) / seconds if seconds > 0 else float("nan"),
        },
    }
    log.info(
        "val nmse %.4f fve %.4f l0 %.2f dead %.3f dense %.3f; purity fine %.3f coarse %.3f (chance %.3f / %.3f)",
        rec["nmse"], rec["fve"], rec["l0"], rec["dead_fraction"], rec["dense_fraction"],
        labels["purity_fine"], labels["purity_coarse"], labels["chance_purity_fine"], labels["chance_purity_coarse"],
    )
    return metrics, latents


def analyse_saved(
    sae_dir: str | os.PathLike,
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    *,
    layer: str | None = None,
    timestep: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Analyse the SAE saved in ``sae_dir`` on a store, streaming; write ``metrics.json`` and
    ``latents.parquet`` into ``out_dir`` (atomically). Settings: the SAE's recorded ``sae``
    config, then ``overrides``; the input scale and split are the SAE's own."""
    from pathlib import Path

    from diffatlas.activations.store import ActivationStore
    from diffatlas.io import atomic_dir, write_json
    from diffatlas.sae.train import split_samples

    sae, meta = TopKSAE.load(sae_dir, device=device)
    cfg = SAEConfig.from_dict({**meta.get("sae_config", {}), **(overrides or {})})
    layer = layer or meta.get("layer")
    timestep = int(timestep if timestep is not None else meta.get("timestep"))
    split = meta.get("split", {})
    if "input_scale" not in meta or "seed" not in split or "val_fraction" not in split:
        raise UserError(f"{Path(sae_dir) / 'cfg.json'} lacks input_scale or split (seed, val_fraction); re-train the SAE")
    store = ActivationStore(store_path)
    samples = StoreSamples(
        store, layer, timestep, cfg.samples, scale=float(meta["input_scale"]),
        is_val=split_samples(len(store), float(split["val_fraction"]), int(split["seed"])),
    )
    if samples.d != sae.arch.d_in:
        raise UserError(f"{samples.where} has {samples.d} channels; the SAE in {sae_dir} reads {sae.arch.d_in}")
    metrics, latents = analyse(sae, samples, cfg, device=device)
    provenance = {k: meta.get(k) for k in ("model", "dataset", "module_path", "pooling", "prompt", "conditioning", "noise")}
    metrics = {
        **provenance, "store": str(store.path), "layer": layer, **store.time_record(timestep),
        "samples": cfg.samples, "seed": cfg.seed,
        "sae": str(sae_dir), **metrics,
    }
    with atomic_dir(out_dir) as tmp:
        write_json(Path(tmp) / "metrics.json", metrics)
        latents.to_parquet(Path(tmp) / "latents.parquet", index=False)
    return metrics
