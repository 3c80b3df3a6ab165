"""Which layers and times carry causal colour and shape latents: the table and the figure.

Reads the experiment directories of one model (:mod:`diffatlas.interventions.experiment`),
each one (layer, timestep) cell, and writes

* the summary table, one row per (layer, timestep, attribute, steering mode ``where``): words, words with a latent,
  how many steer and how many are removed by ablation (verdicts as in
  :mod:`diffatlas.interventions.judged`), which ones, and the n behind each rate; and
* the figure: one row of panels per cell and steering mode, one panel per word: the rate at which the judge finds
  the word's value against α (0 = baseline) for the latent, a random latent and a random
  direction of the same norm, each with its 95% Wilson band; the title gives the latent, its
  purity and the ablation's absence rates. A word with no latent gets an empty, labelled panel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from diffatlas.errors import UserError
from diffatlas.interventions.experiment import RATES, SELECTION, VERDICTS

CELL = ["model", "layer", "timestep"]
SUMMARY_COLUMNS = [*CELL, "attribute", "words", "with_latent", "steer", "ablate", "steering_words", "not_steering_words",
                   "removed_words", "n_steer", "n_ablate", "mean_purity", "where"]
# colour, label, line style (distinct, so curves that coincide stay visible)
CONDITION_STYLE = {"latent": ("C0", "latent j", "o-"), "random_latent": ("C1", "random latent (same norm)", "s--"),
                   "random_direction": ("C2", "random direction (same norm)", "^:")}


def read_cells(runs: Sequence[str | os.PathLike]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(rates, verdicts, selection) of every experiment directory, concatenated (tables written
    before the steering mode was recorded read as steering everywhere)."""
    parts: dict[str, list[pd.DataFrame]] = {RATES: [], VERDICTS: [], SELECTION: []}
    for run in runs:
        for name in parts:
            path = Path(run) / name
            if not path.is_file():
                raise UserError(f"{path} is missing; expected an intervene-experiment output directory")
            parts[name].append(pd.read_csv(path, keep_default_na=False, na_values=[""]))
    if not runs:
        raise UserError("intervene-summary: give at least one experiment directory")
    rates, verdicts, selection = (pd.concat(parts[n], ignore_index=True) for n in (RATES, VERDICTS, SELECTION))
    if "where" not in verdicts.columns:
        verdicts = verdicts.assign(where="everywhere")
    if "where" not in rates.columns:
        rates = rates.assign(where=np.where(rates["condition"] == "baseline", "none",
                                            np.where(rates["experiment"] == "ablate", "active", "everywhere")))
    return rates, verdicts, selection


def summary_table(rates: pd.DataFrame, verdicts: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, layer, timestep, attribute); columns :data:`SUMMARY_COLUMNS`."""
    rows = []
    for key, v in verdicts.groupby([*CELL, "attribute", "where"], sort=False):
        rec = dict(zip([*CELL, "attribute", "where"], key))
        cell = pd.Series({k: rec[k] for k in [*CELL, "attribute"]})
        r = rates[(rates[CELL + ["attribute"]] == cell).all(axis=1)] if len(rates) else rates
        s = selection[(selection[CELL + ["attribute"]] == cell).all(axis=1)]
        chosen = v[v["latent"] >= 0]
        rows.append({
            **rec,
            "words": int(len(v)),
            "with_latent": int(len(chosen)),
            "steer": int(chosen["steers"].astype(bool).sum()),
            "ablate": int(chosen["removes"].astype(bool).sum()),
            "steering_words": " ".join(chosen.loc[chosen["steers"].astype(bool), "value"]),
            "not_steering_words": " ".join(v.loc[~v["steers"].astype(bool), "value"]),
            "removed_words": " ".join(chosen.loc[chosen["removes"].astype(bool), "value"]),
            "n_steer": _n(r, "steer"),
            "n_ablate": _n(r, "ablate"),
            "mean_purity": float(s.loc[s["latent"] >= 0, "purity"].mean()) if (s["latent"] >= 0).any() else np.nan,
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _n(rates: pd.DataFrame, experiment: str) -> int | float:
    """The n of the experiment's rates (every word and condition runs the same number of prompts)."""
    n = rates.loc[rates["experiment"] == experiment, "n"].unique() if len(rates) else []
    return int(n[0]) if len(n) == 1 else (np.nan if len(n) == 0 else int(min(n)))


def figure(rates: pd.DataFrame, verdicts: pd.DataFrame, selection: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Dose-response curves with Wilson bands, one row per cell, one panel per word (module docstring)."""
    from diffatlas.plotting import plt, save_figure

    cells = verdicts[[*CELL, "where"]].drop_duplicates().sort_values(["layer", "timestep"], kind="mergesort").to_numpy().tolist()
    words = verdicts[["attribute", "value"]].drop_duplicates().to_numpy().tolist()
    height = 2.4 * len(cells) + 0.8  # inches: rows of panels, a title band and a legend band of 0.4 each
    fig, axes = plt.subplots(len(cells), len(words), figsize=(2.3 * len(words), height), squeeze=False, sharey=True)
    for ci, cell in enumerate(cells):
        in_cell = lambda t: t[(t[CELL] == pd.Series(dict(zip(CELL, cell[:3])))).all(axis=1)]  # noqa: E731
        where = cell[3]
        r_cell, v_cell = in_cell(rates), in_cell(verdicts)
        v_cell = v_cell[v_cell["where"] == where]
        # this mode's steering rows, the shared baseline and ablation rows
        r_cell = r_cell[(r_cell["condition"] == "baseline") | (r_cell["experiment"] == "ablate") | (r_cell["where"] == where)]
        for wi, (attr, value) in enumerate(words):
            ax = axes[ci][wi]
            v = v_cell[(v_cell["attribute"] == attr) & (v_cell["value"] == value)]
            r = r_cell[(r_cell["attribute"] == attr) & (r_cell["value"] == value)]
            steer = r[r["experiment"] == "steer"]
            base = steer[steer["condition"] == "baseline"]
            if v.empty or int(v["latent"].iloc[0]) < 0 or base.empty:
                ax.text(0.5, 0.5, "no latent chosen", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                ax.set_title(f"{value}", fontsize=8)
                continue
            b = base.iloc[0]
            for cond, (colour, label, style) in CONDITION_STYLE.items():
                c = steer[steer["condition"] == cond].sort_values("alpha")
                x = np.concatenate([[0.0], c["alpha"].to_numpy(float)])
                y = np.concatenate([[b["rate"]], c["rate"].to_numpy(float)])
                lo = np.concatenate([[b["ci_low"]], c["ci_low"].to_numpy(float)])
                hi = np.concatenate([[b["ci_high"]], c["ci_high"].to_numpy(float)])
                ax.plot(x, y, style, color=colour, label=label, ms=3, lw=1.2)
                ax.fill_between(x, lo, hi, color=colour, alpha=0.15, lw=0)
            row = v.iloc[0]
            abl = r[r["experiment"] == "ablate"].set_index("condition")
            abl_text = ""
            if "latent" in abl.index and "baseline" in abl.index:
                abl_text = (f"\nablate: absent {int(abl.loc['latent', 'k'])}/{int(abl.loc['latent', 'n'])}"
                            f" (base {int(abl.loc['baseline', 'k'])}/{int(abl.loc['baseline', 'n'])})")
            verdict = "steers" if bool(row["steers"]) else "does not steer"
            ax.set_title(f"{value}: j={int(row['latent'])} {verdict}{abl_text}", fontsize=7)
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("α (× mean act.)", fontsize=7)
            ax.tick_params(labelsize=7)
        axes[ci][0].set_ylabel(f"{cell[1]} t{cell[2]} ({where})\nrate value present (n={_n(r_cell, 'steer')})", fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        for row_axes in axes:
            for ax in row_axes:
                handles, labels = ax.get_legend_handles_labels()
                if handles:
                    break
            if handles:
                break
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    model = cells[0][0] if cells else ""
    fig.suptitle(f"{model}: steering SAE latents, judged (95% Wilson bands)", fontsize=9)
    fig.tight_layout(rect=(0, 0.4 / height, 1, 1 - 0.4 / height))
    return save_figure(fig, out)
