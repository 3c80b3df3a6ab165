"""Masks vs objects: DAAM word masks scored by IoU against the objects the words name.

For every word that names an object (ShapesWorld knows which), the DAAM mask at τ is
compared with the object's mask by IoU; mIoU is the mean over (image, word) pairs. The truth
is the dataset's mask in real-image mode, and for generated images the object that the
world's detector (:func:`diffatlas.data.shapesworld.detect_objects`) finds with the word's
colour and shape. Two baselines go through the same scoring: *whole image* (every pixel;
independent of τ) and a *centre prior* (an isotropic Gaussian at the image centre,
σ = side/4, thresholded at τ like a DAAM map). A sweep over τ gives the threshold curve.
τ is always the caller's (the ``daam.tau`` / ``daam.taus`` config keys): no default here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from diffatlas.daam.measures import centre_prior, ci95, iou
from diffatlas.daam.parses import check_words, world_parse
from diffatlas.daam.words import TracedRun, WordMaps, threshold_mask
from diffatlas.errors import UserError

METHODS = ("daam", "whole_image", "centre_prior")
NOUN_ROLES = ("shape",)


def score_words(
    maps: WordMaps,
    targets: list[tuple[int, str, str, int, np.ndarray]],
    taus: Sequence[float],
    base: dict[str, Any],
) -> list[dict[str, Any]]:
    """IoU rows for (word_index, word, role, object, true mask) targets, every method and τ."""
    rows = []
    h, w = maps.shape
    prior = centre_prior((h, w))
    for word_index, word, role, obj, truth in targets:
        if not maps.words[word_index].positions:
            continue  # cut off by the text window: recorded in items.parquet, not scored
        heat = maps.word_map(word_index)
        whole = iou(np.ones_like(truth), truth)
        for tau in taus:
            common = {**base, "word_index": word_index, "word": word, "role": role, "object": obj, "tau": float(tau)}
            rows.append({**common, "method": "daam", "iou": iou(threshold_mask(heat, tau), truth)})
            rows.append({**common, "method": "whole_image", "iou": whole})
            rows.append({**common, "method": "centre_prior", "iou": iou(threshold_mask(prior, tau), truth)})
    return rows


def evaluate_real(
    run: TracedRun, meta: pd.DataFrame, masks: np.ndarray, taus: Sequence[float]
) -> pd.DataFrame:
    """IoU rows of every object-naming word of a real-image run against the dataset's masks.

    ``meta``/``masks`` are the dataset's (``masks`` bool [N, max_objects, H, W]); items are
    matched to rows by ``sample_id``.
    """
    if masks is None:
        raise UserError("daam real-image evaluation needs a dataset with object masks (ShapesWorld)")
    if "words" not in meta.columns:
        raise UserError("daam real-image evaluation needs the dataset's 'words' column (which word names which object)")
    index = {int(s): i for i, s in enumerate(meta["sample_id"])}
    rows: list[dict[str, Any]] = []
    for k, (maps, item) in enumerate(zip(run.maps, run.items)):
        sid = int(item["sample_id"])
        if sid not in index:
            raise UserError(f"daam run item {k} has sample_id {sid}, which is not in the dataset")
        r = index[sid]
        words = json.loads(meta["words"].iloc[r])
        if not check_words(maps, words):
            continue
        targets = [
            (j, w["word"], w.get("role", ""), int(w["object"]), masks[r, int(w["object"])])
            for j, w in enumerate(words)
            if int(w.get("object", -1)) >= 0 and w.get("role") not in ("det", "cc")
        ]
        rows.extend(score_words(maps, targets, taus, {"source": "real", "item": k, "sample_id": sid}))
    return pd.DataFrame(rows)


def match_detections(objects: list[dict[str, Any]], detected: list[dict[str, Any]]) -> list[tuple[int, str] | None]:
    """For each named object, ``(index of a detected object, "exact" | "colour")`` or None.

    Detections with the object's colour and shape are taken first ("exact"), then, for
    objects whose colour is named, one of that colour whatever its shape ("colour": what the
    model drew for the phrase, with a shape the detector reads differently). Each detection
    is used once, largest first. None: nothing of that colour (the object was not generated).
    """
    used: set[int] = set()
    out: list[tuple[int, str] | None] = [None] * len(objects)
    for kind in ("exact", "colour"):
        for i, obj in enumerate(objects):
            if out[i] is not None or (kind == "colour" and "colour" not in obj):
                continue
            for j, det in enumerate(detected):
                if j in used or ("colour" in obj and det["colour"] != obj["colour"]):
                    continue
                if kind == "exact" and det.get("shape") != obj["shape"]:
                    continue
                out[i] = (j, kind)
                used.add(j)
                break
    return out


def evaluate_generated(run: TracedRun, taus: Sequence[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """IoU rows of generated images against the objects the detector finds in them.

    Returns ``(rows, detections)``: detections has one row per named object with ``found``
    and ``match`` (exact / colour / none, see :func:`match_detections`), so the mIoU is read
    together with how often the model drew the object at all. Prompts outside the
    ShapesWorld grammar are skipped.
    """
    from diffatlas.data.shapesworld import detect_objects

    rows: list[dict[str, Any]] = []
    found_rows: list[dict[str, Any]] = []
    for k, (maps, image) in enumerate(zip(run.maps, run.images)):
        parsed = world_parse(maps.prompt)
        if parsed is None or not check_words(maps, parsed[0]):
            continue
        words, _, objects = parsed
        detected = detect_objects(image)
        match = match_detections(objects, detected)
        for o, (obj, m) in enumerate(zip(objects, match)):
            found_rows.append(
                {"item": k, "object": o, "shape": obj["shape"], "colour": obj.get("colour", ""), "found": m is not None,
                 "match": m[1] if m else "none"}
            )
        targets = [
            (wi, w["word"], w["role"], int(w["object"]), detected[match[int(w["object"])][0]]["mask"])
            for wi, w in enumerate(words)
            if int(w["object"]) >= 0 and w["role"] not in ("det", "cc") and match[int(w["object"])] is not None
        ]
        rows.extend(score_words(maps, targets, taus, {"source": "generated", "item": k, "sample_id": -1}))
    return pd.DataFrame(rows), pd.DataFrame(found_rows, columns=["item", "object", "shape", "colour", "found", "match"])


def summarize(rows: pd.DataFrame, tau: float, roles: Sequence[str] = NOUN_ROLES) -> pd.DataFrame:
    """The mIoU table: one row per (source, method) for the given roles at ``tau``,
    with the 95% CI, n, and the best τ of the sweep and its mIoU."""
    if rows.empty:
        return pd.DataFrame(columns=["source", "method", "words", "tau", "miou", "ci95", "n", "best_tau", "best_miou"])
    sel = rows[rows["role"].isin(roles)]
    out = []
    for (source, method), df in sel.groupby(["source", "method"], sort=False):
        at = df[np.isclose(df["tau"], tau)]
        curve = df.groupby("tau")["iou"].mean()
        out.append(
            {
                "source": source,
                "method": method,
                "words": "+".join(roles),
                "tau": tau,
                "miou": float(at["iou"].mean()) if len(at) else float("nan"),
                "ci95": ci95(at["iou"]),
                "n": int(len(at)),
                "best_tau": float(curve.idxmax()),
                "best_miou": float(curve.max()),
            }
        )
    order = {m: i for i, m in enumerate(METHODS)}
    return pd.DataFrame(out).sort_values(["source", "method"], key=lambda s: s.map(order) if s.name == "method" else s).reset_index(drop=True)


def summarize_by_role(rows: pd.DataFrame, tau: float, roles: Sequence[str] = ("shape", "colour", "size")) -> pd.DataFrame:
    """:func:`summarize` once per word role (shape nouns, colour and size adjectives), stacked.

    Which kind of word carries the localisation differs between models: on the trained
    ShapesWorld model colour words give sharp object maps while shape nouns attend to the
    background as much as to the object, which the noun-only table alone hides.
    """
    present = [r for r in roles if len(rows) and (rows["role"] == r).any()]
    if not present:
        return summarize(rows.iloc[0:0] if len(rows) else rows, tau)
    return pd.concat([summarize(rows, tau, roles=(r,)) for r in present], ignore_index=True)


def threshold_curve(rows: pd.DataFrame, roles: Sequence[str] = NOUN_ROLES) -> pd.DataFrame:
    """mIoU per (source, method, τ) for the given roles."""
    if rows.empty:
        return pd.DataFrame(columns=["source", "method", "tau", "miou", "n"])
    sel = rows[rows["role"].isin(roles)]
    return sel.groupby(["source", "method", "tau"], as_index=False).agg(miou=("iou", "mean"), n=("iou", "size"))
