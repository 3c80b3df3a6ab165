"""What each semantic direction means on ShapesWorld: which factor an edit changes.

ShapesWorld images have known factors (position, size, colour, shape, number of objects) and
the world's judge (:func:`diffatlas.world.judge.judge_image`, a deterministic colour/shape
reader) reads them back from an image. For every edited image (one-step, x0-normalised and
iterative edits of every timestep) the edited result is compared with the *unedited* result
of the same sample (strength 0, denoised along the same DDIM path), object by object:

* the reference's main (largest) object is matched to the edited object it overlaps most
  (mask IoU; nearest centroid when nothing overlaps);
* ``position``: the matched centroid moved by more than :data:`POSITION_TOL` of the side;
* ``size``: the judge's size class (small / large) differs (or, where it gives none, the area
  changed by more than a factor :data:`AREA_RATIO_TOL`);
* ``colour`` / ``shape``: the detector's colour / shape of the matched object differ;
* ``count``: the number of objects differs.

A factor is undefined (NaN) when the reference or the edit has no object. The summary gives,
per (timestep, edit mode, direction), the share of edits that changed each factor and the
dominant factor.

Park et al.'s ablation (:func:`ablation`): the one-step edits along the semantic directions
(mode ``linear``) against the same edits along random unit directions (mode ``random``), per
(timestep, strength), over the edits whose reference shows an object:

* ``factor``: the edited image still shows an object and at least one known factor changed;
* ``lost``: the edited image shows no object at all (the judge finds nothing: damage);
* ``pixel_change``: mean absolute pixel change against the reference (a damage proxy, no interval).

Rates carry 95% Wilson intervals; n is stated.

Plain vs x0-normalised edits (Park et al.'s normalisation ablation, :func:`edit_quality` and
:func:`quality_summary`): every edited image of the one-step modes (``linear`` = plain,
``normalised``, ``random``) is read on its own, not against a reference:

* ``found``: the judge finds at least one object;
* ``blob``: the judge finds a background blob (a palette-coloured region too large to be an
  object: the washed-out or recoloured background of an edit gone too far);
* ``plausible``: found and no blob;
* ``saturation``: the share of the image's RGB values at the clip limits (0 or 255) - the
  share of the clean sample x0 (at t = 0, after DDIM) that lies at or beyond the [-1, 1]
  range the decoder clips to. ShapesWorld's palette and background hold no 0 or 255, so a
  rendered scene has saturation 0.

Global directions (:func:`global_agreement`): a global direction edits every sample; for
each (direction, strength) the judge says which factors each sample's edit changed (against
that sample's strength-0 image); the *majority factor* is the one changed in the most samples
(ties: the first in :data:`FACTORS`), and the agreement is the share of samples whose edit
changed it (a lost object changes no factor). Pooled over directions and strengths with a
Wilson interval. The majority of a few samples agrees with itself by construction (with 3
samples, two alike make 2/3), so the pooled row also carries the *chance* agreement
(:func:`chance_agreement`): the same statistic after shuffling, per sample, which
(direction, strength) each of its edits belongs to - what samples whose changes have nothing
to do with the direction would score.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

POSITION_TOL = 0.08
"""Centroid shift (fraction of the image side; 2.6 px at 32x32) that counts as a move."""
AREA_RATIO_TOL = 1.35
"""Area ratio that counts as a size change (small vs large objects differ by ~2x in area)."""
FACTORS = ("position", "size", "colour", "shape", "count")


def describe(image: np.ndarray) -> list[dict[str, Any]]:
    """Objects found in a uint8 image [H, W, 3], largest first.

    Each has ``colour``, ``shape``, ``centroid`` (x, y fractions), ``area``, ``mask`` and,
    from the world's judge, ``size``.
    """
    from diffatlas.world.judge import judge_image

    return judge_image(image, return_masks=True)["objects"]


def _match(ref: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, Any]:
    best, best_iou = None, 0.0
    for o in objects:
        inter = float(np.logical_and(ref["mask"], o["mask"]).sum())
        union = float(np.logical_or(ref["mask"], o["mask"]).sum())
        iou = inter / union if union else 0.0
        if iou > best_iou:
            best, best_iou = o, iou
    if best is None:
        cx, cy = ref["centroid"]
        best = min(objects, key=lambda o: (o["centroid"][0] - cx) ** 2 + (o["centroid"][1] - cy) ** 2)
    return best


def compare(ref_objs: list[dict[str, Any]], edit_objs: list[dict[str, Any]]) -> dict[str, Any]:
    """Which factors differ between two detections (see the module docstring)."""
    out: dict[str, Any] = {"n_ref": len(ref_objs), "n_edit": len(edit_objs),
                           "count_changed": float(len(ref_objs) != len(edit_objs))}
    if not ref_objs or not edit_objs:
        out.update(position_shift=math.nan, area_ratio=math.nan, position_changed=math.nan, size_changed=math.nan,
                   colour_changed=math.nan, shape_changed=math.nan)
        return out
    r = ref_objs[0]
    e = _match(r, edit_objs)
    shift = math.dist(r["centroid"], e["centroid"])
    ratio = e["area"] / max(r["area"], 1)
    out.update(
        position_shift=shift,
        area_ratio=ratio,
        position_changed=float(shift > POSITION_TOL),
        size_changed=float(e["size"] != r["size"]) if ("size" in r and "size" in e)
        else float(max(ratio, 1 / max(ratio, 1e-9)) > AREA_RATIO_TOL),
        colour_changed=float(e["colour"] != r["colour"]),
        shape_changed=float(e["shape"] != r["shape"]),
    )
    return out


def judge_edits(
    images: np.ndarray, strengths: np.ndarray, *, describe_fn: Callable[[np.ndarray], list] = describe
) -> list[dict[str, Any]]:
    """Compare every edited image with its strength-0 reference.

    images: uint8 [E, m, S, H, W, 3] (sample, direction, strength); strengths: [S] with one 0.
    Returns one dict per (sample, direction, nonzero strength).
    """
    zero = np.flatnonzero(np.asarray(strengths) == 0)
    if len(zero) != 1:
        raise ValueError(f"strengths must contain 0 exactly once, got {list(strengths)}")
    z = int(zero[0])
    rows = []
    E, m, S = images.shape[:3]
    for e in range(E):
        for d in range(m):
            ref_img = images[e, d, z]
            ref = describe_fn(ref_img)
            for s in range(S):
                if s == z:
                    continue
                img = images[e, d, s]
                row = {"sample": e, "direction": d, "strength": float(strengths[s])}
                row.update(compare(ref, describe_fn(img)))
                row["pixel_change"] = float(np.abs(img.astype(np.float32) - ref_img.astype(np.float32)).mean() / 255.0)
                rows.append(row)
    return rows


def summarise(df) -> "pd.DataFrame":  # noqa: F821
    """Per (model, timestep, mode, direction): share of edits changing each factor, dominant factor."""
    cols = [f"{f}_changed" for f in FACTORS]
    g = df.groupby(["model", "timestep", "mode", "direction"], as_index=False)
    out = g[cols + ["pixel_change"]].mean()
    out["n_edits"] = g.size()["size"].to_numpy()
    shares = out[cols].fillna(0.0).to_numpy()
    out["dominant"] = [FACTORS[int(i)] if row.max() > 0 else "none" for i, row in zip(shares.argmax(1), shares)]
    return out


ABLATION_MODES = ("linear", "random")
"""Semantic one-step edits and their control: the same edits along random unit directions."""


def ablation(df) -> "pd.DataFrame":  # noqa: F821
    """Semantic vs random directions per (model, timestep, strength, mode): see the module docstring.

    Columns: ``n`` (edits whose reference shows an object), ``factor_k``, ``factor_rate``,
    ``factor_low``, ``factor_high``, ``lost_k``, ``lost_rate``, ``lost_low``, ``lost_high``,
    ``pixel_change``.
    """
    import pandas as pd

    from diffatlas.intervals import wilson

    cols = [f"{f}_changed" for f in FACTORS]
    sub = df[df["mode"].isin(ABLATION_MODES) & (df["n_ref"] > 0)]
    rows = []
    for (model, t, g, mode), grp in sub.groupby(["model", "timestep", "strength", "mode"], sort=True):
        found = grp["n_edit"].to_numpy() > 0
        changed = (grp[cols].fillna(0.0).to_numpy() > 0).any(axis=1)
        n = len(grp)
        kf, kl = int((found & changed).sum()), int((~found).sum())
        fl, fh = wilson(kf, n)
        ll, lh = wilson(kl, n)
        rows.append({"model": model, "timestep": int(t), "strength": float(g), "mode": mode, "n": n,
                     "factor_k": kf, "factor_rate": kf / n, "factor_low": fl, "factor_high": fh,
                     "lost_k": kl, "lost_rate": kl / n, "lost_low": ll, "lost_high": lh,
                     "pixel_change": float(grp["pixel_change"].mean())})
    return pd.DataFrame(rows, columns=["model", "timestep", "strength", "mode", "n", "factor_k", "factor_rate",
                                       "factor_low", "factor_high", "lost_k", "lost_rate", "lost_low", "lost_high",
                                       "pixel_change"])


def saturation(images: np.ndarray) -> np.ndarray:
    """Share of RGB values at the clip limits 0 or 255: uint8 [..., H, W, 3] -> float [...]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"saturation needs uint8 RGB images [..., H, W, 3], got {images.dtype} {images.shape}")
    return ((images == 0) | (images == 255)).mean(axis=(-3, -2, -1))


QUALITY_MODES = ("linear", "normalised", "random")
"""The one-step edit modes read by :func:`edit_quality`: plain, x0-normalised, random direction."""


def edit_quality(images: np.ndarray, strengths, *, judge_fn: Callable[[np.ndarray], dict] | None = None) -> list[dict[str, Any]]:
    """Per image of uint8 [E, m, S, H, W, 3]: sample, direction, strength, n_objects,
    n_background_blobs, found, blob, plausible, saturation (module docstring)."""
    if judge_fn is None:
        from diffatlas.world.judge import judge_image as judge_fn
    sat = saturation(images)
    rows = []
    E, m, S = images.shape[:3]
    for e in range(E):
        for d in range(m):
            for s in range(S):
                j = judge_fn(images[e, d, s])
                found, blob = j["n_objects"] > 0, j["n_background_blobs"] > 0
                rows.append({"sample": e, "direction": d, "strength": float(strengths[s]),
                             "n_objects": int(j["n_objects"]), "n_background_blobs": int(j["n_background_blobs"]),
                             "found": int(found), "blob": int(blob), "plausible": int(found and not blob),
                             "saturation": float(sat[e, d, s])})
    return rows


def quality_summary(df) -> "pd.DataFrame":  # noqa: F821
    """Per (model, timestep, strength, mode): n images; found, blob and plausible rates with 95%
    Wilson intervals (``{x}_k``, ``{x}_rate``, ``{x}_low``, ``{x}_high``); mean saturation with a
    95% bootstrap interval."""
    import pandas as pd

    from diffatlas.intervals import bootstrap_mean, wilson

    rows = []
    for (model, t, g, mode), grp in df.groupby(["model", "timestep", "strength", "mode"], sort=True):
        n = len(grp)
        row = {"model": model, "timestep": int(t), "strength": float(g), "mode": mode, "n": n}
        for x in ("found", "blob", "plausible"):
            k = int(grp[x].sum())
            low, high = wilson(k, n)
            row.update({f"{x}_k": k, f"{x}_rate": k / n, f"{x}_low": low, f"{x}_high": high})
        low, high = bootstrap_mean(grp["saturation"].to_numpy())
        row.update(saturation=float(grp["saturation"].mean()), saturation_low=low, saturation_high=high)
        rows.append(row)
    return pd.DataFrame(rows)


def agreement(changed: np.ndarray) -> tuple[int, int, int]:
    """Majority factor of one (direction, strength) over samples: changed [G, F] (0/1, NaN = 0).

    Returns (majority factor index, k samples that changed it, n samples); the majority is the
    factor changed in most samples, ties broken by the lower index (the order of :data:`FACTORS`).
    """
    c = np.nan_to_num(np.asarray(changed, dtype=np.float64), nan=0.0) > 0
    counts = c.sum(axis=0)
    f = int(np.argmax(counts))
    return f, int(counts[f]), int(c.shape[0])


CHANCE_PERMUTATIONS = 500
"""Shuffles behind :func:`chance_agreement` (seeded: the same table on every run)."""


def chance_agreement(changed: np.ndarray, n_perm: int = CHANCE_PERMUTATIONS, seed: int = 0) -> float:
    """Pooled agreement expected when samples' changes are unrelated to the direction.

    changed: [G, K, F] (sample, (direction, strength) group, factor; 0/1, NaN = 0). Each
    permutation shuffles every sample's K groups independently and pools :func:`agreement`
    over the groups; returns the mean over ``n_perm`` permutations.
    """
    c = np.nan_to_num(np.asarray(changed, dtype=np.float64), nan=0.0) > 0
    G, K, _ = c.shape
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(n_perm):
        perm = np.stack([rng.permutation(K) for _ in range(G)])  # [G, K]
        shuffled = c[np.arange(G)[:, None], perm]  # [G, K, F]
        total += sum(agreement(shuffled[:, k])[1] for k in range(K)) / (G * K)
    return total / n_perm


def global_agreement(images: np.ndarray, strengths, *, describe_fn: Callable[[np.ndarray], list] = describe):
    """Judge agreement of global directions across samples (module docstring).

    images: uint8 [G, m, S, H, W, 3] (sample, global direction, strength). Returns
    (per-edit table, per (direction, strength) table with the majority factor, k, n).
    """
    import pandas as pd

    edits = pd.DataFrame(judge_edits(images, strengths, describe_fn=describe_fn))
    cols = [f"{f}_changed" for f in FACTORS]
    rows = []
    for (d, g), grp in edits.groupby(["direction", "strength"], sort=True):
        f, k, n = agreement(grp.sort_values("sample")[cols].to_numpy())
        rows.append({"direction": int(d), "strength": float(g), "majority_factor": FACTORS[f] if k else "none",
                     "k": k, "n": n, "agreement": k / n})
    return edits, pd.DataFrame(rows, columns=["direction", "strength", "majority_factor", "k", "n", "agreement"])


def changed_cube(edits) -> np.ndarray:
    """The per-edit table of :func:`global_agreement` as changed [G, K, F] (K = (direction, strength) groups)."""
    cols = [f"{f}_changed" for f in FACTORS]
    e = edits.sort_values(["sample", "direction", "strength"])
    G = e["sample"].nunique()
    return e[cols].to_numpy(dtype=np.float64).reshape(G, -1, len(FACTORS))


def run_global_agreement(global_dir: str | os.PathLike, out_csv: str | os.PathLike) -> "pd.DataFrame":  # noqa: F821
    """Judge the global-direction edits of ``global_dir``; write one row per (direction, strength)
    and a pooled row (direction ``all``) with its 95% Wilson interval."""
    import pandas as pd

    from diffatlas.geometry.artifacts import load_global
    from diffatlas.intervals import wilson
    from diffatlas.io import atomic_file

    tensors, meta = load_global(global_dir)
    edits, table = global_agreement(tensors["images"], tensors["strengths"])
    table.insert(0, "timestep", int(meta["timestep"]))
    table.insert(0, "model", meta["model"])
    table["direction"] = table["direction"].astype(str)
    k, n = int(table["k"].sum()), int(table["n"].sum())
    pooled = {"model": meta["model"], "timestep": int(meta["timestep"]), "direction": "all", "strength": float("nan"),
              "majority_factor": "", "k": k, "n": n, "agreement": k / n if n else float("nan"),
              "chance": chance_agreement(changed_cube(edits)) if n else float("nan")}
    table = pd.concat([table, pd.DataFrame([pooled])], ignore_index=True)
    ci = [wilson(int(r.k), int(r.n)) for r in table.itertuples()]
    table["low"], table["high"] = [c[0] for c in ci], [c[1] for c in ci]
    with atomic_file(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    log.info("global directions at t=%s: judge agreement %d/%d = %.2f [%.2f, %.2f] (chance %.2f)", meta["timestep"], k, n,
             pooled["agreement"], table["low"].iloc[-1], table["high"].iloc[-1], pooled["chance"])
    return table


def run_meaning(run_dirs: list[str], out_csv: str | os.PathLike, summary_csv: str | os.PathLike,
                ablation_csv: str | os.PathLike | None = None, quality_csv: str | os.PathLike | None = None,
                quality_summary_csv: str | os.PathLike | None = None) -> "pd.DataFrame":  # noqa: F821
    """Judge the edits of every timestep directory; write the per-edit table, the summary,
    the semantic-vs-random ablation (``ablation_csv``, default ``meaning_random.csv`` beside the
    summary) and the plain-vs-normalised image quality per image (``quality_csv``, default
    ``edit_quality.csv``) and per (timestep, strength, mode) (``quality_summary_csv``, default
    ``edit_quality_summary.csv``)."""
    import pandas as pd

    from diffatlas.geometry.artifacts import load_basis, load_edits
    from diffatlas.io import atomic_file

    frames, quality = [], []
    for d in run_dirs:
        _, meta = load_basis(d)
        edits = load_edits(d)
        for mode in QUALITY_MODES:
            if mode in edits:
                q = pd.DataFrame(edit_quality(edits[mode], edits["strengths"]))
                q.insert(0, "mode", mode)
                q.insert(0, "timestep", int(meta["timestep"]))
                q.insert(0, "model", meta["model"])
                quality.append(q)
        modes = [("linear", edits["linear"], edits["strengths"]), ("normalised", edits["normalised"], edits["strengths"])]
        if "random" in edits:
            modes.append(("random", edits["random"], edits["strengths"]))
        if "iterative" in edits:
            modes.append(("iterative", edits["iterative"][None], edits["iterative_strengths"]))
        for mode, images, strengths in modes:
            rows = judge_edits(images, strengths)
            df = pd.DataFrame(rows)
            df.insert(0, "mode", mode)
            df.insert(0, "timestep", int(meta["timestep"]))
            df.insert(0, "model", meta["model"])
            frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    with atomic_file(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    summary = summarise(table)
    with atomic_file(summary_csv) as tmp:
        summary.to_csv(tmp, index=False)
    abl = ablation(table)
    ablation_csv = Path(summary_csv).with_name("meaning_random.csv") if ablation_csv is None else Path(ablation_csv)
    with atomic_file(ablation_csv) as tmp:
        abl.to_csv(tmp, index=False)
    quality_df = pd.concat(quality, ignore_index=True)
    qsum = quality_summary(quality_df)
    base = Path(summary_csv)
    quality_csv = base.with_name("edit_quality.csv") if quality_csv is None else Path(quality_csv)
    quality_summary_csv = base.with_name("edit_quality_summary.csv") if quality_summary_csv is None else Path(quality_summary_csv)
    with atomic_file(quality_csv) as tmp:
        quality_df.to_csv(tmp, index=False)
    with atomic_file(quality_summary_csv) as tmp:
        qsum.to_csv(tmp, index=False)
    for r in qsum.itertuples():
        log.info("t=%d γ=%+g %-10s n=%d: objects found %.2f [%.2f, %.2f], background blob %.2f [%.2f, %.2f], "
                 "saturation %.3f [%.3f, %.3f]", r.timestep, r.strength, r.mode, r.n, r.found_rate, r.found_low,
                 r.found_high, r.blob_rate, r.blob_low, r.blob_high, r.saturation, r.saturation_low, r.saturation_high)
    for r in abl.itertuples():
        log.info("t=%d γ=%+g %-6s n=%d: factor changed %.2f [%.2f, %.2f], no object %.2f [%.2f, %.2f], pixel change %.3f",
                 r.timestep, r.strength, r.mode, r.n, r.factor_rate, r.factor_low, r.factor_high,
                 r.lost_rate, r.lost_low, r.lost_high, r.pixel_change)
    log.info("meaning: %d edits judged; dominant factors %s", len(table),
             summary.groupby("dominant").size().to_dict())
    return summary
