"""Training a TopK SAE on one (layer, timestep) of an activation store.

Pipeline (:func:`run`): split the store's samples *by sample* (image) into train / validation
with a seed (no data read) → one streamed pass over the layer checks for NaN/Inf and measures
the input scale (mean squared norm d on the training split; recorded) → initialise ``b_pre``
at the geometric median of a training sample → Adam with linear warm-up, unit-norm decoder
with projected gradients and AuxK on dead latents, batches from the streaming loader
(:mod:`diffatlas.activations.loader`) → stop on a plateau of validation FVE or at the step cap
→ metrics and latent meaning (:mod:`diffatlas.sae.analysis`) → ``sae.safetensors``,
``cfg.json``, ``metrics.json``, ``curve.csv``, ``latents.parquet`` written atomically.

The training loop never waits on the host: dead-latent counters live on the device, and the
losses, validation FVE and dead fraction leave it once every ``eval_every`` steps.

Samples: ``pooled`` takes one vector per image (the store's pooled array); ``spatial`` takes
one vector per position of the stored spatial map (all positions of an image fall in the same
split, and latent meaning is judged per image by the max over positions).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffatlas.activations.loader import ArraySource, LastChunk, ShuffleLoader, Source, cache_if_fits, read_items, read_rows, scan, store_source
from diffatlas.activations.store import POOLED, ActivationStore
from diffatlas.errors import UserError
from diffatlas.logs import progress
from diffatlas.optim import Adam  # noqa: F401  (re-exported for tests)
from diffatlas.sae.config import SAEArch, SAEConfig
from diffatlas.sae.model import TopKSAE, geometric_median

log = logging.getLogger(__name__)

CURVE = "curve.csv"
CURVE_COLUMNS = ("step", "lr", "train_loss", "train_mse", "train_aux", "val_fve", "dead_fraction")


@dataclass
class SAEData:
    """Vectors of one (layer, timestep) grouped by sample, read on demand.

    x: the raw activations, an array [N, P, d] (P = 1 for pooled, h·w for spatial) or a loader
    :class:`~diffatlas.activations.loader.Source` of the store (never the whole layer in memory).
    sample_ids: [N] dataset sample ids; is_val: [N] validation mask.
    scale: multiply raw vectors by this so that the mean squared norm on train is d.
    fine / coarse: [N] int class codes; fine_classes / coarse_classes: their names.
    attributes: the dataset's categorical attributes, name -> (codes [N], class names).
    """

    x: np.ndarray | Source
    sample_ids: np.ndarray
    is_val: np.ndarray
    scale: float
    fine: np.ndarray
    coarse: np.ndarray
    fine_classes: list[str]
    coarse_classes: list[str]
    source: Source = field(init=False, repr=False)
    attributes: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.x, ArraySource) or not isinstance(self.x, Source):
            self.source = self.x if isinstance(self.x, Source) else ArraySource(np.asarray(self.x))
        else:  # streamed: passes that read a few samples at a time decode each chunk once
            self.source = LastChunk(self.x)

    @property
    def d(self) -> int:
        return int(self.source.item_shape[0])

    @property
    def positions(self) -> int:
        return int(self.source.positions)

    def vectors(self, rows: np.ndarray, keep_dtype: bool = False) -> np.ndarray:
        """Normalised vectors of the samples ``rows``: [len(rows)·P, d], float32 (chunk-aware read).

        ``keep_dtype`` keeps the storage dtype (float16 spatial maps).
        """
        raw = read_rows(self.source, np.asarray(rows, dtype=np.int64))
        out = raw.reshape(-1, self.d).astype(np.float32) * np.float32(self.scale)
        return out.astype(self.source.dtype) if keep_dtype else out


def split_samples(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Validation mask [n] over samples: round(val_fraction·n) of them (at least 1), chosen by seed."""
    if n < 2:
        raise UserError(f"an SAE needs at least 2 samples (one for training, one for validation); the store has {n}")
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:n_val]] = True
    return mask


def input_scale(sum_sq: float, count: int, d: int) -> float:
    """Scale s with mean |s·v|² = d over ``count`` vectors whose squared norms sum to ``sum_sq``."""
    if not sum_sq > 0:
        raise UserError("the training activations are all zero; an SAE cannot be trained on them")
    return math.sqrt(d * count / sum_sq)


def prepare(store: ActivationStore, layer: str, timestep: int, cfg: SAEConfig) -> SAEData:
    """Split, check and measure the data of one SAE in one streamed pass (nothing kept but a
    cached copy when the layer's vectors fit in ``cfg.shuffle_buffer``)."""
    source = cache_if_fits(store_source(store, layer, timestep, cfg.samples), cfg.shuffle_buffer)
    is_val = split_samples(source.n, cfg.val_fraction, cfg.seed)
    train_rows = np.nonzero(~is_val)[0]
    n_train = len(train_rows) * source.positions
    if n_train < cfg.batch_size:
        raise UserError(
            f"config sae.batch_size = {cfg.batch_size} is larger than the {n_train} training vectors of "
            f"{store.path} (layer {layer!r}, timestep {timestep}, {cfg.samples}); lower sae.batch_size or sae.val_fraction"
        )
    moments = scan(source, train_rows)
    if len(moments.nonfinite_rows):
        bad = moments.nonfinite_rows
        ids = store.sample_ids[bad[:5]].tolist()
        raise UserError(
            f"{store.path}: layer {layer!r} at timestep {timestep} ({cfg.samples}) holds {moments.n_nonfinite} NaN/Inf values in "
            f"{len(bad)} samples (first sample ids: {ids}); re-run extraction (float16 spatial maps overflow past 65504)"
        )
    fine_codes = np.asarray(store.group["label_code"][:], dtype=np.int64)
    coarse_codes = np.asarray(store.group["coarse_label_code"][:], dtype=np.int64)
    return SAEData(
        x=source,
        sample_ids=np.asarray(store.sample_ids),
        is_val=is_val,
        scale=input_scale(moments.sum_sq, moments.count, source.item_shape[0]),
        fine=fine_codes,
        coarse=coarse_codes,
        fine_classes=list(store.attrs.get("label_classes", [])),
        coarse_classes=list(store.attrs.get("coarse_label_classes", [])),
        attributes=store.attributes(),
    )


def warmup_lr(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up: lr · (step + 1) / warmup for the first ``warmup`` steps, then lr."""
    return lr if warmup <= 0 else lr * min(1.0, (step + 1) / warmup)


def total_steps(cfg: SAEConfig, n_train: int) -> int:
    """The step cap: ``epochs`` passes over the n_train training vectors, else ``steps``."""
    return cfg.epochs * (n_train // cfg.batch_size) if cfg.epochs is not None else cfg.steps


def sae_at_median(sample: torch.Tensor, arch: SAEArch, cfg: SAEConfig) -> TopKSAE:
    """A fresh SAE: random unit-norm atoms, encoder = decoder transpose, b_enc = 0, and
    b_pre = geometric median of the training vectors ``sample`` [m, d]."""
    sae = TopKSAE(arch, seed=cfg.seed)
    with torch.no_grad():
        sae.b_pre.copy_(geometric_median(sample.float()).to(sae.b_pre))
    return sae


def init_sae(x_train: torch.Tensor, arch: SAEArch, cfg: SAEConfig, gen: torch.Generator | None = None) -> TopKSAE:
    """:func:`sae_at_median` of ``cfg.init_sample`` rows of x_train [M, d] drawn with ``gen``
    (``randperm(M)[:init_sample]``, as the streamed trainer draws them)."""
    gen = gen if gen is not None else torch.Generator().manual_seed(cfg.seed)
    rows = torch.randperm(x_train.shape[0], generator=gen)[: cfg.init_sample]
    return sae_at_median(x_train[rows], arch, cfg)


class Trainer:
    """One optimisation step of the recipe, reused by :func:`fit` and the benchmarks.

    A step: loss (MSE + AuxK on latents silent for more than ``dead_steps`` steps) →
    backward → remove the gradient component parallel to each atom → Adam → renormalise atoms
    → update the steps-since-fired counters. Nothing in a step waits for the device: the
    counters are updated with tensor ops. AuxK is skipped while no latent *can* be dead, which
    the host knows without looking at the counters: they grow by at most one per step, so after
    :meth:`refresh` with their maximum m (read at a metrics check), none exceeds ``dead_steps``
    for the next ``dead_steps − m`` steps. Past that horizon AuxK runs masked (a no-op, exactly,
    when nothing is dead).
    """

    def __init__(self, sae: TopKSAE, cfg: SAEConfig) -> None:
        self.sae = sae
        self.cfg = cfg
        self.opt = Adam(list(sae.parameters()))
        self.since_fired = torch.zeros(sae.arch.n_latents, dtype=torch.long, device=sae.W_dec.device)
        self.steps_done = 0
        self.safe_until = cfg.dead_steps  # no latent can be dead while steps_done <= safe_until

    def refresh(self, max_since_fired: int) -> None:
        """Move the no-dead-latent horizon, given the counters' current maximum (a host int)."""
        self.safe_until = self.steps_done + self.cfg.dead_steps - int(max_since_fired)

    def dead(self) -> torch.Tensor:
        """[n] bool: latents silent for more than ``dead_steps`` steps."""
        return self.since_fired > self.cfg.dead_steps

    def step(self, xb: torch.Tensor, lr: float) -> dict[str, Any]:
        sae = self.sae
        dead = self.dead() if self.steps_done > self.safe_until else None
        loss, parts = sae.loss(xb, dead, self.cfg.aux_coef)
        self.opt.zero_grad()
        loss.backward()
        sae.project_decoder_grad_()
        self.opt.step(lr)
        sae.normalize_decoder_()
        out = parts["out"]
        with torch.no_grad():
            hits = torch.zeros(sae.arch.n_latents, dtype=out.vals.dtype, device=out.vals.device)
            hits.index_add_(0, out.idx.reshape(-1), (out.vals > 0).reshape(-1).to(hits.dtype))
            self.since_fired = torch.where(hits > 0, torch.zeros_like(self.since_fired), self.since_fired + 1)
        self.steps_done += 1
        return parts


@torch.no_grad()
def fve(sae: TopKSAE, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """Fraction of variance explained, 1 − Σ|x − x̂|² / Σ|x − x̄|², on x [M, d] (a device scalar)."""
    sse = x.new_zeros((), dtype=torch.float64)
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch]
        sse += (sae(xb).x_hat - xb).double().pow(2).sum()
    xd = x.double()
    sst = (xd - xd.mean(0)).pow(2).sum()
    return 1.0 - sse / sst.clamp_min(torch.finfo(torch.float64).tiny)


@dataclass
class FitResult:
    """What :func:`fit` did: the curve (one row per check), why it stopped, and its steps."""

    curve: list[dict[str, float]]
    steps: int
    cap: int
    converged: bool
    best_val_fve: float | None
    best_step: int | None
    seconds: float

    def summary(self, cfg: SAEConfig) -> dict[str, Any]:
        return {
            "converged": self.converged,
            "stopped": "plateau" if self.converged else "cap",
            "steps_run": self.steps,
            "step_cap": self.cap,
            "best_val_fve": self.best_val_fve,
            "best_val_fve_step": self.best_step,
            "plateau_rule": {"eval_every": cfg.eval_every, "patience": cfg.patience, "min_delta": cfg.min_delta,
                             "eval_vectors": cfg.eval_vectors},
        }


def fit(
    sae: TopKSAE,
    batches: Iterable[torch.Tensor],
    cfg: SAEConfig,
    n_steps: int,
    x_val: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> FitResult:
    """Train ``sae`` (on ``device``) on ``batches`` (float32 [B, d], any device) for at most
    ``n_steps`` steps; with ``x_val`` [M, d] (on ``device``), stop once validation FVE has not
    risen by ``cfg.min_delta`` for ``cfg.patience`` checks (every ``cfg.eval_every`` steps).

    Losses add up on the device; the one host synchronisation is at each check.
    """
    device = torch.device(device)
    trainer = Trainer(sae, cfg)
    curve: list[dict[str, float]] = []
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # mse, aux since the last check
    since, best, best_step, stale, converged, step = 0, -math.inf, None, 0, False, 0
    start = time.perf_counter()
    it: Iterator[torch.Tensor] = iter(batches)
    bar = progress(range(n_steps), desc="train SAE", total=n_steps)
    for step in bar:
        xb = next(it)
        xb = xb.to(device, torch.float32, non_blocking=True)
        lr = warmup_lr(step, cfg.lr, cfg.warmup)
        parts = trainer.step(xb, lr)
        sums += torch.stack([parts["mse"], parts["aux"]]).double()
        since += 1
        last = step == n_steps - 1
        if (step + 1) % cfg.eval_every and not last:
            continue
        val = fve(sae, x_val) if x_val is not None else sums.new_full((), float("nan"))
        dead = trainer.dead().double().mean()
        max_since = trainer.since_fired.max().double()
        mse, aux, val_fve, dead_frac, max_since = torch.cat(
            [sums / since, val.reshape(1), dead.reshape(1), max_since.reshape(1)]
        ).tolist()  # the one sync
        trainer.refresh(int(max_since))
        rec = {"step": step + 1, "lr": lr, "train_loss": mse + cfg.aux_coef * aux, "train_mse": mse, "train_aux": aux,
               "val_fve": val_fve, "dead_fraction": dead_frac}
        curve.append(rec)
        sums.zero_()
        since = 0
        log.info("step %d/%d mse %.4f aux %.4f val fve %.4f dead %.3f", step + 1, n_steps, mse, aux, val_fve, dead_frac)
        if x_val is None:
            continue
        if val_fve > best + cfg.min_delta:
            best, best_step, stale = val_fve, step + 1, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                converged = True
                log.info("validation FVE plateaued (best %.4f at step %d); stopping at step %d", best, best_step, step + 1)
                break
    steps = curve[-1]["step"] if curve else 0
    seconds = time.perf_counter() - start
    converged = converged and x_val is not None
    log.info("trained %d steps in %.1fs (%s)", steps, seconds, "plateau" if converged else "step cap")
    sae.eval()
    best_val = None if best == -math.inf else best
    return FitResult(curve, int(steps), int(n_steps), bool(converged), best_val, best_step, seconds)


def train_on_source(
    source: Source,
    rows: np.ndarray,
    arch: SAEArch,
    cfg: SAEConfig,
    *,
    scale: float = 1.0,
    val_rows: np.ndarray | None = None,
    device: torch.device | str = "cpu",
) -> tuple[TopKSAE, FitResult]:
    """Train an SAE on the vectors of samples ``rows`` of ``source`` (× ``scale``), streamed.

    The generator seeded with ``cfg.seed`` first draws the b_pre sample (``randperm(M)[:init_sample]``
    over the M training vectors in row order) and then belongs to the loader — the same draws
    as :func:`init_sae` and an in-memory epoch loop, so data that fits trains identically.
    ``val_rows``: samples whose vectors (a seeded sample of ``cfg.eval_vectors``) drive the plateau rule.
    """
    device = torch.device(device)
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    m = len(rows) * source.positions
    if m < cfg.batch_size:
        raise UserError(f"config sae.batch_size = {cfg.batch_size} is larger than the {m} training vectors")
    gen = torch.Generator().manual_seed(cfg.seed)
    init_items = torch.randperm(m, generator=gen)[: cfg.init_sample].numpy()
    sample = torch.from_numpy(read_items(source, init_items, rows).astype(np.float32) * np.float32(scale))
    sae = sae_at_median(sample, arch, cfg).to(device)
    x_val = None
    if val_rows is not None and len(val_rows):
        val_rows = np.sort(np.asarray(val_rows, dtype=np.int64))
        n_val = len(val_rows) * source.positions
        pick = np.sort(np.random.default_rng(cfg.seed).permutation(n_val)[: cfg.eval_vectors])
        x_val = torch.from_numpy(read_items(source, pick, val_rows).astype(np.float32) * np.float32(scale)).to(device)
    with ShuffleLoader(source, rows, cfg.batch_size, gen, buffer=cfg.shuffle_buffer, scale=scale,
                       pin_memory=device.type == "cuda") as loader:
        result = fit(sae, (b.x for b in loader), cfg, total_steps(cfg, m), x_val, device)
    return sae, result


def train_sae(
    x_train: torch.Tensor,
    arch: SAEArch,
    cfg: SAEConfig,
    device: torch.device | str = "cpu",
    x_val: torch.Tensor | None = None,
) -> tuple[TopKSAE, FitResult]:
    """Train a TopK SAE on normalised vectors x_train [M, d] held in memory (through the same
    loader as a store; ``x_val`` [V, d] turns on the plateau rule). Returns the model (on
    ``device``) and the :class:`FitResult` (its ``curve`` is the training history)."""
    train = ArraySource(x_train.detach().cpu().numpy()[:, None, :])
    val_rows = None
    if x_val is not None:
        joined = np.concatenate([train.x, x_val.detach().cpu().numpy().astype(train.x.dtype)[:, None, :]])
        train = ArraySource(joined)
        val_rows = np.arange(x_train.shape[0], joined.shape[0])
    return train_on_source(train, np.arange(x_train.shape[0]), arch, cfg, val_rows=val_rows, device=device)


def write_curve(path: Path, curve: list[dict[str, float]]) -> None:
    """The training curve as CSV: one row per check (step, lr, train losses, val FVE, dead fraction)."""
    import pandas as pd

    pd.DataFrame(curve, columns=list(CURVE_COLUMNS)).to_csv(path, index=False)


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
    store.t_index(timestep)  # a time the store lacks: UserError naming the stored times
    # Check the architecture against the layer's channel count before reading any data.
    arch = cfg.arch(int(store.group[POOLED.format(layer)].shape[2]), layer)
    data = prepare(store, layer, timestep, cfg)
    train_rows = np.nonzero(~data.is_val)[0]
    log.info(
        "SAE %s t=%d: %d train / %d val samples × %d positions, d=%d, n=%d, k=%d, scale %.4g, %s",
        layer, timestep, len(train_rows), int(data.is_val.sum()), data.positions, arch.d_in, arch.n_latents, arch.k, data.scale,
        "in memory" if isinstance(data.x, ArraySource) else "streamed",
    )
    t0 = time.perf_counter()
    sae, fitted = train_on_source(
        data.x, train_rows, arch, cfg, scale=data.scale, val_rows=np.nonzero(data.is_val)[0], device=device
    )
    train_seconds = time.perf_counter() - t0  # initialisation and loader start included

    metrics, latents = analysis.analyse(sae, data, cfg, device=device)
    attrs = store.attrs
    provenance = {
        "model": model or attrs.get("model_name") or attrs.get("model") or attrs.get("model_id"),
        "dataset": dataset or attrs.get("dataset_name") or attrs.get("dataset"),
        "store": str(store.path),
        "layer": layer,
        "module_path": attrs.get("layers", {}).get(layer),
        **store.time_record(timestep),  # timestep, ᾱ_t or σ (flow matching), the noising rule
        "samples": cfg.samples,
        "pooling": attrs.get("pooling"),
        "prompt": attrs.get("prompt"),
        "conditioning": attrs.get("conditioning"),
        "noise": attrs.get("noise"),
        "seed": cfg.seed,
    }
    metrics = {**provenance, **metrics, "train_seconds": train_seconds, "training": fitted.summary(cfg), "history": fitted.curve}
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
                "store_attrs": {k: v for k, v in attrs.items() if k not in ("label_classes", "coarse_label_classes", "attribute_classes")},
                "sae_config": cfg.to_dict(),
            },
        )
        write_json(Path(tmp) / "metrics.json", metrics)
        write_curve(Path(tmp) / CURVE, fitted.curve)
        latents.to_parquet(Path(tmp) / "latents.parquet", index=False)
    return metrics
