"""The demo's time budget: what each stage of a run cost, from Snakemake's benchmark files.

Every rule writes ``results/benchmarks/{rule}[/{wildcards...}].tsv`` (Snakemake's
``benchmark:``; column ``s`` is the job's wall-clock seconds, ``cpu_time`` its CPU seconds).
A rule's stage is the ``rules/{stage}.smk`` file that defines it, so a new stage gets a row by
adding its file, and a rule that moves between files moves with it.

The demo (``snakemake --cores all`` on config.yaml, 2 CPU cores) must finish in
:data:`DEMO_BUDGET_S` seconds; :data:`STAGE_BUDGET_S` is each stage's share, in job-seconds
(the sum of its jobs' ``s``). On 2 cores two jobs overlap, so the run's wall time is below the
sum of its job-seconds; the shares add up to more than the budget by about that overlap.
Job-seconds are wall time, so they grow when other processes share the cores; CPU seconds
(``cpu_time``) are printed beside them as the load-independent view.
A stage added later brings a demo size that fits a share here and takes it from ``reserve``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from diffatlas.errors import UserError

#: Wall-clock seconds of the whole demo workflow on 2 CPU cores (install excluded).
DEMO_BUDGET_S = 300

#: Each stage's share of the demo, in job-seconds on 2 CPU cores. Order = the table's order.
STAGE_BUDGET_S = {
    "data": 10,
    "world_model": 10,
    "extract": 40,
    "sae": 80,
    "diffc": 90,
    "daam": 100,
    "geometry": 100,
    "intervene": 35,  # judged steering: its store, a spatial SAE, one experiment cell, the summary (rules/intervene.smk)
    "links": 20,  # cross-method links: SAE latents vs DAAM words and pullback directions
    "atlas": 10,  # the static HTML atlas: reads results/, writes pages and thumbnails
    "reserve": 5,  # later stages: SD3/Flux (issue 21)
}

_RULE = re.compile(r"^rule\s+([A-Za-z_][A-Za-z0-9_]*)\s*:", re.MULTILINE)


def rule_stages(rules_dir: str | os.PathLike) -> dict[str, str]:
    """{rule name: stage} from ``rules/{stage}.smk`` (the file that defines the rule)."""
    out = {}
    for smk in sorted(Path(rules_dir).glob("*.smk")):
        for name in _RULE.findall(smk.read_text()):
            out[name] = smk.stem
    return out


def read_benchmarks(results: str | os.PathLike) -> pd.DataFrame:
    """One row per benchmark file under ``results/benchmarks``: rule, job, s, cpu_time, end.

    ``job`` is the file's path below the rule's folder (the wildcards), ``end`` its
    modification time (when the job finished). With ``benchmark-repeats`` a file has several
    rows; their mean is the job's time.
    """
    root = Path(results) / "benchmarks"
    rows = []
    for tsv in sorted(root.rglob("*.tsv")):
        rel = tsv.relative_to(root)
        rule = rel.parts[0] if len(rel.parts) > 1 else tsv.stem
        job = str(Path(*rel.parts[1:]).with_suffix("")) if len(rel.parts) > 1 else ""
        try:
            table = pd.read_csv(tsv, sep="\t")
            s, cpu = float(table["s"].mean()), float(table["cpu_time"].mean()) if "cpu_time" in table else float("nan")
        except (OSError, ValueError, KeyError, pd.errors.EmptyDataError) as err:
            raise UserError(f"{tsv} is not a Snakemake benchmark file (columns s, cpu_time): {err}") from err
        rows.append({"rule": rule, "job": job, "s": s, "cpu_time": cpu, "end": tsv.stat().st_mtime})
    return pd.DataFrame(rows, columns=["rule", "job", "s", "cpu_time", "end"])


@dataclass
class Budget:
    """Per-stage and per-rule times of one run, and the span of its jobs."""

    stages: pd.DataFrame  # stage, jobs, seconds, cpu_seconds, share, budget_s, within
    rules: pd.DataFrame  # stage, rule, jobs, seconds, cpu_seconds
    span_s: float  # first job start to last job end, from the files' times


def budget(results: str | os.PathLike, rules_dir: str | os.PathLike) -> Budget:
    """The budget table of the run in ``results`` (raises :class:`UserError` when it has no benchmarks)."""
    bench = read_benchmarks(results)
    if bench.empty:
        raise UserError(f"no benchmark files under {Path(results) / 'benchmarks'}; run the workflow first")
    stages = rule_stages(rules_dir)
    bench["stage"] = bench["rule"].map(stages).fillna("other")
    per_rule = (
        bench.groupby(["stage", "rule"], sort=False)
        .agg(jobs=("s", "size"), seconds=("s", "sum"), cpu_seconds=("cpu_time", "sum"))
        .reset_index()
    )
    order = {s: i for i, s in enumerate(STAGE_BUDGET_S)}
    per_rule = per_rule.sort_values(["stage", "seconds"], key=lambda c: c.map(order).fillna(len(order)) if c.name == "stage" else -c)
    per_stage = per_rule.groupby("stage", sort=False).agg(jobs=("jobs", "sum"), seconds=("seconds", "sum"), cpu_seconds=("cpu_seconds", "sum"))
    per_stage = per_stage.reset_index()
    per_stage["share"] = per_stage["seconds"] / per_stage["seconds"].sum()
    per_stage["budget_s"] = per_stage["stage"].map(STAGE_BUDGET_S)
    per_stage["within"] = per_stage["seconds"] <= per_stage["budget_s"]
    span = float((bench["end"]).max() - (bench["end"] - bench["s"]).min())
    return Budget(stages=per_stage.reset_index(drop=True), rules=per_rule.reset_index(drop=True), span_s=span)


def format_budget(b: Budget, per_rule: bool = False) -> str:
    """The budget as a Markdown table (the README's), optionally followed by the per-rule times."""
    lines = [
        "| stage | jobs | job-seconds | CPU seconds | share of the run | budget (s) | within |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in b.stages.itertuples(index=False):
        budget_s = "" if pd.isna(r.budget_s) else f"{r.budget_s:.0f}"
        within = "" if pd.isna(r.budget_s) else ("yes" if r.within else "**no**")
        lines.append(f"| {r.stage} | {r.jobs} | {r.seconds:.1f} | {r.cpu_seconds:.1f} | {r.share:.0%} | {budget_s} | {within} |")
    total = b.stages["seconds"].sum()
    lines.append(
        f"| total | {b.stages['jobs'].sum()} | {total:.1f} | {b.stages['cpu_seconds'].sum():.1f} | 100% | {DEMO_BUDGET_S} (wall) | |"
    )
    lines.append("")
    lines.append(
        f"Span of the benchmarked jobs (first start to last end, from the files' times): {b.span_s:.0f} s; "
        f"budget {DEMO_BUDGET_S} s of wall time on 2 cores."
    )
    if per_rule:
        lines += ["", "| stage | rule | jobs | job-seconds | CPU seconds |", "| --- | --- | ---: | ---: | ---: |"]
        for r in b.rules.itertuples(index=False):
            lines.append(f"| {r.stage} | {r.rule} | {r.jobs} | {r.seconds:.1f} | {r.cpu_seconds:.1f} |")
    return "\n".join(lines)


def format_comparison(before: Budget, after: Budget, names: tuple[str, str] = ("before", "after")) -> str:
    """Two runs side by side per stage (job-seconds and CPU seconds), as a Markdown table."""
    b = before.stages.set_index("stage")
    a = after.stages.set_index("stage")
    order = list(dict.fromkeys([*STAGE_BUDGET_S, *b.index, *a.index]))
    n0, n1 = names
    lines = [
        f"| stage | {n0}: jobs | {n0}: job-s | {n0}: CPU s | {n1}: jobs | {n1}: job-s | {n1}: CPU s | budget (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cells(t: pd.DataFrame, stage: str) -> str:
        if stage not in t.index:
            return "0 | 0 | 0"
        r = t.loc[stage]
        return f"{int(r['jobs'])} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f}"

    for stage in order:
        if stage in b.index or stage in a.index:
            budget_s = STAGE_BUDGET_S.get(stage, "")
            lines.append(f"| {stage} | {cells(b, stage)} | {cells(a, stage)} | {budget_s} |")
    tb, ta = before.stages, after.stages
    lines.append(
        f"| total | {tb['jobs'].sum()} | {tb['seconds'].sum():.1f} | {tb['cpu_seconds'].sum():.1f} | "
        f"{ta['jobs'].sum()} | {ta['seconds'].sum():.1f} | {ta['cpu_seconds'].sum():.1f} | {DEMO_BUDGET_S} (wall) |"
    )
    lines.append(f"| span of the jobs (wall) | | {before.span_s:.0f} | | | {after.span_s:.0f} | | |")
    return "\n".join(lines)
