"""Cost of per-attribute label statistics in the SAE analysis, side by side.

Runs :func:`diffatlas.sae.analysis.analyse` (the one streaming pass plus the latents table
and metrics) on two stores holding the same vectors and labels, one without dataset
attributes and one with ShapesWorld's four (colour 4, shape 3, size 2, position 9 classes),
and prints the best of ``--repeats`` wall times of each and their ratio.

Usage::

    python bench/bench_sae_attributes.py                      # N = 4096, d = 64, 512 latents
    python bench/bench_sae_attributes.py --n 65536 --d 640 --latents 5120
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffatlas.activations.store import ActivationStore, ActivationWriter, LayerSpec
from diffatlas.sae import analysis
from diffatlas.sae.config import SAEArch, SAEConfig
from diffatlas.sae.model import TopKSAE

ATTRIBUTE_CLASSES = {"colour": 4, "shape": 3, "size": 2, "position": 9}


def _store(path: Path, x: np.ndarray, chunk: int, attributes: dict[str, list[str]] | None) -> ActivationStore:
    n, d = x.shape
    w = ActivationWriter(path, timesteps=[0], alpha_bar=[1.0], sample_ids=list(range(n)),
                         labels=[f"f{i % 12}" for i in range(n)], coarse_labels=[f"c{i % 3}" for i in range(n)],
                         layers=[LayerSpec("mid", "mid", d, 0, 0, False)], attrs={}, batch_size=chunk,
                         attributes=attributes)
    for s in range(0, n, chunk):
        w.write("mid", 0, s, x[s : s + chunk])
    w.close()
    return ActivationStore(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--latents", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.d)).astype(np.float32)
    attributes = {a: [str(v) for v in rng.integers(0, c, args.n)] for a, c in ATTRIBUTE_CLASSES.items()}
    sae = TopKSAE(SAEArch(d_in=args.d, n_latents=args.latents, k=args.k, k_aux=args.k))
    cfg = SAEConfig(k=args.k, expansion=max(1, args.latents // args.d), samples="pooled")
    is_val = np.zeros(args.n, bool)
    is_val[::10] = True
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"labels only": _store(Path(tmp) / "a.zarr", x, args.chunk, None),
                  "+4 attributes": _store(Path(tmp) / "b.zarr", x, args.chunk, attributes)}
        best = {name: float("inf") for name in stores}
        for _ in range(args.repeats):
            for name, store in stores.items():  # interleaved, so drifts in machine load hit both
                data = analysis.StoreSamples(store, "mid", 0, "pooled", scale=1.0, is_val=is_val)
                t0 = time.perf_counter()
                analysis.analyse(sae, data, cfg)
                best[name] = min(best[name], time.perf_counter() - t0)
    print(f"N={args.n} d={args.d} latents={args.latents} k={args.k} threads={torch.get_num_threads()}")
    for name, seconds in best.items():
        print(f"  {name:14s} {seconds:.3f} s")
    print(f"  ratio {best['+4 attributes'] / best['labels only']:.3f}")


if __name__ == "__main__":
    main()
