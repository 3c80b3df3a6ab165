"""What a run made: the short text printed at the end of the workflow (``diffatlas summary``).

It reads only files under ``results/`` (and the fidelity record shipped with the model), never
re-runs an analysis, and names only files that exist, so it is right after a partial run, a
single target, or a run on another config:

* the stages that produced output;
* the model's caption fidelity with 95% Wilson intervals (the record shipped with the model,
  and/or the one this run measured);
* Diff-C and the linear probe: the best layer x timestep per granularity, with the Wilson
  interval over test images and how many other cells fall inside it (the seed spread too,
  when ``diffc.seeds`` > 1);
* the k-SAE: the layer x timestep whose top latents are purest, with the bootstrap interval
  over latents, against chance;
* DAAM: mIoU at τ with its 95% interval, next to the baselines (whole image, centre prior);
* geometry: semantic path lengths (Σ D_geo) of lerp, slerp and geodesic shooting at T-1, and how
  many of Park et al.'s claims (claims.csv) the model bears out;
* interventions: per layer x timestep and attribute, how many words' SAE latents steer the judged
  image and how many are removed by ablation (intervals apart from baseline and controls), and n;
* where to look: every figure, the report and the atlas when they exist;
* the time per stage, from the benchmark files (:mod:`diffatlas.budget`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

#: Stage -> the glob (under results/) whose matches mean the stage produced output.
STAGE_OUTPUTS = {
    "data": "data/*/info.json",
    "world_model": "world_model/fidelity.json",
    "activations": "activations/*/*/t*.zarr",  # one store per (model, dataset, timestep)
    "sae": "sae/*/*/summary.csv",
    "diffc": "diffc/summary.csv",
    "daam": "daam/*/*/*/summary.csv",
    "geometry": "geometry/*/t*",
    "intervene": "intervene/*/summary.csv",
}

#: Files a reader opens first, when they exist (relative to results/).
ENTRY_POINTS = {"report": "report.html", "atlas": "atlas/index.html"}


def _ci(low: Any, high: Any) -> str:
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return ""
    return f" [{float(low):.2f}, {float(high):.2f}]"


def stages_run(results: Path, fidelity_record: Path | None = None) -> list[str]:
    """Stages with output under ``results`` (world_model also when its record was used)."""
    out = [s for s, pattern in STAGE_OUTPUTS.items() if any(results.glob(pattern))]
    if fidelity_record is not None and fidelity_record.is_file() and "world_model" not in out:
        out.insert(1 if "data" in out else 0, "world_model")
    return out


def fidelity_lines(results: Path, fidelity_record: Path | None) -> list[str]:
    lines = []
    sources = []
    if fidelity_record is not None and fidelity_record.is_file():
        sources.append((f"recorded with the model ({fidelity_record})", fidelity_record))
    measured = results / "world_model" / "fidelity.json"
    if measured.is_file():
        sources.append((f"measured by this run ({measured})", measured))
    for label, path in sources:
        rec = json.loads(path.read_text())
        parts = []
        for key, name in (("shape_accuracy", "shape"), ("colour_accuracy", "colour"), ("two_object_rate", "two objects")):
            m = rec.get(key) or {}
            if m.get("rate") is not None:
                parts.append(f"{name} {m['rate']:.2f}{_ci(*(m.get('ci95') or [None, None]))} ({m['k']}/{m['n']})")
        passed = (rec.get("gate") or {}).get("passed")
        verdict = {True: "gate PASS", False: "gate FAIL"}.get(passed, "")
        lines.append(f"  {label}:")
        lines.append(f"    {', '.join(parts)}; {verdict}".rstrip("; "))
    return lines


def diffc_lines(results: Path) -> list[str]:
    path = results / "diffc" / "summary.csv"
    if not path.is_file():
        return []
    from diffatlas.diffc.summary import best_cells

    table = pd.read_csv(path)
    if "accuracy_ci_low" not in table:  # a summary from before intervals: no ties to report
        table["accuracy_ci_low"] = table["accuracy_ci_high"] = float("nan")
        table["n_seeds"], table["accuracy_seed_std"] = 1, 0.0
    lines = [f"  best layer x timestep (95% Wilson interval over the test images; {path}):"]
    for r in best_cells(table).itertuples(index=False):
        seeds = f", {r.n_seeds} seeds sd {r.accuracy_seed_std:.3f}" if r.n_seeds > 1 else ""
        tied = f"; {r.n_tied} other cell(s) inside the interval" if r.n_tied else ""
        lines.append(
            f"    {r.model}/{r.dataset} {r.granularity:<6} {r.method:<5}: {r.layer} t={r.timestep}  "
            f"{r.accuracy:.2f}{_ci(r.accuracy_ci_low, r.accuracy_ci_high)} (n={r.n_test}, chance {r.chance_uniform:.2f}{seeds}{tied})"
        )
    return lines


def sae_lines(results: Path) -> list[str]:
    lines = []
    for path in sorted(results.glob("sae/*/*/summary.csv")):
        table = pd.read_csv(path)
        if table.empty or "purity_fine" not in table:
            continue
        lines.append(f"  top latents' label purity (95% bootstrap over latents; {path}):")
        for gran in ("fine", "coarse"):
            col = f"purity_{gran}"
            best = table.loc[table[col].idxmax()]
            ci = _ci(best.get(f"{col}_ci_low"), best.get(f"{col}_ci_high"))
            lines.append(
                f"    {best['model']}/{best['dataset']} {gran:<6}: {best['layer']} t={int(best['timestep'])}  "
                f"purity {best[col]:.2f}{ci} vs chance {best[f'chance_{col}']:.2f}; FVE {best['fve']:.2f}"
            )
    return lines


def daam_lines(results: Path) -> list[str]:
    lines = []
    for path in sorted(results.glob("daam/*/*/*/summary.csv")):
        table = pd.read_csv(path)
        if table.empty:
            continue
        model, mode, name = path.parts[-4:-1]
        cells = [f"{r.method} {r.miou:.2f} ± {r.ci95:.2f}" for r in table.itertuples(index=False) if pd.notna(r.miou)]
        tau, n = table["tau"].iloc[0], int(table["n"].iloc[0])
        lines.append(f"    {model} {mode}/{name} (mIoU at tau={tau:g}, n={n} words): {'; '.join(cells)}")
    if lines:
        lines.insert(0, "  DAAM maps vs true masks, against the baselines (± 95% interval):")
    return lines


def geometry_lines(results: Path) -> list[str]:
    lines = []
    for path in sorted(results.glob("geometry/*/path_lengths.json")):
        rec = json.loads(path.read_text())
        mean = rec.get("semantic_length_mean", {})
        if {"lerp", "slerp", "geodesic"} <= set(mean):
            lines.append(
                f"    {rec.get('model')}: semantic path length (Σ D_geo) at t={rec.get('timestep')}, lerp {mean['lerp']:.3f}, "
                f"slerp {mean['slerp']:.3f}, geodesic {mean['geodesic']:.3f} ({rec.get('pairs')} pairs x "
                f"{rec.get('segments')} segments; slerp shorter in {rec['slerp_shorter']['k']}/{rec['slerp_shorter']['n']})"
            )
    for path in sorted(results.glob("geometry/*/claims.csv")):
        claims = pd.read_csv(path)
        ok = claims[claims["verdict"] == "supported"]
        lines.append(f"    {path.parent.name}: Park et al.'s claims, {len(ok)} of {len(claims)} measures supported "
                     f"({', '.join(dict.fromkeys(ok['claim'])) or 'none'}; see {path.with_suffix('.md').relative_to(results)})")
    if lines:
        lines.insert(0, "  pullback geometry:")
    return lines


def intervene_lines(results: Path) -> list[str]:
    lines = []
    for path in sorted(results.glob("intervene/*/summary.csv")):
        table = pd.read_csv(path, keep_default_na=False, na_values=[""])
        for r in table.itertuples(index=False):
            steering = f" ({r.steering_words})" if isinstance(r.steering_words, str) and r.steering_words else ""
            where = f" steered {r.where}" if isinstance(getattr(r, "where", None), str) else ""
            lines.append(f"    {r.model} {r.layer} t{r.timestep} {r.attribute}{where}: {r.steer} of {r.with_latent} latents steer"
                         f"{steering}, {r.ablate} removed by ablation (of {r.words} words; n = {r.n_steer} images per rate)")
    if lines:
        lines.insert(0, "  judged steering with SAE latents (95% Wilson intervals apart from baseline and controls):")
    return lines


def paths_to_open(results: Path) -> list[Path]:
    """Every file a reader may open, that exists: figures (sorted), the report, the atlas."""
    figures = sorted((results / "figures").rglob("*.png")) if (results / "figures").is_dir() else []
    extra = [results / rel for rel in ENTRY_POINTS.values() if (results / rel).is_file()]
    return extra + figures


def time_lines(results: Path, rules_dir: Path | None) -> list[str]:
    if rules_dir is None or not (results / "benchmarks").is_dir():
        return []
    from diffatlas.budget import budget

    try:
        b = budget(results, rules_dir)
    except Exception:  # noqa: BLE001 - the time line is a courtesy; never fail the summary over it
        return []
    per = ", ".join(f"{r.stage} {r.seconds:.0f}" for r in b.stages.itertuples(index=False))
    return [f"time (job-seconds per stage, from {results / 'benchmarks'}): {per}; span {b.span_s:.0f} s"]


def summarise_run(results: str | os.PathLike, fidelity_record: str | os.PathLike | None = None,
                  rules_dir: str | os.PathLike | None = None) -> str:  # fmt: skip
    """The end-of-run text for the run in ``results``."""
    results = Path(results)
    record = Path(fidelity_record) if fidelity_record else None
    out = [f"diffatlas: what this run made ({results}/)"]
    stages = stages_run(results, record)
    out.append(f"stages with output: {', '.join(stages) if stages else 'none'}")
    for title, lines in (
        ("world model caption fidelity (95% Wilson intervals):", fidelity_lines(results, record)),
        ("Diff-C and linear probe:", diffc_lines(results)),
        ("k-SAE:", sae_lines(results)),
        ("DAAM:", daam_lines(results)),
        ("geometry:", geometry_lines(results)),
        ("interventions:", intervene_lines(results)),
    ):
        if lines:
            out += [title, *lines]
    opened = paths_to_open(results)
    if opened:
        out.append(f"open ({len(opened)} files):")
        by_dir: dict[Path, list[str]] = {}
        for p in opened:
            by_dir.setdefault(p.parent, []).append(p.name)
        out += [f"  {d}/: {', '.join(names)}" for d, names in by_dir.items()]
    out += time_lines(results, Path(rules_dir) if rules_dir else None)
    return "\n".join(out)
