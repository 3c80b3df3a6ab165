"""One Diff-C job: a (layer, timestep) of an activation store -> classifiers, probes, metrics.

For each requested label granularity (coarse, fine) the job trains a Diff-C classifier on
the stored spatial maps and a logistic-regression probe on the pooled features, on the same
stratified train / validation / test split, and writes to ``out_dir``::

    metrics.json        accuracy (with its 95% Wilson interval over the test samples and,
                        with ``seeds`` > 1, every seed's accuracy and their spread), macro-F1,
                        per-class accuracy, confusion matrix, warnings, per granularity and
                        method, plus model, layer, timestep, ᾱ_t, seed, prompt, pooling and
                        the split sizes
    diffc.safetensors   Diff-C weights per granularity (architecture + classes in metadata)
    probe.safetensors   probe weights per granularity (no pickle)
    predictions.csv     sample_id, split, granularity, true, diffc, probe (class names)

The directory appears only when every file is complete (``atomic_dir``).

Reading: through the streaming loader (:mod:`diffatlas.activations.loader`), in whole zarr
chunks. When the layer's maps fit in ``diffc.shuffle_buffer`` samples they are read once into
memory (float16) and every pass reads from there; otherwise every pass streams from the store,
and training batches come from a seeded shuffle buffer of that many samples. Minibatches are
converted to float32 and moved to the training device on the fly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from diffatlas.activations.loader import ShuffleLoader, Source, cache_if_fits, iter_batches, scan, store_source
from diffatlas.activations.store import ActivationStore
from diffatlas.diffc.config import DiffCConfig
from diffatlas.diffc.metrics import check_classes, classification_metrics
from diffatlas.diffc.model import DiffC, DiffCArch, save_diffc
from diffatlas.diffc.probe import fit_probe, probe_predict, save_probes
from diffatlas.diffc.split import Split, stratified_split
from diffatlas.errors import UserError
from diffatlas.intervals import spread
from diffatlas.io import atomic_dir, pick_device, write_json
from diffatlas.optim import Adam

log = logging.getLogger(__name__)

# Forward-only passes (prediction, BatchNorm recalibration) use larger batches: no gradients to hold.
EVAL_BATCH = 256

# Store attributes that are bookkeeping of the store itself, not of the extraction.
_STORE_ONLY_ATTRS = {"label_classes", "coarse_label_classes", "attribute_classes", "layers", "spatial_layers"}


@dataclass
class JobTimings:
    """Wall-clock seconds of the parts of a job (logged and used by bench/, not in metrics)."""

    read_s: float = 0.0  # store -> memory (spatial maps, pooled features, labels)
    diffc_s: float = 0.0  # Diff-C training and prediction, all granularities
    probe_s: float = 0.0  # probe fitting and prediction
    write_s: float = 0.0
    train_samples: int = 0  # samples seen by Diff-C optimiser steps, all granularities

    @property
    def compute_s(self) -> float:
        return self.diffc_s + self.probe_s


@dataclass
class JobResult:
    metrics: dict[str, Any]
    timings: JobTimings = field(default_factory=JobTimings)


def load_spatial_maps(store: ActivationStore, layer: str, timestep: int, buffer: int) -> Source:
    """The maps of ``layer`` at ``timestep`` as a loader source of items [C, H, W] (float16):
    read into memory once when the N samples fit in ``buffer``, else streamed from the store.

    One chunk-ordered pass checks every map for NaN/Inf. Raises :class:`UserError` when the
    layer was extracted without spatial maps.
    """
    if not store.has_spatial(layer):
        with_maps = store.attrs.get("spatial_layers", [])
        raise UserError(
            f"layer {layer!r} in {store.path} was extracted without spatial maps, which Diff-C needs; "
            f"layers with maps: {', '.join(with_maps) or 'none'}. Set extract.spatial: true (or drop the layer "
            "from diffc.layers) and re-run extract"
        )
    source = cache_if_fits(store_source(store, layer, timestep, "maps"), buffer)
    bad = scan(source, np.zeros(0, np.int64)).nonfinite_rows
    if len(bad):
        raise UserError(
            f"layer {layer!r} at timestep {timestep} in {store.path} has non-finite values in {len(bad)} sample(s) "
            "(float16 overflow during extraction?); re-extract with a smaller spatial cap or check the model"
        )
    return source


def _maps(source: Source, rows: np.ndarray, batch: int) -> Iterator[torch.Tensor]:
    """float32 maps [B, C, H, W] of ``rows`` in order, ``batch`` at a time (prefetched)."""
    for _, x in iter_batches(source, rows, batch):
        yield x.squeeze(1)


def channel_stats(maps: Source, rows: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [C] over ``rows`` of ``maps`` (float64 sums)."""
    c = maps.item_shape[0]
    # sums on the host, where the loader's batches are; the caller moves the result to the device
    s1 = torch.zeros(c, dtype=torch.float64, device="cpu")
    s2 = torch.zeros(c, dtype=torch.float64, device="cpu")
    count = 0
    for x in _maps(maps, rows, batch):
        x = x.double()
        s1 += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s1 / count
    var = torch.clamp(s2 / count - mean * mean, min=0.0)
    return mean.float(), var.sqrt().float()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def recalibrate_batchnorm(model: DiffC, maps: Source, rows: np.ndarray, batch_size: int) -> None:
    """Set every BatchNorm's running statistics to exact averages over ``rows`` under the current weights.

    With few steps per epoch and a high learning rate, the default running averages mix
    statistics of several stale weight versions, and eval-mode accuracy swings from epoch to
    epoch; one extra forward pass over the training rows removes that.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    device = _device_of(model)
    for x in _maps(maps, rows, batch_size):
        model(x.to(device, non_blocking=True))
    for m, mom in zip(norms, saved):
        m.momentum = mom
    model.eval()


@torch.no_grad()
def predict(model: DiffC, maps: Source, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Class indices [len(rows)] predicted by ``model`` (eval mode) for ``rows`` of ``maps``."""
    model.eval()
    device = _device_of(model)
    out = [model(x.to(device, non_blocking=True)).argmax(dim=1) for x in _maps(maps, rows, batch_size)]
    return torch.cat(out).cpu().numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def train_diffc(
    maps: Source,
    y: np.ndarray,
    split: Split,
    n_classes: int,
    cfg: DiffCConfig,
    device: torch.device | str = "cpu",
) -> tuple[DiffC, dict[str, Any], int]:
    """Train one Diff-C on ``maps`` (a loader source of [C, H, W] maps) with labels ``y`` [N] on ``device``.

    Batches come from the streaming loader over ``split.train``, shuffled per epoch with a
    generator seeded by ``cfg.seed`` (a batch of one left over at an epoch's end is skipped:
    BatchNorm needs two). Returns the model (best validation epoch with early stopping, else
    the last epoch), its training history and the number of samples seen by optimiser steps.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    c, h, w = maps.item_shape
    model = DiffC(DiffCArch(c, h, w, n_classes, cfg.n_convs, cfg.feature_dim, cfg.dropout)).to(device)
    model.set_input_stats(*(t.to(device) for t in channel_stats(maps, split.train)))
    opt = Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=False)
    loss_fn = nn.CrossEntropyLoss()
    y_all = torch.as_tensor(y, dtype=torch.long)
    history: dict[str, list[float]] = {"loss": [], "val_accuracy": []}  # val_accuracy: with early stopping
    best_acc, best_epoch, best_state, stale, seen = -1.0, 0, None, 0, 0
    total, batches = torch.zeros((), device=device), 0

    loader = ShuffleLoader(maps, split.train, cfg.batch_size, gen, buffer=cfg.shuffle_buffer, drop_last=False,
                           min_batch=2, epochs=cfg.epochs, pin_memory=device.type == "cuda")
    with loader:
        model.train()
        for batch in loader:
            logits = model(batch.x.to(device, non_blocking=True))
            loss = loss_fn(logits, y_all[batch.rows].to(device, non_blocking=True))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach()
            batches += 1
            seen += len(batch.rows)
            if not batch.last:
                continue
            epoch = batch.epoch
            history["loss"].append(float(total) / max(batches, 1))  # one host sync per epoch
            total, batches = torch.zeros((), device=device), 0
            # Validation every epoch only when it decides something (early stopping): it costs a
            # BatchNorm recalibration pass plus a prediction pass, about a third of an epoch.
            if cfg.early_stopping:
                recalibrate_batchnorm(model, maps, split.train, EVAL_BATCH)
                acc = float((predict(model, maps, split.val, EVAL_BATCH) == y[split.val]).mean())
                history["val_accuracy"].append(acc)
                if acc > best_acc:
                    best_acc, best_epoch, stale = acc, epoch + 1, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    stale += 1
                if stale >= cfg.patience:
                    log.info("early stopping after epoch %d (best validation accuracy %.3f at epoch %d)", epoch + 1, best_acc, best_epoch)
                    break
            log.debug("epoch %d loss %.4f", epoch + 1, history["loss"][-1])
            model.train()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        recalibrate_batchnorm(model, maps, split.train, EVAL_BATCH)
    info = {
        "epochs_run": len(history["loss"]),
        "best_epoch": best_epoch if cfg.early_stopping else len(history["loss"]),
        "history": history,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "map_before_pooling": list(model.out_size),
    }
    return model.eval(), info, seen


def _label_codes(store: ActivationStore, granularity: str) -> tuple[np.ndarray, list[str]]:
    names = np.asarray(store.labels(granularity)).astype(str)
    classes, codes = np.unique(names, return_inverse=True)
    classes = [str(c) for c in classes]
    check_classes(classes, f"{store.path}: {granularity} labels")
    return codes.astype(np.int64), classes


def _majority_baseline(y: np.ndarray, split: Split, n_classes: int) -> float:
    """Test accuracy of always predicting the most frequent training class."""
    majority = int(np.argmax(np.bincount(y[split.train], minlength=n_classes)))
    return float((y[split.test] == majority).mean())


def _repeat_seeds(
    maps: Source, pooled: np.ndarray, y: np.ndarray, strata: list[np.ndarray], n_classes: int,
    cfg: DiffCConfig, timings: JobTimings, device: torch.device,
) -> dict[str, list[dict[str, Any]]]:
    """Test accuracy of Diff-C and the probe retrained with seeds ``seed + 1 .. seed + seeds - 1``.

    Each run draws its own split, initialisation and batch order, so the spread over runs shows
    how much of a difference between layers the training itself can make. Weights are not kept.
    """
    out: dict[str, list[dict[str, Any]]] = {"diffc": [], "probe": []}
    for seed in range(cfg.seed + 1, cfg.seed + cfg.seeds):
        run_cfg = dataclasses.replace(cfg, seed=seed)
        split = stratified_split(strata, cfg.val_fraction, cfg.test_fraction, seed)
        t0 = time.perf_counter()
        model, _, seen = train_diffc(maps, y, split, n_classes, run_cfg, device)
        d_pred = predict(model, maps, split.test, EVAL_BATCH)
        timings.diffc_s += time.perf_counter() - t0
        timings.train_samples += seen
        t0 = time.perf_counter()
        probe = fit_probe(pooled, y, split.train, cfg.probe_c, cfg.probe_max_iter, seed)
        p_pred = probe_predict(probe, pooled[split.test])
        timings.probe_s += time.perf_counter() - t0
        for method, pred in (("diffc", d_pred), ("probe", p_pred)):
            out[method].append({"seed": seed, "accuracy": float((pred == y[split.test]).mean()), "n_test": len(split.test)})
        log.info("seed %d: Diff-C %.3f, probe %.3f", seed, out["diffc"][-1]["accuracy"], out["probe"][-1]["accuracy"])
    return out


def run_diffc_job(
    store_path: str | Path,
    layer: str,
    timestep: int,
    out_dir: str | Path,
    cfg: DiffCConfig | None = None,
    device: str = "auto",
    model_name: str | None = None,
    dataset_name: str | None = None,
) -> JobResult:
    """Train Diff-C and the probe for one (layer, timestep) of a store; write ``out_dir``."""
    cfg = cfg or DiffCConfig()
    dev = pick_device(device)
    timings = JobTimings()
    store = ActivationStore(store_path)
    store.t_index(timestep)  # a time the store lacks: UserError naming the stored times
    if layer not in store.layers:
        raise UserError(f"layer {layer!r} is not in {store.path}; stored layers: {', '.join(store.layers)}")

    labels = {g: _label_codes(store, g) for g in cfg.granularities}
    strata = [labels[g][0] for g in cfg.granularities]
    split = stratified_split(strata, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    if len(split.test) == 0 or len(split.train) < 2:
        raise UserError(
            f"{store.path} has {len(store)} samples: too few for a train/test split "
            f"(diffc.test_fraction = {cfg.test_fraction}); extract more samples"
        )

    t0 = time.perf_counter()
    maps = load_spatial_maps(store, layer, timestep, cfg.shuffle_buffer)
    pooled = store.pooled(layer, timestep)
    if not np.isfinite(pooled).all():
        raise UserError(f"layer {layer!r} at timestep {timestep} in {store.path} has non-finite pooled features; check the extraction")
    timings.read_s = time.perf_counter() - t0
    n, (c, h, w) = maps.n, maps.item_shape
    log.info(
        "%s t=%d: %d samples, maps %dx%dx%d, split %d/%d/%d, device %s, read %.2fs",
        layer, timestep, n, c, h, w, len(split.train), len(split.val), len(split.test), dev, timings.read_s,
    )

    results: dict[str, Any] = {}
    all_warnings: list[str] = []
    models: dict[str, DiffC] = {}
    probes = {}
    classes = {g: labels[g][1] for g in cfg.granularities}
    pred_rows = []
    assignment = split.assignment(n)
    for gran in cfg.granularities:
        y, names = labels[gran]
        where = f"{store.path}: layer {layer}, t={timestep}, {gran}"

        t0 = time.perf_counter()
        model, info, seen = train_diffc(maps, y, split, len(names), cfg, dev)
        d_pred = predict(model, maps, np.arange(n), EVAL_BATCH)
        timings.diffc_s += time.perf_counter() - t0
        timings.train_samples += seen

        t0 = time.perf_counter()
        probe = fit_probe(pooled, y, split.train, cfg.probe_c, cfg.probe_max_iter, cfg.seed)
        p_pred = probe_predict(probe, pooled)
        timings.probe_s += time.perf_counter() - t0

        entry: dict[str, Any] = {"classes": names, "majority_baseline": _majority_baseline(y, split, len(names))}
        repeats = _repeat_seeds(maps, pooled, y, strata, len(names), cfg, timings, dev)
        for method, pred, extra in (("diffc", d_pred, info), ("probe", p_pred, {"n_iter": probe.n_iter})):
            m = classification_metrics(y[split.test], pred[split.test], names, where=f"{where}, {method}")
            runs = [{"seed": cfg.seed, "accuracy": m["accuracy"], "n_test": m["n_test"]}] + repeats[method]
            m["seeds"] = {"runs": runs, **spread([r["accuracy"] for r in runs])}
            m["train_accuracy"] = float((pred[split.train] == y[split.train]).mean())
            m["val_accuracy"] = float((pred[split.val] == y[split.val]).mean()) if len(split.val) else None
            if method == "probe":
                m["warnings"] += probe.warnings
            m.update(extra)
            entry[method] = m
            all_warnings += [f"{gran}/{method}: {x}" for x in m["warnings"]]
        results[gran] = entry
        models[gran], probes[gran] = model, probe
        pred_rows.append(
            pd.DataFrame(
                {
                    "sample_id": store.sample_ids,
                    "split": assignment,
                    "granularity": gran,
                    "true": np.asarray(names, dtype=object)[y],
                    "diffc": np.asarray(names, dtype=object)[d_pred],
                    "probe": np.asarray(names, dtype=object)[p_pred],
                }
            )
        )
        log.info(
            "%s t=%d %s: Diff-C %.3f, probe %.3f (chance %.3f, majority %.3f)",
            layer, timestep, gran, entry["diffc"]["accuracy"], entry["probe"]["accuracy"],
            1 / len(names), entry["majority_baseline"],
        )

    extraction = {k: v for k, v in store.attrs.items() if k not in _STORE_ONLY_ATTRS}
    metrics = {
        "model": model_name or extraction.get("model_id") or extraction.get("model"),
        "dataset": dataset_name or extraction.get("dataset"),
        "layer": layer,
        "module_path": store.attrs.get("layers", {}).get(layer),
        **store.time_record(timestep),  # timestep, ᾱ_t or σ (flow matching), the noising rule
        "seed": cfg.seed,
        "prompt": extraction.get("prompt"),
        "pooling": extraction.get("pooling"),
        "store": str(store.path),
        "input": {"n_samples": n, "channels": c, "height": h, "width": w},
        "split": {
            "seed": cfg.seed,
            "stratified_by": list(cfg.granularities),
            "n_train": len(split.train),
            "n_val": len(split.val),
            "n_test": len(split.test),
        },
        "config": cfg.to_dict(),
        "results": results,
        "warnings": all_warnings,
        "extraction": extraction,
    }
    meta = {
        "format": "diffatlas.diffc/1",
        "model": str(metrics["model"]),
        "dataset": str(metrics["dataset"]),
        "layer": layer,
        "timestep": str(timestep),
        "alpha_bar": repr(metrics["alpha_bar"]),
        "sigma": repr(metrics["sigma"]),
        "seed": str(cfg.seed),
        "prompt": str(metrics["prompt"]),
        "pooling": str(metrics["pooling"]),
    }
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        save_diffc(str(tmp / "diffc.safetensors"), models, classes, meta)
        save_probes(tmp / "probe.safetensors", probes, classes, meta)
        pd.concat(pred_rows, ignore_index=True).to_csv(tmp / "predictions.csv", index=False)
        write_json(tmp / "metrics.json", metrics)
    timings.write_s = time.perf_counter() - t0
    log.info(
        "wrote %s (read %.2fs, Diff-C %.2fs, probe %.2fs, write %.2fs)",
        out_dir, timings.read_s, timings.diffc_s, timings.probe_s, timings.write_s,
    )
    return JobResult(metrics=metrics, timings=timings)
