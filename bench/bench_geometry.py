"""Benchmark of the pullback subspace iteration (geometry stage).

Prints, on the ShapesWorld model (``resources/models/shapesworld`` when present, else the
same architecture with random weights):

* time of the **batched** subspace iteration (one vmapped JVP pass and one vmapped VJP pass
  over the n directions per round, the VJP closure of one forward reused) ÷ time of the
  **same iteration** with one JVP and one VJP call per direction in a loop (each VJP call
  its own forward), measured side by side for the same rounds, block and start vectors;
  target: batched >= 3x faster at n = 8;
* the cost of one round in forward-pass units: seconds per round ÷ seconds of one forward
  pass of the truncated map ``f`` (stops at the layer) and of the full denoiser, batch 1.

Usage::

    python bench/bench_geometry.py [--model DIR] [--n 8] [--iters 3] [--repeats 3] [--timestep 500] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _model_dir(requested: str | None, tmp: Path) -> tuple[Path, str]:
    if requested:
        return Path(requested), "given"
    shipped = ROOT / "resources" / "models" / "shapesworld"
    if (shipped / "model_index.json").is_file():
        return shipped, "shipped checkpoint"
    try:  # the ShapesWorld architecture with random weights
        from diffatlas.world.config import WorldModelConfig
        from diffatlas.world.train import build_pipeline

        pipe = build_pipeline(WorldModelConfig())
        pipe.save_pretrained(str(tmp / "world"), safe_serialization=True)
        return tmp / "world", "ShapesWorld architecture, random weights"
    except Exception as err:  # noqa: BLE001 - fall back to the tiny pixel model
        from diffatlas.models.tiny import make_tiny_model

        return make_tiny_model("pixel", tmp / "tiny"), f"tiny pixel model (world architecture unavailable: {err})"


def _timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: shipped ShapesWorld or its architecture)")
    ap.add_argument("--n", type=int, default=8, help="directions (block size; no oversampling)")
    ap.add_argument("--iters", type=int, default=3, help="rounds per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (alternating; median reported)")
    ap.add_argument("--timestep", type=int, default=500)
    ap.add_argument("--layer", default="mid")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from diffatlas.geometry.jacobian import PullbackMap, forward_ad_safe_attention, top_singular
    from diffatlas.models.loader import load_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, what = _model_dir(args.model, Path(tmp))
        handle = load_model(model_dir, device=args.device)
    n_params = sum(p.numel() for p in handle.denoiser.parameters())
    fmap = PullbackMap.from_handle(handle, args.timestep, layer=args.layer)
    x = torch.randn(1, handle.latent_channels, handle.latent_size, handle.latent_size,
                    generator=torch.Generator().manual_seed(0)).to(handle.device)
    cond = handle.conditioning([""])
    fmap.check(x)

    def sync():
        if handle.device.type == "cuda":
            torch.cuda.synchronize()

    # Forward-pass units (batch 1, no grad), with the same attention processor as the iteration;
    # alternated and repeated like the variants below.
    t_fs, t_fulls = [], []
    with torch.no_grad(), forward_ad_safe_attention(handle.denoiser):
        for _ in range(5):
            t_fs.append(_timed(lambda: (fmap(x), sync()), 3))
            t_fulls.append(_timed(lambda: (handle.predict_noise(x, args.timestep, cond), sync()), 3))
    t_f, t_full = statistics.median(t_fs), statistics.median(t_fulls)

    def run(batching: str):
        sync()
        t0 = time.perf_counter()
        b = top_singular(fmap, x, args.n, oversample=0, tol=1e-30, max_iters=args.iters, batching=batching,
                         generator=torch.Generator().manual_seed(0))
        sync()
        return time.perf_counter() - t0, b

    import logging

    logging.getLogger("diffatlas.geometry.jacobian").setLevel(logging.ERROR)  # "not converged" is expected here
    run("vmap")  # warm-up (first vmap call traces batching rules)
    # Alternate the variants and keep each one's median, so a change in machine load during
    # the run hits both alike.
    t_b, t_l = [], []
    for _ in range(args.repeats):
        t, b_vmap = run("vmap")
        t_b.append(t)
        t, b_loop = run("loop")
        t_l.append(t)
    t_batched, t_loop = statistics.median(t_b), statistics.median(t_l)
    agree = float(((b_vmap.s - b_loop.s).abs() / b_loop.s).max())
    per_round_b = t_batched / args.iters
    per_round_l = t_loop / args.iters
    print(f"model: {model_dir} ({what}), {n_params / 1e6:.2f}M denoiser parameters, layer {args.layer} "
          f"({fmap.layer.module_path}), t={args.timestep}, input {tuple(x.shape[1:])}, feature dim {int(b_vmap.u.shape[-1])}")
    print(f"device {handle.device}, threads {torch.get_num_threads()}, n = {args.n} directions, {args.iters} rounds per run, "
          f"median of {args.repeats} alternating runs per variant")
    print(f"batched (vmap JVP + vmap VJP per round):      {t_batched:8.3f} s  ({per_round_b:.3f} s/round; runs {[round(t, 2) for t in t_b]})")
    print(f"loop (1 JVP + 1 VJP call per direction):      {t_loop:8.3f} s  ({per_round_l:.3f} s/round; runs {[round(t, 2) for t in t_l]})")
    print(f"speed-up batched vs loop:                      {t_loop / t_batched:8.2f}x   (target >= 3x at n = 8)")
    print(f"one forward of f (truncated at {args.layer}), batch 1:  {t_f * 1e3:8.1f} ms")
    print(f"one full denoiser forward, batch 1:            {t_full * 1e3:8.1f} ms")
    print(f"cost per round: {per_round_b / t_f:.1f} forward passes of f = {per_round_b / t_full:.1f} full forwards "
          f"({per_round_b / t_f / args.n:.2f} f-forwards per direction); loop: {per_round_l / t_f:.1f} f-forwards")
    print(f"max relative difference of singular values, batched vs loop: {agree:.1e}")


if __name__ == "__main__":
    main()
