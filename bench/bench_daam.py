"""Cost of DAAM tracing: generation time with tracing / without, and peak memory of each.

    python bench/bench_daam.py                      # ShapesWorld model if present, else its architecture, random weights
    python bench/bench_daam.py --model resources/models/shapesworld --prompts 16 --steps 20 --repeats 3

Both sides generate the same prompts with the same seeds and steps; the traced side is the
full :func:`diffatlas.daam.trace.trace_generation` (explicit attention, accumulation,
upsampling and word maps), the plain side the pipeline call alone. Runs alternate
(plain, traced, plain, traced, ...) after a warm-up and the ratio of medians is printed, of
wall-clock time and of process CPU time (the latter is robust on a machine shared with other
jobs when --threads is 1).
Peak memory is measured in a fresh subprocess per side (peak RSS on CPU; on CUDA also
``torch.cuda.max_memory_allocated``), plus the bytes held by the tracer's accumulators.
Target (issue 7): ratio <= 1.3 on CPU for the ShapesWorld model.

    python bench/bench_daam.py --families sd3,flux  # joint attention: tiny SD3 and Flux side by side

``--families`` benches tiny random models of those families (``diffatlas.models.tiny``) in
one run, each traced vs plain with the same alternation, and prints one ratio line per
family (target, issue 21: <= 1.3). Peak memory is not measured in this mode.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "resources" / "models" / "shapesworld"


def build_model(args: argparse.Namespace) -> str:
    """The model directory to bench: the shipped one, or the same architecture with random weights."""
    if args.model:
        return args.model
    if (DEFAULT_MODEL / "model_index.json").exists():
        return str(DEFAULT_MODEL)
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffatlas.data.shapesworld import VOCABULARY
    from diffatlas.models.architecture import world_text_encoder_config, world_unet_config
    from diffatlas.models.pipeline import ShapesWorldPipeline
    from diffatlas.models.tokenizer import build_world_tokenizer

    torch.manual_seed(0)
    tok = build_world_tokenizer(list(VOCABULARY))
    te = CLIPTextModel(CLIPTextConfig(**world_text_encoder_config(len(tok))))
    unet = UNet2DConditionModel(**world_unet_config(32))
    pipe = ShapesWorldPipeline(unet=unet, text_encoder=te, tokenizer=tok, scheduler=DDIMScheduler(num_train_timesteps=1000))
    out = Path(tempfile.mkdtemp(prefix="bench_daam_")) / "model"
    pipe.save_pretrained(str(out))
    print(f"(no trained model at {DEFAULT_MODEL}: benchmarking its architecture with random weights, {out})")
    return str(out)


def prompts(n: int) -> list[str]:
    from diffatlas.data.shapesworld import generate_shapesworld

    return list(generate_shapesworld({"n_samples": n, "seed": 1, "two_object_fraction": 0.5}).meta["caption"])


def plain_call_kwargs(handle) -> dict:
    """The pipeline arguments trace_generation adds for joint-attention models (same work on both sides)."""
    if handle.family in ("sd3", "flux"):
        return {"max_sequence_length": handle.t5_length, "height": handle.image_size, "width": handle.image_size}
    return {}


def time_sides(handle, ps: list[str], steps: int, guidance: float, batch: int, repeats: int) -> tuple[dict, dict]:
    """Wall-clock and CPU seconds of each run, plain and traced alternating, after a warm-up."""
    import torch

    from diffatlas.daam.trace import trace_generation

    extra = plain_call_kwargs(handle)

    def plain() -> None:
        for s in range(0, len(ps), batch):
            chunk = ps[s : s + batch]
            gens = [torch.Generator().manual_seed(s + j) for j in range(len(chunk))]
            handle.pipeline(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                            output_type="np", **extra)

    def traced() -> None:
        trace_generation(handle, ps, steps=steps, guidance=guidance, batch_size=batch)

    plain()
    traced()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "traced": []}
    cpu: dict[str, list[float]] = {"plain": [], "traced": []}
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("traced", traced)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return times, cpu


def bench_families(args: argparse.Namespace) -> int:
    """Tiny joint-attention models side by side: traced / plain per family."""
    import torch

    from diffatlas.daam.trace import AttentionTracer
    from diffatlas.models.loader import load_model
    from diffatlas.models.tiny import make_tiny_model

    torch.set_num_threads(args.threads)
    ps = prompts(args.prompts)
    root = Path(tempfile.mkdtemp(prefix="bench_daam_joint_"))
    rows = []
    for fam in args.families.split(","):
        handle = load_model(str(make_tiny_model(fam, root / fam)), device=args.device)
        n_att = len(AttentionTracer(handle.denoiser).modules)
        times, cpu = time_sides(handle, ps, args.steps, args.guidance, args.batch, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        rows.append((fam, n_att, med, med_cpu, times))
    print(f"tiny joint-attention models: {len(ps)} prompts x {args.steps} steps, guidance {args.guidance}, "
          f"batch {args.batch}, {args.threads} thread(s), {args.device}, {args.repeats} repeats (target <= 1.3)")
    for fam, n_att, med, med_cpu, times in rows:
        print(f"  {fam:5s} ({n_att} joint attention modules): plain {med['plain']:.2f} s, traced {med['traced']:.2f} s; "
              f"ratio traced / plain {med['traced'] / med['plain']:.3f} wall-clock, "
              f"{med_cpu['traced'] / med_cpu['plain']:.3f} CPU time "
              f"(runs plain {', '.join(f'{t:.2f}' for t in times['plain'])}; traced {', '.join(f'{t:.2f}' for t in times['traced'])})")
    return 0


def one_side(model: str, side: str, n: int, steps: int, guidance: float, batch: int, device: str) -> dict:
    """Run one side once (in this process) and report peak memory."""
    import torch

    from diffatlas.daam.trace import trace_generation
    from diffatlas.models.loader import load_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    handle = load_model(model, device=device)
    ps = prompts(n)
    extra = {}
    if side == "traced":
        run = trace_generation(handle, ps, steps=steps, guidance=guidance, batch_size=batch)
        extra["maps_bytes"] = int(sum(m.token_maps.nbytes for m in run.maps))
    else:
        for s in range(0, n, batch):
            chunk = ps[s : s + batch]
            gens = [torch.Generator().manual_seed(s + j) for j in range(len(chunk))]
            handle.pipeline(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np")
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}
    if torch.cuda.is_available() and device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--families", default=None, help="comma-separated tiny families to bench instead, e.g. sd3,flux")
    parser.add_argument("--_side", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["BENCH_THREADS"] = str(args.threads)
    if args.families:
        import logging

        logging.disable(logging.WARNING)
        return bench_families(args)
    if args._side:
        print(json.dumps(one_side(args.model, args._side, args.prompts, args.steps, args.guidance, args.batch, args.device)))
        return 0

    import logging

    import torch

    from diffatlas.daam.processor import find_cross_attention
    from diffatlas.daam.trace import AttentionTracer, layout_from_pipeline
    from diffatlas.models.loader import load_model

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    model = build_model(args)
    handle = load_model(model, device=args.device)
    ps = prompts(args.prompts)
    n_att = len(find_cross_attention(handle.denoiser))
    times, cpu = time_sides(handle, ps, args.steps, args.guidance, args.batch, args.repeats)
    # Accumulator size for one batch (what tracing holds while the pipeline runs).
    with AttentionTracer(handle.denoiser) as tr:
        chunk = ps[: args.batch]
        handle.pipeline(prompt=chunk, num_inference_steps=2, guidance_scale=args.guidance, output_type="np")
        acc_bytes = sum(t.numel() * t.element_size() for t in tr.accumulator.sums.values())
        layout = layout_from_pipeline(handle.pipeline, len(chunk))
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"model {model}: {n_att} cross-attention modules; {len(ps)} prompts x {args.steps} DDIM steps, "
          f"guidance {args.guidance} ({'CFG' if layout.guidance else 'no CFG'}), batch {args.batch}, {args.threads} thread(s), {args.device}")
    print(f"  plain  generation: median {med['plain']:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times['plain'])})")
    print(f"  traced generation: median {med['traced']:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times['traced'])})")
    print(f"  time ratio traced / plain: {med['traced'] / med['plain']:.3f} wall-clock, "
          f"{med_cpu['traced'] / med_cpu['plain']:.3f} CPU time (plain {med_cpu['plain']:.2f} s, traced {med_cpu['traced']:.2f} s)"
          "  (target <= 1.3 on CPU; on a shared machine trust the CPU-time ratio)")
    print(f"  tracer accumulators for one batch of {len(chunk)} ({layout.n_rows} denoiser rows): {acc_bytes / 2**20:.2f} MiB")
    peaks = {}
    for side in ("plain", "traced"):
        cmd = [sys.executable, __file__, "--_side", side, "--model", model, "--prompts", str(args.prompts), "--steps", str(args.steps),
               "--guidance", str(args.guidance), "--batch", str(args.batch), "--threads", str(args.threads), "--device", args.device]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peaks[side] = json.loads(res.stdout.strip().splitlines()[-1])
    line = f"  peak RSS: plain {peaks['plain']['peak_rss_mb']:.0f} MiB, traced {peaks['traced']['peak_rss_mb']:.0f} MiB"
    if "cuda_peak_mb" in peaks["plain"]:
        line += f"; CUDA peak: plain {peaks['plain']['cuda_peak_mb']:.0f} MiB, traced {peaks['traced']['cuda_peak_mb']:.0f} MiB"
    print(line + f"; word maps kept: {peaks['traced'].get('maps_bytes', 0) / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
