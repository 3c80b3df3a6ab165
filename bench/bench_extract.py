"""Benchmark of activation extraction: per-image rate against the bare forward, fixed costs apart.

Prints ratios measured side by side in one run (no absolute targets are asserted). The
machine may be shared, so every comparison interleaves its variants:

0. fixed costs, paid once per extraction job: model load, store creation (arrays and
   attributes), and the rest of a job's constant part (first-batch warm-up, conditioning,
   consolidation), found as the intercept of job time against the number of images.
1. per forward pass, on the same (batch, timestep) inputs, rotating the order pass by pass:
   bare ``handle.predict_noise`` (no hooks) vs capturing every layer (with the per-pass work
   of extraction: seeded noise, pooling, maps, copy to the host), as shipped (the pass stops
   after the last selected layer) and forced to run to the end; and vs one full pass per
   layer (what per-layer scripts do).
2. end to end, as the workflow runs it (one ``extract_activations`` job per timestep): the
   per-image rate, the slope of job time between a one-batch job and an ``--n``-image job (so
   fixed costs cancel), divided by the bare rate (VAE encode + denoiser forwards of the same
   batches, same autocast), with spatial maps and without. Target >= 0.90 with maps. Two
   diagnostic rows: passes run to the end (no early stop: the pure cost of capture and
   storage) and the synchronous writer (what the background writer saves). On the CPU the
   same ratios are also printed from process CPU time (all threads, the writer's included):
   steadier than wall time on a shared machine, and a bound the wall-time ratio meets when a
   core is free for the writer.
3. (CPU, ``--rss``) peak RSS of extraction runs in fresh processes on two dataset sizes:
   memory is bounded by the batch, not the dataset.

``--model``: ``shapesworld`` (default: resources/models/shapesworld when present, else random
weights of its architecture; weights do not change the timing), a saved diffusers model
directory (SD3 and Flux included), a tiny family (``sd``, ``sdxl``, ``dit``, ``pixel``, ``sd3``,
``flux``), or a size of ``diffatlas make-tiny-model --size`` (``sd15``, ``sd2v``: random weights
at the published size).

Flow-matching models (SD3, Flux) run at sigmas (``--timesteps s0.250 s0.500``; by default
extract's default timesteps t as σ = t / T), and without ``--layers`` at the image-token stream
of every block (``block{i}.image``, ``single_block{i}.image``: extract's default layers are U-Net
blocks). Both variants take their inputs from extraction's own steps (``_Runner``): the seeded
ε, ``noised`` (x_σ = (1 - σ) x0 + σ ε through the diffusion core) and the denoiser's time (σ,
which the model handle passes to SD3 as σ·T and to Flux as σ).

The slope needs work well above a job's fixed cost: with tiny models (~1 ms an image on the CPU)
use ``--n 512`` or more; at ``--n 64`` (batch 64) it spans one 32-image batch (~0.1 s) and the
ratio is noise. Last measured (CPU, 1 thread, shared 2-core machine, ``--quick --repeats 2``,
with maps, wall): tiny SD3 1.00, Flux 0.94, UNet ``sd`` 1.56 at ``--n 512``; at ``--n 64`` SD3
0.87-1.00, Flux 0.88-0.98 with one negative outlier in three runs.

    python bench/bench_extract.py                                   # ShapesWorld, CPU, 128 images
    python bench/bench_extract.py --n 256 --repeats 3 --rss
    python bench/bench_extract.py --model sd3 --quick --n 512 --threads 1    # tiny SD3 at s0.050 s0.250 s0.500
    python bench/bench_extract.py --device cuda --model sd15 --n 256 --batch-size 32 \\
        --layers mid up_ft0 up_ft1 up_ft2 down_ft2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
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


def resolve_model(name: str, tmp: Path) -> tuple[Path, str]:
    """``--model`` -> a saved model directory and what it is."""
    from diffatlas.models.tiny import FAMILIES, make_tiny_model

    try:  # sizes of make-tiny-model --size (Stable Diffusion architectures at published size)
        from diffatlas.models.fullsize import SIZES, make_full_size_model
    except ImportError:
        SIZES, make_full_size_model = (), None
    if name == "shapesworld":
        return world_model(tmp)
    if (Path(name) / "model_index.json").exists():
        return Path(name), "saved model directory"
    if name in FAMILIES:
        return make_tiny_model(name, tmp / name), f"tiny random {name} model"
    if name in SIZES:
        return make_full_size_model(name, tmp / name), f"{name} architecture, random weights"
    raise SystemExit(f"--model {name!r}: not a model directory (no model_index.json); allowed: shapesworld, a model "
                     f"directory, a tiny family ({', '.join(FAMILIES)}) or a size ({', '.join(SIZES) or 'none in this checkout'})")


class Clock:
    """Wall time with the device drained first, so queued GPU work is counted where it ran."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> float:
        """Wall seconds of ``fn()``; its process CPU seconds (all threads) go to ``last_cpu``."""
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        self.sync()
        self.last_cpu = time.process_time() - c0
        return time.perf_counter() - t0


def autocast(cfg, device: torch.device):
    """Extraction's autocast for ``cfg.dtype`` on ``device`` (the same resolver extraction uses)."""
    from diffatlas.accel import amp_dtype, autocast

    return autocast(device, amp_dtype(cfg.dtype, device, "extract"))


def runner(handle, cfg, n: int, device, layers=None, stop_early: bool = True):
    """Extraction's own per-batch steps (:class:`diffatlas.activations.extract._Runner`) for
    ``n`` images with sample ids 0..n-1: its times in the model's convention (steps, or σ),
    its seeded forward noising (``noised``), the denoiser's time argument (``_timestep``:
    the step, or σ, which the handle turns into SD3's σ·T or Flux's σ) and its conditioning."""
    from diffatlas.activations.extract import _Runner, model_times, prompts_for

    prompts = prompts_for(cfg, ["x"] * n, [""] * n, str(getattr(handle, "family", "")))
    return _Runner(handle, cfg, layers or [], set(), prompts, np.arange(n, dtype=np.int64), device, stop_early,
                   model_times(cfg, handle))


def bare_forward(handle, images, cfg, device, clock: Clock) -> float:
    """Seconds of VAE encode + denoiser forward per (timestep, batch), as extraction runs them.

    Inputs are built, conditioning encoded and the seeded noise drawn outside the timing:
    only the model's work counts (with extraction's autocast); x_t is formed inside the
    timing from extraction's own noising (a UNet's ᾱ rule or a flow model's σ rule).
    """
    from diffatlas.activations.extract import images_to_tensor

    n, bs = len(images), cfg.batch_size
    run_ = runner(handle, cfg, n, device)
    work = []
    with torch.no_grad():
        for t in sorted(run_.times):
            for s in range(0, n, bs):
                x = images_to_tensor(images[s : s + bs], handle.image_size, device)
                shape = handle.encode_images(x[:1]).shape[1:]
                noise = run_.noise(t, range(s, s + len(x)), tuple(shape)).to(device)
                work.append((x, noise, t, run_._timestep(t, len(x)), run_.cond(s, s + len(x))))

    def run():
        with torch.no_grad(), autocast(cfg, device):
            for x, noise, t, tt, cond in work:
                x0 = handle.encode_images(x).float()
                handle.predict_noise(run_.noised(x0, t, noise), tt, cond)

    return clock.time(run)


def extraction(handle, images, cfg, out: Path, device, clock: Clock, stop_early: bool = True,
               background: bool = True) -> float:
    """Seconds of extraction as the workflow runs it: one job (store) per timestep."""
    from dataclasses import replace

    from diffatlas.activations.extract import extract_activations

    n = len(images)

    def run():
        for t in cfg.timesteps:
            extract_activations(handle, images=images, sample_ids=list(range(n)), labels=["x"] * n, coarse_labels=None,
                                captions=None, cfg=replace(cfg, timesteps=[t]), out=out / f"t{t}.zarr", device=device,
                                stop_early=stop_early, background=background)

    return clock.time(run)


class SubmitTimer:
    """Seconds the compute loop spends inside ``submit`` (handing a batch to the store): the
    whole write with the synchronous writer, only the queueing with the background one."""

    def __init__(self) -> None:
        from diffatlas.activations import store

        self.seconds = 0.0
        for cls in (store.ActivationWriter, store.BackgroundWriter):
            real = cls.submit

            def timed(obj, *a, _real=real, _cls=cls, **kw):
                # the background worker calls ActivationWriter.submit too: count the caller's thread only
                if threading.current_thread() is not threading.main_thread():
                    return _real(obj, *a, **kw)
                t0 = time.perf_counter()
                try:
                    return _real(obj, *a, **kw)
                finally:
                    self.seconds += time.perf_counter() - t0

            cls.submit = timed


def paired_passes(handle, images, cfg, device, clock: Clock) -> dict[str, float]:
    """Seconds per variant, measured pass by pass in rotating order (robust to machine load)."""
    from diffatlas.activations.extract import images_to_tensor
    from diffatlas.activations.hooks import ActivationCapture
    from diffatlas.activations.layers import resolve_layers

    layers = resolve_layers(handle.denoiser, cfg.layers)
    names = [x.name for x in layers if x.keeps_maps]  # text-token streams have no map
    kw = dict(spatial_max_size=cfg.spatial_max_size, pooling=cfg.pooling, grid=getattr(handle, "token_grid", None))
    run_ = runner(handle, cfg, len(images), device)
    caps = {
        "capture": ActivationCapture(handle.denoiser, layers, spatial_layers=names, stop_early=True, **kw),
        "capture_full": ActivationCapture(handle.denoiser, layers, spatial_layers=names, stop_early=False, **kw),
    }
    singles = [ActivationCapture(handle.denoiser, [x], spatial_layers={x.name} & set(names), stop_early=False, **kw)
               for x in layers]
    n, bs = len(images), cfg.batch_size
    totals = dict.fromkeys(["bare", "capture", "capture_full", "per_layer"], 0.0)

    def noised(x0, ids, t):
        return run_.noised(x0, t, run_.noise(t, ids, x0.shape[1:]))

    def to_host(res):
        for c in res.values():
            c.pooled.cpu().numpy()
            if c.spatial is not None:
                c.spatial.cpu().numpy()

    k = 0
    with torch.no_grad(), autocast(cfg, device):
        for t in sorted(run_.times):
            for s in range(0, n, bs):
                ids = list(range(s, min(n, s + bs)))
                x0 = handle.encode_images(images_to_tensor(images[s : s + bs], handle.image_size, device)).float()
                cond = run_.cond(s, s + len(ids))
                tt = run_._timestep(t, len(ids))
                x_t = noised(x0, ids, t)

                def bare():
                    handle.predict_noise(x_t, tt, cond)

                def capture(name):
                    def run():
                        with caps[name] as cap:
                            to_host(cap.run(handle.predict_noise, noised(x0, ids, t), tt, cond))
                    return run

                def per_layer():
                    for single in singles:
                        with single as cap:
                            to_host(cap.run(handle.predict_noise, noised(x0, ids, t), tt, cond))

                jobs = [("bare", bare), ("capture", capture("capture")), ("capture_full", capture("capture_full")),
                        ("per_layer", per_layer)]
                for name, fn in jobs[k % 4:] + jobs[: k % 4]:  # rotate the order pass by pass
                    totals[name] += clock.time(fn)
                k += 1
    return totals


def store_creation(handle, cfg, n: int, tmp: Path, device) -> float:
    """Seconds to create an empty store with the job's arrays and attributes."""
    from diffatlas.activations.extract import images_to_tensor
    from diffatlas.activations.hooks import ActivationCapture
    from diffatlas.activations.layers import resolve_layers
    from diffatlas.activations.store import ActivationWriter, LayerSpec

    layers = resolve_layers(handle.denoiser, cfg.layers)
    run_ = runner(handle, cfg, 1, device)
    t = run_.times[0]
    maps = [x.name for x in layers if x.keeps_maps]
    x = images_to_tensor(np.zeros((1, handle.image_size, handle.image_size, 3), np.uint8), handle.image_size, device)
    with torch.no_grad(), autocast(cfg, device), ActivationCapture(
        handle.denoiser, layers, spatial_layers=maps, spatial_max_size=cfg.spatial_max_size,
        grid=getattr(handle, "token_grid", None)
    ) as cap:
        x0 = handle.encode_images(x).float()
        res = cap.run(handle.predict_noise, x0, run_._timestep(t, 1), run_.cond(0, 1))
    specs = [LayerSpec(x.name, x.module_path, res[x.name].pooled.shape[1],
                       res[x.name].spatial.shape[2] if x.name in maps else 0,
                       res[x.name].spatial.shape[3] if x.name in maps else 0, cfg.spatial and x.name in maps)
             for x in layers]
    t0 = time.perf_counter()
    ActivationWriter(tmp / "empty.zarr", timesteps=[10], alpha_bar=[float("nan") if run_.flow else 0.5],
                     sigma=[0.01] if run_.flow else None, sample_ids=list(range(n)), labels=["x"] * n,
                     coarse_labels=None, layers=specs, attrs={"a": 1}, batch_size=cfg.batch_size)
    return time.perf_counter() - t0


def rss_child(args) -> int:
    """Run one extraction from a dataset directory and print peak RSS (MiB) as JSON."""
    import resource

    from diffatlas.activations.config import ExtractConfig
    from diffatlas.activations.extract import extract
    from diffatlas.io import set_threads

    set_threads(args.threads)
    cfg = ExtractConfig.from_json(args.cfg)
    t0 = time.perf_counter()
    extract(cfg, model=args.model, dataset=args.rss_child, out=args.out, device="cpu")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak, "seconds": time.perf_counter() - t0}))
    return 0


def rss_runs(args, cfg, model_dir: Path, image_size: int, tmp: Path) -> int:
    from diffatlas.data.dataset import write_dataset

    # One timestep keeps these runs short; memory does not depend on the number of timesteps.
    rss_cfg = json.dumps({**cfg.to_dict(), "timesteps": [cfg.timesteps[0]]})
    print(f"\n3. peak memory (fresh process per run; same layers and maps, t = {cfg.timesteps[0]}; "
          f"{args.rss_image_size}px images resized to {image_size}px)")
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
          f"(held in memory, the extra images alone would take {mb1 - mb0:.0f} MiB as uint8)")
    return 0


def bench_config(args, handle):
    """Extract's workflow default (:class:`ExtractConfig`), narrowed by the flags and fitted to the model.

    A flow-matching model (SD3, Flux) runs at sigmas: without ``--timesteps`` it takes
    extract's default timesteps t as σ = t / T (the same store names, t50 -> s0.050), and
    without ``--layers``, where extract's default layers (U-Net blocks) do not exist on it,
    the image-token stream of every joint and single block. Times are checked against the
    model's convention as extraction checks them (:func:`~diffatlas.activations.extract.model_times`).
    """
    from dataclasses import replace

    from diffatlas.activations.config import ExtractConfig
    from diffatlas.activations.extract import model_times
    from diffatlas.activations.layers import layer_streams
    from diffatlas.models.diffusion import Time

    base = ExtractConfig()  # the workflow default
    times = None
    if args.timesteps is not None:
        times = [t.value if t.kind == "step" else str(t) for t in map(Time.parse, args.timesteps)]
    elif getattr(handle, "time_convention", "step") == "sigma":
        T = int(handle.num_train_timesteps)
        times = [str(Time.sigma(Time.parse(t).value / T)) for t in base.timesteps]
    layers = args.layers
    streams = layer_streams(handle.denoiser)
    if layers is None and not set(base.layers) <= set(streams):
        # image-token streams of joint blocks (block{i}.image, single_block{i}.image); a DiT's block{i}
        layers = [a for a, (_, st) in streams.items() if (st == "image" and "." in a) or (st is None and "block" in a)]
    cfg = replace(base, **{k: v for k, v in (("batch_size", args.batch_size), ("timesteps", times),
                                             ("layers", layers)) if v is not None})
    model_times(cfg, handle)  # a step on a flow model, a sigma on a UNet, or a step out of range: UserError
    return cfg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapesworld", help="shapesworld | model directory | tiny family | size (sd15, sd2v)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument("--n", type=int, default=128, help="images of the throughput runs (default 128)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward (default: extract's default)")
    p.add_argument("--timesteps", nargs="+", default=None,
                   help="steps (250, t250) or, for a flow model (SD3, Flux), sigmas (s0.500); default: extract's "
                        "default (a flow model: the same timesteps as sigmas t/T)")
    p.add_argument("--layers", nargs="+", default=None,
                   help="default: extract's default, or where the model has none of those (SD3, Flux) its image-token "
                        "streams (block{i}.image, single_block{i}.image)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="end-to-end runs of each variant, in A B B A order, summed (default 2)")
    p.add_argument("--quick", action="store_true", help="skip section 1 and the diagnostic rows of section 2")
    p.add_argument("--rss", action="store_true", help="also measure peak RSS in fresh processes (CPU)")
    p.add_argument("--rss-sizes", type=int, nargs=2, default=[128, 1024], help="dataset sizes of the memory runs")
    p.add_argument("--rss-image-size", type=int, default=128, help="side of the memory runs' images (default 128)")
    # internal: the memory-measuring child process
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return rss_child(args)

    import logging
    from dataclasses import replace

    sys.stdout.reconfigure(line_buffering=True)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("DIFFATLAS_NO_PROGRESS", "1")
    torch.set_num_threads(args.threads)
    from diffatlas.activations.layers import resolve_layers
    from diffatlas.errors import UserError
    from diffatlas.io import pick_device
    from diffatlas.models.loader import load_model

    device = pick_device(args.device)
    clock = Clock(device)
    with tempfile.TemporaryDirectory(prefix="bench_extract-") as tmpname:
        tmp = Path(tmpname)
        model_dir, what = resolve_model(args.model, tmp)
        t0 = time.perf_counter()
        handle = load_model(str(model_dir), device=device)
        clock.sync()
        load_s = time.perf_counter() - t0
        try:
            cfg = bench_config(args, handle)
        except UserError as err:
            raise SystemExit(f"bench_extract: {err}") from None
        size = int(handle.image_size)
        images = np.random.default_rng(0).integers(0, 256, (args.n, size, size, 3), dtype=np.uint8)
        layers = resolve_layers(handle.denoiser, cfg.layers)
        n_params = sum(p.numel() for p in handle.denoiser.parameters())
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, torch threads {args.threads}"
        print(f"model: {model_dir} ({what}), denoiser {n_params / 1e6:.2f}M parameters, {size}px; device {device} ({gpu}), "
              f"dtype {cfg.dtype}")
        print(f"work: {args.n} images x {len(cfg.timesteps)} timesteps {cfg.timesteps} (one job each), batch "
              f"{cfg.batch_size}, layers {', '.join(f'{x.name}={x.module_path}' for x in layers)}, spatial maps capped "
              f"at {cfg.spatial_max_size}")

        # The short job of the slope: one batch, or half the images when --n is under two batches.
        small = images[: min(cfg.batch_size, args.n // 2)]
        if args.n < 2 or len(small) == 0:
            raise SystemExit("--n must be at least 2 (the rate is a slope between two job sizes)")
        extraction(handle, small, replace(cfg, timesteps=cfg.timesteps[:1]), tmp / "warm", device, clock)  # warm-up
        bare_forward(handle, small, replace(cfg, timesteps=cfg.timesteps[:1]), device, clock)
        create_s = store_creation(handle, cfg, args.n, tmp, device)

        if not args.quick:
            pp = paired_passes(handle, images, cfg, device, clock)
            n_pass, L = args.n * len(cfg.timesteps), len(cfg.layers)
            print(f"\n1. per forward pass, variants interleaved pass by pass ({n_pass} image-passes each)")
            print(f"   bare forward (no hooks)                       {pp['bare']:8.2f} s")
            print(f"   capture all layers, as shipped                {pp['capture']:8.2f} s   throughput ratio "
                  f"{pp['bare'] / pp['capture']:.2f}")
            print(f"   capture all layers, pass run to the end       {pp['capture_full']:8.2f} s   throughput ratio "
                  f"{pp['bare'] / pp['capture_full']:.2f}")
            print(f"   one full pass per layer ({L} layers)             {pp['per_layer']:8.2f} s   -> one pass is "
                  f"{pp['per_layer'] / pp['capture']:.2f}x faster")

        print("\n2. end to end, one job per timestep: per-image rate (slope between a one-batch job and "
              f"{args.n} images) / bare (VAE encode + denoiser forwards, same batches and autocast)")
        # (label, maps, stop early, background writer); the last two rows show what the
        # shipped path gains from stopping early and from writing in the background.
        variants = [("with spatial maps", True, True, True), ("without spatial maps", False, True, True)]
        if not args.quick:
            variants += [("maps, passes run to the end", True, False, True),
                         ("maps, synchronous writer", True, True, False)]
        ratios, fixed, cpu_ratios = {}, {}, {}
        timer = SubmitTimer()
        for label, spatial, stop_early, background in variants:
            c = replace(cfg, spatial=spatial)
            wall = dict.fromkeys(("bare", "ext", "ext_small"), 0.0)
            cpu = dict(wall)
            timer.seconds = 0.0
            for r in range(args.repeats):  # A B B A ..., so a drift in machine load hits both alike
                for which in (("bare", "ext") if r % 2 == 0 else ("ext", "bare")):
                    if which == "bare":
                        wall["bare"] += bare_forward(handle, images, c, device, clock)
                        cpu["bare"] += clock.last_cpu
                    else:
                        kw = dict(stop_early=stop_early, background=background)
                        wall["ext_small"] += extraction(handle, small, c, tmp / f"s{r}", device, clock, **kw)
                        cpu["ext_small"] += clock.last_cpu
                        wall["ext"] += extraction(handle, images, c, tmp / f"e{r}", device, clock, **kw)
                        cpu["ext"] += clock.last_cpu

            def rates(sec):  # seconds per image: bare; extraction (slope); fixed seconds per job
                per_image = (sec["ext"] - sec["ext_small"]) / (args.repeats * (args.n - len(small)))
                return (sec["bare"] / (args.repeats * args.n), per_image,
                        (sec["ext"] / args.repeats - args.n * per_image) / len(cfg.timesteps))

            bare_s, ext_s, fixed[label] = rates(wall)
            ratios[label] = bare_s / ext_s
            line = (f"   {label:28s}: bare {1 / bare_s:7.1f} images/s; extraction {1 / ext_s:7.1f} images/s "
                    f"(x {len(cfg.timesteps)} timesteps) -> ratio {ratios[label]:.2f}; fixed per job {fixed[label]:.2f} s; "
                    f"in submit {1000 * timer.seconds / (args.repeats * (args.n + len(small)) * len(cfg.timesteps)):.2f} ms/image")
            if device.type == "cpu":  # process CPU seconds: robust to a loaded machine, and they count the writer thread
                cpu_bare, cpu_ext, _ = rates(cpu)
                cpu_ratios[label] = cpu_bare / cpu_ext
                line += f"; CPU-time ratio {cpu_ratios[label]:.2f}"
            print(line)
        print("\n0. fixed costs (paid once per job, not in the rates above)")
        print(f"   model load {load_s:.2f} s; store creation {create_s * 1000:.0f} ms; rest of a job's constant part "
              f"(first-batch warm-up, conditioning, consolidation) {fixed['with spatial maps'] - create_s:.2f} s with "
              f"maps, {fixed['without spatial maps'] - create_s:.2f} s without")
        print(f"\nsummary: per-image rate / bare forward = {ratios['with spatial maps']:.2f} with spatial maps "
              f"(target >= 0.90), {ratios['without spatial maps']:.2f} without ({args.model}, {device}, "
              f"batch {cfg.batch_size}, {len(cfg.layers)} layers)")
        if cpu_ratios:
            print(f"         CPU-time ratio {cpu_ratios['with spatial maps']:.2f} with spatial maps, "
                  f"{cpu_ratios['without spatial maps']:.2f} without (writer thread's CPU time included)")

        if args.rss:
            if device.type != "cpu":
                print("\n3. peak RSS: CPU only, skipped")
            elif rss_runs(args, cfg, model_dir, size, tmp):
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
