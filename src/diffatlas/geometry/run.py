"""The geometry stage's jobs: what each CLI command computes and writes.

Path grammar (``results/geometry/{model}/``)::

    t{timestep}/basis.safetensors   v [N, n, C, h, w], u [N, n, d], s [N, n], residuals [N, n],
                                    x_t [N, C, h, w], x_T [N, C, h, w]      (float32)
    t{timestep}/edits.safetensors   strengths [S]; linear, normalised, random [E, m, S, H, W, 3] (uint8);
                                    random_directions [E, m, C, h, w] (unit norm, float32);
                                    iterative [m_i, S_i, H, W, 3] (uint8), iterative_strengths [S_i],
                                    transport_cos [m_i, S_i]
    t{timestep}/meta.json           model, layer, module path, timestep, ᾱ_t, seed, pooling, prompt,
                                    config, convergence, timings
    global/global.safetensors       directions_h [n, d] (ū, averaged in H), aligned_h [N, n, d],
                                    directions [G, m, C, h, w] (v̄ of each edited sample), cos [N, n],
                                    perm, signs [N, n], kept [G, m], strengths [S],
                                    images [G, m, S, H, W, 3] (uint8)
    global/meta.json
    path_lengths.csv                one row per (pair, method in lerp/slerp/geodesic): semantic length
                                    (Σ D_geo), Euclidean H length, X length, norm range, noise floor
    path_segments.csv               D_geo (and ||Δh||) of every segment of every path
    path_lengths.json               summary with 95% intervals (slerp < lerp, geodesic shortest, ...)
    psd.csv                         timestep, rank, frequency, power (mean over samples)
    spectra_samples.csv, spectra_trend.csv   spectral flatness, top-1 energy share, PSD centroid per
                                    (timestep, sample) / per timestep with 95% bootstrap intervals
    tangent_distances.csv           D_geo between tangent spaces in H (u bases)
    meaning.csv, meaning_summary.csv    (ShapesWorld models; see :mod:`diffatlas.geometry.meaning`)
    edit_quality.csv, edit_quality_summary.csv, global_agreement.csv   (ShapesWorld models: plain vs
                                    x0-normalised edits, global-direction agreement; same module)
    claims.csv, claims.md           Park et al.'s claims, measured (:mod:`diffatlas.geometry.claims`)

Sample ``i`` of every timestep starts from the same ``x_T`` (seeded per sample id) and is
brought to ``t`` by DDIM, so sample ``i`` at two timesteps lies on one trajectory.

Flow-matching models (SD3, Flux) run at σ (``"s0.500"``): sampling, edits and denoising use the
core's Euler flow step (:mod:`diffatlas.geometry.sampling`), generation starts at σ = 1, and the
directory of σ is named by the scheduler's timestep σ·T (``t500``), as extraction names its
stores. Every ``meta.json`` records the time in the model's convention (``time``,
``time_convention``), the scheduler timestep, σ (flow) or ᾱ (DDPM; the other is NaN, written as
null), the noising rule and the layer alias.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from diffatlas.accel import amp_dtype, describe_precision, out_of_memory_hint
from diffatlas.errors import UserError
from diffatlas.geometry.artifacts import load_basis
from diffatlas.geometry.config import GeometryConfig
from diffatlas.geometry.editing import geodesic_shoot, linear_edits, x0_normalise
from diffatlas.geometry.jacobian import PullbackMap, top_singular
from diffatlas.geometry.sampling import (
    CLEAN,
    Denoiser,
    decode_uint8,
    geometry_time,
    initial_noise,
    start_time,
    time_index,
    time_record,
)
from diffatlas.models.diffusion import Time
from diffatlas.io import atomic_dir, write_json

log = logging.getLogger(__name__)

PATH_SAMPLE_OFFSET = 100_000
"""Sample ids of the path-length endpoints start here (disjoint from the analysed samples)."""
RANDOM_SEED_OFFSET = 200_000
"""Offset of the random-direction generator's seed (disjoint from the basis and path seeds)."""


def random_directions(cfg: GeometryConfig, timestep: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Unit vectors [*shape[:-3], C, h, w] in X, uniform on the sphere, seeded by (seed, timestep).

    The control of Park et al.'s ablation: the edits take random directions of the same norm as
    the semantic v's (unit). Drawn on a CPU generator, then moved, so they do not depend on the device.
    """
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + RANDOM_SEED_OFFSET + timestep)
    r = torch.randn(shape, generator=gen, dtype=torch.float64, device="cpu")
    r = r / r.flatten(-3).norm(dim=-1)[..., None, None, None]
    return r.to(like.device, like.dtype)


def _pullback(handle, cfg: GeometryConfig, timestep: int) -> PullbackMap:
    return PullbackMap.from_handle(handle, timestep, layer=cfg.layer, pooling=cfg.pooling, prompt=cfg.prompt)


def _denoiser(handle, cfg: GeometryConfig) -> Denoiser:
    """The no-grad denoiser passes, autocast by ``cfg.dtype`` (see :mod:`diffatlas.accel`)."""
    return Denoiser(handle, cfg.prompt, cfg.guidance_scale, amp=amp_dtype(cfg.dtype, handle.device, "geometry"))


def _basis_kwargs(cfg: GeometryConfig) -> dict[str, Any]:
    return dict(oversample=cfg.oversample, tol=cfg.tol, max_iters=cfg.max_iters, batching=cfg.batching,
                chunk_size=cfg.chunk_size, attention_chunk=cfg.attention_chunk, conv_tf32=cfg.conv_tf32)


def _global_time(handle, cfg: GeometryConfig) -> Time:
    """The time of the global directions and path lengths for this model's convention, checked."""
    conv = "sigma" if handle.time_convention == "sigma" else "step"
    key = "geometry.global_sigma" if conv == "sigma" else "geometry.global_timestep"
    return geometry_time(handle, cfg.global_time(conv), key)


def _provenance(handle, cfg: GeometryConfig, model_name: str, fmap: PullbackMap | None, timestep: Time | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": model_name,
        "model_info": handle.describe(),
        "layer": cfg.layer,
        "module_path": fmap.layer.module_path if fmap is not None else None,
        "stream": fmap.layer.stream if fmap is not None else None,
        "pooling": cfg.pooling,
        "prompt": cfg.prompt,
        "guidance_scale": cfg.guidance_scale,
        "seed": cfg.seed,
        "device": str(handle.device),
        "dtype": str(handle.dtype).removeprefix("torch."),
        "precision": describe_precision(handle.dtype, denoise=amp_dtype(cfg.dtype, handle.device, "geometry"),
                                        jacobian=("float32 (cuDNN convolutions TF32)" if handle.device.type == "cuda"
                                                  and cfg.conv_tf32 else "float32")),
        "config": cfg.to_dict(),
    }
    if timestep is not None:
        out.update(time_record(handle, timestep))
    return out


@torch.no_grad()
def sample_points(handle, den: Denoiser, cfg: GeometryConfig, timestep, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, x_t) [n, C, h, w]: seeded Gaussian starts, DDIM (flow: Euler) from the start of
    generation (T-1; σ = 1) down to ``timestep``."""
    n = cfg.n_samples if n is None else n
    time = geometry_time(handle, timestep)
    x_T = initial_noise(handle, n, cfg.seed)
    start = start_time(handle)
    x_t = den.ddim(x_T, start, time, cfg.ddim_steps) if time.value < start.value else x_T.clone()
    return x_T, x_t


def _denoise_images(handle, den: Denoiser, x: torch.Tensor, timestep: Time, cfg: GeometryConfig) -> np.ndarray:
    """x [..., C, h, w] at ``timestep`` -> uint8 images [..., H, W, 3] after DDIM to the clean sample."""
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    x0 = den.ddim(flat, timestep, CLEAN, cfg.ddim_steps)
    imgs = decode_uint8(handle, x0)
    return imgs.reshape(*lead, *imgs.shape[1:])


def _iterative_edits(fmap: PullbackMap, b0, x0: torch.Tensor, strengths: list[float], mi: int,
                     cfg: GeometryConfig, gen: torch.Generator) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """Geodesic shooting along ±v_1..v_mi of one point ``x0`` [1, C, h, w] through ``strengths``.

    Both signs ride in one batch when the strengths are symmetric. Returns the points
    [mi, S, C, h, w] (strength 0 included, increasing), the signed strengths and the
    transport cosines [mi, S].
    """
    pos = [g for g in strengths if g > 0]
    neg = sorted(-g for g in strengths if g < 0)
    groups = [([1.0, -1.0], pos)] if pos and pos == neg else [([1.0], pos), ([-1.0], neg)]
    by_sign: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    for signs, gs in groups:
        if not gs:
            continue
        u0 = torch.cat([sg * b0.u[0, :mi] for sg in signs])
        v0 = torch.cat([sg * b0.v[0, :mi] for sg in signs])
        P = len(signs) * mi
        shot = geodesic_shoot(fmap, x0.expand(P, *x0.shape[1:]), u0, v0, gs, cfg.iterative_substeps,
                              n=cfg.n_directions, basis_kwargs=_basis_kwargs(cfg),
                              init=b0.v.expand(P, *b0.v.shape[1:]), generator=gen)
        for j, sg in enumerate(signs):
            by_sign[sg] = (shot.points[j * mi:(j + 1) * mi], shot.transport_cos[j * mi:(j + 1) * mi])
    sig, pts = [0.0], [x0.expand(mi, *x0.shape[1:])[:, None]]
    coss = [torch.ones(mi, 1, dtype=b0.u.dtype, device=b0.u.device)]
    if 1.0 in by_sign:
        sig, pts, coss = sig + pos, pts + [by_sign[1.0][0]], coss + [by_sign[1.0][1]]
    if -1.0 in by_sign:
        sig = [-g for g in neg][::-1] + sig
        pts = [by_sign[-1.0][0].flip(1)] + pts
        coss = [by_sign[-1.0][1].flip(1)] + coss
    return torch.cat(pts, dim=1), sig, torch.cat(coss, dim=1)


def run_timestep(handle, cfg: GeometryConfig, timestep: int, out_dir: str | os.PathLike, model_name: str) -> dict[str, Any]:
    """Local bases of ``cfg.n_samples`` samples at ``timestep``, their edits; written to ``out_dir``."""
    timestep = geometry_time(handle, timestep)
    ti = time_index(handle, timestep)  # the step, or σ·T: names the directory, seeds the draws
    timings: dict[str, float] = {}
    fmap = _pullback(handle, cfg, timestep)
    den = _denoiser(handle, cfg)
    tic = time.perf_counter()
    x_T, x_t = sample_points(handle, den, cfg, timestep)
    timings["sample_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    # A CPU generator on every device: the start vectors (and so the bases) do not depend on it.
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + ti)
    k = cfg.n_directions + cfg.oversample
    tried = (f"{x_t.shape[0]} samples x {k} directions (n_directions + oversample), x_t {tuple(x_t.shape[1:])}, "
             f"chunk_size {cfg.chunk_size}, attention_chunk {cfg.attention_chunk}")
    lower = "geometry.chunk_size (directions per pass), geometry.attention_chunk or geometry.n_samples"
    with out_of_memory_hint(f"geometry basis ({timestep})", tried, lower):
        basis = top_singular(fmap, x_t, cfg.n_directions, generator=gen, **_basis_kwargs(cfg))
    timings["basis_s"] = time.perf_counter() - tic
    log.info("%s: %d samples, %d directions in %d rounds (%.1fs); singular value 1 %.3g, max residual %.2e",
             timestep, x_t.shape[0], cfg.n_directions, basis.iterations, timings["basis_s"],
             float(basis.s[:, 0].mean()), float(basis.residuals.max()))

    # -- one-step edits, with and without x0 normalisation
    tic = time.perf_counter()
    strengths = cfg.strengths
    E, m = cfg.n_edit_samples, cfg.edit_directions
    edited = torch.stack([linear_edits(x_t[i], basis.v[i, :m], strengths) for i in range(E)])  # [E, m, S, C, h, w]
    normalised = torch.stack([
        x0_normalise(den, x_t[i:i + 1], edited[i].reshape(-1, *x_t.shape[1:]), timestep, cfg.kappa).reshape(edited[i].shape)
        for i in range(E)
    ])
    # The same one-step edit along random unit directions (one per edited v): the ablation's control.
    # γ = 0 is the unedited image the semantic edits already denoised, so only γ != 0 is denoised.
    rand = random_directions(cfg, ti, (E, m, *x_t.shape[1:]), x_t)
    moved = [g for g in strengths if g != 0]
    randomised = torch.stack([linear_edits(x_t[i], rand[i], moved) for i in range(E)])  # [E, m, S-1, C, h, w]
    both = _denoise_images(handle, den, torch.stack([edited, normalised]), timestep, cfg)
    rand_imgs = both[0].copy()
    if moved:
        rand_imgs[:, :, [j for j, g in enumerate(strengths) if g != 0]] = _denoise_images(handle, den, randomised, timestep, cfg)
    timings["edits_s"] = time.perf_counter() - tic

    tensors: dict[str, torch.Tensor] = {
        "strengths": torch.tensor(strengths, dtype=torch.float32, device="cpu"),
        "linear": torch.from_numpy(np.ascontiguousarray(both[0])),
        "normalised": torch.from_numpy(np.ascontiguousarray(both[1])),
        "random": torch.from_numpy(np.ascontiguousarray(rand_imgs)),
        "random_directions": rand.float().contiguous().cpu(),
    }

    # -- iterative edits (geodesic shooting with parallel transport) for sample 0
    mi = cfg.iterative_directions if cfg.iterative_at(timestep) else 0
    it_info: dict[str, Any] = {}
    if mi and any(g != 0 for g in strengths):
        tic = time.perf_counter()
        with out_of_memory_hint(f"geometry iterative edits ({timestep})", tried, lower):
            pts, sig, coss = _iterative_edits(fmap, basis.sample(0), x_t[:1], strengths, mi, cfg, gen)
        tensors["iterative"] = torch.from_numpy(np.ascontiguousarray(_denoise_images(handle, den, pts, timestep, cfg)))
        tensors["iterative_strengths"] = torch.tensor(sig, dtype=torch.float32, device="cpu")
        tensors["transport_cos"] = coss.float().cpu()
        timings["iterative_s"] = time.perf_counter() - tic
        it_info = {"directions": mi, "substeps": cfg.iterative_substeps, "strengths": sig,
                   "min_transport_cos": float(coss.min())}

    meta = _provenance(handle, cfg, model_name, fmap, timestep)
    meta.update(
        n_samples=int(x_t.shape[0]),
        sample_ids=list(range(int(x_t.shape[0]))),
        n_directions=cfg.n_directions,
        input_dim=int(x_t[0].numel()),
        feature_dim=int(basis.u.shape[-1]),
        iterations=basis.iterations,
        converged=basis.converged,
        max_residual=float(basis.residuals.max()),
        singular_values_mean=basis.s.mean(0).tolist(),
        edit={"samples": E, "directions": m, "strengths": strengths, "kappa": cfg.kappa,
              "normalised": (("flow matching: x_s' = x_s + (1 - sigma)/(1 - kappa sigma) (x0' - x0(x_s)), x0 = x_s - sigma v"
                              if timestep.kind == "sigma" else
                              "Park et al.: x_t' = x_t + sqrt(abar)/(1 - kappa sqrt(1-abar)) (x0' - x0(x_t))")
                             + ", x0' = x0(x_t + gamma v) with x0(x_t)'s per-image, per-channel mean/std (unclipped x0)"),
              "sampler": "Euler steps of the flow ODE (x' = x + (s' - s) v)" if timestep.kind == "sigma" else "DDIM (eta = 0)",
              "random": "one unit direction per edited v, Gaussian then normalised, one-step linear edit"},
        iterative=it_info,
        timings=timings,
    )
    with atomic_dir(out_dir) as tmp:
        save_file(
            {
                "v": basis.v.float().contiguous().cpu(),
                "u": basis.u.float().contiguous().cpu(),
                "s": basis.s.float().contiguous().cpu(),
                "residuals": basis.residuals.float().contiguous().cpu(),
                "x_t": x_t.float().contiguous().cpu(),
                "x_T": x_T.float().contiguous().cpu(),
            },
            str(Path(tmp, "basis.safetensors")),
            metadata={"model": model_name, "layer": cfg.layer, "timestep": str(ti), "time": str(timestep),
                      "pooling": cfg.pooling},
        )
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(Path(tmp, "edits.safetensors")))
        write_json(Path(tmp, "meta.json"), meta)
    return meta


def run_global(handle, cfg: GeometryConfig, basis_dir: str | os.PathLike, out_dir: str | os.PathLike,
               model_name: str) -> dict[str, Any]:
    """Global directions from the local bases at ``cfg.global_timestep`` (read from ``basis_dir``).

    Park et al.'s recipe (:mod:`diffatlas.geometry.global_directions`): the samples' tangent
    vectors ``u`` are matched and averaged in H into ``ū``; for each edited sample ``ū`` is
    projected onto its tangent space and mapped to X through its Jacobian (``v̄``).
    """
    from diffatlas.geometry.global_directions import global_directions, global_to_x

    tensors, meta_t = load_basis(basis_dir, torch=True)
    timestep = _global_time(handle, cfg)
    held = Time.parse(meta_t.get("time", meta_t["timestep"]))
    if held != timestep:
        key = "global_sigma" if timestep.kind == "sigma" else "global_timestep"
        raise UserError(f"{basis_dir} holds time {held}, not geometry.{key} = {timestep}")
    v, u, sv, x_t = tensors["v"], tensors["u"], tensors["s"], tensors["x_t"]
    N, n = v.shape[:2]
    g = global_directions(u)  # ū [n, d]: matched and averaged in H
    G = min(cfg.global_samples, N)
    m = min(cfg.edit_directions, n)
    projected, kept = [], []
    for s in range(G):
        vb, k = global_to_x(g.directions[:m], u[s], sv[s], v[s])
        projected.append(vb)
        kept.append(k)
    projected_t = torch.stack(projected).to(handle.device, handle.dtype)  # [G, m, C, h, w]
    strengths = cfg.strengths
    x = x_t[:G].to(handle.device, handle.dtype)
    edited = torch.stack([linear_edits(x[s], projected_t[s], strengths) for s in range(G)])  # [G, m, S, C, h, w]
    den = _denoiser(handle, cfg)
    tic = time.perf_counter()
    images = _denoise_images(handle, den, edited, timestep, cfg)
    meta = _provenance(handle, cfg, model_name, None, timestep)
    meta.update(
        module_path=meta_t.get("module_path"),
        n_samples=int(N),
        n_directions=int(n),
        averaged_in="H (u vectors; Park et al.)",
        matching_rounds=g.rounds,
        mean_cos=g.cos.mean(0).tolist(),
        mean_kept=torch.stack(kept).mean(0).tolist(),
        strengths=strengths,
        edited_samples=G,
        edited_directions=m,
        timings={"edits_s": time.perf_counter() - tic},
        source=str(basis_dir),
    )
    with atomic_dir(out_dir) as tmp:
        save_file(
            {
                "directions_h": g.directions.float().contiguous(),
                "aligned_h": g.aligned.float().contiguous(),
                "directions": torch.stack(projected).float().contiguous().cpu(),
                "cos": g.cos.float().contiguous(),
                "perm": g.perm.contiguous(),
                "signs": g.signs.contiguous(),
                "kept": torch.stack(kept).float().contiguous(),
                "strengths": torch.tensor(strengths, dtype=torch.float32, device="cpu"),
                "images": torch.from_numpy(np.ascontiguousarray(images)),
            },
            str(Path(tmp, "global.safetensors")),
        )
        write_json(Path(tmp, "meta.json"), meta)
    log.info("global directions at %s from %d samples: mean |cos| of local u to global ū %s", timestep, N,
             [round(c, 3) for c in meta["mean_cos"]])
    return meta


def run_paths(handle, cfg: GeometryConfig, out_csv: str | os.PathLike, model_name: str,
              segments_csv: str | os.PathLike | None = None) -> dict[str, Any]:
    """Semantic path lengths (Park et al.) of lerp, slerp and geodesic shooting between pairs of
    Gaussian latents at t = global_timestep (:mod:`diffatlas.geometry.paths`).

    Writes one row per (pair, method) to ``out_csv``, the per-segment D_geo to
    ``segments_csv`` (default: ``path_segments.csv`` beside it) and a summary with 95%
    intervals to ``out_csv`` with suffix ``.json``.
    """
    import pandas as pd

    from diffatlas.geometry.measures import end_over_middle
    from diffatlas.geometry.paths import METHODS, semantic_paths
    from diffatlas.intervals import bootstrap_mean, wilson
    from diffatlas.io import atomic_file

    when = _global_time(handle, cfg)
    timestep = time_index(handle, when)
    fmap = _pullback(handle, cfg, when)
    ends = initial_noise(handle, 2 * cfg.path_pairs, cfg.seed, first_id=PATH_SAMPLE_OFFSET)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + PATH_SAMPLE_OFFSET)
    tic = time.perf_counter()
    tried = (f"{3 * cfg.path_pairs} path points x {cfg.n_directions + cfg.oversample} directions per basis call, "
             f"x_t {tuple(ends.shape[1:])}")
    with out_of_memory_hint("geometry path lengths", tried, "geometry.path_pairs, geometry.chunk_size or geometry.attention_chunk"):
        res = semantic_paths(fmap, ends[0::2], ends[1::2], cfg.path_segments, cfg.n_directions,
                             basis_kwargs=_basis_kwargs(cfg), generator=gen)
    seconds = time.perf_counter() - tic
    rows, seg_rows = [], []
    P, L = cfg.path_pairs, cfg.path_segments
    for m in METHODS:
        pts = res.points[m].reshape(P, L + 1, -1).to(torch.float64)
        norms = pts.norm(dim=-1)
        ref = 0.5 * (norms[:, 0] + norms[:, -1])
        x_len = (pts[:, 1:] - pts[:, :-1]).norm(dim=-1).sum(1)
        for p in range(P):
            rows.append({
                "model": model_name, "timestep": timestep, "pair": p, "method": m, "segments": L,
                "semantic_length": float(res.lengths[m][p]), "h_euclid_length": float(res.h_steps[m][p].sum()),
                "x_length": float(x_len[p]), "min_norm_ratio": float(norms[p].min() / ref[p]),
                "max_norm_ratio": float(norms[p].max() / ref[p]), "floor": float(res.floor[p]),
            })
            for k, d in enumerate(res.segment_lengths[m][p].tolist()):
                seg_rows.append({"model": model_name, "timestep": timestep, "pair": p, "method": m, "segment": k,
                                 "d_geo": d, "h_step": float(res.h_steps[m][p, k])})
    df = pd.DataFrame(rows)
    seg_df = pd.DataFrame(seg_rows)
    segments_csv = Path(out_csv).with_name("path_segments.csv") if segments_csv is None else Path(segments_csv)
    with atomic_file(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_file(segments_csv) as tmp:
        seg_df.to_csv(tmp, index=False)
    wide = df.pivot(index="pair", columns="method", values="semantic_length")

    def rate(mask) -> dict[str, Any]:
        k = int(np.sum(mask))
        return {"k": k, "n": int(len(mask)), "rate": k / len(mask), "ci95": wilson(k, len(mask))}

    lengths = {m: wide[m].to_numpy() for m in METHODS}
    lerp_seg = res.segment_lengths["lerp"].cpu().numpy()
    summary = {
        "model": model_name, **time_record(handle, when), "layer": cfg.layer,
        "module_path": fmap.layer.module_path, "pooling": cfg.pooling, "prompt": cfg.prompt, "seed": cfg.seed,
        "device": str(handle.device), "dtype": str(handle.dtype).removeprefix("torch."),
        "pairs": P, "segments": L, "n_directions": cfg.n_directions, "tol": cfg.tol,
        "measure": "semantic path length = sum of D_geo between consecutive tangent spaces in H (Park et al.)",
        "semantic_length_mean": {m: float(lengths[m].mean()) for m in METHODS},
        "semantic_length_ci95": {m: bootstrap_mean(lengths[m]) for m in METHODS},
        "segment_profile_mean": {m: res.segment_lengths[m].mean(0).tolist() for m in METHODS},
        "h_euclid_length_mean": df.groupby("method")["h_euclid_length"].mean().to_dict(),
        "min_norm_ratio_mean": df.groupby("method")["min_norm_ratio"].mean().to_dict(),
        "slerp_over_lerp_mean": float((lengths["slerp"] / lengths["lerp"]).mean()),
        "slerp_shorter": rate(lengths["slerp"] < lengths["lerp"]),
        "geodesic_shortest": rate((lengths["geodesic"] < lengths["lerp"]) & (lengths["geodesic"] < lengths["slerp"])),
        "lerp_end_over_middle_mean": float(end_over_middle(lerp_seg).mean()),
        "lerp_end_over_middle_ci95": bootstrap_mean(end_over_middle(lerp_seg)),
        "segment_floor_mean": float(res.floor.mean()),
        "converged": res.converged,
        "timings": {"paths_s": seconds},
    }
    write_json(Path(out_csv).with_suffix(".json"), summary)
    log.info("semantic path length over %d pairs x %d segments: %s (segment noise floor %.3g)", P, L,
             {m: round(v, 4) for m, v in summary["semantic_length_mean"].items()}, summary["segment_floor_mean"])
    return summary


SPECTRA_MEASURES = ("flatness", "top1_energy", "psd_centroid")
"""Columns of ``spectra_samples.csv`` / ``spectra_trend.csv`` (Park et al.'s two trends as t -> 0)."""


def spectra_trend(samples) -> "pd.DataFrame":  # noqa: F821
    """Per (model, timestep): n samples and, per measure of :data:`SPECTRA_MEASURES`, the mean over
    samples with a 95% bootstrap interval (``{measure}``, ``{measure}_low``, ``{measure}_high``)."""
    import pandas as pd

    from diffatlas.intervals import bootstrap_mean

    rows = []
    for (model, t), grp in samples.groupby(["model", "timestep"], sort=False):
        row = {"model": model, "timestep": int(t), "alpha_bar": float(grp["alpha_bar"].iloc[0]), "n": len(grp)}
        for m in SPECTRA_MEASURES:
            low, high = bootstrap_mean(grp[m].to_numpy())
            row.update({m: float(grp[m].mean()), f"{m}_low": low, f"{m}_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def run_measures(run_dirs: list[str], psd_csv: str | os.PathLike, dist_csv: str | os.PathLike,
                 samples_csv: str | os.PathLike | None = None, trend_csv: str | os.PathLike | None = None) -> dict[str, Any]:
    """PSD of directions per timestep and geodesic distances between tangent spaces (no model needed).

    The distances are Park et al.'s D_geo between the n-dimensional tangent spaces in H
    (spans of the ``u`` bases), across samples at one timestep and along each sample's
    trajectory between consecutive timesteps (the same layer, so the same H).

    The two trends Park et al. report as t -> 0 are written per sample (``samples_csv``,
    default ``spectra_samples.csv`` beside ``psd_csv``) and per timestep with 95% bootstrap
    intervals over samples (``trend_csv``, default ``spectra_trend.csv``): the flatness of the
    pullback spectrum (:func:`~diffatlas.geometry.measures.spectral_flatness`, and the top
    singular value's energy share) and the PSD centroid of the directions v (spatial frequency
    in cycles per image, averaged over a sample's n directions). Sample i lies on one
    trajectory at every timestep, so the per-sample rows pair across timesteps.
    """
    import itertools

    import pandas as pd

    from diffatlas.geometry.measures import (grassmann_distance, mean_frequency, radial_psd, spectral_flatness,
                                             top_energy_fraction)
    from diffatlas.io import atomic_file

    runs = []
    for d in run_dirs:
        tensors, meta = load_basis(d, torch=True)
        meta["alpha_bar"] = float("nan") if meta.get("alpha_bar") is None else meta["alpha_bar"]  # null for σ
        runs.append((int(meta["timestep"]), tensors, meta))
    runs.sort(key=lambda r: -r[0])
    psd_rows, dist_rows, sample_rows = [], [], []
    for t, tensors, meta in runs:
        v, u = tensors["v"], tensors["u"]  # [N, n, C, h, w], [N, n, d]
        psd = radial_psd(v)  # [N, n, R]
        mean = psd.mean(0)
        flat, top1 = spectral_flatness(tensors["s"]), top_energy_fraction(tensors["s"], 1)
        centroid = mean_frequency(psd).mean(-1)  # [N]: over each sample's n directions
        for i in range(v.shape[0]):
            sample_rows.append({"model": meta["model"], "timestep": t, "alpha_bar": meta["alpha_bar"], "sample": i,
                                "n_directions": int(v.shape[1]), "flatness": float(flat[i]),
                                "top1_energy": float(top1[i]), "psd_centroid": float(centroid[i])})
        for rank in range(mean.shape[0]):
            for f, pw in enumerate(mean[rank].tolist()):
                psd_rows.append({"model": meta["model"], "timestep": t, "alpha_bar": meta["alpha_bar"], "rank": rank,
                                 "frequency": f, "power": pw})
        N = v.shape[0]
        for a, b in itertools.combinations(range(N), 2):
            dist_rows.append({"model": meta["model"], "kind": "across_samples", "timestep_a": t, "timestep_b": t,
                              "sample_a": a, "sample_b": b, "distance": grassmann_distance(u[a], u[b])})
        log.info("t=%d: mean frequency of directions %.2f", t, float(mean_frequency(mean).mean()))
    for (t1, r1, m1), (t2, r2, _) in zip(runs[:-1], runs[1:]):
        for s in range(min(r1["u"].shape[0], r2["u"].shape[0])):
            dist_rows.append({"model": m1["model"], "kind": "across_timesteps", "timestep_a": t1, "timestep_b": t2,
                              "sample_a": s, "sample_b": s, "distance": grassmann_distance(r1["u"][s], r2["u"][s])})
    with atomic_file(psd_csv) as tmp:
        pd.DataFrame(psd_rows).to_csv(tmp, index=False)
    dist = pd.DataFrame(dist_rows, columns=["model", "kind", "timestep_a", "timestep_b", "sample_a", "sample_b", "distance"])
    with atomic_file(dist_csv) as tmp:
        dist.to_csv(tmp, index=False)
    samples = pd.DataFrame(sample_rows)
    trend = spectra_trend(samples)
    samples_csv = Path(psd_csv).with_name("spectra_samples.csv") if samples_csv is None else Path(samples_csv)
    trend_csv = Path(psd_csv).with_name("spectra_trend.csv") if trend_csv is None else Path(trend_csv)
    with atomic_file(samples_csv) as tmp:
        samples.to_csv(tmp, index=False)
    with atomic_file(trend_csv) as tmp:
        trend.to_csv(tmp, index=False)
    for r in trend.itertuples():
        log.info("t=%d (n=%d): spectral flatness %.3f [%.3f, %.3f], PSD centroid %.2f [%.2f, %.2f] cycles/image",
                 r.timestep, r.n, r.flatness, r.flatness_low, r.flatness_high, r.psd_centroid,
                 r.psd_centroid_low, r.psd_centroid_high)
    return {"timesteps": [r[0] for r in runs],
            "mean_distance": dist.groupby(["kind", "timestep_a", "timestep_b"])["distance"].mean().reset_index().to_dict("records")}
