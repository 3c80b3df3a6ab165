"""Figures of the SAE stage: label statistics across the grid, curves, and image galleries.

Every function returns a matplotlib Figure (save with :func:`diffatlas.plotting.save_figure`):

* :func:`plot_label_stats` — σ_label, purity (fine solid, coarse dashed, chance dotted; bars:
  95% bootstrap interval over the top latents) and FVE against layer (one line per timestep) or against timestep (one line per layer);
* :func:`plot_across_models` — the same statistics per model against timestep (mean over the
  model's layers, band = min..max over layers);
* :func:`plot_label_curves` — mean statistic over the top-N ranked latents as N grows
  (Revelio's curves) for every (layer, timestep) of a model;
* :func:`plot_gallery` — the top-activating images of the top latents of one (layer, timestep);
* :func:`plot_training` — the training curves (train loss, validation FVE, dead fraction vs step)
  of every (layer, timestep), each run's stop marked (plateau: filled dot, step cap: cross).

On ShapesWorld, fine labels ("red circle") and coarse labels ("circle") side by side show the
granularity effect: purity for the coarse label is higher where latents encode shape only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from diffatlas.errors import UserError
from diffatlas.plotting import plt

GRANS = (("fine", "-"), ("coarse", "--"))


def _require(table: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{what} lacks columns {missing}; re-run sae-summary")


def plot_label_stats(summary: pd.DataFrame, by: str = "layer", title: str | None = None) -> "plt.Figure":
    """Label statistics of the top latents vs ``by`` ('layer' or 'timestep') for one model × dataset."""
    if by not in ("layer", "timestep"):
        raise UserError(f"plot by {by!r} is not allowed; allowed: layer, timestep")
    other = "timestep" if by == "layer" else "layer"
    _require(summary, [by, other, "sigma_label_fine", "purity_fine", "fve"], "the SAE summary")
    xs = list(dict.fromkeys(summary[by])) if by == "layer" else sorted(summary[by].unique())
    groups = list(dict.fromkeys(summary[other])) if other == "layer" else sorted(summary[other].unique())
    pos = {x: i for i, x in enumerate(xs)}
    colours = plt.get_cmap("viridis")(np.linspace(0.05, 0.85, max(1, len(groups))))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("sigma_label", "σ_label of top-10 class ids ↓"), ("purity", "purity of top-10 labels ↑"))
    for ax, (stat, ylabel) in zip(axes[:2], panels):
        for colour, group in zip(colours, groups):
            rows = summary[summary[other] == group].copy()
            rows["_x"] = rows[by].map(pos)
            rows = rows.sort_values("_x")
            for gran, style in GRANS:
                ax.plot(rows["_x"], rows[f"{stat}_{gran}"], style, marker="o", color=colour,
                        label=f"{other} {group} ({gran})")
                lo, hi = f"{stat}_{gran}_ci_low", f"{stat}_{gran}_ci_high"
                if lo in rows and hi in rows:  # 95% bootstrap over the top latents
                    y = rows[f"{stat}_{gran}"].to_numpy(dtype=float)
                    yerr = np.stack([y - rows[lo].to_numpy(dtype=float), rows[hi].to_numpy(dtype=float) - y])
                    ax.errorbar(rows["_x"], y, yerr=yerr, fmt="none", ecolor=colour, elinewidth=0.8, capsize=2)
        for gran, style in GRANS:
            chance = summary[f"chance_{stat}_{gran}"].mean() if f"chance_{stat}_{gran}" in summary else np.nan
            if np.isfinite(chance):
                ax.axhline(chance, color="grey", linestyle=":", linewidth=1)
                ax.annotate(f"chance ({gran})", (len(xs) - 1, chance), fontsize=7, color="grey", ha="right", va="bottom")
        ax.set_ylabel(ylabel)
    for colour, group in zip(colours, groups):
        rows = summary[summary[other] == group].copy()
        rows["_x"] = rows[by].map(pos)
        rows = rows.sort_values("_x")
        axes[2].plot(rows["_x"], rows["fve"], marker="o", color=colour, label=f"{other} {group}")
    axes[2].set_ylabel("fraction of variance explained (val) ↑")
    for ax in axes:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_xlabel(by)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    n_top = summary["n_top_latents"].min() if "n_top_latents" in summary else "?"
    where = f"{summary['model'].iloc[0]} / {summary['dataset'].iloc[0]}" if "model" in summary else ""
    fig.suptitle(title or f"SAE latents vs {by} — {where} (top {n_top} latents; solid fine, dashed coarse labels; bars 95% bootstrap over latents)")
    fig.tight_layout()
    return fig


def plot_across_models(summary: pd.DataFrame, title: str | None = None) -> "plt.Figure":
    """Per model: statistic vs timestep, mean over its layers with a min..max band."""
    _require(summary, ["model", "timestep", "layer", "purity_fine", "purity_coarse", "sigma_label_fine"], "the SAE summaries")
    models = list(dict.fromkeys(summary["model"]))
    colours = plt.get_cmap("tab10")(np.arange(len(models)) % 10)
    stats = (("purity_fine", "purity (fine) ↑"), ("purity_coarse", "purity (coarse) ↑"), ("sigma_label_fine", "σ_label (fine) ↓"))
    fig, axes = plt.subplots(1, len(stats), figsize=(4.3 * len(stats), 3.8))
    for ax, (col, ylabel) in zip(axes, stats):
        for colour, model in zip(colours, models):
            g = summary[summary["model"] == model].groupby("timestep")[col]
            t = np.asarray(g.mean().index)
            ax.plot(t, g.mean().to_numpy(), marker="o", color=colour, label=f"{model} ({summary[summary['model'] == model]['layer'].nunique()} layers)")
            ax.fill_between(t, g.min().to_numpy(), g.max().to_numpy(), color=colour, alpha=0.15)
        chance = f"chance_{col}"
        if chance in summary and np.isfinite(summary[chance].mean()):
            ax.axhline(summary[chance].mean(), color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("timestep (training scale; flow-matching models: σ·T)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    dataset = summary["dataset"].iloc[0] if "dataset" in summary else ""
    fig.suptitle(title or f"SAE latents across models — {dataset} (line: mean over layers; band: min..max)")
    fig.tight_layout()
    return fig


def plot_label_curves(curves: dict[str, pd.DataFrame], title: str | None = None) -> "plt.Figure":
    """Mean statistic over the top-N latents vs N; ``curves`` maps a run label to :func:`analysis.curves` output."""
    if not curves:
        raise UserError("no SAE runs to plot curves for")
    stats = (("sigma_label_fine", "σ_label (fine) ↓"), ("purity_fine", "purity (fine) ↑"), ("purity_coarse", "purity (coarse) ↑"))
    fig, axes = plt.subplots(1, len(stats), figsize=(4.3 * len(stats), 3.8))
    colours = plt.get_cmap("viridis")(np.linspace(0.05, 0.9, len(curves)))
    for colour, (name, cur) in zip(colours, curves.items()):
        for ax, (col, ylabel) in zip(axes, stats):
            ax.plot(cur["n_top"], cur[col], color=colour, label=name)
            ax.set_ylabel(ylabel)
    for ax in axes:
        ax.set_xlabel("number of top latents averaged (ranked by activation)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle(title or "label statistics of the top-N latents")
    fig.tight_layout()
    return fig


TRAINING_PANELS = (("train_loss", "train loss (MSE + AuxK/32) ↓", True), ("val_fve", "validation FVE ↑", False),
                   ("dead_fraction", "dead latents (share) ↓", False))


def plot_training(runs: dict[str, tuple[pd.DataFrame, bool]], title: str | None = None) -> "plt.Figure":
    """Training curves; ``runs`` maps a run label to (its curve.csv table, whether it converged)."""
    if not runs:
        raise UserError("no SAE runs to plot training curves for")
    fig, axes = plt.subplots(1, len(TRAINING_PANELS), figsize=(4.3 * len(TRAINING_PANELS), 3.8))
    colours = plt.get_cmap("viridis")(np.linspace(0.05, 0.9, len(runs)))
    for colour, (name, (curve, converged)) in zip(colours, runs.items()):
        _require(curve, ["step"] + [c for c, _, _ in TRAINING_PANELS], f"curve of {name}")
        stop = "plateau" if converged else "step cap"
        for ax, (col, ylabel, log_y) in zip(axes, TRAINING_PANELS):
            ax.plot(curve["step"], curve[col], color=colour, label=f"{name} ({stop})")
            ax.plot(curve["step"].iloc[-1:], curve[col].iloc[-1:], "o" if converged else "x", color=colour)
            ax.set_ylabel(ylabel)
            if log_y:
                ax.set_yscale("log")
    for ax in axes:
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    fig.suptitle(title or "SAE training (dot: stopped on a validation-FVE plateau; cross: stopped at the step cap)")
    fig.tight_layout()
    return fig


def load_images(dataset_dir: str | os.PathLike, sample_ids: list[int]) -> dict[int, np.ndarray]:
    """Images (uint8 [H, W, 3]) of the given dataset sample ids, read through a memory map."""
    from diffatlas.data.dataset import load_dataset

    ds = load_dataset(dataset_dir, mmap=True)
    row_of = {int(s): i for i, s in enumerate(ds.meta["sample_id"].to_numpy())}
    missing = [s for s in sample_ids if int(s) not in row_of]
    if missing:
        raise UserError(f"sample ids {missing[:5]} of the SAE are not in dataset {dataset_dir}: was the store extracted from it?")
    return {int(s): np.asarray(ds.images[row_of[int(s)]]) for s in sample_ids}


def gallery_mosaic(rows: list[list[np.ndarray]], cols: int, pad_y: int = 2, pad_x: int = 2) -> np.ndarray:
    """Tile images (uint8 [h, w, 3], all the same size) into one array, row by row.

    Cell (r, c) occupies ``[r·(h+pad_y) : r·(h+pad_y)+h, c·(w+pad_x) : c·(w+pad_x)+w]``;
    missing cells and gaps are white. One image instead of rows × cols axes keeps large
    galleries fast.
    """
    first = next(img for row in rows for img in row)
    h, w = first.shape[:2]
    out = np.full((len(rows) * (h + pad_y), cols * (w + pad_x) - pad_x, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row[:cols]):
            out[r * (h + pad_y) : r * (h + pad_y) + h, c * (w + pad_x) : c * (w + pad_x) + w] = img
    return out


def gallery_gaps(side: int) -> tuple[int, int]:
    """(row gap, column gap) in pixels for displayed images of ``side`` pixels; the row gap holds captions."""
    pad_x = max(1, side // 16)
    return max(pad_x, side // 3), pad_x


def plot_gallery(
    latents: pd.DataFrame,
    dataset_dir: str | os.PathLike,
    n_latents: int = 8,
    top_n: int | None = None,
    title: str | None = None,
    max_side: int = 96,
) -> "plt.Figure":
    """Rows: the ``n_latents`` top-ranked latents; columns: their top-activating images.

    Each row is labelled with the latent id, its purity (fine / coarse) and majority fine
    label; under each image, its fine label and activation. Images larger than ``max_side``
    are subsampled by an integer stride (display only).
    """
    ranked = latents[latents["rank"] >= 0].sort_values("rank").head(n_latents)
    note = ""
    if ranked.empty:
        # Tiny datasets: no latent fires on more than min_active samples. Show the most
        # active latents instead (said in the title) rather than failing the figure.
        active = latents[latents["n_active"] > 0]
        ranked = active.sort_values(["n_active", "latent"], ascending=[False, True]).head(n_latents)
        note = " — no latent met min_active; showing the most active"
    if ranked.empty:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no latent fired on any sample", ha="center", va="center")
        ax.set_title(title or "top-activating images", fontsize=9)
        return fig
    top_n = top_n or max(len(ids) for ids in ranked["top_sample_ids"])
    ids = sorted({int(s) for row in ranked["top_sample_ids"] for s in list(row)[:top_n]})
    images = load_images(dataset_dir, ids)
    side = max(next(iter(images.values())).shape[:2])
    stride = max(1, -(-side // max_side))
    blank = np.full_like(next(iter(images.values()))[::stride, ::stride], 255)
    rows = [
        [images[int(s)][::stride, ::stride] for s in list(lat["top_sample_ids"])[:top_n]] or [blank]
        for _, lat in ranked.iterrows()
    ]
    h, w = rows[0][0].shape[:2]
    pad_y, pad_x = gallery_gaps(max(h, w))
    mosaic = gallery_mosaic(rows, top_n, pad_y, pad_x)
    fig, ax = plt.subplots(figsize=(1.1 * top_n + 2.0, 1.25 * len(rows) + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(h + pad_y) * r + h / 2 for r in range(len(rows))])
    ax.set_yticklabels(
        [f"#{int(lat['latent'])}  pur {lat['purity_fine']:.1f}/{lat['purity_coarse']:.1f}\n{lat['majority_fine']}"
         for _, lat in ranked.iterrows()],
        fontsize=7,
    )
    for r, (_, lat) in enumerate(ranked.iterrows()):
        for c, (lab, val) in enumerate(zip(list(lat["top_labels_fine"])[:top_n], list(lat["top_values"])[:top_n])):
            ax.text((w + pad_x) * c + w / 2, (h + pad_y) * r + h + pad_y * 0.1, f"{lab} {val:.2f}", fontsize=4.5,
                    ha="center", va="top", color="black", clip_on=False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title((title or "top-activating images of the top latents (purity fine/coarse)") + note, fontsize=9)
    fig.subplots_adjust(left=0.16, right=0.99, top=0.93, bottom=0.02)
    return fig


def run_label(metrics_or_path: str | os.PathLike) -> str:
    """'layer t{timestep}' of a run directory (from its path: .../{layer}/t{timestep})."""
    path = Path(metrics_or_path)
    path = path.parent if path.suffix else path
    return f"{path.parent.name} {path.name}"
