"""Benchmark of TopK SAE training: throughput next to its limit, measured side by side.

For each input width d (default 640 and 1280, SD's mid/up channel counts) with
n = expansion × d latents, prints in one run on one device:

* ``train``: samples/s of the full training step (:class:`diffatlas.sae.train.Trainer`:
  forward, MSE, backward, gradient projection, Adam, atom renormalisation) with no dead
  latent, and ``+auxK``: the same when every latent is dead, so AuxK (k_aux = d/2) runs at
  its worst;
* ``encoder``: the share of the step spent in the encoder (dense matmul + TopK), forward
  alone and forward + backward;
* ``matmul``: samples/s of one bare [B, d] × [d, n] matmul — the encoder's forward product,
  which no TopK SAE step can avoid — and of two (forward + the weight-gradient product, the
  dense work of a step: the decoder is a sparse gather of k atoms); ``train / 2×matmul`` is the
  fraction of that limit reached;
* peak memory: CUDA peak allocated, or the process's peak resident set on CPU.

Usage::

    python bench/bench_sae.py                       # CPU (or CUDA when present), d = 640 1280
    python bench/bench_sae.py --device cuda --batch 4096 --steps 50
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from diffatlas.io import pick_device
from diffatlas.sae.config import SAEConfig
from diffatlas.sae.model import TopKSAE
from diffatlas.sae.train import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, reps: int, device: torch.device, warmup: int = 2) -> float:
    """Median seconds per call of fn over ``reps`` calls (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def bench_width(d: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    cfg = SAEConfig(k=args.k, expansion=args.expansion, batch_size=args.batch, dead_steps=10**9)
    arch = cfg.arch(d)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, d, generator=gen).to(device)
    x *= (d / x.pow(2).sum(1).mean()).sqrt()
    sae = TopKSAE(arch).to(device)
    trainer = Trainer(sae, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    t_step = timed(lambda: trainer.step(x, 1e-4), args.steps, device, warmup=2)
    # every latent dead: the AuxK branch at its most expensive
    dead_trainer = Trainer(sae, SAEConfig(k=args.k, expansion=args.expansion, batch_size=args.batch, dead_steps=1))
    dead_trainer.since_fired.fill_(10)
    dead_trainer.safe_until = -1  # the trainer looks at the counters (AuxK on) at every step
    t_dead = timed(lambda: (dead_trainer.since_fired.fill_(10), dead_trainer.step(x, 1e-4)), args.steps, device, warmup=1)

    def enc_fwd():
        with torch.no_grad():
            sae.select(sae.pre_acts(x))

    def enc_fwd_bwd():
        vals, _ = sae.select(sae.pre_acts(x))
        vals.sum().backward()
        sae.zero_grad(set_to_none=True)

    t_enc = timed(enc_fwd, args.steps, device)
    t_enc_fb = timed(enc_fwd_bwd, args.steps, device)
    w = torch.randn(d, arch.n_latents, generator=gen).to(device)
    g = torch.randn(args.batch, arch.n_latents, generator=gen).to(device)
    t_mm = timed(lambda: x @ w, args.steps, device)
    t_mm2 = timed(lambda: (x @ w, g.T @ x), args.steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "d": d,
        "n": arch.n_latents,
        "train_sps": args.batch / t_step,
        "train_aux_sps": args.batch / t_dead,
        "enc_share_fwd": t_enc / t_step,
        "enc_share_fwd_bwd": t_enc_fb / t_step,
        "matmul_sps": args.batch / t_mm,
        "matmul2_sps": args.batch / t_mm2,
        "frac_of_limit": t_mm2 / t_step,
        "peak_mb": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[640, 1280])
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096, help="Revelio trained with 8192")
    ap.add_argument("--steps", type=int, default=5, help="timed repetitions (median reported)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"TopK SAE training benchmark on {name}: batch {args.batch}, k {args.k}, expansion {args.expansion}")
    header = f"{'d':>5} {'n':>6} {'train smp/s':>12} {'+auxK smp/s':>12} {'enc fwd %':>10} {'enc f+b %':>10} {'1 matmul smp/s':>15} {'2 matmul smp/s':>15} {'train/limit':>12} {'peak MB':>9}"
    print(header)
    for d in args.dims:
        r = bench_width(d, args, device)
        print(
            f"{r['d']:>5} {r['n']:>6} {r['train_sps']:>12.0f} {r['train_aux_sps']:>12.0f} {100 * r['enc_share_fwd']:>9.1f}% {100 * r['enc_share_fwd_bwd']:>9.1f}% "
            f"{r['matmul_sps']:>15.0f} {r['matmul2_sps']:>15.0f} {r['frac_of_limit']:>12.2f} {r['peak_mb']:>9.0f}"
        )
    print("limit = two bare matmuls of the encoder's shape ([B,d]x[d,n] forward and its weight gradient);")
    print("train/limit = (time of those two matmuls) / (time of a full training step). Peak MB: CUDA allocated or CPU max RSS.")


if __name__ == "__main__":
    main()
