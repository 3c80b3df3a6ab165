"""DAAM figures: overlay grids per word, the mIoU table with its threshold curve, the relation
plot (mIoH vs mIoD) and the entanglement plots. Each takes tables or a saved run and writes one
PNG atomically (:func:`diffatlas.plotting.save_figure`); none needs torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from diffatlas.daam.words import TracedRun, minmax
from diffatlas.plotting import plt, save_figure

log = logging.getLogger(__name__)

_METHOD_COLOUR = {"daam": "tab:red", "whole_image": "tab:grey", "centre_prior": "tab:blue"}
_SOURCE_STYLE = {"real": "-", "generated": "--"}


def overlay_grid(run: TracedRun, path: str | os.PathLike, tau: float, n_items: int, title: str = "") -> Path:
    """Rows = the first ``n_items`` images; first column the image, then one panel per word:
    the word's map (min-max scaled, jet) over the image, with its DAAM mask outline at ``tau``
    (the τ the run's tables were scored at, recorded in its eval.json)."""
    n = max(1, min(n_items, len(run)))
    n_cols = 1 + max(len(run.maps[i].words) for i in range(n))
    fig, axes = plt.subplots(n, n_cols, figsize=(1.6 * n_cols, 1.7 * n), squeeze=False)
    for r in range(n):
        maps, image = run.maps[r], run.images[r]
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(maps.prompt if len(maps.prompt) < 40 else maps.prompt[:37] + "...", fontsize=6, loc="left")
        for c, word in enumerate(maps.words, start=1):
            ax = axes[r, c]
            ax.imshow(image)
            if word.positions:
                heat = minmax(maps.word_map(word.index))
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1, extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
                ax.contour(heat > tau, levels=[0.5], colors="white", linewidths=0.6)
            ax.set_title(word.text + ("" if word.positions else " (cut)"), fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[r, 1 + len(maps.words) :]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def miou_figure(summary: pd.DataFrame, curve: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Left: the mIoU table (method x source at τ, with 95% CI, n, best τ). Right: mIoU vs τ."""
    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.25, 1]})
    ax_t.axis("off")
    if summary.empty:
        ax_t.text(0.5, 0.5, "no scored words", ha="center")
    else:
        cells = [
            [s, m, f"{mi:.3f} ± {ci:.3f}" if np.isfinite(ci) else f"{mi:.3f}", str(int(k)), f"{bt:.1f} ({bm:.3f})"]
            for s, m, mi, ci, k, bt, bm in summary[["source", "method", "miou", "ci95", "n", "best_tau", "best_miou"]].itertuples(index=False)
        ]
        tau = float(summary["tau"].iloc[0])
        table = ax_t.table(cellText=cells, colLabels=["source", "method", f"mIoU at τ={tau:g}", "n", "best τ (mIoU)"], loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.4)
    for (source, method), df in curve.groupby(["source", "method"]):
        ax_c.plot(df["tau"], df["miou"], _SOURCE_STYLE.get(source, ":"), color=_METHOD_COLOUR.get(method), marker="o", ms=3,
                  label=f"{source}: {method}")
    ax_c.set_xlabel("threshold τ")
    ax_c.set_ylabel("mIoU (nouns)")
    ax_c.set_ylim(0, 1)
    ax_c.grid(alpha=0.3)
    if len(curve):
        ax_c.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def relation_figure(relations: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """mIoH (y) against mIoD (x) per relation (colour) and source (marker); below the diagonal
    (mIoD > mIoH) the dependent's map lies inside the head's, above it the reverse. Size ~ n."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    sources = sorted(relations["source"].unique()) if len(relations) else []
    rels = sorted(relations["relation"].unique()) if len(relations) else []
    markers = dict(zip(sources, "osD^v"))
    colours = {r: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(rels)}
    for row in relations.itertuples(index=False):
        ax.scatter(row.miod, row.mioh, s=15 + 3 * min(row.n, 60), marker=markers.get(row.source, "o"), color=colours[row.relation],
                   alpha=0.8, label=f"{row.relation} ({row.source}): mIoU {row.miou:.2f}, n={row.n}")
    if len(relations):
        ax.legend(fontsize=6, loc="lower left")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mIoD = |H∩D| / |D|")
    ax.set_ylabel("mIoH = |H∩D| / |H|")
    ax.set_title(title or "head–dependent map overlap")
    ax.grid(alpha=0.3)
    if relations.empty:
        ax.text(0.5, 0.5, "no parsed relations", ha="center")
    fig.tight_layout()
    return save_figure(fig, path)


def entanglement_figure(cohyponym: pd.DataFrame, swaps: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Left: share of prompts with both objects generated (judge) and IoU of the two nouns' masks,
    per group. Right: image change inside vs outside the object caused by adjective swaps."""
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(9, 3.6))
    if len(cohyponym):
        g = cohyponym.groupby("group").agg(both=("both_present", "mean"), overlap=("noun_mask_iou", "mean"), n=("item", "size"))
        x = np.arange(len(g))
        ax_l.bar(x - 0.2, g["both"], 0.4, label="both objects generated (judge)")
        ax_l.bar(x + 0.2, g["overlap"], 0.4, label="IoU of the two noun masks")
        ax_l.set_xticks(x, [f"{k}\n(n={n})" for k, n in zip(g.index, g["n"])])
        ax_l.set_ylim(0, 1)
        ax_l.legend(fontsize=7)
    else:
        ax_l.text(0.5, 0.5, "no cohyponym prompts", ha="center")
    ax_l.set_title("cohyponym entanglement", fontsize=9)
    if len(swaps):
        g = swaps.groupby("noun").agg(inside=("change_inside", "mean"), outside=("change_outside", "mean"), spread=("adjective_outside_noun", "mean"))
        x = np.arange(len(g))
        ax_r.bar(x - 0.27, g["inside"], 0.27, label="change inside object")
        ax_r.bar(x, g["outside"], 0.27, label="change outside object")
        ax_r.bar(x + 0.27, g["spread"], 0.27, label="adjective mask outside noun mask")
        ax_r.set_xticks(x, list(g.index))
        ax_r.set_ylim(0, 1)
        ax_r.legend(fontsize=7)
    else:
        ax_r.text(0.5, 0.5, "no adjective swaps", ha="center")
    ax_r.set_title("adjective swaps (mean |ΔRGB| in [0, 1])", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def read_tables(dirs: Sequence[str | os.PathLike], name: str) -> pd.DataFrame:
    """Concatenate ``name`` (CSV) from every directory that has it."""
    frames = [pd.read_csv(Path(d) / name) for d in dirs if (Path(d) / name).exists()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
