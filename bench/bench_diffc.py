"""Diff-C speed on CPU: training throughput per layer size, and the share of a job's time
spent reading the activation store vs computing, all measured in one run.

For each layer size a synthetic store (the real zarr writer, 512 samples, one timestep) is
written, then one full ``train_diffc`` job runs on it with the demo settings of config.yaml
(both granularities, Diff-C + probe). Printed per size:

- Diff-C training throughput: samples through optimiser steps per second of Diff-C time
  (training, per-epoch validation and BatchNorm recalibration, final prediction);
- read share: store -> memory time / (read + Diff-C + probe) time; target < 20 %;
- for contrast, what reading the same maps one sample at a time from zarr would cost
  (timed on 32 samples and scaled), as a multiple of the batched read.

Usage::

    python bench/bench_diffc.py [--samples 512] [--threads 1] [--epochs N] [--sizes 128x8x8 128x16x16 ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from diffatlas.activations.store import ActivationStore
from diffatlas.config import load_config
from diffatlas.diffc.config import DiffCConfig
from diffatlas.diffc.synthetic import image_features, linear_alpha_bar, write_store
from diffatlas.diffc.train import run_diffc_job
from diffatlas.io import set_threads

ROOT = Path(__file__).resolve().parents[1]


def demo_config(epochs: int | None) -> DiffCConfig:
    section = load_config(ROOT / "config.yaml")["diffc"]
    if epochs:
        section["epochs"] = epochs
    return DiffCConfig.from_dict(section)


def per_sample_read_s(store: ActivationStore, layer: str, t: int, n: int, probe: int = 32) -> float:
    """Seconds to read ``n`` maps one sample at a time (timed on ``probe`` samples)."""
    t0 = time.perf_counter()
    for i in range(probe):
        store.spatial(layer, t, slice(i, i + 1))
    return (time.perf_counter() - t0) / probe * n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=None, help="default: config.yaml's diffc.epochs")
    p.add_argument("--sizes", nargs="+", default=["64x4x4", "128x8x8", "128x16x16", "320x16x16"], help="CxHxW")
    args = p.parse_args()
    set_threads(args.threads)
    cfg = demo_config(args.epochs)
    rng = np.random.default_rng(0)
    n = args.samples
    # ShapesWorld-like labels: 3 shapes (coarse) x 4 colours (fine), balanced.
    fine = np.asarray([f"{c} {s}" for s in ("circle", "square", "triangle") for c in ("red", "green", "blue", "yellow")])
    labels = fine[np.arange(n) % len(fine)]
    coarse = [x.split()[1] for x in labels]
    images = rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)

    print(f"Diff-C bench: {n} samples, {args.threads} thread(s), epochs {cfg.epochs}, feature_dim {cfg.feature_dim}, "
          f"batch {cfg.batch_size}, granularities {cfg.granularities}")  # fmt: skip
    header = f"{'layer CxHxW':>12} {'MB f16':>7} {'read s':>7} {'Diff-C s':>8} {'probe s':>7} {'samples/s':>9} {'read %':>7} {'1-by-1 read':>11}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.sizes:
            c, h, w = (int(x) for x in spec.split("x"))
            maps = image_features(images, h, c, linear_alpha_bar([250]), seed=1, mode="pool")
            path = write_store(Path(tmp) / f"{spec}.zarr", {"L": maps}, labels, coarse, [250])
            result = run_diffc_job(path, "L", 250, Path(tmp) / f"out_{spec}", cfg, device="cpu")
            tm = result.timings
            share = tm.read_s / (tm.read_s + tm.compute_s)
            worst = max(worst, share)
            one_by_one = per_sample_read_s(ActivationStore(path), "L", 250, n)
            mb = n * c * h * w * 2 / 2**20
            print(
                f"{spec:>12} {mb:7.1f} {tm.read_s:7.2f} {tm.diffc_s:8.2f} {tm.probe_s:7.2f} "
                f"{tm.train_samples / tm.diffc_s:9.0f} {100 * share:6.1f}% {one_by_one / tm.read_s:10.0f}x"
            )
    print(f"\nlargest read share: {100 * worst:.1f}% (target < 20%): {'PASS' if worst < 0.2 else 'FAIL'}")
    print("samples/s = samples through Diff-C optimiser steps / Diff-C time (incl. validation, BN recalibration, prediction);")
    print("1-by-1 read = time to read the maps one sample at a time from zarr / the batched read actually used.")


if __name__ == "__main__":
    main()
