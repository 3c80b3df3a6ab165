"""Spatial activation maps: where in an image a k-SAE latent fires.

An SAE of ``sae.samples: pooled`` is trained on one vector per image (the map pooled over
positions). Applied to each position of the stored spatial map ``[C, h, w]`` of the same
layer and timestep, with the same input scale, it gives a code per position; the code of
latent j over the positions is the latent's activation map ``[h, w]`` on that image. For the
top ``sae.top_latents`` ranked latents of ``latents.parquet`` (the ranking of the summary),
this module encodes every top image of each latent position by position and keeps that
latent's map.

Is a pooled SAE sound per position? A mean-pooled vector is an average of position vectors,
so its distribution is narrower than theirs; the SAE may reconstruct positions badly. The
module measures it: the fraction of variance explained (FVE, as in
:func:`diffatlas.sae.analysis.reconstruction_metrics`: 1 − Σ|x − x̂|² / Σ|x − x̄|²) of the SAE
on the spatial vectors of the validation images, beside its FVE on what it was trained on.
Where it is low, train on spatial vectors (``sae.samples: spatial``): the same module then
measures the SAE on its own kind of input.

Artifacts, beside the SAE (``results/sae/{model}/{dataset}/{layer}/t{timestep}/``):

* ``spatial_maps.safetensors``: ``maps`` [L, top_n, h, w] float32 (the latent's post-TopK
  code per position; 0 where it is not among the position's top k), ``latents`` [L] int64
  (latent ids, rank order), ``sample_ids`` [L, top_n] int64 (dataset sample ids, −1 = none);
* ``spatial.json``: the FVE of the SAE per position and pooled, the map shape, and the
  provenance (model, layer, timestep, seed, pooling, samples, store, device).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from diffatlas.activations.store import ActivationStore
from diffatlas.errors import UserError
from diffatlas.io import atomic_file, read_json, write_json
from diffatlas.sae.model import TopKSAE

log = logging.getLogger(__name__)

MAPS = "spatial_maps.safetensors"
RECORD = "spatial.json"
#: Position vectors encoded at once: bounds the dense [vectors, n_latents] codes in memory.
CHUNK_VECTORS = 8192


def _position_vectors(maps: np.ndarray, scale: float) -> torch.Tensor:
    """[B, C, h, w] raw maps -> [B·h·w, C] float32 vectors the SAE reads (× input_scale)."""
    b, c = maps.shape[:2]
    x = maps.reshape(b, c, -1).transpose(0, 2, 1).reshape(-1, c).astype(np.float32)
    return torch.from_numpy(x * np.float32(scale))


def _rows_per_chunk(positions: int) -> int:
    return max(1, CHUNK_VECTORS // max(1, positions))


@torch.no_grad()
def spatial_fve(sae: TopKSAE, store: ActivationStore, layer: str, timestep: int, rows: np.ndarray, scale: float,
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """FVE, NMSE and L0 of ``sae`` on every position vector of the images ``rows``.

    Accumulated in float64 over chunks of images, so memory stays bounded by CHUNK_VECTORS.
    """
    _, h, w = store.spatial_shape(layer)
    sse, sum_sq, nnz, count = 0.0, 0.0, 0, 0
    sum_x = torch.zeros(sae.arch.d_in, dtype=torch.float64)
    per = _rows_per_chunk(h * w)
    for start in range(0, len(rows), per):
        x = _position_vectors(store.spatial(layer, timestep, rows[start : start + per]), scale).to(device)
        vals, idx = sae.encode(x)
        x_hat = sae.decode(vals, idx)
        sse += float((x_hat - x).double().pow(2).sum())
        sum_x += x.double().sum(0).cpu()
        sum_sq += float(x.double().pow(2).sum())
        nnz += int((vals > 0).sum())
        count += x.shape[0]
    if count == 0:
        raise UserError(f"{store.path}: no validation images to measure the SAE of layer {layer!r} on")
    sst = sum_sq - count * float((sum_x / count).pow(2).sum())
    nmse = sse / sst if sst > 0 else float("nan")
    return {"n_vectors": count, "nmse": nmse, "fve": 1.0 - nmse, "l0": nnz / count}


def ranked_latents(latents: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` best-ranked latents (rank 0 first) of a ``latents.parquet`` table."""
    ranked = latents[latents["rank"] >= 0].sort_values("rank")
    return ranked.head(n)


@torch.no_grad()
def latent_maps(sae: TopKSAE, store: ActivationStore, layer: str, timestep: int, top: pd.DataFrame, top_n: int,
                scale: float, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activation maps of each latent in ``top`` on each of its top images.

    -> (maps [L, top_n, h, w] float32, latents [L] int64, sample_ids [L, top_n] int64, −1 padded).
    Every needed image is read once and encoded in chunks; only the maps kept are stored.
    """
    _, h, w = store.spatial_shape(layer)
    lat = top["latent"].to_numpy(dtype=np.int64)
    ids = np.full((len(top), top_n), -1, dtype=np.int64)
    for i, sids in enumerate(top["top_sample_ids"]):
        sids = np.asarray(list(sids), dtype=np.int64)[:top_n]
        ids[i, : len(sids)] = sids
    maps = np.zeros((len(top), top_n, h, w), dtype=np.float32)
    row_of = {int(s): r for r, s in enumerate(np.asarray(store.sample_ids))}
    missing = sorted({int(s) for s in ids[ids >= 0].tolist()} - set(row_of))
    if missing:
        raise UserError(f"{store.path} holds no sample ids {missing[:5]} named in latents.parquet; was the SAE trained on another store?")
    needed = np.unique(ids[ids >= 0])
    # (image, latent) pairs to fill, grouped by image
    wanted: dict[int, list[tuple[int, int]]] = {}
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if ids[i, j] >= 0:
                wanted.setdefault(int(ids[i, j]), []).append((i, j))
    per = _rows_per_chunk(h * w)
    for start in range(0, len(needed), per):
        chunk = needed[start : start + per]
        rows = np.array([row_of[int(s)] for s in chunk])
        order = np.argsort(rows)  # zarr orthogonal indexing reads in row order
        x = _position_vectors(store.spatial(layer, timestep, rows[order]), scale).to(device)
        z = sae.codes(x).view(len(chunk), h * w, -1).cpu()
        for b, sid in enumerate(chunk[order]):
            for i, j in wanted[int(sid)]:
                maps[i, j] = z[b, :, lat[i]].reshape(h, w).numpy()
    return maps, lat, ids


def run(run_dir: str | os.PathLike, store_path: str | os.PathLike | None = None, n_latents: int | None = None,
        device: torch.device | str = "cpu") -> dict[str, Any]:
    """Write ``spatial_maps.safetensors`` and ``spatial.json`` into the SAE run ``run_dir``.

    ``store_path``: the activation store (default: the one recorded in cfg.json);
    ``n_latents``: latents mapped (default: the run's ``sae.top_latents``).
    """
    from safetensors.numpy import save_file

    from diffatlas.sae.train import split_samples

    run_dir = Path(run_dir)
    sae, cfg = TopKSAE.load(run_dir, device=device)
    sae.eval()
    layer, timestep = cfg["layer"], int(cfg["timestep"])
    scfg = cfg.get("sae_config", {})
    store = ActivationStore(store_path or cfg["store"])
    if not store.has_spatial(layer):
        raise UserError(
            f"layer {layer!r} in {store.path} was extracted without spatial maps; set extract.spatial: true "
            "(or list the layer in extract.spatial_layers) and re-run extract"
        )
    latents_path = run_dir / "latents.parquet"
    if not latents_path.exists():
        raise UserError(f"no {latents_path}; run train-sae first")
    latents = pd.read_parquet(latents_path)
    n = int(n_latents if n_latents is not None else scfg.get("top_latents", 100))
    top_n = int(scfg.get("top_n", 10))
    scale = float(cfg["input_scale"])
    split = cfg.get("split", {})
    is_val = split_samples(len(store), float(split.get("val_fraction", 0.2)), int(split.get("seed", 0)))
    fve = spatial_fve(sae, store, layer, timestep, np.nonzero(is_val)[0], scale, device=device)
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else {}
    top = ranked_latents(latents, n)
    maps, lat, ids = latent_maps(sae, store, layer, timestep, top, top_n, scale, device=device)
    c, h, w = store.spatial_shape(layer)
    samples = cfg.get("samples", "pooled")
    record = {
        "model": cfg.get("model"),
        "dataset": cfg.get("dataset"),
        "layer": layer,
        **store.time_record(timestep),  # timestep, ᾱ_t or σ (flow matching), the noising rule
        "seed": cfg.get("seed"),
        "pooling": cfg.get("pooling"),
        "prompt": cfg.get("prompt"),
        "store": str(store.path),
        "device": str(device),
        "dtype": "float32",
        "sae_samples": samples,
        "map_shape": [h, w],
        "channels": c,
        "n_latents_mapped": int(len(lat)),
        "top_n": top_n,
        "ranking": "latents.parquet rank (the summary's order)",
        "per_position": {**fve, "on": "every position of the validation images' stored spatial maps, × input_scale"},
        "trained_on": {"samples": samples, "fve": metrics.get("fve"), "on": "validation split (metrics.json)"},
        "maps": {"file": MAPS, "value": "post-TopK code of the latent at each position (0 = not among that position's top k)"},
    }
    with atomic_file(run_dir / MAPS) as tmp:
        save_file({"maps": maps, "latents": lat, "sample_ids": ids}, str(tmp),
                  metadata={"format": "diffatlas-sae-spatial-maps", "layer": layer, "timestep": str(timestep)})
    write_json(run_dir / RECORD, record)
    log.info("%s: pooled-trained FVE %s; per position %.3f over %d vectors", run_dir, metrics.get("fve"), fve["fve"], fve["n_vectors"])
    return record


def read_maps(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of ``spatial_maps.safetensors`` (maps, latents, sample_ids)."""
    from safetensors.numpy import load_file

    path = Path(run_dir) / MAPS
    if not path.exists():
        raise UserError(f"no {path}; run sae-spatial first")
    return load_file(str(path))
