"""The judged steering experiment at one (model, layer, timestep): generate, judge, count.

For each word of the steered attributes (ShapesWorld colours and shapes) with its latent ``j``
(:func:`diffatlas.interventions.judged.select_latents`), all with the same seeds per prompt:

* **steer** prompts that name another value ("a blue circle" for red) by adding, at every
  position (``intervene.where: everywhere``) or only at positions where latent j is active
  (``active``: z_j > 0 at that position and pass, read through the SAE; the controls are added
  at the same positions) and every pass inside the window ``t ± window``,
  ``α · mean_act_j · W_dec[j] / input_scale`` (α in multiples of what the latent adds when it
  fires: ``mean_act_j`` is its mean activation when active, ``latents.parquet``), and as
  controls a vector of the same norm along a random other latent's decoder row and along a
  Gaussian random direction; α = 0 is the baseline;
* **ablate** latent j (``z_j := 0`` through the SAE, keeping its reconstruction error) on
  prompts that name the value, and as control a random other latent.

One batch holds every word's images of one (experiment, condition, α): each image gets its own
latent and direction through :class:`PerImageSAE`, so the edit is exactly the library's
(:func:`diffatlas.interventions.edit.edit_delta`), applied by :class:`InterventionHook`.

Artifact (a directory written atomically): ``rates.csv`` (the dose-response table),
``verdicts.csv`` (per word), ``selection.csv``, ``judged.csv`` (one row per image: prompt,
noise id, what the judge found), ``images.safetensors`` (uint8 ``[N, H, W, 3]``, rows of
judged.csv) and ``record.json`` (model, layer, module, time window and the sampler timesteps
inside it, SAE path and provenance, settings, seed, device, dtype, seconds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from diffatlas.errors import UserError
from diffatlas.interventions.config import STEER_WHERE, InterventionConfig
from diffatlas.interventions.edit import SteeringSAE
from diffatlas.interventions.generate import check_window, resolve_layer, sample, sampler_timesteps
from diffatlas.interventions.hook import InterventionHook
from diffatlas.interventions.judged import attribute_present, rate_table, select_latents, verdicts
from diffatlas.interventions.spec import Intervention
from diffatlas.models.diffusion import uses_cfg

log = logging.getLogger(__name__)

RATES, VERDICTS, SELECTION, JUDGED, IMAGES, RECORD = (
    "rates.csv", "verdicts.csv", "selection.csv", "judged.csv", "images.safetensors", "record.json")


@dataclass
class PerImageSAE(SteeringSAE):
    """An SAE view for a batch in which image i has its own latent ``row_latent[i]`` and steering
    vector ``row_vector[i]`` (raw units, the whole edit: steer with α = 1).

    Tensors of ``n`` images are repeated to the batch (CFG batches are ``[uncond, cond]``, so
    image i sits at rows i and n + i). ``code`` reads each row's own latent, ``atom`` returns each
    row's decoder row ``[B, 1, C]``, ``direction`` each row's vector ``[B, 1, C]``: the edit maths
    broadcasts them over positions unchanged.
    """

    row_latent: torch.Tensor | None = None  # [n] long
    row_vector: torch.Tensor | None = None  # [n, C] float32

    @classmethod
    def of(cls, base: SteeringSAE, row_latent: list[int], row_vector: torch.Tensor | None = None) -> "PerImageSAE":
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(SteeringSAE) if f.name != "_cache"}
        return cls(**fields, row_latent=torch.as_tensor(row_latent, dtype=torch.long), row_vector=row_vector)

    def _per_row(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        if rows % t.shape[0]:
            raise UserError(f"a batch of {rows} rows does not hold the {t.shape[0]} images this edit was built for")
        return t.repeat(rows // t.shape[0], *([1] * (t.ndim - 1)))

    def atom(self, j: int, like: torch.Tensor) -> torch.Tensor:
        lat = self._per_row(self.row_latent, like.shape[0]).to(self.sae.W_dec.device)
        return self.sae.W_dec[lat].detach().to(like.device, torch.float32)[:, None, :]

    def direction(self, j: int, kind: str, like: torch.Tensor) -> torch.Tensor:
        return self._per_row(self.row_vector, like.shape[0]).to(like.device, torch.float32)[:, None, :]

    def code(self, v: torch.Tensor, j: int | torch.Tensor, where: torch.Tensor | None = None, *,
             gather: bool | None = None) -> torch.Tensor:
        lat = self._per_row(self.row_latent, v.shape[0]).to(v.device)
        lat = lat.reshape(-1, *([1] * (v.ndim - 2))).expand(v.shape[:-1])
        return super().code(v, lat, where, gather=gather)


def edit_where(experiment: str, condition: str, where: str) -> str:
    """The ``where`` column of a judged image: none (baseline), active (ablation), else the steering mode."""
    if condition == "baseline":
        return "none"
    return "active" if experiment == "ablate" else where


def word_prompts(attribute: str, value: str, names_it: bool, n: int, seed: int) -> list[str]:
    """``n`` single-object ShapesWorld captions that name ``value`` (or do not), from a seeded
    shuffle of every colour x shape caption, cycled when ``n`` exceeds them."""
    from diffatlas.data.shapesworld import COLOURS, SHAPES, caption_for

    pool = [caption_for([{"shape": s, "colour": c}], size_words=False).text for c in COLOURS for s in SHAPES
            if ({"colour": c, "shape": s}[attribute] == value) == names_it]
    order = np.random.default_rng([seed, len(value), sum(map(ord, value))]).permutation(len(pool))
    return [pool[order[i % len(pool)]] for i in range(n)]


def attribute_values(attribute: str) -> tuple[str, ...]:
    from diffatlas.data.shapesworld import COLOURS, SHAPES

    return {"colour": COLOURS, "shape": SHAPES}[attribute]


def run_experiment(handle: Any, sae_dir: str | Path, layer: str, timestep: int, cfg: InterventionConfig,
                   out: str | Path, *, model: str, share_prefix: bool = True) -> pd.DataFrame:
    """Generate, judge and count one (model, layer, timestep) cell; write the artifact to ``out``.

    ``share_prefix``: the sampler steps before the window are run once per experiment and shared by
    its edited runs (bit-identical to running each from x_T; False runs each from x_T, for the bench).
    """
    from safetensors.torch import save_file

    from diffatlas.geometry.sampling import decode_uint8
    from diffatlas.io import atomic_dir, write_json
    from diffatlas.world.judge import judge_images

    t0 = time.perf_counter()
    sae_dir = Path(sae_dir)
    latents_path = sae_dir / "latents.parquet"
    if not latents_path.is_file():
        raise UserError(f"no latents table at {latents_path}; expected a train-sae output directory")
    latents = pd.read_parquet(latents_path)
    resolved = resolve_layer(handle, layer)
    base = SteeringSAE.load(sae_dir, device=handle.device)
    T = handle.num_train_timesteps
    if not 0 <= int(timestep) < T:
        raise UserError(f"intervene timestep {timestep} is outside model {model!r}'s schedule; allowed: 0..{T - 1}")
    t_sae = base.cfg.get("timestep")
    if t_sae is not None and int(t_sae) != int(timestep):
        raise UserError(f"SAE {sae_dir} was trained at timestep {t_sae}, but the experiment steers around t{timestep}; "
                        f"use the SAE of t{timestep}")
    window = dict(t_max=min(T - 1, int(timestep) + cfg.window), t_min=max(0, int(timestep) - cfg.window))
    selection = pd.concat([select_latents(latents, a, attribute_values(a), cfg.min_active) for a in cfg.attributes],
                          ignore_index=True)
    chosen = selection[selection["latent"] >= 0]
    for j in chosen["latent"]:
        base.check(latent=int(j), model=model, layer=resolved.name, module_path=resolved.module_path)
    probe = Intervention(latent=int(chosen["latent"].iloc[0]) if len(chosen) else 0, mode="ablate", **window,
                         cfg_branch=cfg.cfg_branch)
    inside = check_window(handle, probe, cfg.steps, model)
    mined_on = _mined_on(sae_dir)
    if mined_on != "train":
        log.warning("SAE %s mined its top images on %r, not the training split: the latents were chosen on images "
                    "the SAE validates on (set intervene.sae.mine_on: train)", sae_dir, mined_on)

    # Controls: per word, a random other latent (alive on the mined images) and a Gaussian direction.
    rng = np.random.default_rng(cfg.seed)
    alive = latents.loc[latents["n_active"] > 0, "latent"].to_numpy()
    W = base.sae.W_dec.detach().to("cpu", torch.float32)
    controls = {}
    for sel in chosen.itertuples(index=False):
        others = alive[alive != sel.latent]
        if len(others) == 0:
            raise UserError(f"SAE {sae_dir} has no live latent besides {sel.latent} to serve as the random-latent control")
        r = int(rng.choice(others))
        g = torch.from_numpy(rng.standard_normal(W.shape[1])).to(torch.float32)
        controls[(sel.attribute, sel.value)] = {"random_latent": r, "random_direction": g / g.norm(),
                                                "unit_norm": float(sel.mean_act) * float(W[sel.latent].norm()) / base.scale}
    selection = selection.assign(
        random_latent=[controls.get((s.attribute, s.value), {}).get("random_latent", -1) for s in selection.itertuples()],
        steer_norm_per_alpha=[controls.get((s.attribute, s.value), {}).get("unit_norm", np.nan) for s in selection.itertuples()],
    )

    # One batch per (experiment, condition, alpha), every word's prompts in it.
    words = list(chosen.itertuples(index=False))
    prompts = {(w.attribute, w.value, e): word_prompts(w.attribute, w.value, e == "ablate", cfg.n_prompts, cfg.seed)
               for w in words for e in ("steer", "ablate")}
    guided = uses_cfg(cfg.guidance)
    judged_rows: list[dict[str, Any]] = []
    prefix: dict[str, torch.Tensor] = {}  # the state before the window's first step, per experiment
    images: list[np.ndarray] = []

    def batch(experiment: str, condition: str, alpha: float, where: str = "everywhere") -> None:
        ps, lat, vec, meta = [], [], [], []
        for w in words:
            c = controls[(w.attribute, w.value)]
            j = c["random_latent"] if condition == "random_latent" else int(w.latent)
            # the latent whose code the edit reads: the ablated one; for steering, the chosen latent
            # (where it is active, the vector of the condition is added)
            read = j if experiment == "ablate" else int(w.latent)
            if condition == "random_direction":
                u = c["random_direction"]
            else:
                u = W[j] / W[j].norm()
            for p in prompts[(w.attribute, w.value, experiment)]:
                ps.append(p)
                lat.append(read)
                vec.append(u * (alpha * c["unit_norm"]))
                meta.append({"attribute": w.attribute, "value": w.value, "latent": int(w.latent), "experiment": experiment,
                             "condition": condition, "alpha": float(alpha), "edited_latent": j if condition != "random_direction" else -1,
                             "where": edit_where(experiment, condition, where), "prompt": p, "noise_id": len(ps) - 1})  # row of the batch = its noise seed's id
        if not ps:
            return
        hook = None
        if condition == "baseline":
            prefix[experiment] = sample(handle, ps, seed=cfg.seed, steps=cfg.steps, guidance_scale=cfg.guidance, stop=first_edit)
        else:
            spec = Intervention(latent=int(lat[0]), mode="steer" if experiment == "steer" else "ablate",
                                alpha=1.0 if experiment == "steer" else 0.0, direction="unit",
                                where=STEER_WHERE[where] if experiment == "steer" else "all",
                                cfg_branch=cfg.cfg_branch, **window)
            sae = PerImageSAE.of(base, lat, torch.stack(vec) if experiment == "steer" else None)
            hook = InterventionHook(handle.denoiser, resolved, spec, sae, guided=guided)
        x0 = sample(handle, ps, seed=cfg.seed, steps=cfg.steps, guidance_scale=cfg.guidance, hook=hook,
                    start=(first_edit, prefix[experiment]))
        imgs = decode_uint8(handle, x0)
        for m, verdict, img in zip(meta, judge_images(imgs), imgs):
            found = [f"{o['colour']} {o['shape']}" for o in verdict["objects"]]
            judged_rows.append({**m, "present": attribute_present(verdict, m["attribute"], m["value"]),
                                "found": "; ".join(found)})
            images.append(img)

    # Every edited run of an experiment holds the baseline's prompts in the same order: the steps
    # before the window are the baseline's, computed once (sample(stop=...), then start=...).
    ts = sampler_timesteps(handle, cfg.steps)
    first_edit = next(i for i, t in enumerate(ts) if window["t_min"] <= t <= window["t_max"]) if share_prefix else 0
    batch("steer", "baseline", 0.0)
    batch("ablate", "baseline", 0.0)
    for where in cfg.where_modes:
        for alpha in cfg.alphas:
            for condition in ("latent", "random_latent", "random_direction"):
                batch("steer", condition, float(alpha), where)
    for condition in ("latent", "random_latent"):
        batch("ablate", condition, 0.0)

    judged = pd.DataFrame(judged_rows)
    rates = rate_table(judged.drop(columns=["prompt", "noise_id", "found", "edited_latent"]) if len(judged) else judged)
    verdict_table = verdicts(rates, selection, cfg.where_modes)
    cell = {"model": model, "layer": resolved.name, "timestep": int(timestep)}
    seconds = time.perf_counter() - t0
    record = {
        **cell,
        "module_path": resolved.module_path,
        "model_info": handle.describe(),
        "time_convention": "step (training scale, inclusive window)",
        "window": {**window, "sampler_timesteps_inside": inside, "sampler_timesteps": ts},
        "shared_prefix_steps": first_edit,
        "noise": "diffatlas.geometry.sampling.initial_noise(handle, n, seed): image at batch row i uses id i (judged.csv noise_id)",
        "sae": {"path": str(sae_dir), "mine_on": mined_on, "samples": base.cfg.get("samples"), "granularity": base.granularity,
                "input_scale": base.scale, "n_latents": base.n_latents, "k": base.sae.k,
                **{k: base.cfg.get(k) for k in ("model", "dataset", "layer", "module_path", "timestep", "conditioning", "prompt", "store")}},
        "settings": cfg.to_dict(),
        "alpha_unit": "alpha x mean_act_j x |W_dec[j]| / input_scale = the norm added at each edited position (controls: the same norm)",
        "where": {"modes": cfg.where_modes,
                  "meaning": "everywhere: every position; active: positions where the chosen latent j is active (z_j > 0), "
                             "read at each pass, controls added at the same positions; ablate rows: active (z_j := 0 changes "
                             "only where z_j > 0); baseline rows: none"},
        "cfg": {"guidance_scale": float(cfg.guidance), "guided": guided, "branch": cfg.cfg_branch},
        "judge": "diffatlas.world.judge.judge_images; steer counts images showing the value, ablate images not showing it",
        "intervals": "Wilson 95% (diffatlas.intervals.wilson)",
        "words": int(len(selection)), "words_with_latent": int(len(chosen)), "images": int(len(judged)),
        "seed": int(cfg.seed), "device": str(handle.device), "dtype": str(handle.dtype).replace("torch.", ""),
        "seconds": seconds,
    }
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        for name, table in ((RATES, rates), (VERDICTS, verdict_table), (SELECTION, selection), (JUDGED, judged)):
            table.assign(**cell).to_csv(tmp / name, index=False)
        stack = np.stack(images) if images else np.zeros((0, handle.image_size, handle.image_size, 3), np.uint8)
        save_file({"images": torch.from_numpy(stack).contiguous()}, str(tmp / IMAGES),
                  metadata={"format": "diffatlas-intervene-judged", "rows": JUDGED})
        write_json(tmp / RECORD, record)
    log.info("%s %s t%d: %d words (%d with a latent), %d images judged in %.1f s", model, resolved.name, timestep,
             len(selection), len(chosen), len(judged), seconds)
    return verdict_table


def _mined_on(sae_dir: Path) -> str | None:
    try:
        metrics = json.loads((sae_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics.get("labels", {}).get("mine_on")
