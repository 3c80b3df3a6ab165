"""The summary table across the grid: one row per (model, dataset, layer, timestep, granularity, method)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import pandas as pd

from diffatlas.errors import UserError
from diffatlas.io import read_json

COLUMNS = [
    "model", "dataset", "layer", "module_path", "timestep", "alpha_bar", "granularity", "method",
    "accuracy", "macro_f1", "train_accuracy", "val_accuracy", "chance_uniform", "majority_baseline",
    "n_classes", "n_train", "n_val", "n_test", "n_warnings", "metrics_path",
]  # fmt: skip


def summary_rows(metrics: dict, path: str) -> list[dict]:
    """Rows of one job's ``metrics.json`` (already parsed)."""
    rows = []
    try:
        for gran, entry in metrics["results"].items():
            for method in ("diffc", "probe"):
                m = entry[method]
                rows.append(
                    {
                        "model": metrics["model"],
                        "dataset": metrics["dataset"],
                        "layer": metrics["layer"],
                        "module_path": metrics.get("module_path"),
                        "timestep": int(metrics["timestep"]),
                        "alpha_bar": metrics["alpha_bar"],
                        "granularity": gran,
                        "method": method,
                        "accuracy": m["accuracy"],
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
