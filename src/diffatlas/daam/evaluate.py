"""Scoring DAAM maps against known answers.

**Masks vs objects.** For every word that names an object (ShapesWorld knows which), the
DAAM mask at τ is compared with the object's mask by IoU; mIoU is the mean over
(image, word) pairs. The truth is the dataset's mask in real-image mode, and for generated
images the object that the world's detector (:func:`diffatlas.data.shapesworld.detect_objects`)
finds with the word's colour and shape. Two baselines go through the same scoring:
*whole image* (every pixel; independent of τ) and a *centre prior* (an isotropic Gaussian at
the image centre, σ = side/4, thresholded at τ like a DAAM map). A sweep over τ gives the
threshold curve.

**Syntax** (DAAM paper, §4). For each relation (head h, dependent d) of a caption's parse —
known by construction in ShapesWorld, from spaCy for free prompts when it is installed —
with binary masks H and D at τ::

    IoU = |H ∩ D| / |H ∪ D|     IoD = |H ∩ D| / |D|     IoH = |H ∩ D| / |H|

averaged over occurrences of the relation (mIoU, mIoD, mIoH). mIoD > mIoH means the
dependent's map lies inside the head's (the head "contains" the dependent), as the paper
finds for adjectives and their nouns.

**Entanglement** (DAAM paper, §5). *Cohyponyms*: prompts "a X and a Y" whose nouns share a
hypernym vs control prompts; the world's judge says whether both objects were generated, and
the IoU of the two nouns' masks says how much their maps overlap. *Adjectives*: "a {adj}
{noun}" generated from the same seeds with different adjectives; the change the swap causes
is measured inside the object (union of the objects found in both images) and outside it
(mean absolute RGB difference in [0, 1]), next to the share of the adjective's mask that
falls outside the object.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from diffatlas.daam.words import DEFAULT_TAU, TracedRun, WordMaps, split_words, threshold_mask
from diffatlas.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TAUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
METHODS = ("daam", "whole_image", "centre_prior")
NOUN_ROLES = ("shape",)


# ----------------------------------------------------------------------------- set measures


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two bool masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def intersection_over(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |b|: how much of ``b`` is covered by ``a`` (NaN when ``b`` is empty)."""
    area = b.sum()
    return float(np.logical_and(a, b).sum() / area) if area else float("nan")


def centre_prior(shape: tuple[int, int], sigma_frac: float = 0.25) -> np.ndarray:
    """Isotropic Gaussian at the image centre, σ = ``sigma_frac`` × side.  -> float32 [H, W]."""
    h, w = shape
    y = (np.arange(h) + 0.5) / h - 0.5
    x = (np.arange(w) + 0.5) / w - 0.5
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma_frac**2)).astype(np.float32)


def ci95(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    return float(1.96 * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


# ----------------------------------------------------------------------------- parses


def _world_parse(prompt: str) -> tuple[list[dict[str, Any]], list[list[Any]], list[dict[str, Any]]] | None:
    """(words, relations, objects) of a ShapesWorld caption, or None outside the grammar."""
    from diffatlas.data.shapesworld import parse_caption

    try:
        caption, objects = parse_caption(prompt)
    except UserError:
        return None
    return caption.words, caption.relations, objects


_SPACY: dict[str, Any] = {}


def spacy_relations(prompt: str, model: str = "en_core_web_sm") -> list[list[Any]] | None:
    """Dependency relations ``[rel, head_word_index, dep_word_index]`` from spaCy, or None
    when spaCy (or its English model) is not installed. Word indices follow
    :func:`diffatlas.daam.words.split_words`."""
    if model not in _SPACY:
        try:
            import spacy

            _SPACY[model] = spacy.load(model)
        except (ImportError, OSError):
            log.info("spaCy or its model %s is not installed: free prompts get no syntactic parse", model)
            _SPACY[model] = None
    nlp = _SPACY[model]
    if nlp is None:
        return None
    words = split_words(prompt)
    starts = {s: i for i, (_, s, _) in enumerate(words)}
    out = []
    for tok in nlp(prompt):
        if tok.dep_ == "ROOT" or tok.idx not in starts or tok.head.idx not in starts:
            continue
        out.append([tok.dep_, starts[tok.head.idx], starts[tok.idx]])
    return out


def _check_words(maps: WordMaps, words: list[dict[str, Any]]) -> bool:
    """The parse's words must be the prompt's words, in order (else indices would not match)."""
    ours = [w.text.lower() for w in maps.words]
    theirs = [str(w["word"]).lower() for w in words]
    if ours != theirs:
        log.warning("caption words %s do not match the prompt's words %s; item skipped", theirs, ours)
        return False
    return True


# ----------------------------------------------------------------------------- masks vs objects


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
    run: TracedRun, meta: pd.DataFrame, masks: np.ndarray, taus: Sequence[float] = DEFAULT_TAUS
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
        if not _check_words(maps, words):
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


def evaluate_generated(run: TracedRun, taus: Sequence[float] = DEFAULT_TAUS) -> tuple[pd.DataFrame, pd.DataFrame]:
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
        parsed = _world_parse(maps.prompt)
        if parsed is None or not _check_words(maps, parsed[0]):
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


def summarize(rows: pd.DataFrame, tau: float = DEFAULT_TAU, roles: Sequence[str] = NOUN_ROLES) -> pd.DataFrame:
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


def summarize_by_role(rows: pd.DataFrame, tau: float = DEFAULT_TAU, roles: Sequence[str] = ("shape", "colour", "size")) -> pd.DataFrame:
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


# ----------------------------------------------------------------------------- syntax


def relation_rows(run: TracedRun, parses: list[list[list[Any]] | None], tau: float = DEFAULT_TAU, source: str = "") -> pd.DataFrame:
    """IoU, IoD, IoH of head and dependent masks for every relation of every item.

    ``parses[k]``: item k's relations ``[rel, head_word_index, dep_word_index]`` (None: no parse).
    """
    rows = []
    for k, (maps, rels) in enumerate(zip(run.maps, parses)):
        if not rels:
            continue
        for rel, head, dep in rels:
            head, dep = int(head), int(dep)
            if not (maps.words[head].positions and maps.words[dep].positions):
                continue
            hm, dm = maps.mask(head, tau), maps.mask(dep, tau)
            rows.append(
                {
                    "source": source,
                    "item": k,
                    "relation": str(rel),
                    "head": maps.words[head].text,
                    "dependent": maps.words[dep].text,
                    "iou": iou(hm, dm),
                    "iod": intersection_over(hm, dm),
                    "ioh": intersection_over(dm, hm),
                }
            )
    return pd.DataFrame(rows, columns=["source", "item", "relation", "head", "dependent", "iou", "iod", "ioh"])


def parses_for_run(run: TracedRun, meta: pd.DataFrame | None = None) -> tuple[list[list[list[Any]] | None], str]:
    """Relations per item: the dataset's (real mode), the world grammar's, or spaCy's."""
    out: list[list[list[Any]] | None] = []
    sources = set()
    index = {int(s): i for i, s in enumerate(meta["sample_id"])} if meta is not None and "relations" in meta.columns else {}
    for maps, item in zip(run.maps, run.items):
        sid = int(item.get("sample_id", -1))
        if sid in index:
            r = index[sid]
            words = json.loads(meta["words"].iloc[r])
            out.append(json.loads(meta["relations"].iloc[r]) if _check_words(maps, words) else None)
            sources.add("dataset")
            continue
        parsed = _world_parse(maps.prompt)
        if parsed is not None and _check_words(maps, parsed[0]):
            out.append(parsed[1])
            sources.add("shapesworld-grammar")
            continue
        rels = spacy_relations(maps.prompt)
        out.append(rels)
        sources.add("spacy" if rels is not None else "none")
    return out, "+".join(sorted(sources))


def summarize_relations(rows: pd.DataFrame) -> pd.DataFrame:
    """mIoU, mIoD, mIoH and n per (source, relation)."""
    if rows.empty:
        return pd.DataFrame(columns=["source", "relation", "miou", "miod", "mioh", "n"])
    return rows.groupby(["source", "relation"], as_index=False).agg(
        miou=("iou", "mean"), miod=("iod", "mean"), mioh=("ioh", "mean"), n=("iou", "size")
    )


# ----------------------------------------------------------------------------- entanglement


def judge(images: np.ndarray) -> tuple[list[dict[str, Any]], str]:
    """The world's verdict on each image (:func:`diffatlas.world.judge.judge_images`): dicts
    with ``objects`` (shape, colour, size, ...), and the judge's name."""
    from diffatlas.world.judge import judge_images

    return list(judge_images(images)), "diffatlas.world.judge.judge_images"


def _present(objects: list[dict[str, Any]], found: list[dict[str, Any]]) -> list[bool]:
    """Whether each named object was generated: a found object of its shape (and colour, if
    named), each found object used once."""
    used: set[int] = set()
    out = []
    for obj in objects:
        hit = next(
            (i for i, f in enumerate(found) if i not in used and f.get("shape") == obj["shape"] and obj.get("colour", f.get("colour")) == f.get("colour")),
            None,
        )
        if hit is not None:
            used.add(hit)
        out.append(hit is not None)
    return out


def cohyponym_prompts(pairs: Sequence[Sequence[str]], template: str = "a {0} and a {1}") -> list[str]:
    return [template.format(*p) for p in pairs]


def evaluate_cohyponyms(run: TracedRun, groups: dict[str, list[int]], tau: float = DEFAULT_TAU) -> pd.DataFrame:
    """One row per item of each group: both objects present (judge), each present, and the
    IoU of the two nouns' masks. ``groups`` maps a group name to its items' prompt indices."""
    from diffatlas.world.judge import matches_caption

    verdicts, judge_name = judge(run.images)
    group_of = {p: g for g, ps in groups.items() for p in ps}
    rows = []
    for k, (maps, item) in enumerate(zip(run.maps, run.items)):
        g = group_of.get(int(item["prompt_index"]))
        parsed = _world_parse(maps.prompt)
        if g is None or parsed is None or len(parsed[2]) != 2:
            continue
        words, _, objects = parsed
        nouns = [i for i, w in enumerate(words) if w["role"] == "shape"]
        present = _present(objects, verdicts[k]["objects"])
        rows.append(
            {
                "group": g,
                "item": k,
                "prompt": maps.prompt,
                "first_present": present[0],
                "second_present": present[1],
                "both_present": all(present),
                "caption_match": bool(matches_caption(verdicts[k], objects)["all"]),
                "n_found": int(verdicts[k]["n_objects"]),
                "noun_mask_iou": iou(maps.mask(nouns[0], tau), maps.mask(nouns[1], tau)),
                "judge": judge_name,
            }
        )
    return pd.DataFrame(rows)


def evaluate_adjective_swaps(run: TracedRun, items_by_noun: dict[str, dict[str, list[int]]], tau: float = DEFAULT_TAU) -> pd.DataFrame:
    """Change caused by swapping the adjective, per (noun, adjective pair, seed).

    ``items_by_noun[noun][adjective]``: item indices (one per seed, same seed order for
    every adjective). Objects are found with :func:`detect_objects`.
    """
    from diffatlas.data.shapesworld import detect_objects

    rows = []
    for noun, by_adj in items_by_noun.items():
        for a1, a2 in itertools.combinations(sorted(by_adj), 2):
            for s, (i1, i2) in enumerate(zip(by_adj[a1], by_adj[a2])):
                im1, im2 = run.images[i1].astype(np.float32) / 255, run.images[i2].astype(np.float32) / 255
                obj = np.zeros(im1.shape[:2], bool)
                for im in (run.images[i1], run.images[i2]):
                    for det in detect_objects(im):
                        obj |= det["mask"]
                diff = np.abs(im1 - im2).mean(-1)
                spread = []
                for i, adj in ((i1, a1), (i2, a2)):
                    m = run.maps[i]
                    adj_mask = m.mask(adj, tau)
                    noun_mask = m.mask(noun, tau)
                    spread.append(1.0 - intersection_over(noun_mask, adj_mask) if adj_mask.any() else float("nan"))
                rows.append(
                    {
                        "noun": noun,
                        "adjective_1": a1,
                        "adjective_2": a2,
                        "seed_index": s,
                        "object_fraction": float(obj.mean()),
                        "change_inside": float(diff[obj].mean()) if obj.any() else float("nan"),
                        "change_outside": float(diff[~obj].mean()) if (~obj).any() else float("nan"),
                        "adjective_outside_noun": float(np.nanmean(spread)) if not np.all(np.isnan(spread)) else float("nan"),
                    }
                )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- stage jobs


def _write_tables(out: Any, tables: dict[str, pd.DataFrame]) -> None:
    for name, df in tables.items():
        if name.endswith(".parquet"):
            df.to_parquet(out / name, index=False)
        else:
            df.to_csv(out / name, index=False)


def _score_run(run: TracedRun, cfg: Any, meta: pd.DataFrame | None, masks: np.ndarray | None, source: str) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """Every table of a run: IoU rows, mIoU summary, threshold curve, relations."""
    tables: dict[str, pd.DataFrame] = {}
    notes: dict[str, Any] = {}
    taus = sorted(set(cfg.taus) | {cfg.tau})
    if source == "real":
        rows = evaluate_real(run, meta, masks, taus) if masks is not None else pd.DataFrame()
        if masks is None:
            notes["miou"] = "dataset has no object masks: maps only, no mIoU"
    else:
        rows, found = evaluate_generated(run, taus)
        tables["detections.csv"] = found
        notes["objects_found"] = float(found["found"].mean()) if len(found) else None
        notes["objects_found_exact"] = float((found["match"] == "exact").mean()) if len(found) else None
    tables["iou_rows.parquet"] = rows
    tables["summary.csv"] = summarize(rows, cfg.tau)
    tables["summary_all_words.csv"] = summarize(rows, cfg.tau, roles=("shape", "colour", "size"))
    tables["summary_by_role.csv"] = summarize_by_role(rows, cfg.tau)
    tables["threshold_curve.csv"] = threshold_curve(rows)
    parses, parse_source = parses_for_run(run, meta)
    rel = relation_rows(run, parses, cfg.tau, source)
    tables["relation_rows.csv"] = rel
    tables["relations.csv"] = summarize_relations(rel)
    notes["parse_source"] = parse_source
    notes["taus"] = taus
    return tables, notes


def run_prompt_set(handle: Any, cfg: Any, prompt_set: str, out: Any, model_name: str | None = None) -> dict[str, Any]:
    """Trace generation of one prompt set and score it; everything lands in ``out/`` atomically.

    ``out/run/`` is the traced run (maps.zarr, items.parquet, words.parquet, info.json); the
    tables are CSV/Parquet next to it (summary.csv, threshold_curve.csv, relations.csv,
    detections.csv, and for entanglement sets cohyponym.csv and adjective_swaps.csv).
    """
    from pathlib import Path

    from diffatlas.daam.trace import trace_generation
    from diffatlas.io import atomic_dir, write_json

    import time

    t0, c0 = time.perf_counter(), time.process_time()
    ps = cfg.prompt_set(prompt_set)
    prompts, meta = ps.build()
    n_images = ps.n_seeds if ps.kind == "entanglement" else cfg.n_images
    run = trace_generation(
        handle,
        prompts,
        n_images=n_images,
        seed=cfg.seed,
        steps=cfg.steps,
        guidance=cfg.guidance,
        layers=cfg.layers,
        time_resolved=cfg.time_resolved,
        batch_size=cfg.batch_size,
        out_size=cfg.map_size,
        model_name=model_name,
    )
    for item in run.items:
        item.update(meta[int(item["prompt_index"])])
    run.info.update({"prompt_set": prompt_set, "prompt_set_config": {k: v for k, v in vars(ps).items()}, "model_name": model_name})
    tables, notes = _score_run(run, cfg, None, None, "generated")
    if ps.kind == "entanglement":
        groups: dict[str, list[int]] = {}
        adj: dict[str, dict[str, list[int]]] = {}
        for k, item in enumerate(run.items):
            if item["group"] in ("cohyponym", "non_cohyponym"):
                groups.setdefault(item["group"], []).append(int(item["prompt_index"]))
            elif item["group"] == "adjective":
                adj.setdefault(item["noun"], {}).setdefault(item["adjective"], []).append(k)
        coh = evaluate_cohyponyms(run, groups, cfg.tau)
        tables["cohyponym.csv"] = coh
        tables["adjective_swaps.csv"] = evaluate_adjective_swaps(run, adj, cfg.tau)
        notes["judge"] = str(coh["judge"].iloc[0]) if len(coh) else None
    notes["seconds"] = {"wall": round(time.perf_counter() - t0, 2), "cpu": round(time.process_time() - c0, 2)}
    log.info("prompt set %s: %d images traced and scored in %.1f s (CPU %.1f s)", prompt_set, len(run), notes["seconds"]["wall"], notes["seconds"]["cpu"])
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        run.save(tmp / "run")
        _write_tables(tmp, tables)
        write_json(tmp / "eval.json", {"mode": "generate", "prompt_set": prompt_set, "n_items": len(run), **notes, "tau": cfg.tau})
    return {"n_items": len(run), **notes, "summary": tables["summary.csv"]}


def run_real(handle: Any, cfg: Any, dataset_dir: Any, out: Any, model_name: str | None = None, dataset_name: str | None = None) -> dict[str, Any]:
    """Trace the first ``cfg.n_real`` captioned images of a dataset and score them against its masks."""
    from pathlib import Path

    from diffatlas.daam.realimage import trace_real_images
    from diffatlas.data.dataset import load_dataset
    from diffatlas.io import atomic_dir, write_json

    import time

    t0, c0 = time.perf_counter(), time.process_time()
    ds = load_dataset(dataset_dir)
    meta = ds.meta
    captions = [str(c) for c in meta["caption"]]
    n = min(cfg.n_real, len(ds))
    missing = [int(meta["sample_id"].iloc[i]) for i in range(n) if not captions[i].strip()]
    if missing:
        raise UserError(
            f"daam real-image mode: dataset {dataset_dir} has images without a caption (sample ids {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}); real-image DAAM needs a caption per image"
        )
    run = trace_real_images(
        handle,
        ds.images[:n],
        captions[:n],
        sample_ids=[int(s) for s in meta["sample_id"].iloc[:n]],
        t_start=min(cfg.real_t, handle.num_train_timesteps - 1),
        steps=cfg.steps,
        mode=cfg.real_mode,
        guidance=cfg.real_guidance,
        seed=cfg.seed,
        layers=cfg.layers,
        time_resolved=cfg.time_resolved,
        batch_size=cfg.batch_size,
        model_name=model_name,
    )
    run.info.update({"dataset": str(dataset_name or Path(dataset_dir).name), "model_name": model_name})
    tables, notes = _score_run(run, cfg, meta.iloc[:n].reset_index(drop=True), None if ds.masks is None else ds.masks[:n], "real")
    notes["seconds"] = {"wall": round(time.perf_counter() - t0, 2), "cpu": round(time.process_time() - c0, 2)}
    log.info("dataset %s: %d real images traced and scored in %.1f s (CPU %.1f s)", run.info["dataset"], len(run), notes["seconds"]["wall"], notes["seconds"]["cpu"])
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        run.save(tmp / "run")
        _write_tables(tmp, tables)
        write_json(tmp / "eval.json", {"mode": "real", "dataset": run.info["dataset"], "n_items": len(run), **notes, "tau": cfg.tau})
    return {"n_items": len(run), **notes, "summary": tables["summary.csv"]}
