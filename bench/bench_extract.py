"""Benchmark of activation extraction on CPU with the ShapesWorld-architecture model.

Prints ratios measured side by side in one run (no absolute targets are asserted). The
machine may be shared, so every comparison interleaves its variants:

1. per forward pass, on the same (batch, timestep) inputs, rotating the order pass by pass:
   bare ``handle.predict_noise`` (no hooks) vs capturing every layer (with the per-pass work
   of extraction: seeded noise, pooling, maps, copy to numpy), as shipped (the pass stops
   after the last selected layer) and forced to run to the end (the pure cost of capture);
   and vs one full pass per layer (what per-layer scripts do). Targets: throughput ratio
   >= 0.90; one pass >= 0.8 x number of layers faster than one pass per layer.
2. end to end: the whole ``extract_activations`` (noise, conditioning, hooks, zarr writes)
   vs the bare passes on the same batches and timesteps (target >= 0.90).
3. peak RSS of extraction runs (fresh processes, ``extract`` from a dataset directory) on
   two dataset sizes: memory is bounded by the batch, not the dataset.

Uses resources/models/shapesworld when present, else a randomly initialised model of the
same architecture (diffatlas.models.architecture); weights do not change the timing.

    python bench/bench_extract.py                 # defaults: 128 images, 2 threads
    python bench/bench_extract.py --n 512 --repeats 2 --rss-sizes 512 4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "resources" / "models" / "shapesworld"


def world_model(tmp: Path) -> tuple[Path, str]:
    """The shipped checkpoint, or a random model with the ShapesWorld architecture."""
    if (SHIPPED / "model_index.json").exists():
        return SHIPPED, "shipped checkpoint"
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffatlas.data.shapesworld import VOCABULARY
    from diffatlas.models.architecture import world_text_encoder_config, world_unet_config
    from diffatlas.models.pipeline import ShapesWorldPipeline
    from diffatlas.models.tokenizer import build_world_tokenizer

    torch.manual_seed(0)
    tok = build_world_tokenizer(list(VOCABULARY))
    te = CLIPTextModel(CLIPTextConfig(**world_text_encoder_config(len(tok), bos_token_id=tok.bos_token_id,
                                                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)))
    unet = UNet2DConditionModel(**world_unet_config(32))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    path = tmp / "world_model"
    ShapesWorldPipeline(unet=unet, text_encoder=te, tokenizer=tok, scheduler=sched).save_pretrained(str(path))
    return path, "random weights, ShapesWorld architecture"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bare_forward(handle, images, cfg) -> float:
    """Seconds of the denoiser passes alone on the batches/timesteps extraction uses."""
    from diffatlas.activations.extract import images_to_tensor
    from diffatlas.activations.noise import add_noise, sample_noise

    n, bs = len(images), cfg.batch_size
    cond = handle.conditioning([""])
    batches = []
    for t in sorted(cfg.timesteps):
        for s in range(0, n, bs):
            x0 = handle.encode_images(images_to_tensor(images[s : s + bs], handle.image_size, torch.device("cpu")))
            noise = sample_noise(list(range(s, min(n, s + bs))), t, x0.shape[1:], cfg.seed)
            batches.append((add_noise(x0, noise, float(handle.alphas_cumprod[t])), torch.full((len(x0),), t)))

    def run():
        with torch.no_grad():
            for x_t, t in batches:
                handle.predict_noise(x_t, t, cond)

    return timed(run)


def paired_passes(handle, images, cfg) -> dict[str, float]:
    """Seconds per variant, measured pass by pass in rotating order (robust to machine load).

    Variants on the same (batch, timestep) inputs: ``bare`` (predict_noise, no hooks),
    ``capture`` (all layers, as shipped), ``capture_full`` (all layers, pass run to the end),
    ``per_layer`` (one full pass per layer, each capturing one layer). The capture variants
    include the per-pass work of extraction: seeded noise and the copy of results to numpy.
    """
    from diffatlas.activations.extract import images_to_tensor
    from diffatlas.activations.hooks import ActivationCapture
    from diffatlas.activations.layers import resolve_layers
    from diffatlas.activations.noise import add_noise, sample_noise

    layers = resolve_layers(handle.denoiser, cfg.layers)
    names = [x.name for x in layers]
    kw = dict(spatial_max_size=cfg.spatial_max_size, pooling=cfg.pooling)
    caps = {
        "capture": ActivationCapture(handle.denoiser, layers, spatial_layers=names, stop_early=True, **kw),
        "capture_full": ActivationCapture(handle.denoiser, layers, spatial_layers=names, stop_early=False, **kw),
    }
    singles = [ActivationCapture(handle.denoiser, [x], spatial_layers=[x.name], stop_early=False, **kw) for x in layers]
    cond = handle.conditioning([""])
    n, bs = len(images), cfg.batch_size
    totals = dict.fromkeys(["bare", "capture", "capture_full", "per_layer"], 0.0)

    def noised(x0, ids, t):
        return add_noise(x0, sample_noise(ids, t, x0.shape[1:], cfg.seed), float(handle.alphas_cumprod[t]))

    def to_numpy(res):
        for c in res.values():
            c.pooled.cpu().numpy(), c.spatial.cpu().numpy()

    k = 0
    with torch.no_grad():
        for t in sorted(cfg.timesteps):
            for s in range(0, n, bs):
                ids = list(range(s, min(n, s + bs)))
                x0 = handle.encode_images(images_to_tensor(images[s : s + bs], handle.image_size, torch.device("cpu")))
                tt = torch.full((len(ids),), t)
                x_t = noised(x0, ids, t)

                def bare():
                    handle.predict_noise(x_t, tt, cond)

                def capture(name):
                    def run():
                        with caps[name] as cap:
                            to_numpy(cap.run(handle.predict_noise, noised(x0, ids, t), tt, cond))
                    return run

                def per_layer():
                    for single in singles:
                        with single as cap:
                            to_numpy(cap.run(handle.predict_noise, noised(x0, ids, t), tt, cond))

                jobs = [("bare", bare), ("capture", capture("capture")), ("capture_full", capture("capture_full")),
                        ("per_layer", per_layer)]
                for name, fn in jobs[k % 4:] + jobs[: k % 4]:  # rotate the order pass by pass
                    totals[name] += timed(fn)
                k += 1
    return totals


def extraction(handle, images, cfg, out: Path, stop_early: bool = True) -> float:
    from diffatlas.activations.extract import extract_activations

    n = len(images)
    return timed(lambda: extract_activations(
        handle, images=images, sample_ids=list(range(n)), labels=["x"] * n, coarse_labels=None, captions=None,
        cfg=cfg, out=out, stop_early=stop_early,
    ))


def rss_child(args) -> int:
    """Run one extraction from a dataset directory and print peak RSS (MiB) as JSON."""
    import resource

    from diffatlas.activations.config import ExtractConfig
    from diffatlas.activations.extract import extract
    from diffatlas.io import set_threads

    set_threads(args.threads)
    cfg = ExtractConfig.from_json(args.cfg)
    t = timed(lambda: extract(cfg, model=args.model, dataset=args.rss_child, out=args.out, device="cpu"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak, "seconds": t}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=128, help="images in the throughput runs (default 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="end-to-end runs of each variant, in A B B A order, summed (default 2)")
    p.add_argument("--rss-sizes", type=int, nargs=2, default=[128, 1024], help="dataset sizes of the memory runs")
    p.add_argument("--rss-image-size", type=int, default=128, help="side of the memory runs' images (default 128)")
    # internal: the memory-measuring child process
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return rss_child(args)

    import logging

    sys.stdout.reconfigure(line_buffering=True)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("DIFFATLAS_NO_PROGRESS", "1")
    torch.set_num_threads(args.threads)
    from diffatlas.activations.config import ExtractConfig
    from diffatlas.activations.layers import resolve_layers
    from diffatlas.data.dataset import write_dataset
    from diffatlas.models.loader import load_model

    with tempfile.TemporaryDirectory(prefix="bench_extract-") as tmpname:
        tmp = Path(tmpname)
        model_dir, what = world_model(tmp)
        handle = load_model(model_dir)
        cfg = ExtractConfig()  # the workflow default: mid, up_ft0, up_ft1 at t = 50, 250, 500
        images = np.random.default_rng(0).integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
        layers = resolve_layers(handle.denoiser, cfg.layers)
        n_params = sum(p.numel() for p in handle.denoiser.parameters())
        print(f"model: {model_dir} ({what}), UNet {n_params / 1e6:.2f}M parameters, torch threads {args.threads}")
        print(f"work: {args.n} images x {len(cfg.timesteps)} timesteps, batch {cfg.batch_size}, layers "
              f"{', '.join(f'{x.name}={x.module_path}' for x in layers)}, spatial maps capped at {cfg.spatial_max_size}")

        extraction(handle, images[: cfg.batch_size], ExtractConfig(timesteps=[50]), tmp / "warm.zarr")  # warm-up
        n_pass = args.n * len(cfg.timesteps)
        L = len(cfg.layers)
        pp = paired_passes(handle, images, cfg)
        print(f"\n1. per forward pass, variants interleaved pass by pass ({n_pass} image-passes each)")
        print(f"   bare forward (no hooks)                       {pp['bare']:8.2f} s")
        print(f"   capture all layers, as shipped                {pp['capture']:8.2f} s   throughput ratio "
              f"{pp['bare'] / pp['capture']:.2f}  (target >= 0.90)")
        print(f"   capture all layers, pass run to the end       {pp['capture_full']:8.2f} s   throughput ratio "
              f"{pp['bare'] / pp['capture_full']:.2f}")
        print(f"   one full pass per layer ({L} layers)             {pp['per_layer']:8.2f} s   -> one pass is "
              f"{pp['per_layer'] / pp['capture']:.2f}x faster (target >= {0.8 * L:.1f}x); "
              f"{pp['per_layer'] / pp['capture_full']:.2f}x with full passes")

        bare = ext = 0.0
        for r in range(args.repeats):  # A B B A ..., so a drift in machine load hits both alike
            order = ("bare", "ext") if r % 2 == 0 else ("ext", "bare")
            for which in order:
                if which == "bare":
                    bare += bare_forward(handle, images, cfg)
                else:
                    ext += extraction(handle, images, cfg, tmp / "a.zarr")
        print("\n2. end to end: extract_activations (noise, conditioning, hooks, zarr writes) vs bare forward passes")
        print(f"   bare forward {n_pass * args.repeats / bare:6.1f} image-passes/s ({bare:.2f} s); extraction "
              f"{n_pass * args.repeats / ext:6.1f} /s ({ext:.2f} s) -> ratio {bare / ext:.2f}  (target >= 0.90)")

        # One timestep keeps these runs short; memory does not depend on the number of timesteps.
        rss_cfg = json.dumps({**cfg.to_dict(), "timesteps": [50]})
        print(f"\n3. peak memory (fresh process per run; same layers and maps, t = 50; {args.rss_image_size}px images "
              f"resized to {handle.image_size}px)")
        rss = []
        for size in args.rss_sizes:
            s = args.rss_image_size
            imgs = np.random.default_rng(1).integers(0, 256, (size, s, s, 3), dtype=np.uint8)
            meta = pd.DataFrame({"sample_id": np.arange(size), "label": ["x"] * size, "coarse_label": ["x"] * size,
                                 "caption": [""] * size})
            data = tmp / f"data{size}"
            write_dataset(data, imgs, meta)
            del imgs
            cmd = [sys.executable, __file__, "--rss-child", str(data), "--model", str(model_dir), "--out",
                   str(tmp / f"rss{size}.zarr"), "--cfg", rss_cfg, "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DIFFATLAS_NO_PROGRESS": "1"})
            if res.returncode != 0:
                print(res.stderr[-2000:])
                return 1
            info = json.loads(res.stdout.strip().splitlines()[-1])
            mb = size * s * s * 3 / 2**20
            rss.append((mb, info["peak_rss_mib"]))
            print(f"   {size:6d} images ({mb:7.1f} MiB of pixels): peak RSS {info['peak_rss_mib']:7.1f} MiB"
                  f"  ({info['seconds']:.1f} s)")
        (mb0, r0), (mb1, r1) = rss
        print(f"   peak RSS grew {r1 - r0:+.1f} MiB for {mb1 - mb0:+.1f} MiB more pixels "
              f"(held in memory, the extra images alone would take {mb1 - mb0:.0f} MiB as uint8, "
              f"{4 * (mb1 - mb0):.0f} MiB as float32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
