"""Training a TopK SAE on one (layer, timestep) of an activation store.

Pipeline (:func:`run`): read the vectors of the layer at the timestep from the store →
split *by sample* (image) into train / validation with a seed → scale inputs so the mean
squared norm on the training split is d (the scale is recorded) → initialise ``b_pre`` at
the geometric median of a training sample → Adam with linear warm-up, unit-norm decoder with
projected gradients and AuxK on dead latents → metrics and latent meaning
(:mod:`diffatlas.sae.analysis`) → ``sae.safetensors``, ``cfg.json``, ``metrics.json``,
``latents.parquet`` written atomically into the output directory.

Samples: ``pooled`` takes one vector per image (the store's pooled array); ``spatial`` takes
one vector per position of the stored spatial map (all positions of an image fall in the same
split, and latent meaning is judged per image by the max over positions).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffatlas.activations.store import POOLED, ActivationStore
from diffatlas.errors import UserError
from diffatlas.logs import progress
from diffatlas.optim import Adam
from diffatlas.sae.config import SAEArch, SAEConfig
from diffatlas.sae.model import TopKSAE, geometric_median

log = logging.getLogger(__name__)


@dataclass
class SAEData:
    """Vectors of one (layer, timestep) grouped by sample.

    x: [N, P, d] raw activations (P = 1 for pooled, h·w for spatial; float32 or float16).
    sample_ids: [N] dataset sample ids; is_val: [N] validation mask.
    scale: multiply raw vectors by this so that the mean squared norm on train is d.
    fine / coarse: [N] int class codes; fine_classes / coarse_classes: their names.
    """

    x: np.ndarray
    sample_ids: np.ndarray
    is_val: np.ndarray
    scale: float
    fine: np.ndarray
    coarse: np.ndarray
    fine_classes: list[str]
    coarse_classes: list[str]

    @property
    def d(self) -> int:
        return int(self.x.shape[2])

    @property
    def positions(self) -> int:
        return int(self.x.shape[1])

    def vectors(self, rows: np.ndarray, keep_dtype: bool = False) -> np.ndarray:
        """Normalised vectors of the samples ``rows``: [len(rows)·P, d], float32.

        ``keep_dtype`` keeps the storage dtype (float16 spatial maps): half the memory for a
        training set that is converted to float32 one batch at a time.
        """
        out = self.x[rows].reshape(-1, self.d).astype(np.float32) * np.float32(self.scale)
        return out.astype(self.x.dtype) if keep_dtype else out


def split_samples(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Validation mask [n] over samples: round(val_fraction·n) of them (at least 1), chosen by seed."""
    if n < 2:
        raise UserError(f"an SAE needs at least 2 samples (one for training, one for validation); the store has {n}")
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:n_val]] = True
    return mask


def load_samples(store: ActivationStore, layer: str, timestep: int, samples: str) -> np.ndarray:
    """Raw vectors [N, P, d] of ``layer`` at ``timestep``; refuses NaN/Inf naming where they are."""
    if samples == "pooled":
        x = store.pooled(layer, timestep)[:, None, :]
    elif samples == "spatial":
        maps = store.spatial(layer, timestep)  # [N, C, h, w] float16
        n, c = maps.shape[:2]
        x = np.ascontiguousarray(maps.reshape(n, c, -1).transpose(0, 2, 1))
    else:
        raise UserError(f"config sae.samples = {samples!r} is not allowed; allowed: pooled, spatial")
    finite = np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
    if not finite.all():
        bad = np.nonzero(~finite)[0]
        ids = store.sample_ids[bad[:5]].tolist()
        n_bad = int((~np.isfinite(x)).sum())
        raise UserError(
            f"{store.path}: layer {layer!r} at timestep {timestep} ({samples}) holds {n_bad} NaN/Inf values in "
            f"{len(bad)} samples (first sample ids: {ids}); re-run extraction (float16 spatial maps overflow past 65504)"
        )
    return x


def input_scale(x: np.ndarray, rows: np.ndarray, chunk: int = 1024) -> float:
    """Scale s with mean |s·v|² = d over the vectors v of samples ``rows`` of x [N, P, d].

    Accumulated in float64 over chunks of samples, so no float64 copy of the data is made.
    """
    total, count = 0.0, 0
    for start in range(0, len(rows), chunk):
        block = x[rows[start : start + chunk]].reshape(-1, x.shape[2]).astype(np.float64)
        total += float(np.einsum("ij,ij->", block, block))
        count += block.shape[0]
    if not total > 0:
        raise UserError("the training activations are all zero; an SAE cannot be trained on them")
    return math.sqrt(x.shape[2] * count / total)


def prepare(store: ActivationStore, layer: str, timestep: int, cfg: SAEConfig) -> SAEData:
    """Read, check, split and measure the data of one SAE."""
    x = load_samples(store, layer, timestep, cfg.samples)
    is_val = split_samples(x.shape[0], cfg.val_fraction, cfg.seed)
    train_rows = np.nonzero(~is_val)[0]
    n_train = len(train_rows) * x.shape[1]
    if n_train < cfg.batch_size:
        raise UserError(
            f"config sae.batch_size = {cfg.batch_size} is larger than the {n_train} training vectors of "
            f"{store.path} (layer {layer!r}, timestep {timestep}, {cfg.samples}); lower sae.batch_size or sae.val_fraction"
        )
    fine_codes = np.asarray(store.group["label_code"][:], dtype=np.int64)
    coarse_codes = np.asarray(store.group["coarse_label_code"][:], dtype=np.int64)
    return SAEData(
        x=x,
        sample_ids=np.asarray(store.sample_ids),
        is_val=is_val,
        scale=input_scale(x, train_rows),
        fine=fine_codes,
        coarse=coarse_codes,
        fine_classes=list(store.attrs.get("label_classes", [])),
        coarse_classes=list(store.attrs.get("coarse_label_classes", [])),
    )


def warmup_lr(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up: lr · (step + 1) / warmup for the first ``warmup`` steps, then lr."""
    return lr if warmup <= 0 else lr * min(1.0, (step + 1) / warmup)


def total_steps(cfg: SAEConfig, n_train: int) -> int:
    return cfg.epochs * (n_train // cfg.batch_size) if cfg.epochs is not None else cfg.steps


def init_sae(x_train: torch.Tensor, arch: SAEArch, cfg: SAEConfig, gen: torch.Generator | None = None) -> TopKSAE:
    """A fresh SAE: random unit-norm atoms, encoder = decoder transpose, b_enc = 0, and
    b_pre = geometric median of ``cfg.init_sample`` training vectors drawn with ``gen``."""
    gen = gen if gen is not None else torch.Generator().manual_seed(cfg.seed)
    sae = TopKSAE(arch, seed=cfg.seed)
    rows = torch.randperm(x_train.shape[0], generator=gen)[: cfg.init_sample]
    with torch.no_grad():
        sae.b_pre.copy_(geometric_median(x_train[rows].float()).to(sae.b_pre))
    return sae


class Trainer:
    """One optimisation step of the recipe, reused by :func:`train_sae` and the benchmark.

    A step: loss (MSE + AuxK on latents silent for more than ``dead_steps`` steps) →
    backward → remove the gradient component parallel to each atom → Adam → renormalise atoms
    → update the steps-since-fired counters.
    """

    def __init__(self, sae: TopKSAE, cfg: SAEConfig) -> None:
        self.sae = sae
        self.cfg = cfg
        self.opt = Adam(list(sae.parameters()))
        self.since_fired = torch.zeros(sae.arch.n_latents, dtype=torch.long, device=sae.W_dec.device)

    def step(self, xb: torch.Tensor, lr: float) -> dict[str, Any]:
        sae = self.sae
        dead = self.since_fired > self.cfg.dead_steps
        loss, parts = sae.loss(xb, dead, self.cfg.aux_coef)
        self.opt.zero_grad()
        loss.backward()
        sae.project_decoder_grad_()
        self.opt.step(lr)
        sae.normalize_decoder_()
        out = parts["out"]
        with torch.no_grad():
            fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
            fired[out.idx[out.vals > 0]] = True
            self.since_fired += 1
            self.since_fired[fired] = 0
        return parts


def train_sae(
    x_train: torch.Tensor,
    arch: SAEArch,
    cfg: SAEConfig,
    device: torch.device | str = "cpu",
    log_every: int = 100,
) -> tuple[TopKSAE, list[dict[str, float]]]:
    """Train a TopK SAE on normalised vectors x_train [M, d] (kept on CPU, batches moved).

    Batches are drawn without replacement from a seeded permutation, reshuffled every epoch
    (the last incomplete batch of an epoch is dropped). Returns the model (on ``device``) and
    a short history (step, lr, mse, aux, n_dead).
    """
    device = torch.device(device)
    m = x_train.shape[0]
    if m < cfg.batch_size:
        raise UserError(f"config sae.batch_size = {cfg.batch_size} is larger than the {m} training vectors")
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = init_sae(x_train, arch, cfg, gen).to(device)
    trainer = Trainer(sae, cfg)
    n_steps = total_steps(cfg, m)
    per_epoch = m // cfg.batch_size
    history: list[dict[str, float]] = []
    perm = torch.randperm(m, generator=gen)
    start = time.perf_counter()
    for step in progress(range(n_steps), desc="train SAE", total=n_steps):
        j = step % per_epoch
        if j == 0 and step > 0:
            perm = torch.randperm(m, generator=gen)
        xb = x_train[perm[j * cfg.batch_size : (j + 1) * cfg.batch_size]].to(device, torch.float32, non_blocking=True)
        lr = warmup_lr(step, cfg.lr, cfg.warmup)
        parts = trainer.step(xb, lr)
        if step % log_every == 0 or step == n_steps - 1:
            rec = {"step": step, "lr": lr, "mse": float(parts["mse"]), "aux": float(parts["aux"]), "n_dead": parts["n_dead"]}
            history.append(rec)
            log.info("step %d/%d mse %.4f aux %.4f dead %d", step, n_steps, rec["mse"], rec["aux"], rec["n_dead"])
    log.info("trained %d steps on %d vectors in %.1fs", n_steps, m, time.perf_counter() - start)
    sae.eval()
    return sae, history


def run(
    store_path: str | os.PathLike,
    layer: str,
    timestep: int,
    cfg: SAEConfig,
    out_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    model: str | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Train, analyse and write one SAE; returns the metrics dict."""
    from diffatlas.io import atomic_dir, write_json
    from diffatlas.sae import analysis

    store = ActivationStore(store_path)
    if layer not in store.layers:
        raise UserError(f"layer {layer!r} is not in {store.path}; stored layers: {', '.join(store.layers)}")
    t_index = store.t_index(timestep)
    # Check the architecture against the layer's channel count before reading any data.
    arch = cfg.arch(int(store.group[POOLED.format(layer)].shape[2]), layer)
    data = prepare(store, layer, timestep, cfg)
    train_rows = np.nonzero(~data.is_val)[0]
    x_train = torch.from_numpy(data.vectors(train_rows, keep_dtype=True))
    log.info(
        "SAE %s t=%d: %d train / %d val samples × %d positions, d=%d, n=%d, k=%d, scale %.4g",
        layer, timestep, len(train_rows), int(data.is_val.sum()), data.positions, arch.d_in, arch.n_latents, arch.k, data.scale,
    )
    t0 = time.perf_counter()
    sae, history = train_sae(x_train, arch, cfg, device=device)
    train_seconds = time.perf_counter() - t0

    metrics, latents = analysis.analyse(sae, data, cfg, device=device)
    attrs = store.attrs
    provenance = {
        "model": model or attrs.get("model_name") or attrs.get("model") or attrs.get("model_id"),
        "dataset": dataset or attrs.get("dataset_name") or attrs.get("dataset"),
        "store": str(store.path),
        "layer": layer,
        "module_path": attrs.get("layers", {}).get(layer),
        "timestep": int(timestep),
        "alpha_bar": float(store.alpha_bar[t_index]),
        "samples": cfg.samples,
        "pooling": attrs.get("pooling"),
        "prompt": attrs.get("prompt"),
        "conditioning": attrs.get("conditioning"),
        "noise": attrs.get("noise"),
        "seed": cfg.seed,
    }
    metrics = {**provenance, **metrics, "train_seconds": train_seconds, "history": history}
    with atomic_dir(out_dir) as tmp:
        sae.save(
            tmp,
            {
                **provenance,
                "input_scale": data.scale,
                "input_scale_note": "the SAE sees raw activations × input_scale (mean squared norm d on the training split)",
                "split": {
                    "by": "sample",
                    "seed": cfg.seed,
                    "val_fraction": cfg.val_fraction,
                    "n_train": int((~data.is_val).sum()),
                    "n_val": int(data.is_val.sum()),
                    "function": "diffatlas.sae.train.split_samples(n_samples, val_fraction, seed)",
                },
                "store_attrs": {k: v for k, v in attrs.items() if k not in ("label_classes", "coarse_label_classes")},
                "sae_config": cfg.to_dict(),
            },
        )
        write_json(Path(tmp) / "metrics.json", metrics)
        latents.to_parquet(Path(tmp) / "latents.parquet", index=False)
    return metrics
