"""Reading a Snakemake dry run (``snakemake -n``) in tests: which jobs it plans."""

from __future__ import annotations


def planned_jobs(text: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a dry run lists."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in text.splitlines():
        head = line.strip()
        if head.startswith(("rule ", "localrule ")) and head.endswith(":"):
            jobs.append((head.split()[1].rstrip(":"), {}))
        elif head.startswith("wildcards:") and jobs:
            pairs = (kv.split("=", 1) for kv in head[len("wildcards:"):].split(","))
            jobs[-1][1].update({k.strip(): v.strip() for k, v in pairs})
    return jobs
