"""Planted-dictionary recovery: how close the trained decoder comes to a known dictionary.

Data: x = Σ_j c_j a_j with k of m unit atoms a_j (d dims) per vector, coefficients in
[0.5, 1.5), normalised to mean squared norm d. Reports the mean over atoms of the best
|cosine| with any decoder atom, the steps run and whether the plateau rule stopped training.

Usage::

    python bench/planted_dictionary.py --atoms 512 --d 64 --k 8 --steps 500
    python bench/planted_dictionary.py --atoms 512 --d 64 --k 8 --steps 20000   # plateau rule decides
"""

from __future__ import annotations

import argparse
import time

import torch

from diffatlas.sae.config import SAEConfig
from diffatlas.sae.train import train_sae


def planted(d: int, m: int, k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n vectors [n, d] of k-sparse combinations of m random unit atoms [m, d]."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(m, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(dim=1)[:, :k]
    vals = torch.rand(n, k, generator=g) + 0.5
    x = torch.zeros(n, m).scatter_(1, idx, vals) @ atoms
    return x * (d / x.pow(2).sum(1).mean()).sqrt(), atoms


def mean_best_cosine(atoms: torch.Tensor, decoder: torch.Tensor) -> float:
    dec = decoder / decoder.norm(dim=1, keepdim=True)
    return float((atoms @ dec.T).abs().max(dim=1).values.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atoms", type=int, default=512)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--n", type=int, default=65536, help="training vectors (validation: n / 4 more)")
    ap.add_argument("--steps", type=int, default=20000, help="step cap")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, atoms = planted(args.d, args.atoms, args.k, args.n + args.n // 4)
    cfg = SAEConfig(k=args.k, expansion=args.atoms // args.d, steps=args.steps, batch_size=args.batch, lr=args.lr,
                    eval_every=args.eval_every)
    t0 = time.perf_counter()
    sae, fitted = train_sae(x[: args.n], cfg.arch(args.d), cfg, x_val=x[args.n :])
    print(f"planted dictionary: {args.atoms} atoms, d={args.d}, k={args.k}, {args.n} vectors, batch {args.batch}, lr {args.lr}")
    print(f"steps run {fitted.steps} (cap {args.steps}), converged {fitted.converged}, best val FVE {fitted.best_val_fve:.4f}, "
          f"mean best cosine {mean_best_cosine(atoms, sae.W_dec.detach()):.3f}, {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
