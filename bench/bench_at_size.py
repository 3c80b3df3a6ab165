"""Proof at size: SAE training, SAE mining/analysis and Diff-C on a store several times larger
than the memory each job may use.

1. A synthetic activation store of ``--gb`` GB of spatial maps (float16, one layer ``mid``,
   ``--channels`` × ``--size`` × ``--size``, one timestep) is written with the project's own
   writer (:func:`diffatlas.activations.store.open_writer`), chunked ``--chunk`` samples along
   the sample axis. Samples carry a class pattern (10 fine classes, 2 coarse) over noise.
2. Each phase runs as its own child process through the project's CLI, under a memory limit:
   ``diffatlas train-sae`` (spatial samples), ``diffatlas analyse-sae`` (one-pass metrics and
   mining of an SAE initialised by this script, so it does not depend on the training phase)
   and ``diffatlas train-diffc``.
3. Per phase: exit status, wall time, peak RSS of the child (``ru_maxrss`` from ``os.wait4``)
   and throughput. A failed phase is reported with its last error line; the others still run.

The limit is ``RLIMIT_AS`` (``resource.setrlimit`` in the child, the same as ``ulimit -v``):
address space, a stricter bound than resident memory (RSS ≤ address space), so a phase that
completes under it never held more than the limit. ``MALLOC_ARENA_MAX=2`` keeps glibc from
reserving 64 MB of address space per thread. (No cgroup is used: on this machine the cgroup
hierarchy is v1 and belongs to the machinery that runs the session.)

Usage::

    python bench/bench_at_size.py [--gb 6] [--limit-gb 2] [--phases train-sae analyse-sae train-diffc]
        [--dir DIR] [--keep] [--channels 128] [--expansion 1] [--size 16] [--chunk 256] [--threads 1]

The store goes to a temporary directory under ``--dir`` (default: the system temp dir),
removed at the end unless ``--keep``. The script checks the free disk space first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffatlas.activations.store import ActivationStore, LayerSpec, open_writer

LAYER, TIMESTEP = "mid", 100
N_FINE, N_COARSE = 10, 2
PHASES = ("train-sae", "analyse-sae", "train-diffc")


# -- the synthetic store ------------------------------------------------------------------------
def write_store(path: Path, gb: float, channels: int, size: int, chunk: int, seed: int = 0) -> int:
    """Write about ``gb`` GB of float16 spatial maps; returns the number of samples."""
    per_sample = channels * size * size * 2
    n = max(2 * chunk, int(gb * 1e9 // per_sample) // chunk * chunk)
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, N_FINE, n)
    # A class = a channel pattern (a direction in activation space) on a blob at a class-specific place.
    patterns = rng.normal(size=(N_FINE, channels, 1, 1)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    centres = rng.uniform(0, size, size=(N_FINE, 2))
    blobs = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / (size / 3) ** 2)
    signal = (2.0 * patterns * blobs[:, None]).astype(np.float16)  # [classes, C, h, w]
    # Noise from a bank of blocks (drawing fresh normals for GBs would dominate the bench).
    bank = rng.normal(size=(8, chunk, channels, size, size)).astype(np.float16)
    with open_writer(
        path,
        timesteps=[TIMESTEP],
        alpha_bar=[0.5],
        sample_ids=list(range(n)),
        labels=[f"class{c}" for c in fine],
        coarse_labels=[f"group{c % N_COARSE}" for c in fine],
        layers=[LayerSpec(LAYER, "synthetic.mid", channels, size, size, True)],
        attrs={"model_id": "synthetic", "prompt": "", "pooling": "mean", "seed": seed, "noise_mode": "forward"},
        batch_size=chunk,
    ) as writer:
        for i, start in enumerate(range(0, n, chunk)):
            maps = bank[i % len(bank)][: n - start] + signal[fine[start : start + chunk]]
            writer.write(LAYER, 0, start, maps.astype(np.float32).mean(axis=(2, 3)), maps)
    return n


def make_sae(store_path: Path, out: Path, expansion: int, k: int, val_fraction: float = 0.2) -> None:
    """An SAE for the mining phase, initialised as training would start (b_pre at the data's
    mean, input scale from the first chunk), saved the way train-sae saves one."""
    import torch

    from diffatlas.sae.config import SAEConfig
    from diffatlas.sae.model import TopKSAE

    store = ActivationStore(store_path)
    arr, t = store.layer_array(LAYER, TIMESTEP, spatial=True)
    first = np.asarray(arr[t, : arr.chunks[1]], dtype=np.float32)  # [B, C, h, w]
    vec = first.reshape(first.shape[0], first.shape[1], -1).transpose(0, 2, 1).reshape(-1, first.shape[1])
    scale = math.sqrt(vec.shape[1] / float((vec.astype(np.float64) ** 2).sum(1).mean()))
    cfg = SAEConfig(k=k, expansion=expansion, samples="spatial", val_fraction=val_fraction)
    sae = TopKSAE(cfg.arch(vec.shape[1], LAYER), seed=0)
    with torch.no_grad():
        sae.b_pre.copy_(torch.from_numpy(vec.mean(0) * scale))
    sae.save(out, {"layer": LAYER, "timestep": TIMESTEP, "input_scale": scale, "model": "synthetic", "dataset": "synthetic",
                   "split": {"by": "sample", "seed": cfg.seed, "val_fraction": val_fraction}, "sae_config": cfg.to_dict()})


# -- one phase in a child process ---------------------------------------------------------------
def run_limited(argv: list[str], limit_bytes: int, log: Path, threads: int) -> dict:
    """Run ``argv`` with RLIMIT_AS = ``limit_bytes``; exit status, wall seconds, peak RSS (MB)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": str(threads), "DIFFATLAS_NO_PROGRESS": "1"}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=limit)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    lines = log.read_text(errors="replace").strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower() or "Error" in ln]
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "last_error": (errors or lines or [""])[-1][:300] if proc.returncode else "",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=6.0, help="size of the store's spatial maps in GB (default 6)")
    ap.add_argument("--limit-gb", type=float, default=2.0,
                    help="address-space limit of each phase in GiB (default 2: address space counts thread stacks and "
                         "allocator reservations that never become resident, so Diff-C at ~1.1 GB RSS needs ~1.6 GiB of it)")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--channels", type=int, default=128, help="channels of the layer (d of the SAE)")
    ap.add_argument("--size", type=int, default=16, help="spatial map height = width")
    ap.add_argument("--chunk", type=int, default=256, help="samples per zarr chunk (the extraction batch size)")
    ap.add_argument("--expansion", type=int, default=1, help="SAE latents = expansion × channels")
    ap.add_argument("--k", type=int, default=8, help="SAE k")
    ap.add_argument("--sae-steps", type=int, default=300, help="train-sae steps (batch 1024 vectors)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where the temporary store goes (default: system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the store and outputs")
    args = ap.parse_args()

    base = Path(args.dir or tempfile.gettempdir())
    need = args.gb * 1.1e9 + 0.5e9
    free = shutil.disk_usage(base).free
    if free < need:
        sys.exit(f"bench_at_size: {base} has {free / 1e9:.1f} GB free; the store needs about {need / 1e9:.1f} GB (lower --gb)")
    work = Path(tempfile.mkdtemp(prefix="bench_at_size_", dir=base))
    limit = int(args.limit_gb * 1024**3)
    cli = [sys.executable, "-m", "diffatlas"]
    rows = []
    try:
        store = work / "store.zarr"
        t0 = time.perf_counter()
        n = write_store(store, args.gb, args.channels, args.size, args.chunk)
        write_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        ratio = args.gb * 1e9 / limit
        print(f"store: {n} samples × {args.channels}×{args.size}×{args.size} float16 = {n * args.channels * args.size**2 * 2 / 1e9:.2f} GB "
              f"of maps, {disk / 1e9:.2f} GB on disk, written in {write_s:.0f} s; limit RLIMIT_AS {args.limit_gb} GB "
              f"per phase (maps = {ratio:.1f}× the limit)", flush=True)
        common = ["--store", str(store), "--layer", LAYER, "--timestep", str(TIMESTEP), "--threads", str(args.threads), "--device", "cpu"]
        sae_cfg = {"samples": "spatial", "k": args.k, "expansion": args.expansion, "steps": args.sae_steps, "batch_size": 1024}
        for phase in args.phases:
            out = work / phase
            if phase == "train-sae":
                argv = [*cli, "train-sae", *common, "--out", str(out), "--config-json", json.dumps(sae_cfg)]
                work_done, unit = args.sae_steps * 1024, "vectors"
            elif phase == "analyse-sae":
                make_sae(store, work / "sae_init", args.expansion, args.k)
                argv = [*cli, "analyse-sae", "--sae", str(work / "sae_init"), "--store", str(store), "--out", str(out),
                        "--threads", str(args.threads), "--device", "cpu"]
                work_done, unit = n, "samples"
            else:
                diffc_cfg = {"epochs": 1, "feature_dim": 64, "batch_size": 256, "granularities": ["coarse"], "seeds": 1}
                argv = [*cli, "train-diffc", *common, "--out", str(out), "--config-json", json.dumps(diffc_cfg)]
                work_done, unit = n, "samples (1 epoch)"
            print(f"{phase}: {' '.join(argv[1:])}", flush=True)
            res = run_limited(argv, limit, work / f"{phase}.log", args.threads)
            res.update(phase=phase, throughput=work_done / res["wall_s"], unit=unit)
            if phase == "analyse-sae" and res["rc"] == 0:
                inner = json.loads((out / "metrics.json").read_text())["analysis"]
                res["inner"] = f"one pass {inner['seconds']:.0f} s, {inner['samples_per_second']:.0f} samples/s ({n * args.size**2} vectors)"
            rows.append(res)
            status = "ok" if res["rc"] == 0 else f"FAILED (exit {res['rc']}): {res['last_error']}"
            speed = f"{res['throughput']:.0f} {unit}/s" if res["rc"] == 0 else "no throughput (failed)"
            print(f"  {status}; wall {res['wall_s']:.1f} s; peak RSS {res['peak_rss_mb']:.0f} MB; {speed}"
                  + (f"; {res['inner']}" if "inner" in res else ""), flush=True)
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("\nphase        status  wall_s  peak_RSS_MB  throughput")
    for r in rows:
        speed = f"{r['throughput']:.0f} {r['unit']}/s" if r["rc"] == 0 else "-"
        print(f"{r['phase']:12s} {'ok' if r['rc'] == 0 else 'FAILED':7s} {r['wall_s']:6.1f}  {r['peak_rss_mb']:11.0f}  {speed}")
    under = all(r["rc"] == 0 and r["peak_rss_mb"] < 2048 for r in rows)
    print(f"\nall phases completed with peak RSS < 2 GB: {'yes' if under else 'no'}")
    return 0 if under else 1


if __name__ == "__main__":
    sys.exit(main())
