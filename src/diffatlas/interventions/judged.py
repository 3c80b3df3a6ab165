"""The judged steering experiment's bookkeeping: which latent per word, and the dose-response table.

No torch here: the choice of latents reads an SAE's ``latents.parquet``; the tables read the
judge's verdicts (one row per generated image). :mod:`diffatlas.interventions.experiment`
generates the images.

**Choice of latent** (:func:`select_latents`) for a word ``v`` of attribute ``a`` (colour "red",
shape "circle"): among latents whose top-activating images' majority value of ``a`` is ``v``
(``majority_{a} == v``) and that fire on at least ``min_active`` mined images (the SAE's
``mine_on``; ``train`` for the steering SAE, so the choice never sees held-out images), the
highest ``purity_{a}`` (share of the top images with value ``v``); ties go to the higher
``purity_active_{a}`` (over every image the latent fires on), then the more active latent, then
the lower index. A word no latent qualifies for stays in the table with no latent
(``status = "no latent"``): reported, not hidden.

**Rates** (:func:`rate_table`): per (word, experiment, condition, α) the count ``k`` of images
where the outcome holds out of ``n`` images, the rate k/n and its 95% Wilson interval
(:func:`diffatlas.intervals.wilson`). Outcome: ``present`` (the judge finds an object with the
word's value) for steering, ``absent`` (it finds none) for ablation.

**Verdicts** (:func:`verdicts`): a latent *steers* when, at some α, its rate's 95% interval lies
wholly above the baseline's (α = 0) and both controls' intervals at that α (a random latent and a
random direction, each added with the same norm); it *removes* when its ablation's absence-rate
interval lies wholly above the baseline's and the random latent's ablation's. Non-overlapping
intervals are a conservative test (a difference at well below the 5% level), so at a small n
every verdict is "no": the rates and their n are in the table beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from diffatlas.errors import UserError
from diffatlas.intervals import wilson

#: Experiments and their conditions. ``baseline``: no edit (α = 0); ``latent``: the chosen
#: latent; ``random_latent``: another latent of the SAE; ``random_direction``: a Gaussian
#: direction. Steering controls are added with the latent's norm at each α.
STEER_CONDITIONS = ("baseline", "latent", "random_latent", "random_direction")
ABLATE_CONDITIONS = ("baseline", "latent", "random_latent")
OUTCOME = {"steer": "present", "ablate": "absent"}

SELECTION_COLUMNS = ["attribute", "value", "latent", "status", "purity", "purity_active", "n_active", "mean_act",
                     "n_candidates"]
RATE_COLUMNS = ["attribute", "value", "latent", "experiment", "condition", "alpha", "outcome", "n", "k", "rate",
                "ci_low", "ci_high", "where"]
#: ``where`` of a rate: steering everywhere / where active (``intervene.where``); ``none`` for the
#: baselines; ``active`` for ablations (z_j := 0 changes only where z_j > 0).
WHERE_MODES = ("everywhere", "active")


def select_latents(latents: pd.DataFrame, attribute: str, values: Sequence[str], min_active: int) -> pd.DataFrame:
    """One row per value of ``attribute``: the chosen latent (module docstring), or ``latent = -1``.

    Columns :data:`SELECTION_COLUMNS`; ``n_candidates`` counts the latents that qualified.
    """
    need = ["latent", "n_active", "mean_act", f"purity_{attribute}", f"majority_{attribute}", f"purity_active_{attribute}"]
    missing = [c for c in need if c not in latents.columns]
    if missing:
        raise UserError(f"latents table has no column(s) {', '.join(missing)}: the steering SAE's store must carry the "
                        f"attribute {attribute!r} (a ShapesWorld dataset; retrain the SAE on a store extracted with it)")
    purity = latents[f"purity_{attribute}"].to_numpy(dtype=np.float64)
    ok = (latents["n_active"].to_numpy() >= int(min_active)) & np.isfinite(purity)
    rows = []
    for value in values:
        cand = latents.loc[ok & (latents[f"majority_{attribute}"].astype(str) == str(value))]
        if cand.empty:
            rows.append({"attribute": attribute, "value": value, "latent": -1, "status": "no latent", "purity": np.nan,
                         "purity_active": np.nan, "n_active": 0, "mean_act": np.nan, "n_candidates": 0})
            continue
        cand = cand.assign(_pa=cand[f"purity_active_{attribute}"].fillna(-1.0))
        best = cand.sort_values([f"purity_{attribute}", "_pa", "n_active", "latent"],
                                ascending=[False, False, False, True], kind="mergesort").iloc[0]
        rows.append({"attribute": attribute, "value": value, "latent": int(best["latent"]), "status": "chosen",
                     "purity": float(best[f"purity_{attribute}"]), "purity_active": float(best[f"purity_active_{attribute}"]),
                     "n_active": int(best["n_active"]), "mean_act": float(best["mean_act"]), "n_candidates": int(len(cand))})
    return pd.DataFrame(rows, columns=SELECTION_COLUMNS)


def attribute_present(verdict: dict[str, Any], attribute: str, value: str) -> bool:
    """Whether the judge found an object whose ``attribute`` is ``value`` in one image's verdict."""
    return any(obj.get(attribute) == value for obj in verdict.get("objects", []))


def rate_table(judged: pd.DataFrame) -> pd.DataFrame:
    """Rates with Wilson intervals from one row per image.

    ``judged`` columns: attribute, value, latent, experiment, condition, alpha, present (bool),
    and where (without it: steering everywhere). Returns :data:`RATE_COLUMNS`, one row per
    (attribute, value, experiment, condition, alpha, where).
    """
    if judged.empty:
        return pd.DataFrame(columns=RATE_COLUMNS)
    default = [("none" if c == "baseline" else "active" if e == "ablate" else "everywhere")
               for e, c in zip(judged["experiment"], judged["condition"])]
    given = judged["where"] if "where" in judged.columns else pd.Series([None] * len(judged), index=judged.index)
    judged = judged.assign(where=[d if not isinstance(w, str) else w for w, d in zip(given, default)])
    keys = ["attribute", "value", "latent", "experiment", "condition", "alpha", "where"]
    rows = []
    for key, group in judged.groupby(keys, sort=False):
        rec = dict(zip(keys, key))
        outcome = OUTCOME[rec["experiment"]]
        hits = group["present"].astype(bool)
        k = int(hits.sum() if outcome == "present" else (~hits).sum())
        n = int(len(group))
        low, high = wilson(k, n)
        rows.append({**rec, "outcome": outcome, "n": n, "k": k, "rate": k / n, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=RATE_COLUMNS)


def verdicts(rates: pd.DataFrame, selection: pd.DataFrame, where_modes: Sequence[str] = ("everywhere",)) -> pd.DataFrame:
    """Per word of ``selection`` and steering mode of ``where_modes``: steers / removes (module
    docstring), the best α and its rates. The latent and both controls are compared within one
    mode; the baseline and the ablation are shared by the modes.

    Columns: attribute, value, latent, status, where, steers, best_alpha, rate_best, ci_low_best, ci_high_best,
    baseline_rate, control_rate_best (the larger control's rate at the best α), removes,
    ablated_absent_rate, baseline_absent_rate, control_absent_rate. The best α is the one whose
    interval clears the others' upper ends by the most (the first on ties).
    """
    bad = [m for m in where_modes if m not in WHERE_MODES]
    if bad or not where_modes:
        raise UserError(f"steering where = {list(where_modes)!r} is not allowed; allowed: {', '.join(WHERE_MODES)}")
    if "where" not in rates.columns:
        rates = rates.assign(where="everywhere")
    out = []
    for sel, where in ((s, m) for s in selection.itertuples(index=False) for m in where_modes):
        rec: dict[str, Any] = {"attribute": sel.attribute, "value": sel.value, "latent": sel.latent, "status": sel.status,
                               "where": where, "steers": False, "best_alpha": np.nan, "rate_best": np.nan, "ci_low_best": np.nan,
                               "ci_high_best": np.nan, "baseline_rate": np.nan, "control_rate_best": np.nan,
                               "removes": False, "ablated_absent_rate": np.nan, "baseline_absent_rate": np.nan,
                               "control_absent_rate": np.nan}
        mine = rates[(rates["attribute"] == sel.attribute) & (rates["value"] == sel.value)]
        steer = mine[mine["experiment"] == "steer"]
        base = steer[steer["condition"] == "baseline"]
        base_high = float(base["ci_high"].iloc[0]) if not base.empty else np.nan
        if not base.empty:
            rec["baseline_rate"] = float(base["rate"].iloc[0])
        in_mode = steer[steer["where"] == where]
        lat = in_mode[in_mode["condition"] == "latent"].sort_values("alpha")
        best_margin = -np.inf
        for row in lat.itertuples(index=False):
            ctrl = in_mode[(in_mode["alpha"] == row.alpha) & in_mode["condition"].isin(["random_latent", "random_direction"])]
            margin = row.ci_low - np.nanmax([base_high, *ctrl["ci_high"].to_numpy(float)])
            if margin > best_margin:
                best_margin = margin
                rec.update(best_alpha=float(row.alpha), rate_best=float(row.rate), ci_low_best=float(row.ci_low),
                           ci_high_best=float(row.ci_high),
                           control_rate_best=float(ctrl["rate"].max()) if not ctrl.empty else np.nan)
        rec["steers"] = bool(best_margin > 0)
        abl = mine[mine["experiment"] == "ablate"].set_index("condition")
        if "latent" in abl.index:
            others = [c for c in ("baseline", "random_latent") if c in abl.index]
            rec["ablated_absent_rate"] = float(abl.loc["latent", "rate"])
            rec["baseline_absent_rate"] = float(abl.loc["baseline", "rate"]) if "baseline" in abl.index else np.nan
            rec["control_absent_rate"] = float(abl.loc["random_latent", "rate"]) if "random_latent" in abl.index else np.nan
            rec["removes"] = bool(others) and bool(abl.loc["latent", "ci_low"] > abl.loc[others, "ci_high"].max())
        out.append(rec)
    return pd.DataFrame(out)
