"""Benchmark of the pullback subspace iteration (geometry stage).

Prints, on the ShapesWorld model (``resources/models/shapesworld`` when present, else the
same architecture with random weights):

* time of the **batched** subspace iteration (one vmapped JVP pass and one vmapped VJP pass
  over the n directions per round, the VJP closure of one forward reused) ÷ time of the
  **same iteration** with one JVP and one VJP call per direction in a loop (each VJP call
  its own forward), measured side by side for the same rounds, block and start vectors;
  target: batched >= 3x faster at n = 8;
* the cost of one round in forward-pass units: seconds per round ÷ seconds of one forward
  pass of the truncated map ``f`` (stops at the layer) and of the full denoiser, batch 1;
* with ``--memory``: peak memory of one basis round (one batched JVP pass, one batched VJP
  pass), pooling ``sum`` and ``none``, with the chunked forward-AD-safe attention
  and feed-forward (``--attention-chunk`` tokens per block) vs the whole attention matrix per tangent
  (diffusers' classic processor, the path before issue 16), and the relative difference of
  their singular values. Peak = CUDA ``max_memory_allocated`` (in process, reset between
  variants) or, on CPU, the peak resident set of a fresh process per variant, counted from
  the resident set after the model is loaded and warmed up (Linux ``/proc/self/clear_refs``
  resets the peak). Target (CPU, SD1.5 at 256 px, n = 8): >= 4x lower, σ rel. err < 1e-5.
* with ``--flow-vs-unet`` (alone): a basis of the same size (``--n`` directions, ``--iters``
  rounds, batched) on the tiny SD3 transformer (``block0.image`` at σ = 0.5, flow matching) and
  the tiny latent U-Net (``mid`` at t = 500), both from ``diffatlas.models.tiny``, side by side
  (alternated, median of ``--repeats``): seconds per round and per round ÷ one full forward
  pass of that model (the forward-pass units above), and their SD3 / U-Net ratio.

Usage::

    python bench/bench_geometry.py [--model DIR | --size sd15] [--n 8] [--iters 3] [--repeats 3] [--timestep 500]
                                   [--threads 1] [--device cpu] [--latent-size 32] [--memory] [--no-speed]
    python bench/bench_geometry.py --flow-vs-unet [--n 8] [--iters 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _model_dir(requested: str | None, tmp: Path, size: str | None = None) -> tuple[Path, str]:
    if requested:
        return Path(requested), "given"
    if size and size != "tiny":
        from diffatlas.models.fullsize import make_full_size_model

        return make_full_size_model(size, tmp / size, dtype=torch.float16), f"{size} architecture, random weights"
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


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` memory line (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _one_round(fmap, x, n: int, chunk: int | None, conv_tf32: bool):
    from diffatlas.geometry.jacobian import top_singular

    return top_singular(fmap, x, n, oversample=0, tol=1e-30, max_iters=1, attention_chunk=chunk,
                        conv_tf32=conv_tf32, generator=torch.Generator().manual_seed(0))


def _setup(args):
    from diffatlas.geometry.jacobian import PullbackMap
    from diffatlas.models.loader import load_model

    handle = load_model(args.model, device=args.device)
    fmap = PullbackMap.from_handle(handle, args.timestep, layer=args.layer)
    side = args.latent_size or handle.latent_size
    x = torch.randn(1, handle.latent_channels, side, side, generator=torch.Generator().manual_seed(0)).to(handle.device)
    fmap.check(x)
    return handle, fmap, x


def _memory_child(args) -> None:
    """One variant in this (fresh) process: print the round's peak memory as JSON."""
    handle, fmap, x = _setup(args)
    fmap.pooling = args.pooling
    with torch.no_grad():  # warm-up: lazily allocated buffers exist before the baseline
        fmap(x)
    gc.collect()
    exact = _reset_peak_rss()
    base = _proc_status("VmRSS")
    t0 = time.perf_counter()
    b = _one_round(fmap, x, args.n, None if args.chunk_child == 0 else args.chunk_child, not args.strict_fp32)
    dt = time.perf_counter() - t0
    peak = _proc_status("VmHWM")  # since the reset (or, where none was possible, since start)
    print(json.dumps({"base": base, "peak": peak, "exact": exact, "seconds": dt, "s": b.s[0].tolist()}))


def _memory(args, handle, fmap, x) -> list[str]:
    """Peak memory of one basis round: chunked vs whole-matrix attention, pooling sum and none."""
    lines = []
    results = {}
    for pooling in ("sum", "none"):
        for chunk in (args.attention_chunk, None):
            if handle.device.type == "cuda":
                fmap.pooling = pooling
                gc.collect()
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                b = _one_round(fmap, x, args.n, chunk, not args.strict_fp32)
                torch.cuda.synchronize()
                r = {"base": base, "peak": torch.cuda.max_memory_allocated(), "exact": True,
                     "seconds": time.perf_counter() - t0, "s": b.s[0].tolist()}
                del b
            else:
                cmd = [sys.executable, __file__, "--model", str(args.model), "--device", args.device, "--n", str(args.n),
                       "--timestep", str(args.timestep), "--layer", args.layer, "--threads", str(args.threads),
                       "--latent-size", str(args.latent_size or 0), "--pooling", pooling, "--chunk-child", str(chunk or 0)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if proc.returncode != 0:
                    raise RuntimeError(f"memory child failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[pooling, chunk] = r
    where = "CUDA max_memory_allocated" if handle.device.type == "cuda" else "peak RSS of a fresh process"
    if handle.device.type == "cuda":
        where += ", cuDNN convolutions " + ("strict float32" if args.strict_fp32 else "TF32 (geometry.conv_tf32)")
    for pooling in ("sum", "none"):
        c, w = results[pooling, args.attention_chunk], results[pooling, None]
        dc, dw = c["peak"] - c["base"], w["peak"] - w["base"]
        s_c, s_w = torch.tensor(c["s"], dtype=torch.float64), torch.tensor(w["s"], dtype=torch.float64)
        rel = float(((s_c - s_w).abs() / s_w.abs()).max())
        lines.append(
            f"memory, pooling {pooling:4s}: one round (n = {args.n}) chunked attention+FF ({args.attention_chunk} tokens) "
            f"{dc / 2**30:6.2f} GiB ({c['seconds']:.1f} s) vs whole matrix per tangent {dw / 2**30:6.2f} GiB "
            f"({w['seconds']:.1f} s): {dw / max(dc, 1):.1f}x lower (target >= 4x); peak incl. model "
            f"{c['peak'] / 2**30:.2f} vs {w['peak'] / 2**30:.2f} GiB ({where}"
            f"{'' if c['exact'] and w['exact'] else ', peak not resettable: includes loading'}); "
            f"sigma max rel. diff {rel:.1e} (target < 1e-5)"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: shipped ShapesWorld or its architecture)")
    ap.add_argument("--size", default=None, choices=("tiny", "sd15", "sd2v"),
                    help="without --model: build this architecture with random weights (sd15: SD1.5)")
    ap.add_argument("--n", type=int, default=8, help="directions (block size; no oversampling)")
    ap.add_argument("--iters", type=int, default=3, help="rounds per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (alternating; median reported)")
    ap.add_argument("--timestep", type=int, default=500)
    ap.add_argument("--layer", default="mid")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latent-size", type=int, default=None,
                    help="side of the denoiser input x_t (default: the model's; 32 = SD1.5 at 256 px)")
    ap.add_argument("--memory", action="store_true", help="also measure the peak memory of one basis round")
    ap.add_argument("--no-speed", action="store_true", help="skip the batched-vs-loop timing")
    ap.add_argument("--strict-fp32", action="store_true",
                    help="memory runs with geometry.conv_tf32 false (CUDA: no TF32 in cuDNN convolutions)")
    ap.add_argument("--attention-chunk", type=int, default=None, help="tokens per attention and feed-forward block (default: the config's)")
    ap.add_argument("--flow-vs-unet", action="store_true",
                    help="only: basis time on tiny SD3 (block0.image, sigma 0.5) vs the tiny latent U-Net (mid, t 500)")
    ap.add_argument("--pooling", default="sum", help=argparse.SUPPRESS)
    ap.add_argument("--chunk-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("diffatlas.geometry.jacobian").setLevel(logging.ERROR)  # "not converged" is expected here
    if args.chunk_child is not None:
        _memory_child(args)
        return
    if args.flow_vs_unet:
        _flow_vs_unet(args)
        return
    from diffatlas.geometry.config import GeometryConfig
    from diffatlas.geometry.jacobian import forward_ad_safe_attention, top_singular

    if args.attention_chunk is None:
        args.attention_chunk = GeometryConfig.attention_chunk
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, what = _model_dir(args.model, Path(tmp), args.size)
        args.model = str(model_dir)
        handle, fmap, x = _setup(args)
        n_params = sum(p.numel() for p in handle.denoiser.parameters())
        cond = handle.conditioning([""])
        print(f"model: {model_dir} ({what}), {n_params / 1e6:.2f}M denoiser parameters, layer {args.layer} "
              f"({fmap.layer.module_path}), t={args.timestep}, input {tuple(x.shape[1:])}, device {handle.device}, "
              f"threads {torch.get_num_threads()}, n = {args.n}", flush=True)
        if args.memory:
            for line in _memory(args, handle, fmap, x):
                print(line, flush=True)
        if args.no_speed:
            return
        _speed(args, handle, fmap, x, cond, forward_ad_safe_attention, top_singular)


def _flow_vs_unet(args) -> None:
    """Tiny SD3 vs the tiny latent U-Net: the same batched basis rounds, side by side (module docstring)."""
    from diffatlas.geometry.jacobian import PullbackMap, top_singular
    from diffatlas.models.loader import load_model
    from diffatlas.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        setups = {}
        for name, family, time_, layer in (("sd3", "sd3", "s0.500", "block0.image"), ("unet", "sd", 500, "mid")):
            handle = load_model(make_tiny_model(family, Path(tmp) / family), device=args.device)
            cond = handle.conditioning([""])
            fmap = PullbackMap.from_handle(handle, time_, layer=layer, pooling="sum", cond=cond)
            x = torch.randn(1, handle.latent_channels, handle.latent_size, handle.latent_size,
                            generator=torch.Generator().manual_seed(0)).to(handle.device)
            mt = 0.5 if family == "sd3" else 500
            setups[name] = (handle, fmap, x, lambda h=handle, x=x, c=cond, t=mt: h.model_output(x, t, c))
        rounds = {k: [] for k in setups}
        fwd = {k: [] for k in setups}
        for k, (handle, fmap, x, full) in setups.items():  # warm-up
            top_singular(fmap, x, args.n, oversample=0, tol=1e-30, max_iters=1, generator=torch.Generator().manual_seed(0))
        for _ in range(args.repeats):
            for k, (handle, fmap, x, full) in setups.items():
                t0 = time.perf_counter()
                top_singular(fmap, x, args.n, oversample=0, tol=1e-30, max_iters=args.iters,
                             generator=torch.Generator().manual_seed(0))
                rounds[k].append((time.perf_counter() - t0) / args.iters)
                with torch.no_grad():
                    fwd[k].append(_timed(full, 5))
        out = {}
        for k, (handle, fmap, x, _) in setups.items():
            r, f = statistics.median(rounds[k]), statistics.median(fwd[k])
            out[k] = r
            print(f"{k}: layer {fmap.layer.name} ({fmap.layer.module_path}), x_t {tuple(x.shape[1:])}, "
                  f"{sum(p.numel() for p in handle.denoiser.parameters()) / 1e3:.1f}k params: "
                  f"{r * 1e3:.1f} ms per round (n = {args.n}) = {r / f:.1f} full forward passes ({f * 1e3:.2f} ms each)",
                  flush=True)
        print(f"SD3 / U-Net seconds per basis round: {out['sd3'] / out['unet']:.2f}", flush=True)


def _speed(args, handle, fmap, x, cond, forward_ad_safe_attention, top_singular) -> None:
    fmap.pooling = "sum"

    def sync():
        if handle.device.type == "cuda":
            torch.cuda.synchronize()

    # Forward-pass units (batch 1, no grad), with the same attention processor as the iteration;
    # alternated and repeated like the variants below.
    t_fs, t_fulls = [], []
    with torch.no_grad(), forward_ad_safe_attention(handle.denoiser, args.attention_chunk):
        for _ in range(5):
            t_fs.append(_timed(lambda: (fmap(x), sync()), 3))
            t_fulls.append(_timed(lambda: (handle.predict_noise(x, args.timestep, cond), sync()), 3))
    t_f, t_full = statistics.median(t_fs), statistics.median(t_fulls)

    def run(batching: str):
        sync()
        t0 = time.perf_counter()
        b = top_singular(fmap, x, args.n, oversample=0, tol=1e-30, max_iters=args.iters, batching=batching,
                         attention_chunk=args.attention_chunk, generator=torch.Generator().manual_seed(0))
        sync()
        return time.perf_counter() - t0, b

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
    print(f"feature dim {int(b_vmap.u.shape[-1])}, {args.iters} rounds per run, "
          f"median of {args.repeats} alternating runs per variant")
    print(f"batched (vmap JVP + vmap VJP per round):      {t_batched:8.3f} s  ({per_round_b:.3f} s/round; runs {[round(t, 2) for t in t_b]})")
    print(f"loop (1 JVP + 1 VJP call per direction):      {t_loop:8.3f} s  ({per_round_l:.3f} s/round; runs {[round(t, 2) for t in t_l]})")
    print(f"speed-up batched vs loop:                      {t_loop / t_batched:8.2f}x   (target >= 3x at n = 8)")
    print(f"one forward of f (truncated at {args.layer}), batch 1:  {t_f * 1e3:8.1f} ms")
    print(f"one full denoiser forward, batch 1:            {t_full * 1e3:8.1f} ms")
    print(f"cost per round: {per_round_b / t_f:.1f} forward passes of f = {per_round_b / t_full:.1f} full forwards "
          f"({per_round_b / t_f / args.n:.2f} f-forwards per direction); loop: {per_round_l / t_f:.1f} f-forwards")
    print(f"max relative difference of singular values, batched vs loop: {agree:.1e}")
    if handle.device.type == "cuda":
        print(f"CUDA peak memory allocated (whole run): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
