"""Park et al.'s claims, measured on the geometry stage's result files (never typed in).

Each claim becomes one or two rows of ``claims.csv`` / ``claims.md``: the measure, its value,
a 95% interval, n (the units the interval resamples), the criterion and the verdict. A claim
is **supported** when the interval lies entirely on the claimed side of the no-effect value
(a difference > 0, a ratio > 1, an agreement rate above chance and 0.5); otherwise it is **not supported**,
and ``direction`` says whether the point estimate at least points the claimed way (``as
claimed``), the other way (``opposite``) or neither (``none``). A claim whose inputs are
missing is ``not measured``. Small demo runs leave most intervals wide: read n.

The claims and where their numbers come from:

========================  ====================================================================
normalised_plausible      edit_quality.csv: at the largest |γ|, the share of *plausible* images
                          (judge finds an object, no background blob) of x0-normalised minus
                          plain edits, paired per (timestep, sample, direction, γ); and the
                          saturation of plain minus normalised, paired the same way.
semantic_vs_random        meaning.csv: over every γ != 0, "an object is kept and a known factor
                          changed" for semantic minus random directions, paired per (timestep,
                          sample, direction, γ) where the reference shows an object; and from
                          edit_quality.csv the share of damaged (not plausible) images of random
                          minus semantic edits.
global_agreement          global_agreement.csv: pooled judge agreement (Wilson) above 0.5 and
                          above the chance agreement of shuffled samples.
slerp_shorter             path_lengths.csv: lerp minus slerp semantic length, per pair.
lerp_ends_highest         path_segments.csv: lerp's mean segment D_geo in the outer quarters
                          over the middle half, per pair (> 1).
geodesic_shortest         path_lengths.csv: min(lerp, slerp) minus geodesic, per pair.
spectra_flatten           spectra_samples.csv: spectral flatness at the smallest t minus at the
                          largest t, per sample (one trajectory).
psd_shifts_up             spectra_samples.csv: PSD centroid at the smallest t minus at the
                          largest t, per sample.
========================  ====================================================================

Intervals of paired differences are percentile bootstraps over the units
(:func:`diffatlas.intervals.bootstrap_mean`); units that share a sample or a direction are
treated as independent, so these intervals are if anything too narrow.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

COLUMNS = ("claim", "statement", "measure", "value", "low", "high", "n", "unit", "criterion", "verdict",
           "direction", "detail", "source")

SUPPORTED, NOT_SUPPORTED, NOT_MEASURED = "supported", "not supported", "not measured"


def verdict(value: float, low: float, high: float, null: float) -> tuple[str, str]:
    """(verdict, direction) of a claim "the effect exceeds ``null``" given its 95% interval."""
    if value is None or not math.isfinite(value):
        return NOT_MEASURED, "none"
    direction = "as claimed" if value > null else "opposite" if value < null else "none"
    ok = low is not None and math.isfinite(low) and low > null
    return (SUPPORTED if ok else NOT_SUPPORTED), direction


def _row(claim: str, statement: str, measure: str, value: float, low: float, high: float, n: int, unit: str,
         null: float, criterion: str, source: str, detail: str = "") -> dict[str, Any]:
    v, d = verdict(value, low, high, null)
    return {"claim": claim, "statement": statement, "measure": measure, "value": value, "low": low, "high": high,
            "n": int(n), "unit": unit, "criterion": criterion, "verdict": v, "direction": d, "detail": detail,
            "source": source}


def _missing(claim: str, statement: str, measure: str, source: str, why: str) -> dict[str, Any]:
    return _row(claim, statement, measure, float("nan"), float("nan"), float("nan"), 0, "", 0.0, "", source, why)


def _paired_diff(df, mode_col: str, a: str, b: str, value: str, keys: list[str]):
    """Per unit (``keys``): value of mode ``a`` minus value of mode ``b`` -> numpy [n]."""
    wide = df[df[mode_col].isin([a, b])].pivot_table(index=keys, columns=mode_col, values=value, aggfunc="first")
    wide = wide.dropna()
    if a not in wide or b not in wide:
        return np.zeros(0)
    return (wide[a] - wide[b]).to_numpy(dtype=np.float64)


def _mean_ci(values: np.ndarray) -> tuple[float, float, float]:
    from diffatlas.intervals import bootstrap_mean

    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = bootstrap_mean(values)
    return float(np.mean(values)), low, high


def _rate(x) -> str:
    from diffatlas.intervals import wilson

    k, n = int(np.sum(x)), len(x)
    low, high = wilson(k, n)
    return f"{k}/{n} = {k / n:.2f} [{low:.2f}, {high:.2f}]" if n else "n = 0"


# ----------------------------------------------------------------------------- the claims
def normalised_claims(quality) -> list[dict[str, Any]]:
    """x0-normalised edits stay plausible at the largest strength where plain edits do not."""
    stmt = "x0-normalised edits stay plausible at strengths where plain edits do not"
    src = "edit_quality.csv"
    if quality is None:
        return [_missing("normalised_plausible", stmt, "plausible rate", src, "no edit_quality.csv")]
    q = quality[quality["strength"] != 0]
    gmax = float(q["strength"].abs().max())
    top = q[q["strength"].abs() == gmax]
    keys = ["timestep", "sample", "direction", "strength"]
    plaus = _paired_diff(top, "mode", "normalised", "linear", "plausible", keys)
    sat = _paired_diff(top, "mode", "linear", "normalised", "saturation", keys)
    by = {m: top[top["mode"] == m] for m in ("linear", "normalised")}
    detail_p = (f"plain {_rate(by['linear']['plausible'])}; normalised {_rate(by['normalised']['plausible'])}; "
                f"objects found: plain {_rate(by['linear']['found'])}, normalised {_rate(by['normalised']['found'])}; "
                f"background blob: plain {_rate(by['linear']['blob'])}, normalised {_rate(by['normalised']['blob'])}")
    detail_s = (f"mean saturation: plain {by['linear']['saturation'].mean():.4f}, "
                f"normalised {by['normalised']['saturation'].mean():.4f}")
    unit = f"edit (timestep, sample, direction, γ = ±{gmax:g})"
    return [
        _row("normalised_plausible", stmt, f"plausible rate, normalised - plain, |γ| = {gmax:g}", *_mean_ci(plaus),
             len(plaus), unit, 0.0, "difference > 0 (95% interval above 0)", src, detail_p),
        _row("normalised_plausible", stmt,
             f"saturation of the denoised x0 (share of RGB values at 0 or 255), plain - normalised, |γ| = {gmax:g}",
             *_mean_ci(sat),
             len(sat), unit, 0.0, "difference > 0 (95% interval above 0)", src, detail_s),
    ]


def random_claims(meaning, quality) -> list[dict[str, Any]]:
    """Semantic directions change a known factor more often than random ones, which damage more."""
    stmt = "semantic directions change a known factor more often than random directions of the same norm, which damage the image more"
    from diffatlas.geometry.meaning import FACTORS

    rows = []
    keys = ["timestep", "sample", "direction", "strength"]
    if meaning is None or "random" not in set(meaning["mode"]):
        rows.append(_missing("semantic_vs_random", stmt, "factor-change rate", "meaning.csv", "no random-direction edits"))
    else:
        m = meaning[meaning["n_ref"] > 0].copy()
        cols = [f"{f}_changed" for f in FACTORS]
        m["factor"] = ((m["n_edit"] > 0) & (m[cols].fillna(0.0).to_numpy() > 0).any(axis=1)).astype(float)
        diff = _paired_diff(m, "mode", "linear", "random", "factor", keys)
        detail = (f"semantic {_rate(m[m['mode'] == 'linear']['factor'])}; "
                  f"random {_rate(m[m['mode'] == 'random']['factor'])}")
        rows.append(_row("semantic_vs_random", stmt, "factor changed (object kept), semantic - random, all γ != 0",
                         *_mean_ci(diff), len(diff), "edit (timestep, sample, direction, γ), reference shows an object",
                         0.0, "difference > 0 (95% interval above 0)", "meaning.csv", detail))
    if quality is None or "random" not in set(quality["mode"]):
        rows.append(_missing("semantic_vs_random", stmt, "damage rate", "edit_quality.csv", "no random-direction edits"))
    else:
        q = quality[quality["strength"] != 0].copy()
        q["damaged"] = 1.0 - q["plausible"]
        diff = _paired_diff(q, "mode", "random", "linear", "damaged", keys)
        detail = (f"semantic {_rate(q[q['mode'] == 'linear']['damaged'])}; "
                  f"random {_rate(q[q['mode'] == 'random']['damaged'])}")
        rows.append(_row("semantic_vs_random", stmt, "damaged (no object or a background blob), random - semantic, all γ != 0",
                         *_mean_ci(diff), len(diff), "edit (timestep, sample, direction, γ)", 0.0,
                         "difference > 0 (95% interval above 0)", "edit_quality.csv", detail))
    return rows


def global_claims(agreement) -> list[dict[str, Any]]:
    """The same factor changes across samples under a global direction."""
    stmt = "a global direction changes the same factor across samples"
    if agreement is None:
        return [_missing("global_agreement", stmt, "judge agreement", "global_agreement.csv", "no global_agreement.csv")]
    pooled = agreement[agreement["direction"].astype(str) == "all"].iloc[0]
    per = agreement[agreement["direction"].astype(str) != "all"]
    majority = per.groupby("majority_factor")["n"].count().sort_values(ascending=False)
    chance = float(pooled["chance"])
    detail = (f"chance (samples shuffled across (direction, γ)) {chance:.3f}; majority factors over (direction, γ): "
              + ", ".join(f"{f} {c}" for f, c in majority.items()))
    return [_row("global_agreement", stmt, "share of samples whose edit changed the majority factor",
                 float(pooled["agreement"]), float(pooled["low"]), float(pooled["high"]), int(pooled["n"]),
                 "edit (sample, global direction, γ != 0)", max(0.5, chance),
                 f"agreement > max(0.5, chance {chance:.3f}) (95% Wilson interval above it)", "global_agreement.csv",
                 detail)]


def path_claims(lengths, segments) -> list[dict[str, Any]]:
    """slerp < lerp; lerp's segments highest near the ends; geodesic shooting shortest."""
    from diffatlas.geometry.measures import end_over_middle

    s1 = "slerp is shorter than lerp in semantic path length"
    s2 = "lerp's segment lengths are highest near the ends"
    s3 = "geodesic shooting gives the shortest semantic path"
    if lengths is None or segments is None:
        return [_missing(c, s, "semantic length", "path_lengths.csv", "no path tables") for c, s in
                (("slerp_shorter", s1), ("lerp_ends_highest", s2), ("geodesic_shortest", s3))]
    wide = lengths.pivot(index="pair", columns="method", values="semantic_length")
    unit = f"pair of Gaussian latents ({int(lengths['segments'].iloc[0])} segments)"
    means = ", ".join(f"{m} {wide[m].mean():.4f}" for m in wide.columns)
    slerp = (wide["lerp"] - wide["slerp"]).to_numpy()
    geo = (np.minimum(wide["lerp"], wide["slerp"]) - wide["geodesic"]).to_numpy()
    lerp_seg = segments[segments["method"] == "lerp"].pivot(index="pair", columns="segment", values="d_geo")
    ratio = end_over_middle(lerp_seg.to_numpy())
    return [
        _row("slerp_shorter", s1, "semantic length, lerp - slerp", *_mean_ci(slerp), len(slerp), unit, 0.0,
             "difference > 0 (95% interval above 0)", "path_lengths.csv", f"mean semantic length: {means}"),
        _row("lerp_ends_highest", s2, "lerp segment D_geo, outer quarters / middle half", *_mean_ci(ratio), len(ratio),
             unit, 1.0, "ratio > 1 (95% interval above 1)", "path_segments.csv",
             "mean lerp profile: " + " ".join(f"{x:.3f}" for x in lerp_seg.mean(axis=0))),
        _row("geodesic_shortest", s3, "semantic length, min(lerp, slerp) - geodesic", *_mean_ci(geo), len(geo), unit,
             0.0, "difference > 0 (95% interval above 0)", "path_lengths.csv", f"mean semantic length: {means}"),
    ]


def spectra_claims(samples) -> list[dict[str, Any]]:
    """Spectra flatten as t -> 0; the directions' PSD moves to higher frequencies as t -> 0."""
    s1 = "the pullback spectrum flattens as t -> 0"
    s2 = "the directions' power spectrum moves to higher frequencies as t -> 0"
    if samples is None or samples["timestep"].nunique() < 2:
        return [_missing(c, s, m, "spectra_samples.csv", "needs two timesteps or more") for c, s, m in
                (("spectra_flatten", s1, "spectral flatness"), ("psd_shifts_up", s2, "PSD centroid"))]
    lo, hi = int(samples["timestep"].min()), int(samples["timestep"].max())
    rows = []
    for claim, stmt, col, name in (("spectra_flatten", s1, "flatness", "spectral flatness of σ²"),
                                   ("psd_shifts_up", s2, "psd_centroid", "PSD centroid of v (cycles / image)")):
        wide = samples.pivot(index="sample", columns="timestep", values=col)[[lo, hi]].dropna()
        diff = (wide[lo] - wide[hi]).to_numpy()
        per_t = samples.groupby("timestep")[col].mean().sort_index(ascending=False)
        detail = "mean per timestep: " + ", ".join(f"t={t} {v:.3f}" for t, v in per_t.items())
        rows.append(_row(claim, stmt, f"{name}, t={lo} - t={hi}", *_mean_ci(diff), len(diff),
                         "sample (one trajectory at every t)", 0.0, "difference > 0 (95% interval above 0)",
                         "spectra_samples.csv", detail))
    return rows


def claims_table(*, meaning=None, quality=None, agreement=None, lengths=None, segments=None, samples=None):
    """All claims as one DataFrame (columns :data:`COLUMNS`) from the result tables (DataFrames or None)."""
    import pandas as pd

    rows = (normalised_claims(quality) + random_claims(meaning, quality) + global_claims(agreement)
            + path_claims(lengths, segments) + spectra_claims(samples))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def to_markdown(table, title: str) -> str:
    """The claims table as Markdown (numbers to 3 significant digits)."""
    def f(x):
        return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3g}"

    lines = [f"# {title}", "",
             "Each row is computed from the result file in `source`; supported = the 95% interval lies on the "
             "claimed side of the criterion. `direction` says where the point estimate lies.", "",
             "| claim | measure | value | 95% interval | n | criterion | verdict | direction | detail |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        ci = f"[{f(r.low)}, {f(r.high)}]" if math.isfinite(r.low) else ""
        lines.append(f"| {r.claim}: {r.statement} | {r.measure} | {f(r.value)} | {ci} | {r.n} ({r.unit}) | "
                     f"{r.criterion} | **{r.verdict}** | {r.direction} | {r.detail} |")
    return "\n".join(lines) + "\n"


def run_claims(out_csv: str | os.PathLike, *, meaning=None, quality=None, agreement=None, lengths=None, segments=None,
               samples=None, out_md: str | os.PathLike | None = None):
    """Read the result files given (paths; None = not available), write ``claims.csv`` and ``claims.md``."""
    import pandas as pd

    from diffatlas.errors import UserError
    from diffatlas.io import atomic_file

    def read(path):
        if path is None:
            return None
        if not Path(path).is_file():
            raise UserError(f"{path} not found: run the geometry job that writes it first")
        return pd.read_csv(path)

    table = claims_table(meaning=read(meaning), quality=read(quality), agreement=read(agreement),
                         lengths=read(lengths), segments=read(segments), samples=read(samples))
    model = ""
    for p in (lengths, samples, meaning):
        if p is not None:
            model = str(pd.read_csv(p, usecols=["model"], nrows=1)["model"].iloc[0])
            break
    out_md = Path(out_csv).with_suffix(".md") if out_md is None else Path(out_md)
    with atomic_file(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_file(out_md) as tmp:
        Path(tmp).write_text(to_markdown(table, f"Park et al.'s claims measured on {model}".rstrip()))
    for r in table.itertuples():
        log.info("%-20s %-14s %s = %.4g [%.4g, %.4g] n=%d", r.claim, r.verdict, r.measure, r.value, r.low, r.high, r.n)
    return table
