"""Figures of the geometry stage; each is its own workflow target.

* :func:`spectra_figure` - singular values per timestep (mean ± std over samples), absolute
  and normalised by σ_1: the spectrum flattens as t -> 0 (Park et al., Fig. 4).
* :func:`edits_figure` - edit grid of one timestep: per sample and direction a row of
  strengths, one-step (no normalisation), x0-normalised, and iterative (parallel transport).
* :func:`global_figure` - one global direction applied to several samples.
* :func:`psd_figure` - radially averaged power spectrum of the directions per timestep, and
  the distances between tangent spaces.
* :func:`meaning_figure` - share of edits that change each ShapesWorld factor, per direction.
* :func:`path_lengths_figure` - D_geo of each segment along the lerp, slerp and
  geodesic-shooting paths, and each path's total semantic length (Park et al., Fig. 7).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffatlas.plotting import plt, save_figure


def _colours(n: int):
    return [plt.cm.viridis(x) for x in np.linspace(0.0, 0.9, max(n, 1))]


def time_label(meta: dict) -> str:
    """``t=500 (ᾱ=0.277)`` for a step model, ``σ=0.500 (t=500)`` for a flow-matching one (σ·T)."""
    if meta.get("time_convention") == "sigma":
        return f"σ={meta['sigma']:.3f} (t={meta['timestep']})"
    return f"t={meta['timestep']} (ᾱ={meta['alpha_bar']:.3f})"


def spectra_figure(run_dirs: list[str], out: str | os.PathLike, title: str | None = None) -> Path:
    from diffatlas.geometry.artifacts import load_basis

    runs = sorted((load_basis(d) for d in run_dirs), key=lambda r: -int(r[1]["timestep"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for (tensors, meta), colour in zip(runs, _colours(len(runs))):
        s = tensors["s"].astype(np.float64)  # [N, n]
        idx = np.arange(1, s.shape[1] + 1)
        ratio = float(np.mean(s[:, -1] / s[:, 0]))
        label = f"{time_label(meta)}, s_{s.shape[1]}/s_1 = {ratio:.2f}"
        for ax, vals in ((axes[0], s), (axes[1], s / s[:, :1])):
            mean, std = vals.mean(0), vals.std(0)
            ax.plot(idx, mean, "o-", color=colour, label=label, ms=3)
            ax.fill_between(idx, mean - std, mean + std, color=colour, alpha=0.2)
    axes[0].set_ylabel("singular value σ_i")
    axes[1].set_ylabel("σ_i / σ_1")
    for ax in axes:
        ax.set_xlabel("direction i")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    meta = runs[0][1]
    fig.suptitle(title or f"{meta['model']}: pullback spectra of {meta['layer']} ({meta['pooling']}-pooled), "
                          f"{runs[0][0]['s'].shape[0]} samples", fontsize=9)
    return save_figure(fig, out)


def _grid(rows: list[tuple[str, np.ndarray]], strengths: list[float], title: str, out) -> Path:
    """rows: (label, images [S, H, W, 3]) drawn as a labelled grid, one column per strength."""
    n_rows, n_cols = len(rows), len(strengths)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.9 * n_cols + 1.6, 0.9 * n_rows + 0.6), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(imgs[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"γ={strengths[c]:g}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    return save_figure(fig, out)


def edits_figure(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    from diffatlas.geometry.artifacts import load_edits
    from diffatlas.io import read_json

    meta = read_json(Path(run_dir, "meta.json"))
    edits = load_edits(run_dir)
    strengths = [float(g) for g in edits["strengths"]]
    lin, nor = edits["linear"], edits["normalised"]
    rows = []
    for e in range(lin.shape[0]):
        for d in range(lin.shape[1]):
            rows.append((f"s{e} v{d + 1}", lin[e, d]))
            rows.append((f"s{e} v{d + 1} x0-norm", nor[e, d]))
            if "random" in edits:
                rows.append((f"s{e} random {d + 1}", edits["random"][e, d]))
            if e == 0 and "iterative" in edits and d < edits["iterative"].shape[0]:
                it_strengths = [float(g) for g in edits["iterative_strengths"]]
                if it_strengths == strengths:
                    rows.append((f"s{e} v{d + 1} iterative", edits["iterative"][d]))
    sampler = "Euler (flow)" if meta.get("time_convention") == "sigma" else "DDIM"
    title = (f"{meta['model']} {time_label(meta)}: x' = x_t + γ v_i, then {sampler}; "
             f"x0-norm κ={meta['config']['kappa']}; random: a random unit direction")
    return _grid(rows, strengths, title, out)


def global_figure(global_dir: str | os.PathLike, out: str | os.PathLike, direction: int = 0) -> Path:
    from diffatlas.geometry.artifacts import load_global

    tensors, meta = load_global(global_dir)
    images = tensors["images"]  # [G, m, S, H, W, 3]
    direction = min(direction, images.shape[1] - 1)
    strengths = [float(g) for g in tensors["strengths"]]
    kept = tensors["kept"][:, direction].tolist()
    rows = [(f"sample {s} (kept {kept[s]:.2f})", images[s, direction]) for s in range(images.shape[0])]
    title = (f"{meta['model']}: global direction {direction + 1} at {time_label(meta)} applied to "
             f"{images.shape[0]} samples (mean |cos| local-global {meta['mean_cos'][direction]:.2f})")
    return _grid(rows, strengths, title, out)


def psd_figure(psd_csv: str | os.PathLike, out: str | os.PathLike, distances_csv: str | os.PathLike | None = None) -> Path:
    import pandas as pd

    psd = pd.read_csv(psd_csv)
    has_dist = distances_csv is not None and Path(distances_csv).is_file()
    fig, axes = plt.subplots(1, 2 if has_dist else 1, figsize=(9 if has_dist else 4.8, 3.6), squeeze=False)
    ax = axes[0, 0]
    steps = sorted(psd["timestep"].unique(), reverse=True)
    for t, colour in zip(steps, _colours(len(steps))):
        sub = psd[psd["timestep"] == t].groupby("frequency")["power"].mean()
        p = sub / sub.sum()
        centroid = float((p.index.to_numpy() * p.to_numpy()).sum())
        ax.semilogy(p.index, p.to_numpy(), "o-", ms=2, color=colour, label=f"t={t} (centroid {centroid:.1f})")
    ax.set_xlabel("spatial frequency (cycles / image)")
    ax.set_ylabel("normalised power")
    ax.set_title("PSD of the top directions v_i", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if has_dist:
        dist = pd.read_csv(distances_csv)
        ax2 = axes[0, 1]
        across = dist[dist["kind"] == "across_samples"].groupby("timestep_a")["distance"].agg(["mean", "std"])
        ax2.errorbar(across.index, across["mean"], yerr=across["std"].fillna(0), fmt="o-", label="between samples, same t")
        steps_d = dist[dist["kind"] == "across_timesteps"]
        if len(steps_d):
            g = steps_d.groupby(["timestep_a", "timestep_b"])["distance"].mean().reset_index()
            ax2.plot(0.5 * (g["timestep_a"] + g["timestep_b"]), g["distance"], "s--", label="same sample, adjacent t")
        ax2.set_xlabel("timestep t")
        ax2.set_ylabel("geodesic distance (principal angles)")
        ax2.set_title("distances between tangent spaces", fontsize=8)
        ax2.invert_xaxis()
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
    model = psd["model"].iloc[0] if len(psd) else ""
    fig.suptitle(f"{model}: frequency content of the local latent basis", fontsize=9)
    return save_figure(fig, out)


def meaning_figure(summary_csv: str | os.PathLike, out: str | os.PathLike) -> Path:
    import pandas as pd

    from diffatlas.geometry.meaning import FACTORS

    df = pd.read_csv(summary_csv)
    modes = [m for m in ("linear", "normalised", "iterative") if m in set(df["mode"])]
    steps = sorted(df["timestep"].unique(), reverse=True)
    cols = [f"{f}_changed" for f in FACTORS]
    fig, axes = plt.subplots(len(modes), len(steps), figsize=(2.6 * len(steps) + 1.2, 2.0 * len(modes) + 0.8),
                             squeeze=False, constrained_layout=True)
    im = None
    for i, mode in enumerate(modes):
        for j, t in enumerate(steps):
            ax = axes[i, j]
            sub = df[(df["mode"] == mode) & (df["timestep"] == t)].sort_values("direction")
            ax.set_title(f"{mode}, t={t}", fontsize=7)
            if not len(sub):  # e.g. no iterative edits at this timestep
                ax.text(0.5, 0.5, "not computed", ha="center", va="center", fontsize=7, transform=ax.transAxes)
                ax.set_axis_off()
                continue
            mat = sub[cols].to_numpy(dtype=float)  # NaN: no object to judge (grey)
            im = ax.imshow(np.ma.masked_invalid(mat), vmin=0, vmax=1, cmap="magma", aspect="auto")
            ax.set_facecolor("0.7")
            ax.set_xticks(range(len(FACTORS)), FACTORS, fontsize=6, rotation=45, ha="right")
            ax.set_yticks(range(len(sub)), [f"v{d + 1} (n={n})" for d, n in zip(sub["direction"], sub["n_edits"])], fontsize=6)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="share of edits that change the factor")
    model = df["model"].iloc[0] if len(df) else ""
    fig.suptitle(f"{model}: what each direction changes (judged on ShapesWorld)", fontsize=9)
    return save_figure(fig, out)


PATH_SEGMENT_COLUMNS = ("pair", "method", "segment", "d_geo")
"""Columns of ``path_segments.csv`` (:func:`diffatlas.geometry.run.run_paths`) the path figure reads."""

FEW_PAIRS = 5
"""Below this many pairs the path figure draws every pair's profile; from it on, a 95% band of the mean."""


def read_path_segments(segments_csv: str | os.PathLike):
    """``path_segments.csv`` as a DataFrame; UserError when a column the figure reads is missing or it is empty."""
    import pandas as pd

    from diffatlas.errors import UserError

    df = pd.read_csv(segments_csv)
    missing = [c for c in PATH_SEGMENT_COLUMNS if c not in df.columns]
    if missing or not len(df):
        raise UserError(f"{segments_csv}: {'columns ' + str(missing) + ' missing' if missing else 'no rows'}; "
                        f"allowed: the path_segments.csv of geometry-paths, with columns {list(PATH_SEGMENT_COLUMNS)}")
    dup = df.duplicated(["pair", "method", "segment"])
    if dup.any():
        first = df[dup].iloc[0]
        raise UserError(f"{segments_csv}: segment {first['segment']} of pair {first['pair']}, method {first['method']!r} "
                        "appears more than once; allowed: one row per (pair, method, segment), i.e. one model and "
                        "timestep per file")
    return df


def path_lengths_plot(segments, summary: dict | None = None):
    """The path-length figure (not saved): left, D_geo of segment l = 1..L per path (mean over
    pairs, with a 95% bootstrap band from :data:`FEW_PAIRS` pairs on, else every pair's line);
    right, each path's semantic length Σ_l D_geo (mean, pairs as dots, the summary's 95%
    interval where it has one). segments: the DataFrame of ``path_segments.csv``; summary:
    ``path_lengths.json`` (intervals and the segment noise floor), or None.

    Each method's mean line has ``gid = "mean:<method>"``, each pair's ``"pair:<method>:<p>"``,
    and each bar ``"total:<method>"``, so the plotted values can be read back.
    """
    from diffatlas.geometry.paths import METHODS
    from diffatlas.intervals import bootstrap_mean

    summary = summary or {}
    present = list(dict.fromkeys(segments["method"]))
    methods = [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    colours = dict(zip(methods, _colours(len(methods))))
    ci = summary.get("semantic_length_ci95", {})
    n_pairs = {}
    for i, m in enumerate(methods):
        # [P, L] segment lengths of method m, one row per pair, one column per segment index.
        wide = segments[segments["method"] == m].pivot(index="pair", columns="segment", values="d_geo").sort_index(axis=1)
        P = len(wide)
        n_pairs[m] = P
        idx = wide.columns.to_numpy() + 1  # segment l = 1..L
        mean = wide.mean(axis=0).to_numpy()
        colour = colours[m]
        ax.plot(idx, mean, "o-", ms=3, lw=1.8, color=colour, label=f"{m} (n={P} pairs)", gid=f"mean:{m}")
        if P >= FEW_PAIRS:
            band = np.array([bootstrap_mean(wide[c].to_numpy()) for c in wide.columns])
            ax.fill_between(idx, band[:, 0], band[:, 1], color=colour, alpha=0.2, lw=0)
        else:
            for p, row in wide.iterrows():
                ax.plot(idx, row.to_numpy(), "-", lw=0.7, alpha=0.5, color=colour, gid=f"pair:{m}:{p}")
        totals = wide.sum(axis=1).to_numpy()  # semantic length of each pair's path
        lo_hi = ci.get(m)
        yerr = None
        if lo_hi is not None and np.all(np.isfinite(lo_hi)):
            yerr = [[totals.mean() - lo_hi[0]], [lo_hi[1] - totals.mean()]]
        ax2.bar(i, totals.mean(), color=colour, alpha=0.6, yerr=yerr, capsize=4, gid=f"total:{m}")
        jitter = np.linspace(-0.15, 0.15, P) if P > 1 else np.zeros(1)
        ax2.plot(i + jitter, totals, "k.", ms=4, gid=f"totals:{m}")
    floor = summary.get("segment_floor_mean")
    if floor is not None and np.isfinite(floor):
        ax.axhline(floor, color="0.4", ls=":", lw=1, label=f"noise floor {floor:.2g} (two solves at x(2))")
    band_note = "band: 95% bootstrap of the mean" if min(n_pairs.values()) >= FEW_PAIRS else "thin lines: each pair"
    ax.set_xlabel("segment l along the path")
    ax.set_ylabel("D_geo(T_h(l-1), T_h(l))")
    ax.set_title(f"segment lengths along the path ({band_note})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax2.set_xticks(range(len(methods)), methods)
    ax2.set_ylabel("semantic length Σ_l D_geo")
    ax2.set_title("per path: mean" + (", 95% interval" if ci else "") + "; dots: pairs", fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    model = summary.get("model") or (segments["model"].iloc[0] if "model" in segments.columns else "")
    t = summary.get("timestep", segments["timestep"].iloc[0] if "timestep" in segments.columns else "?")
    L = int(segments["segment"].max()) + 1
    fig.suptitle(f"{model}: semantic path length at t={t}, {max(n_pairs.values())} pairs x {L} segments "
                 "(Park et al.: slerp < lerp, lerp longest near the ends, geodesic shortest)", fontsize=9)
    return fig


def path_lengths_figure(segments_csv: str | os.PathLike, out: str | os.PathLike,
                        summary_json: str | os.PathLike | None = None) -> Path:
    """:func:`path_lengths_plot` of ``path_segments.csv`` (and ``path_lengths.json`` when given), saved to ``out``."""
    from diffatlas.io import read_json

    segments = read_path_segments(segments_csv)
    summary = read_json(summary_json) if summary_json is not None else None
    return save_figure(path_lengths_plot(segments, summary), out)
