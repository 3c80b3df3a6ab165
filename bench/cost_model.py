"""Cost model of activation extraction at scale: store bytes, jobs, GPU-hours and disk.

    python bench/cost_model.py                                   # ImageNet-1k on SD1.5, config.yaml's extract
    python bench/cost_model.py --timesteps 50 100 250 500 750 --spatial-max-size 8 --shard-size 10000

Every input is computed or measured, never typed in as a result:

* bytes per image per (layer, timestep): the layer's real output shape, from a forward pass
  of the model's architecture on the ``meta`` device (no weights, no memory: SD1.5's UNet from
  diffatlas.models.fullsize at its 512 px / 64x64-latent size), through the extraction's own
  layer resolution and spatial cap (diffatlas.activations.layers / hooks.cap_size), then an
  empty store made by the extraction's own writer for one image, whose arrays' shapes and
  dtypes give the bytes (pooled float32, maps float16). Raw bytes: zarr's compression of
  real activations is not modelled.
* extraction speed: ``--rate`` image-timesteps per second per GPU and ``--fixed-s`` seconds
  per job. Defaults: the H200 run of scripts/gpu_check.sh in README ("On a GPU"): bench/
  bench_extract.py on SD1.5's architecture (random weights, fp16 autocast, 512 px, batch 32,
  layers mid/up_ft0/up_ft1, 3 timesteps): bare forward 28.5 images/s x 3 timesteps, extraction
  0.99 of it with spatial maps -> 28.5 x 3 x 0.99 = 84.6 image-timesteps/s; fixed per job:
  model load 10.0 s + store creation 0.044 s + warm-up 0.18 s. Extraction is about one
  forward pass per image-timestep whatever layers it keeps (the pass stops after the last
  one), so the rate holds for other layer lists up to the full pass.
* the job grid: one extraction job per (timestep, shard) (extract.shard_size, null = one
  shard), one gather per timestep when sharded, one SAE and one Diff-C job per (layer,
  timestep); SAE and Diff-C hours are not modelled here (bench/bench_sae.py, bench_diffc.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_1K_TRAIN = 1_281_167
"""Images in ImageNet-1k's training split (ILSVRC-2012)."""
# The H200 measurement in README ("On a GPU: scripts/gpu_check.sh"): see the docstring.
H200_BARE_IMAGES_S, H200_TIMESTEPS, H200_RATIO = 28.5, 3, 0.99
H200_FIXED_S = 10.0 + 0.044 + 0.18


def layer_shapes(size: str, layers: list[str]) -> dict[str, tuple[str, int, int, int]]:
    """Layer name -> (module path, channels, h, w) of its output, from a meta-device forward."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffatlas.activations.layers import resolve_layers
    from diffatlas.models.fullsize import unet_config

    cfg = unet_config(size)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    resolved = resolve_layers(unet, layers)
    modules = dict(unet.named_modules())
    shapes: dict[str, tuple[str, int, int, int]] = {}
    for lay in resolved:
        def hook(_m, _i, out, lay=lay):
            out = out[0] if isinstance(out, tuple) else out  # down blocks: (hidden, res_samples)
            shapes[lay.name] = (lay.module_path, *map(int, out.shape[1:4]))
        modules[lay.module_path].register_forward_hook(hook)
    s = cfg["sample_size"]
    with torch.no_grad():
        unet(torch.zeros(1, cfg["in_channels"], s, s, device="meta"), torch.tensor([500], device="meta"),
             encoder_hidden_states=torch.zeros(1, 77, cfg["cross_attention_dim"], device="meta"))
    return shapes


def bytes_per_image(shapes: dict, spatial: bool, spatial_max_size: int | None) -> dict[str, dict]:
    """Per layer: stored map size and bytes per image per timestep, read off a one-image store
    made by the extraction's writer (its dtypes and shapes, no values)."""
    import zarr

    from diffatlas.activations.hooks import cap_size
    from diffatlas.activations.store import POOLED, SPATIAL, ActivationWriter, LayerSpec

    specs = [LayerSpec(name, path, c, *cap_size(h, w, spatial_max_size), spatial)
             for name, (path, c, h, w) in shapes.items()]
    with tempfile.TemporaryDirectory() as tmp:
        ActivationWriter(Path(tmp) / "one.zarr", timesteps=[0], alpha_bar=[1.0], sample_ids=[0], labels=["x"],
                         coarse_labels=None, layers=specs, attrs={}, batch_size=1)
        g = zarr.open_group(str(Path(tmp) / "one.zarr"), mode="r")
        out = {}
        for spec in specs:
            pooled = g[POOLED.format(spec.name)]
            row = {"channels": spec.channels, "native": shapes[spec.name][2:], "stored": (spec.height, spec.width),
                   "pooled_B": pooled.dtype.itemsize * math.prod(pooled.shape[2:]), "spatial_B": 0}
            if spec.spatial:
                maps = g[SPATIAL.format(spec.name)]
                row["spatial_B"] = maps.dtype.itemsize * math.prod(maps.shape[2:])
            out[spec.name] = row
    return out


def plan(n_images: int, n_layers: int, timesteps: int, shard_size: int | None, per_image_timestep_B: float,
         rate: float, fixed_s: float) -> dict:
    shards = 1 if shard_size is None else math.ceil(n_images / shard_size)
    extract_jobs = timesteps * shards
    gpu_s = n_images * timesteps / rate + extract_jobs * fixed_s
    return {
        "shards": shards,
        "extract_jobs": extract_jobs,
        "gather_jobs": timesteps if shards > 1 else 0,
        "sae_jobs": n_layers * timesteps,
        "diffc_jobs": n_layers * timesteps,
        "gpu_hours": gpu_s / 3600,
        "job_minutes": (min(n_images, shard_size or n_images) / rate + fixed_s) / 60,
        "disk_TB": n_images * timesteps * per_image_timestep_B / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    from diffatlas.activations.config import ExtractConfig

    shipped = ExtractConfig.from_dict(yaml.safe_load((ROOT / "config.yaml").read_text())["extract"])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="sd15", help="architecture (diffatlas.models.fullsize.SIZES)")
    ap.add_argument("--n-images", type=int, default=IMAGENET_1K_TRAIN, help="default: ImageNet-1k train")
    ap.add_argument("--layers", nargs="+", default=shipped.layers, help="default: config.yaml extract.layers")
    ap.add_argument("--timesteps", type=int, nargs="+", default=shipped.timesteps, help="default: config.yaml's")
    ap.add_argument("--spatial-max-size", type=int, default=shipped.spatial_max_size)
    ap.add_argument("--no-spatial", action="store_true", help="pooled vectors only (extract.spatial: false)")
    ap.add_argument("--shard-size", type=int, default=getattr(shipped, "shard_size", None),
                    help="extract.shard_size (default: config.yaml's; null = one shard)")
    ap.add_argument("--rate", type=float, default=H200_BARE_IMAGES_S * H200_TIMESTEPS * H200_RATIO,
                    help="image-timesteps/s per GPU (default: measured on one H200, see above)")
    ap.add_argument("--fixed-s", type=float, default=H200_FIXED_S, help="seconds per extraction job besides images")
    args = ap.parse_args(argv)
    cfg = replace(shipped, layers=args.layers, timesteps=args.timesteps, spatial_max_size=args.spatial_max_size,
                  spatial=not args.no_spatial)

    shapes = layer_shapes(args.size, cfg.layers)
    rows = bytes_per_image(shapes, cfg.spatial, cfg.spatial_max_size)
    per_t = sum(r["pooled_B"] + r["spatial_B"] for r in rows.values())
    print(f"{args.size}, layers {cfg.layers}, timesteps {cfg.timesteps}, spatial "
          f"{'cap ' + str(cfg.spatial_max_size) if cfg.spatial else 'off'}\n")
    print("| layer | channels | map | stored map | pooled B | spatial B | per image per timestep |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        stored = f"{r['stored'][0]}x{r['stored'][1]}" if r["spatial_B"] else "-"
        print(f"| {name} | {r['channels']} | {r['native'][0]}x{r['native'][1]} | {stored} | {r['pooled_B']:,} | "
              f"{r['spatial_B']:,} | {(r['pooled_B'] + r['spatial_B']) / 1e6:.3f} MB |")
    print(f"| all layers | | | | | | {per_t / 1e6:.3f} MB (x {len(cfg.timesteps)} timesteps = "
          f"{per_t * len(cfg.timesteps) / 1e6:.2f} MB per image) |")

    p = plan(args.n_images, len(cfg.layers), len(cfg.timesteps), args.shard_size, per_t, args.rate, args.fixed_s)
    print(f"\n{args.n_images:,} images at {args.rate:.1f} image-timesteps/s per GPU, {args.fixed_s:.2f} s fixed per job:\n")
    print("| extraction jobs | gather jobs | SAE jobs | Diff-C jobs | GPU-hours (extraction) | minutes per job | disk (raw) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {p['extract_jobs']:,} ({len(cfg.timesteps)} timesteps x {p['shards']:,} shard(s)) | {p['gather_jobs']} | "
          f"{p['sae_jobs']} | {p['diffc_jobs']} | {p['gpu_hours']:.1f} | {p['job_minutes']:.1f} | {p['disk_TB']:.2f} TB |")

    print("\nWhat one SAE / Diff-C job reads (one layer at one timestep, every image):")
    for name, r in rows.items():
        spatial = f", spatial maps {args.n_images * r['spatial_B'] / 1e9:,.1f} GB" if r["spatial_B"] else ""
        print(f"  {name}: pooled vectors {args.n_images * r['pooled_B'] / 1e9:,.2f} GB{spatial}")

    # What moves it: one setting changed at a time, the rest as above.
    variants = [
        ("as above", cfg, args.shard_size),
        ("5 timesteps (configs/paper-activations.yaml)", replace(cfg, timesteps=[50, 100, 250, 500, 750]), args.shard_size),
        ("+ up_ft2 (640 ch, 64x64 map)", replace(cfg, layers=[*cfg.layers, "up_ft2"]), args.shard_size),
        ("spatial_max_size 8", replace(cfg, spatial_max_size=8), args.shard_size),
        ("spatial off (pooled only)", replace(cfg, spatial=False), args.shard_size),
        ("shard_size 10,000", cfg, 10_000),
        ("shard_size 100,000", cfg, 100_000),
    ]
    print("\n| setting changed | MB per image | extraction jobs | GPU-hours | minutes per job | disk (raw) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, c, shard in variants:
        r = rows if c.layers == cfg.layers else bytes_per_image(layer_shapes(args.size, c.layers), c.spatial, c.spatial_max_size)
        if c.layers == cfg.layers and (c.spatial, c.spatial_max_size) != (cfg.spatial, cfg.spatial_max_size):
            r = bytes_per_image(shapes, c.spatial, c.spatial_max_size)
        b = sum(x["pooled_B"] + x["spatial_B"] for x in r.values())
        q = plan(args.n_images, len(c.layers), len(c.timesteps), shard, b, args.rate, args.fixed_s)
        print(f"| {label} | {b * len(c.timesteps) / 1e6:.2f} | {q['extract_jobs']:,} | {q['gpu_hours']:.1f} | "
              f"{q['job_minutes']:.1f} | {q['disk_TB']:.2f} TB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
