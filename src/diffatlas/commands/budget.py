"""``diffatlas budget``: each stage's share of a run, from Snakemake's benchmark files.

Example::

    diffatlas budget --results results --rules rules --per-rule

Prints a Markdown table (stage, jobs, job-seconds, share, the stage's budget in
diffatlas.budget.STAGE_BUDGET_S and whether it is within), the span of the jobs, and with
``--per-rule`` every rule's seconds; ``--before DIR`` puts an earlier run beside it. The
README's budget tables are this command's output.
"""

from __future__ import annotations

from pathlib import Path

from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("budget", __doc__)


def main(argv: list[str]) -> int:
    p = RUNNER.parser()
    p.add_argument("--results", default="results", help="results directory of a run (holds benchmarks/)")
    p.add_argument("--rules", default=str(Path(__file__).resolve().parents[3] / "rules"),
                   help="the workflow's rules/ folder (rule -> stage by file name)")  # fmt: skip
    p.add_argument("--per-rule", action="store_true", help="also print every rule's seconds")
    p.add_argument("--before", default=None, help="results directory of an earlier run: print both side by side")
    args = p.parse_args(argv)

    from diffatlas.budget import budget, format_budget, format_comparison

    if args.before:
        result(format_comparison(budget(args.before, args.rules), budget(args.results, args.rules)))
        return 0
    result(format_budget(budget(args.results, args.rules), per_rule=args.per_rule))
    return 0
