"""Caption fidelity of a ShapesWorld model, read by the judge, and the sample grid figure.

Protocol (all of it a function of :class:`~diffatlas.world.config.FidelityConfig`):

* **single-object captions** ``"a {colour} {shape}"``, cycling through the 12 fine classes;
  scored by the judge's largest object: shape accuracy, colour accuracy, both (fine class),
  and how often exactly one object appears;
* **two-object captions** ``"a {colour} {shape} and a {colour} {shape}"`` (two different fine
  classes drawn from ``seed``): how often exactly two objects appear (the gate), and how often
  both named objects are there with their shape and colour;
* samples of a UNet model come from its own pipeline (DDIM, ``num_inference_steps``,
  classifier-free guidance ``guidance_scale``); samples of a flow-matching model (the SD3
  world model) from the diffusion core's flow Euler sampler (:func:`generate_flow`: the
  model's own scheduler's sigmas, the same CFG, :func:`~diffatlas.models.diffusion.flow_step`);
  the starting noise of sample ``i`` is drawn once for all from ``seed``, so the numbers do
  not depend on ``batch_size``.

The quality gate of the shipped model: shape accuracy >= 0.90 and colour accuracy >= 0.85
on single-object captions, two objects for two-object captions >= 0.60 of the time.
Rates come with 95% Wilson intervals, since the default check uses few samples.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffatlas.errors import UserError
from diffatlas.intervals import wilson
from diffatlas.models.diffusion import cfg_batch, cfg_split, flow_step, uses_cfg
from diffatlas.world.config import FidelityConfig
from diffatlas.world.judge import judge_images, matches_caption

log = logging.getLogger(__name__)

#: The quality gate of the shipped model.
GATE = {"shape_accuracy": 0.90, "colour_accuracy": 0.85, "two_object_rate": 0.60}


def fidelity_captions(cfg: FidelityConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The captions of the check: (single, two), each a list of {caption, objects}.

    ``objects`` are the named objects ({shape, colour}) in caption order.
    """
    from diffatlas.data.shapesworld import FINE_CLASSES

    def obj(fine: str) -> dict[str, str]:
        colour, shape = fine.split(" ")
        return {"shape": shape, "colour": colour}

    single = [{"caption": f"a {FINE_CLASSES[i % 12]}", "objects": [obj(FINE_CLASSES[i % 12])]} for i in range(cfg.n_single)]
    rng = np.random.default_rng([cfg.seed, 2])
    two = []
    for _ in range(cfg.n_two):
        a, b = rng.choice(len(FINE_CLASSES), size=2, replace=False)
        fa, fb = FINE_CLASSES[int(a)], FINE_CLASSES[int(b)]
        two.append({"caption": f"a {fa} and a {fb}", "objects": [obj(fa), obj(fb)]})
    return single, two


@torch.no_grad()
def generate(pipe, captions: list[str], cfg: FidelityConfig, device: torch.device | str = "cpu") -> np.ndarray:
    """Sample one image per caption.  -> uint8 [N, S, S, 3].

    The noise of all N samples is drawn up front from ``cfg.seed`` (CPU generator), then fed
    to the pipeline in batches of ``cfg.batch_size``.
    """
    s = pipe.image_size
    c = pipe.unet.config.in_channels
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((len(captions), c, s, s), generator=g, device="cpu")  # seeded on the host: same noise on any device
    out = []
    for start in range(0, len(captions), cfg.batch_size):
        chunk = captions[start : start + cfg.batch_size]
        lat = noise[start : start + len(chunk)].to(device=device, dtype=pipe.unet.dtype)
        imgs = pipe(chunk, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                    latents=lat, output_type="np").images
        out.append(np.clip(np.round(imgs * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, s, s, 3), np.uint8)


@torch.no_grad()
def generate_flow(handle, captions: list[str], cfg: FidelityConfig) -> np.ndarray:
    """One image per caption from a flow-matching model (:func:`sample_flow`).  -> uint8 [N, S, S, 3]."""
    from diffatlas.geometry.sampling import decode_uint8

    return decode_uint8(handle, sample_flow(handle, captions, cfg), batch_size=cfg.batch_size)


@torch.no_grad()
def sample_flow(handle, captions: list[str], cfg: FidelityConfig) -> torch.Tensor:
    """Clean denoiser-space samples ``[N, C, h, w]`` of a flow-matching model, one per caption,
    with the core's Euler step.

    ``x`` starts as the same seeded noise :func:`generate` draws (N(0, I) = x at σ = 1) and
    moves ``x <- x + (σ' - σ) v`` down the scheduler's sigmas, with ``v`` the model's velocity
    (``handle.model_output``) guided as ``v_u + w (v_c - v_u)`` when ``guidance_scale > 1``
    (StableDiffusion3Pipeline's guidance; its negative prompt is "").
    """
    s, c = handle.latent_size, handle.latent_channels
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((len(captions), c, s, s), generator=g, device="cpu")  # seeded on the host: same noise on any device
    sigmas = handle.flow_sigmas(cfg.num_inference_steps)
    guided = uses_cfg(cfg.guidance_scale)
    uncond = handle.conditioning([""]) if guided else None
    out = []
    for start in range(0, len(captions), cfg.batch_size):
        chunk = captions[start : start + cfg.batch_size]
        x = noise[start : start + len(chunk)].to(device=handle.device, dtype=handle.dtype)
        cond = handle.conditioning(chunk)
        if guided:
            n = len(chunk)
            cond = {k: torch.cat([uncond[k].expand(n, *uncond[k].shape[1:]), v]) for k, v in cond.items()}
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v = handle.model_output(cfg_batch(x) if guided else x, sigma, cond).to(x.dtype)
            x = flow_step(cfg_split(v, cfg.guidance_scale) if guided else v, x, sigma, sigma_next)
        out.append(x)
    return torch.cat(out) if out else torch.zeros((0, c, s, s), dtype=handle.dtype, device=handle.device)


def _rate(flags: list[bool]) -> dict[str, Any]:
    k, n = int(sum(flags)), len(flags)
    return {"rate": round(k / n, 4) if n else None, "k": k, "n": n, "ci95": [round(x, 4) for x in wilson(k, n)]}


def score(single: list[dict[str, Any]], two: list[dict[str, Any]], verdicts_single: list[dict[str, Any]],
          verdicts_two: list[dict[str, Any]]) -> dict[str, Any]:
    """Fidelity metrics from the judge's verdicts (see the module docstring)."""
    ms = [matches_caption(v, c["objects"]) for v, c in zip(verdicts_single, single)]
    mt = [matches_caption(v, c["objects"]) for v, c in zip(verdicts_two, two)]
    per_class: dict[str, dict[str, float]] = {}
    for c, m in zip(single, ms):
        d = per_class.setdefault(c["caption"][2:], {"n": 0, "shape": 0, "colour": 0})
        d["n"] += 1
        d["shape"] += int(m["shape"])
        d["colour"] += int(m["colour"])
    metrics = {
        "shape_accuracy": _rate([m["shape"] for m in ms]),
        "colour_accuracy": _rate([m["colour"] for m in ms]),
        "fine_class_accuracy": _rate([m["shape"] and m["colour"] for m in ms]),
        "single_one_object_rate": _rate([m["count"] for m in ms]),
        "two_object_rate": _rate([m["count"] for m in mt]),
        "two_object_all_correct_rate": _rate([m["all"] for m in mt]),
        # Palette-coloured regions too large to be objects (a tinted background): not
        # objects for the judge, but a flaw of the samples worth watching.
        "background_blob_rate": _rate([v.get("n_background_blobs", 0) > 0 for v in verdicts_single + verdicts_two]),
        "per_class_single": per_class,
    }
    values = {k: metrics[k]["rate"] for k in GATE}
    metrics["gate"] = {
        "thresholds": GATE,
        "values": values,
        "passed": all(v is not None and v >= GATE[k] for k, v in values.items()) if two else None,
    }
    return metrics


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def evaluate_pipeline(pipe, cfg: FidelityConfig, device: torch.device | str = "cpu", handle=None) -> dict[str, Any]:
    """Generate, judge and score.  -> {"metrics", "single", "two", "images_single", "images_two", ...}.

    A ``handle`` of a flow-matching model samples with :func:`generate_flow` (``pipe`` unused).
    """
    single, two = fidelity_captions(cfg)
    captions = [c["caption"] for c in single + two]
    t0 = time.perf_counter()
    if handle is not None and handle.time_convention == "sigma":
        images = generate_flow(handle, captions, cfg)
    else:
        images = generate(pipe, captions, cfg, device)
    gen_s = time.perf_counter() - t0
    verdicts = judge_images(images)
    vs, vt = verdicts[: len(single)], verdicts[len(single) :]
    metrics = score(single, two, vs, vt)
    log.info(
        "fidelity: shape %.3f colour %.3f (single, n=%d); two objects %.3f (n=%d); %.1f s to generate",
        metrics["shape_accuracy"]["rate"], metrics["colour_accuracy"]["rate"], len(single),
        _nan(metrics["two_object_rate"]["rate"]), len(two), gen_s,
    )
    return {"metrics": metrics, "single": single, "two": two, "images": images, "verdicts": verdicts,
            "generation_seconds": round(gen_s, 2)}


def sample_grid(images: np.ndarray, record: dict[str, Any], path: str | os.PathLike, rows: int = 4,
                cols: int = 12) -> Path:
    """Grid of samples with their captions; a green frame when the judge agrees, red when not.

    ``images`` uint8 [N, S, S, 3] and ``record`` (the fidelity JSON: its ``samples`` list
    gives each image's caption and named objects, single-object captions first). The first
    half of the cells show single-object captions (frame: shape and colour right), the rest
    two-object captions (frame: two objects found).
    """
    from diffatlas.plotting import plt, save_figure

    samples = record["samples"]
    if len(samples) != len(images):
        raise UserError(f"sample grid: {len(images)} images but {len(samples)} samples in the fidelity record")
    idx_s = [i for i, e in enumerate(samples) if len(e["objects"]) == 1]
    idx_t = [i for i, e in enumerate(samples) if len(e["objects"]) > 1]
    n_cells = rows * cols
    n_s = min(len(idx_s), (n_cells + 1) // 2 if idx_t else n_cells)
    picks = idx_s[:n_s] + idx_t[: n_cells - n_s]
    verdicts = judge_images(images[picks]) if picks else []
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.05, rows * 1.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for cell, (idx, verdict) in enumerate(zip(picks, verdicts)):
        ax = axes.ravel()[cell]
        entry = samples[idx]
        m = matches_caption(verdict, entry["objects"])
        ok = (m["shape"] and m["colour"]) if len(entry["objects"]) == 1 else m["count"]
        ax.imshow(images[idx], interpolation="nearest")
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor("#2ca02c" if ok else "#d62728")
            spine.set_linewidth(2.0)
        ax.set_title(entry["caption"][2:].replace(" and a ", "\n+ "), fontsize=5, pad=2)

    def fmt(key: str) -> str:
        rate = record.get(key, {}).get("rate")
        return "n/a" if rate is None else f"{rate:.2f}"

    head = (f"shape {fmt('shape_accuracy')}  colour {fmt('colour_accuracy')}  two objects {fmt('two_object_rate')}"
            f"  ({record['sampler'].get('name', 'DDIM')} {record['sampler']['num_inference_steps']} steps, CFG {record['sampler']['guidance_scale']};"
            " frame: green = judge agrees)")
    model = record.get("model", {})
    fig.suptitle(f"{Path(str(model.get('path', ''))).name} ({model.get('revision', '')})\n{head}", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=150)


def run_fidelity(model_path: str | os.PathLike, cfg: FidelityConfig, out_json: str | os.PathLike,
                 out_samples: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                 revision: str | None = None, allow_pickle_weights: bool = False) -> dict[str, Any]:
    """Load the model, run the check, write the JSON (and the images, uint8 .npy).  -> the JSON dict."""
    from diffatlas.io import atomic_file, write_json
    from diffatlas.models.loader import load_model

    handle = load_model(str(model_path), device=device, revision=revision, allow_pickle_weights=allow_pickle_weights)
    pipe = handle.pipeline
    pipe.set_progress_bar_config(disable=True)
    result = evaluate_pipeline(pipe, cfg, handle.device, handle=handle)
    flow = handle.time_convention == "sigma"
    if flow:
        from diffatlas.models.diffusion import FLOW_NOISING_RULE

        sampler = {"name": "flow Euler", "num_inference_steps": cfg.num_inference_steps,
                   "sigmas": [round(x, 6) for x in handle.flow_sigmas(cfg.num_inference_steps)],
                   "shift": handle.scheduler.config.get("shift"), "noising_rule": FLOW_NOISING_RULE,
                   "guidance_scale": cfg.guidance_scale, "negative_prompt": ""}
    else:
        sampler = {"name": "DDIM", "num_inference_steps": cfg.num_inference_steps, "eta": 0.0,
                   "guidance_scale": cfg.guidance_scale, "negative_prompt": ""}
    model = {"path": str(model_path), "revision": handle.revision, "family": handle.family,
             "image_size": handle.image_size, "scheduler": type(handle.scheduler).__name__}
    if not flow:  # the UNet record keeps its keys (the shipped record stays valid)
        model["beta_schedule"] = handle.scheduler.config.get("beta_schedule")
    record = {
        "model": model,
        "config": cfg.to_dict(),
        "sampler": sampler,
        "judge": "diffatlas.world.judge.judge_images (deterministic colour/shape detector)",
        "seed": cfg.seed,
        "device": str(handle.device),
        "generation_seconds": result["generation_seconds"],
        **result["metrics"],
        "samples": [
            {"caption": e["caption"], "objects": e["objects"], "n_objects": v["n_objects"],
             "n_background_blobs": v["n_background_blobs"],
             "found": [f"{o['size']} {o['colour']} {o['shape']}" for o in v["objects"]]}
            for e, v in zip(result["single"] + result["two"], result["verdicts"])
        ],
    }
    if out_samples is not None:
        with atomic_file(out_samples) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, result["images"], allow_pickle=False)
    write_json(out_json, record)
    return record
