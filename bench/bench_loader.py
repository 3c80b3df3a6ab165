"""Benchmark of the streaming loader: SAE training throughput from the store vs from memory.

A synthetic store the size of the ShapesWorld demo's extraction (512 images, spatial maps
16×16, chunks of 64 samples) but with d channels (default 640, SD's up_ft1 width) is written
with the project's :class:`~diffatlas.activations.store.ActivationWriter`; then, side by side
in one run, the same SAE training loop (:func:`diffatlas.sae.train.fit`, one SAE step per
batch) is timed on:

* ``memory``: the training vectors resident in one float32 tensor, batches indexed from a
  seeded permutation (the pre-loader trainer);
* ``store``: batches from :class:`~diffatlas.activations.loader.ShuffleLoader` reading the store
  in whole chunks on its thread, with a shuffle buffer of ``--buffer`` of the split (default a
  quarter, so it really streams: chunks are decoded during training, every epoch);
* ``limit``: the bare step loop (:class:`~diffatlas.sae.train.Trainer`) on one resident batch.

Prints samples/s of each, ``store / memory`` (target >= 0.9) and ``train / limit``.

Usage::

    python bench/bench_loader.py                       # CPU, d = 640, batch 1024
    python bench/bench_loader.py --device cuda --d 1280 --batch 4096 --steps 200
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffatlas.activations.loader import ShuffleLoader, store_source
from diffatlas.activations.store import ActivationStore, LayerSpec, open_writer
from diffatlas.io import pick_device
from diffatlas.sae.config import SAEConfig
from diffatlas.sae.model import TopKSAE
from diffatlas.sae.train import Trainer, fit, split_samples


def write_store(path: Path, n: int, d: int, hw: int, chunk: int) -> None:
    rng = np.random.default_rng(0)
    layers = [LayerSpec("up_ft1", "up_blocks.1", d, hw, hw, True)]
    with open_writer(path, timesteps=[50], alpha_bar=[0.9], sample_ids=list(range(n)), labels=["x"] * n,
                     coarse_labels=None, layers=layers, attrs={"model_name": "bench"}, batch_size=chunk) as w:
        for start in range(0, n, chunk):
            maps = rng.standard_normal((min(chunk, n - start), d, hw, hw), dtype=np.float32)
            w.submit(0, start, {"up_ft1": (maps.mean((2, 3)), maps)})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=640)
    ap.add_argument("--n", type=int, default=512, help="images (the demo's dataset size)")
    ap.add_argument("--hw", type=int, default=16, help="side of the stored maps (the demo's spatial cap)")
    ap.add_argument("--chunk", type=int, default=64, help="samples per zarr chunk (extract.batch_size)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--buffer", type=float, default=0.25, help="shuffle buffer as a share of the training split")
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cfg = SAEConfig(k=32, expansion=args.expansion, batch_size=args.batch, steps=args.steps, eval_every=10**9, warmup=10)
    arch = cfg.arch(args.d)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.zarr"
        t0 = time.perf_counter()
        write_store(path, args.n, args.d, args.hw, args.chunk)
        store = ActivationStore(path)
        source = store_source(store, "up_ft1", 50, "spatial")
        train = np.nonzero(~split_samples(source.n, 0.2, 0))[0]
        m = len(train) * source.positions
        buffer = max(1, int(args.buffer * m))
        x_mem = torch.from_numpy(store.spatial("up_ft1", 50)[train].astype(np.float32).reshape(len(train), args.d, -1)
                                 .transpose(0, 2, 1).reshape(-1, args.d).copy())
        print(f"store: {args.n} samples × {source.positions} positions × d={args.d} float16 "
              f"({source.n * source.positions * source.item_bytes / 2**20:.0f} MiB), chunks of {source.chunk}, "
              f"written in {time.perf_counter() - t0:.1f}s; training split {m} vectors, shuffle buffer {buffer}")

        def from_memory():
            gen = torch.Generator().manual_seed(0)
            while True:
                perm = torch.randperm(m, generator=gen)
                for j in range(m // args.batch):
                    yield x_mem[perm[j * args.batch : (j + 1) * args.batch]]

        def run(batches) -> float:
            sae = TopKSAE(arch).to(device)
            _sync(device)
            t = time.perf_counter()
            fit(sae, batches, cfg, args.steps, None, device)
            _sync(device)
            return args.steps * args.batch / (time.perf_counter() - t)

        def limit() -> float:
            sae = TopKSAE(arch).to(device)
            trainer = Trainer(sae, cfg)
            xb = x_mem[: args.batch].to(device)
            trainer.step(xb, 1e-4)
            _sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                trainer.step(xb, 1e-4)
            _sync(device)
            return args.steps * args.batch / (time.perf_counter() - t)

        rates: dict[str, list[float]] = {"memory": [], "store": [], "limit": []}
        for _ in range(2):  # interleaved, so both see the same machine
            rates["memory"].append(run(from_memory()))
            with ShuffleLoader(source, train, args.batch, torch.Generator().manual_seed(0), buffer=buffer,
                               pin_memory=device.type == "cuda") as loader:
                rates["store"].append(run(b.x for b in loader))
            rates["limit"].append(limit())
    best = {k: max(v) for k, v in rates.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"SAE training on {name}: d={args.d}, n={arch.n_latents}, k=32, batch {args.batch}, {args.steps} steps (best of 2)")
    print(f"{'memory smp/s':>13} {'store smp/s':>12} {'limit smp/s':>12} {'store/memory':>13} {'train/limit':>12}")
    print(f"{best['memory']:>13.0f} {best['store']:>12.0f} {best['limit']:>12.0f} {best['store'] / best['memory']:>13.2f} "
          f"{best['store'] / best['limit']:>12.2f}")
    print("store/memory target >= 0.9; limit = the bare training step on one resident batch; train/limit uses the store run.")


if __name__ == "__main__":
    main()
