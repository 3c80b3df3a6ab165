"""The two DAAM jobs: trace a prompt set or a dataset's real images, score, write atomically.

:func:`run_prompt_set` (``daam-generate``) and :func:`run_real` (``daam-real``) trace the
cross-attention (:mod:`diffatlas.daam.trace`, :mod:`diffatlas.daam.realimage`), score the
maps (:mod:`~diffatlas.daam.objects`, :mod:`~diffatlas.daam.syntax`,
:mod:`~diffatlas.daam.entanglement`) with the config's τ, and write the run and its tables
into one directory that appears only when complete. ``eval.json`` records τ, so figures
drawn later from the run use the threshold its tables were scored at.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from diffatlas.daam.entanglement import evaluate_adjective_swaps, evaluate_cohyponyms
from diffatlas.daam.objects import evaluate_generated, evaluate_real, summarize, summarize_by_role, threshold_curve
from diffatlas.daam.parses import parses_for_run
from diffatlas.daam.syntax import relation_rows, summarize_relations
from diffatlas.daam.words import TracedRun
from diffatlas.errors import UserError

log = logging.getLogger(__name__)


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
    # the start time in the model's convention: daam.real_t (steps, capped at T - 1) or daam.real_sigma
    conv = handle.time_convention
    start = cfg.real_start(conv)
    start = min(start.value, handle.num_train_timesteps - 1) if conv == "step" else start
    run = trace_real_images(
        handle,
        ds.images[:n],
        captions[:n],
        sample_ids=[int(s) for s in meta["sample_id"].iloc[:n]],
        t_start=start,
        steps=cfg.steps,
        mode=cfg.real_mode,
        guidance=cfg.real_guidance,
        seed=cfg.seed,
        layers=cfg.layers,
        time_resolved=cfg.time_resolved,
        batch_size=cfg.batch_size,
        model_name=model_name,
        start_key=cfg.real_start_key(conv),
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
