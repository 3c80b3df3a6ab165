"""One figure for each link (matplotlib, read from the link tables only).

* :func:`plot_sae_daam` — per SAE run (layer × timestep) and attribute, the mean IoU of the
  latent masks with the DAAM masks of their words, of the latent masks with the true masks,
  and of the DAAM masks with the true masks (averaged per image, then over images; bars: 95%
  bootstrap intervals over images, :func:`diffatlas.links.sae_daam.pooled`);
* :func:`plot_directions` — per SAE run, the share of pullback directions whose most-changed
  latent carries the judge's factor (95% Wilson interval), beside chance.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from diffatlas.errors import UserError
from diffatlas.links.sae_daam import IOUS, pooled
from diffatlas.plotting import plt, save_figure

LABELS = {"iou_sae_daam": "latent ∩ DAAM word", "iou_sae_true": "latent ∩ true mask", "iou_daam_true": "DAAM word ∩ true mask"}


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def plot_sae_daam(rows_path: str | os.PathLike, out: str | os.PathLike, title: str = "") -> None:
    rows = pd.read_parquet(rows_path)
    attrs = sorted(rows["attribute"].unique()) if len(rows) else []
    fig, axes = plt.subplots(1, max(1, len(attrs)), figsize=(4.5 * max(1, len(attrs)), 3.6), squeeze=False, sharey=True)
    if not attrs:
        _empty(axes[0, 0], "no labelled latent names a caption word")
    table = pooled(rows) if len(rows) else pd.DataFrame()
    for ax, attr in zip(axes[0], attrs):
        t = table[table["attribute"] == attr].sort_values(["timestep", "layer"])
        x = np.arange(len(t))
        for i, m in enumerate(IOUS):
            y = t[m].to_numpy()
            err = np.clip(np.stack([y - t[f"{m}_low"].to_numpy(), t[f"{m}_high"].to_numpy() - y]), 0, None)
            ax.bar(x + (i - 1) * 0.27, y, 0.27, yerr=np.nan_to_num(err), capsize=2, label=LABELS[m])
        ax.set_xticks(x, [f"{r.layer} t{r.timestep} ({r.latents})" for r in t.itertuples()], fontsize=7, rotation=45, ha="right")
        ax.set_title(f"{attr} words")
        ax.set_ylim(0, 1)
    axes[0, 0].set_ylabel("mean IoU (95% CI)")
    axes[0, 0].set_xlabel("SAE layer, timestep (labelled latents)", fontsize=7)
    if attrs:
        axes[0, -1].legend(fontsize=7)
    fig.suptitle(title or "SAE latent maps vs DAAM word maps vs true masks")
    save_figure(fig, out)


def plot_directions(agreement_path: str | os.PathLike, out: str | os.PathLike, title: str = "") -> None:
    agree = pd.read_csv(agreement_path)
    need = {"layer", "timestep", "agreement", "low", "high", "chance", "n"}
    if not need <= set(agree.columns):
        raise UserError(f"{agreement_path} lacks columns {sorted(need - set(agree.columns))}; run links-directions first")
    measures = list(dict.fromkeys(agree["measure"])) if "measure" in agree else [None]
    first = agree[agree["measure"] == measures[0]] if measures[0] is not None else agree
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(first) + 1.5), 3.8))
    x = np.arange(len(first))
    width = 0.8 / len(measures)
    for i, measure in enumerate(measures):
        part = agree[agree["measure"] == measure] if measure is not None else agree
        y = part["agreement"].to_numpy(dtype=float)
        # Wilson's bound equals the rate at k = 0 or n; rounding must not make an error bar negative
        err = np.clip(np.stack([y - part["low"].to_numpy(dtype=float), part["high"].to_numpy(dtype=float) - y]), 0, None)
        off = (i - (len(measures) - 1) / 2) * width
        ax.bar(x + off, np.nan_to_num(y), width, yerr=np.nan_to_num(err), capsize=3,
               label=f"most-changed latent ({measure} change): attribute = judge's factor" if measure else "agreement")
        ax.scatter(x + off, part["chance"], marker="D", s=14, color="tab:red", zorder=3,
                   label="chance (a random latent active on the edits)" if i == 0 else None)
    ax.set_xticks(x, [(f"pooled\nn={r.n}\n({r.n_directions} dir.)" if r.layer == "all" else f"{r.layer}\nt{r.timestep}\nn={r.n}")
                      for r in first.itertuples()], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("agreement (95% interval)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    ax.set_title(title or "pullback directions vs SAE latent labels")
    save_figure(fig, out)
