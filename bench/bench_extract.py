"""Benchmark of activation extraction on CPU with the ShapesWorld-architecture model.

Prints ratios measured side by side in one run (no absolute targets are asserted):

1. extraction throughput / bare forward-pass throughput on the same batches and timesteps
   (target >= 0.90). "Bare" = only ``handle.predict_noise`` on precomputed noisy batches,
   no hooks, no noise generation, no writing. "Extraction" = the whole
   ``extract_activations`` (noise, conditioning, hooks, pooling, zarr writes), once as
   shipped (the pass stops after the last selected layer) and once forced to run every
   pass to the end (the pure cost of capture).
2. one pass for all layers vs one extraction per layer (target >= 0.8 x number of layers);
   the per-layer baseline runs the whole network for each layer, as per-layer scripts do.
3. peak RSS of ``diffatlas extract``-equivalent runs (fresh processes) on two dataset sizes:
   memory is bounded by the batch, not the dataset.

Uses resources/models/shapesworld when present, else a randomly initialised model of the
same architecture (diffatlas.models.architecture); weights do not change the timing.

    python bench/bench_extract.py                 # defaults: 128 images, 2 threads
    python bench/bench_extract.py --n 512 --rss-sizes 512 8192
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
    p.add_argument("--repeats", type=int, default=2, help="repeats per measurement; the fastest counts (default 2)")
    p.add_argument("--rss-sizes", type=int, nargs=2, default=[256, 2048], help="dataset sizes of the memory runs")
    p.add_argument("--rss-image-size", type=int, default=64, help="side of the memory runs' images (default 64)")
    # internal: the memory-measuring child process
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return rss_child(args)

    import logging

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
        best = {"bare": [], "extract": [], "extract_full": []}
        for r in range(args.repeats):  # interleaved, so machine load hits all alike
            best["bare"].append(bare_forward(handle, images, cfg))
            best["extract"].append(extraction(handle, images, cfg, tmp / "a.zarr"))
            best["extract_full"].append(extraction(handle, images, cfg, tmp / "b.zarr", stop_early=False))
        per_layer = []
        for r in range(args.repeats):
            per_layer.append(sum(
                extraction(handle, images, ExtractConfig(layers=[lay]), tmp / f"l{i}.zarr", stop_early=False)
                for i, lay in enumerate(cfg.layers)
            ))
        bare, ext, full, naive = (min(best["bare"]), min(best["extract"]), min(best["extract_full"]), min(per_layer))
        n_pass = args.n * len(cfg.timesteps)
        print("\n1. throughput (images x timesteps per second; fastest of", args.repeats, "runs)")
        print(f"   bare forward passes (no hooks, no I/O)        {n_pass / bare:8.1f} /s  ({bare:.2f} s)")
        print(f"   extraction, as shipped (stops after last layer) {n_pass / ext:8.1f} /s  ({ext:.2f} s)"
              f"   ratio {bare / ext:.2f}  (target >= 0.90)")
        print(f"   extraction, every pass run to the end          {n_pass / full:8.1f} /s  ({full:.2f} s)"
              f"   ratio {bare / full:.2f}")
        L = len(cfg.layers)
        print(f"\n2. one pass for {L} layers vs {L} per-layer extractions (full passes each)")
        print(f"   per-layer total {naive:.2f} s; all layers in one pass {ext:.2f} s -> {naive / ext:.2f}x faster"
              f"  (target >= {0.8 * L:.1f}x); with full passes on both sides {naive / full:.2f}x")

        # One timestep keeps these runs short; memory does not depend on the number of timesteps.
        rss_cfg = json.dumps({**cfg.to_dict(), "timesteps": [50]})
        print(f"\n3. peak memory (fresh process per run; same layers and maps, t = 50; {args.rss_image_size}px images)")
        for size in args.rss_sizes:
            s = args.rss_image_size
            import pandas as pd

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
            print(f"   {size:6d} images ({mb:7.1f} MiB of pixels): peak RSS {info['peak_rss_mib']:7.1f} MiB"
                  f"  ({info['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
