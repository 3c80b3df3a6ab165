"""Figures from the Diff-C summary table: how much each layer x timestep knows.

Every figure has one panel per label granularity (coarse, fine: the paper's coarse vs
fine-grained datasets) and draws Diff-C (solid, circles) and the linear probe (dashed,
squares) on the same axes, with uniform chance as a dotted grey line. Error bars are the 95%
Wilson intervals over the test images (columns ``accuracy_ci_low/high`` of the summary): two
points whose bars overlap are not told apart by this test set.

- :func:`plot_vs_layer`: accuracy against layer (in the order of the table), a line per timestep.
- :func:`plot_vs_timestep`: accuracy against timestep, a line per layer.
- :func:`plot_models`: accuracy against timestep, a line per model, taking each model's
  best layer at each timestep (architectures have different layers; the best layer is
  written next to each Diff-C point).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from diffatlas.errors import UserError  # noqa: E402

GRAN_ORDER = ["coarse", "fine"]
STYLE = {"diffc": dict(ls="-", marker="o"), "probe": dict(ls="--", marker="s", alpha=0.8)}
LABEL = {"diffc": "Diff-C", "probe": "linear probe"}


def _errorbar(ax: plt.Axes, x, s: pd.DataFrame, **kw) -> None:
    """Accuracy of ``s`` against ``x`` with its 95% interval as error bars."""
    acc = s["accuracy"].to_numpy(dtype=float)
    yerr = None
    if {"accuracy_ci_low", "accuracy_ci_high"} <= set(s.columns):
        low, high = s["accuracy_ci_low"].to_numpy(dtype=float), s["accuracy_ci_high"].to_numpy(dtype=float)
        yerr = np.stack([acc - low, high - acc])
    ax.errorbar(x, acc, yerr=yerr, capsize=2, elinewidth=0.8, **kw)


def _select(df: pd.DataFrame, **where: str) -> pd.DataFrame:
    sub = df
    for key, value in where.items():
        if value is None:
            continue
        sub = sub[sub[key] == value]
        if sub.empty:
            have = ", ".join(map(str, pd.unique(df[key])))
            raise UserError(f"the Diff-C summary has no rows for {key} = {value!r}; it has: {have}")
    return sub


def _panels(df: pd.DataFrame) -> tuple[plt.Figure, list[tuple[str, plt.Axes]]]:
    grans = [g for g in GRAN_ORDER if g in set(df["granularity"])]
    grans += sorted(set(df["granularity"]) - set(grans))
    fig, axes = plt.subplots(1, len(grans), figsize=(5.2 * len(grans), 4.0), squeeze=False, sharey=True)
    return fig, list(zip(grans, axes[0]))


def _finish(ax: plt.Axes, sub: pd.DataFrame, gran: str, xlabel: str) -> None:
    chance = float(sub["chance_uniform"].iloc[0])
    ax.axhline(chance, color="grey", ls=":", lw=1, label="chance (uniform)")
    ax.annotate(f"chance {chance:.2f}", (1.0, chance), xycoords=("axes fraction", "data"), xytext=(-3, 3),
                textcoords="offset points", ha="right", fontsize=7, color="grey")  # fmt: skip
    n_classes = int(sub["n_classes"].iloc[0])
    ax.set_title(f"{gran} labels ({n_classes} classes)")
    ax.set_xlabel(xlabel)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)


def _legend(fig: plt.Figure, axes: list[tuple[str, plt.Axes]], colour_title: str) -> None:
    handles, labels = axes[0][1].get_legend_handles_labels()
    axes[0][1].set_ylabel("test accuracy (bars: 95% Wilson interval)")
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), title=colour_title, fontsize=8)
    fig.tight_layout()


def plot_vs_layer(df: pd.DataFrame, model: str, dataset: str) -> plt.Figure:
    """Accuracy vs layer for one (model, dataset); a colour per timestep."""
    df = _select(df, model=model, dataset=dataset)
    layers = list(pd.unique(df["layer"]))
    timesteps = sorted(pd.unique(df["timestep"]))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(timesteps)))
    fig, axes = _panels(df)
    for gran, ax in axes:
        sub = df[df["granularity"] == gran]
        for t, colour in zip(timesteps, colours):
            for method in ("diffc", "probe"):
                s = sub[(sub["timestep"] == t) & (sub["method"] == method)].set_index("layer").reindex(layers)
                _errorbar(ax, np.arange(len(layers)), s, color=colour, label=f"{LABEL[method]}, t={t}", **STYLE[method])
        ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
        _finish(ax, sub, gran, "layer")
    fig.suptitle(f"Diff-C vs linear probe by layer: {model} on {dataset}")
    _legend(fig, axes, "method, timestep")
    return fig


def plot_vs_timestep(df: pd.DataFrame, model: str, dataset: str) -> plt.Figure:
    """Accuracy vs training-scale timestep for one (model, dataset); a colour per layer."""
    df = _select(df, model=model, dataset=dataset)
    layers = list(pd.unique(df["layer"]))
    colours = plt.cm.tab10(np.arange(len(layers)) % 10)
    fig, axes = _panels(df)
    for gran, ax in axes:
        sub = df[df["granularity"] == gran]
        for layer, colour in zip(layers, colours):
            for method in ("diffc", "probe"):
                s = sub[(sub["layer"] == layer) & (sub["method"] == method)].sort_values("timestep")
                _errorbar(ax, s["timestep"].to_numpy(), s, color=colour, label=f"{LABEL[method]}, {layer}", **STYLE[method])
        _finish(ax, sub, gran, "timestep t (training scale, flow-matching models σ·T; noisier to the right)")
    fig.suptitle(f"Diff-C vs linear probe by timestep: {model} on {dataset}")
    _legend(fig, axes, "method, layer")
    return fig


def plot_models(df: pd.DataFrame, dataset: str, models: list[str] | None = None) -> plt.Figure:
    """Accuracy vs timestep across models on one dataset (each model's best layer per timestep)."""
    df = _select(df, dataset=dataset)
    models = models or list(pd.unique(df["model"]))
    for m in models:
        _select(df, model=m)
    colours = plt.cm.tab10(np.arange(len(models)) % 10)
    fig, axes = _panels(df)
    for gran, ax in axes:
        sub = df[df["granularity"] == gran]
        for model, colour in zip(models, colours):
            for method in ("diffc", "probe"):
                s = sub[(sub["model"] == model) & (sub["method"] == method)]
                best = s.loc[s.groupby("timestep")["accuracy"].idxmax()].sort_values("timestep")
                _errorbar(ax, best["timestep"].to_numpy(), best, color=colour, label=f"{LABEL[method]}, {model}", **STYLE[method])
                if method == "diffc":
                    for _, row in best.iterrows():
                        ax.annotate(row["layer"], (row["timestep"], row["accuracy"]), fontsize=6, color=colour,
                                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
        _finish(ax, sub, gran, "timestep t (training scale; flow-matching models: σ·T)")
    fig.suptitle(f"Models compared on {dataset} (best layer at each timestep)")
    _legend(fig, axes, "method, model")
    return fig
