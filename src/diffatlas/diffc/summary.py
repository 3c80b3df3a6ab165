"""The summary table across the grid: one row per (model, dataset, layer, timestep, granularity, method).

Every accuracy comes with its 95% Wilson interval over the test images (``accuracy_ci_low``,
``accuracy_ci_high``) and, when the job trained several seeds (``diffc.seeds``), the mean,
standard deviation, min and max of the seeds' accuracies. :func:`best_cells` picks the best
layer x timestep per (model, dataset, granularity, method) and says which other cells are
within its interval (not distinguishable from it at this test size).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import pandas as pd

from diffatlas.errors import UserError
from diffatlas.intervals import wilson
from diffatlas.io import read_json

COLUMNS = [
    "model", "dataset", "layer", "module_path", "timestep", "alpha_bar", "sigma", "granularity", "method",
    "accuracy", "accuracy_ci_low", "accuracy_ci_high", "n_correct", "n_seeds", "accuracy_seed_mean",
    "accuracy_seed_std", "accuracy_seed_min", "accuracy_seed_max", "macro_f1", "train_accuracy", "val_accuracy", "chance_uniform", "majority_baseline",
    "n_classes", "n_train", "n_val", "n_test", "n_warnings", "metrics_path",
]  # fmt: skip


def _number(value: float | None) -> float:
    """A recorded level as a float column value (None, JSON's null for NaN: NaN)."""
    return float("nan") if value is None else float(value)


def summary_rows(metrics: dict, path: str) -> list[dict]:
    """Rows of one job's ``metrics.json`` (already parsed)."""
    rows = []
    try:
        for gran, entry in metrics["results"].items():
            for method in ("diffc", "probe"):
                m = entry[method]
                n_test = int(m.get("n_test", metrics["split"]["n_test"]))
                # metrics.json written before intervals existed: accuracy is k/n exactly
                k = int(m.get("n_correct", round(m["accuracy"] * n_test)))
                ci = m.get("accuracy_ci95") or wilson(k, n_test)
                seeds = m.get("seeds") or {"n": 1, "mean": m["accuracy"], "std": 0.0, "min": m["accuracy"], "max": m["accuracy"]}
                rows.append(
                    {
                        "model": metrics["model"],
                        "dataset": metrics["dataset"],
                        "layer": metrics["layer"],
                        "module_path": metrics.get("module_path"),
                        "timestep": int(metrics["timestep"]),
                        # ᾱ_t of DDPM-family models, σ of flow-matching ones (timestep = σ·T); the other NaN
                        "alpha_bar": _number(metrics["alpha_bar"]),
                        "sigma": _number(metrics.get("sigma")),
                        "granularity": gran,
                        "method": method,
                        "accuracy": m["accuracy"],
                        "accuracy_ci_low": ci[0],
                        "accuracy_ci_high": ci[1],
                        "n_correct": k,
                        "n_seeds": seeds["n"],
                        "accuracy_seed_mean": seeds["mean"],
                        "accuracy_seed_std": seeds["std"],
                        "accuracy_seed_min": seeds["min"],
                        "accuracy_seed_max": seeds["max"],
                        "macro_f1": m["macro_f1"],
                        "train_accuracy": m.get("train_accuracy"),
                        "val_accuracy": m.get("val_accuracy"),
                        "chance_uniform": m["chance_uniform"],
                        "majority_baseline": entry.get("majority_baseline"),
                        "n_classes": len(entry["classes"]),
                        "n_train": metrics["split"]["n_train"],
                        "n_val": metrics["split"]["n_val"],
                        "n_test": metrics["split"]["n_test"],
                        "n_warnings": len(m.get("warnings", [])),
                        "metrics_path": path,
                    }
                )
    except (KeyError, TypeError) as err:
        raise UserError(f"{path} is not a Diff-C metrics.json (missing {err}); re-run train_diffc") from err
    return rows


def build_summary(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Table of every job's test metrics, in the order of ``paths``."""
    rows = []
    for p in paths:
        rows += summary_rows(read_json(p), str(p))
    if not rows:
        raise UserError("no Diff-C metrics.json files given; nothing to summarise")
    return pd.DataFrame(rows, columns=COLUMNS)


def best_cells(table: pd.DataFrame) -> pd.DataFrame:
    """The best layer x timestep per (model, dataset, granularity, method), with its interval.

    Columns: model, dataset, granularity, method, layer, timestep, accuracy, accuracy_ci_low,
    accuracy_ci_high, n_test, n_seeds, accuracy_seed_std, chance_uniform, and ``n_tied``: how many
    other cells' accuracies fall inside the best cell's 95% interval (0 = a clear winner).
    """
    keys = ["model", "dataset", "granularity", "method"]
    rows = []
    for _, group in table.groupby(keys, sort=False):
        best = group.loc[group["accuracy"].idxmax()]
        others = group.drop(index=best.name)
        tied = int(((others["accuracy"] >= best["accuracy_ci_low"]) & (others["accuracy"] <= best["accuracy_ci_high"])).sum())
        row = {k: best[k] for k in keys + ["layer", "timestep", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
                                            "n_test", "n_seeds", "accuracy_seed_std", "chance_uniform"]}  # fmt: skip
        rows.append({**row, "n_tied": tied})
    return pd.DataFrame(rows)
