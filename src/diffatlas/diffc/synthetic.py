"""Synthetic activation stores with a known class signal, for tests and bench/.

``image_features`` turns images into feature maps the way a very simple "diffusion layer"
would: reduce the image to the map size, either by averaging blocks of pixels
(``mode="pool"``, smooth under shifts, like a UNet's downsampled maps) or by cutting it
into patches whose pixels become channels (``mode="patch"``, like a DiT patch embedding),
mix these into ``channels`` channels with a fixed random matrix and a ReLU, then add noise
that grows with the timestep (sqrt(1 - ᾱ_t)). On
ShapesWorld images the shape of the object (coarse label) lives in the spatial layout and
inside the patches, its colour in the channel mix, so Diff-C has something real to find,
and at high noise less of it.

``write_store`` writes such arrays through the real writer (``open_writer``), so every
reader path is the production one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from diffatlas.activations.store import LayerSpec, open_writer


def linear_alpha_bar(timesteps: Sequence[int], num_train_timesteps: int = 1000) -> np.ndarray:
    """ᾱ_t of the DDPM linear beta schedule (1e-4 .. 0.02) at ``timesteps``."""
    betas = np.linspace(1e-4, 0.02, num_train_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)[np.asarray(timesteps, dtype=np.int64)]


def image_features(
    images: np.ndarray,
    size: int,
    channels: int,
    alpha_bar: Sequence[float],
    seed: int = 0,
    noise_scale: float = 1.0,
    mode: str = "pool",
) -> np.ndarray:
    """Feature maps [T, N, channels, size, size] (float32) of images uint8 [N, H, W, 3].

    ``H`` must be a multiple of ``size``. Deterministic for a seed.
    """
    n, h, w, _ = images.shape
    if h % size or w % size:
        raise ValueError(f"image side {h}x{w} is not a multiple of the map size {size}")
    ph, pw = h // size, w // size
    x = images.astype(np.float32) / 127.5 - 1.0
    if mode == "pool":  # [N, 4, s, s]: RGB and brightness, averaged over blocks
        x = x.reshape(n, size, ph, size, pw, 3).mean(axis=(2, 4))
        x = np.concatenate([x, x.mean(axis=-1, keepdims=True)], axis=-1).transpose(0, 3, 1, 2)
    elif mode == "patch":  # [N, ph*pw*3, s, s]: every pixel of the patch
        x = x.reshape(n, size, ph, size, pw, 3).transpose(0, 2, 4, 5, 1, 3).reshape(n, ph * pw * 3, size, size)
    else:
        raise ValueError(f"mode {mode!r} is not one of: pool, patch")
    rng = np.random.default_rng(seed)
    mix = (rng.normal(size=(channels, x.shape[1])) / np.sqrt(x.shape[1])).astype(np.float32)
    bias = rng.normal(scale=0.5, size=(channels, 1, 1)).astype(np.float32)
    clean = np.maximum(np.einsum("ck,nkyx->ncyx", mix, x) + bias, 0.0)  # [N, channels, s, s]
    out = np.empty((len(alpha_bar), n, channels, size, size), np.float32)
    for i, ab in enumerate(alpha_bar):
        noise = rng.normal(size=clean.shape).astype(np.float32)
        out[i] = np.sqrt(ab) * clean + noise_scale * np.sqrt(1.0 - ab) * noise
    return out


def write_store(
    path: str | Path,
    maps: Mapping[str, np.ndarray],
    labels: Sequence[str],
    coarse_labels: Sequence[str] | None,
    timesteps: Sequence[int],
    alpha_bar: Sequence[float] | None = None,
    spatial: Mapping[str, bool] | None = None,
    batch_size: int = 64,
    attrs: Mapping[str, object] | None = None,
) -> Path:
    """Write ``maps`` (layer -> [T, N, C, h, w]) as an activation store at ``path``.

    Pooled features are the spatial means. ``spatial[layer] = False`` stores only the pooled
    array for that layer (as an extraction with ``spatial: false`` would).
    """
    spatial = dict(spatial or {})
    first = next(iter(maps.values()))
    n_t, n = first.shape[:2]
    alpha_bar = linear_alpha_bar(timesteps) if alpha_bar is None else np.asarray(alpha_bar)
    specs = [
        LayerSpec(name, f"synthetic.{name}", a.shape[2], a.shape[3], a.shape[4], spatial.get(name, True))
        for name, a in maps.items()
    ]
    base = {"model_id": "synthetic", "prompt": "", "pooling": "mean", "seed": 0, "noise_mode": "forward"}
    with open_writer(
        path,
        timesteps=list(timesteps),
        alpha_bar=list(alpha_bar),
        sample_ids=list(range(n)),
        labels=list(labels),
        coarse_labels=None if coarse_labels is None else list(coarse_labels),
        layers=specs,
        attrs={**base, **dict(attrs or {})},
        batch_size=batch_size,
    ) as writer:
        for t in range(n_t):
            for start in range(0, n, batch_size):
                for spec in specs:
                    block = maps[spec.name][t, start : start + batch_size]
                    writer.write(spec.name, t, start, block.mean(axis=(2, 3)), block if spec.spatial else None)
    return Path(path)
