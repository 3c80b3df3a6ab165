"""Result tables as page cells: each value of a CSV shown as it is, with its interval beside it.

A column ``c`` that comes with ``c_low`` and ``c_high`` (or a pair named in ``intervals``) is
one cell "value [low, high]"; integers show as integers, other numbers with three decimals and
their full value in ``data-value``; columns the atlas does not know (a stage may add some) are
shown as they come, so a new column appears on the page instead of breaking it. Nothing is
computed here: a cell is a value of the table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from diffatlas.atlas import sources


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def truth(v: Any) -> bool:
    """A verdict cell as a bool: True/False as pandas reads them, or their text ("True", "true")."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    return str(v).strip().lower() == "true"


def scalar(col: str, v: Any) -> dict[str, Any]:
    """One cell: kind ``int`` / ``num`` / ``bool`` / ``text``."""
    if isinstance(v, (bool, np.bool_)):
        return {"col": col, "kind": "bool", "value": bool(v)}
    if is_int(v):
        return {"col": col, "kind": "int", "value": int(v)}
    if isinstance(v, (float, np.floating)):
        return {"col": col, "kind": "num", "value": float(v)}
    return {"col": col, "kind": "text", "value": "" if v is None else str(v)}


def interval_pairs(columns: Sequence[str], named: dict[str, tuple[str, str]] | None = None) -> dict[str, tuple[str, str]]:
    """Columns shown with an interval: ``named`` where present, and every ``c`` with ``c_low``/``c_high``."""
    cols = set(columns)
    pairs = {c: lh for c, lh in (named or {}).items() if c in cols and set(lh) <= cols}
    for c in columns:
        if c not in pairs and f"{c}_low" in cols and f"{c}_high" in cols:
            pairs[c] = (f"{c}_low", f"{c}_high")
    return pairs


def row_attrs(record: dict[str, Any], keys: Iterable[str]) -> dict[str, str]:
    """``data-*`` attributes naming a row (``value``, a word, becomes ``data-word``)."""
    out = {}
    for k in keys:
        if k in record:
            v = record[k]
            out["data-" + ("word" if k == "value" else k)] = str(int(v)) if is_int(v) else str(v)
    return out


def table(frame: pd.DataFrame, keys: Sequence[str] = (), hide: Iterable[str] = (),
          intervals: dict[str, tuple[str, str]] | None = None,
          links: dict[str, Callable[[dict[str, Any]], str | None]] | None = None,
          latent_lists: dict[str, Callable[[dict[str, Any], int], str | None]] | None = None) -> dict[str, Any]:
    """A table for the ``table`` macro: ``{"header": [...], "rows": [{"attrs": {...}, "cells": [...]}]}``.

    ``keys``: columns that name a row (its ``data-*`` attributes); ``hide``: columns not shown;
    ``links``: column -> (row -> atlas-relative href or None); ``latent_lists``: columns holding
    comma-separated latents (directions.csv) -> (row, latent -> href or None).
    """
    hide = set(hide)
    pairs = interval_pairs(list(frame.columns), intervals)
    folded = {c for lh in pairs.values() for c in lh}
    shown = [c for c in frame.columns if c not in hide and c not in folded]
    links, latent_lists = links or {}, latent_lists or {}
    rows = []
    for rec in frame.to_dict("records"):
        cells = []
        for c in shown:
            v = rec[c]
            if c in pairs:
                lo, hi = pairs[c]
                cells.append({"col": c, "kind": "interval", "value": v, "low": rec[lo], "high": rec[hi]})
            elif c in latent_lists:
                cells.append({"col": c, "kind": "latents",
                              "items": [(j, latent_lists[c](rec, j)) for j in sources.latent_list(v)]})
            elif c in links:
                cells.append({**scalar(c, v), "href": links[c](rec)})
            else:
                cells.append(scalar(c, v))
        rows.append({"attrs": row_attrs(rec, keys), "cells": cells})
    header = [f"{c} [95% interval]" if c in pairs else c for c in shown]
    return {"header": header, "rows": rows}
