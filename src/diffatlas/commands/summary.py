"""``diffatlas summary``: what a run made: stages, key numbers with intervals, files to open.

Example::

    diffatlas summary --results results --fidelity-record resources/models/shapesworld/fidelity.json

The workflow calls it when a run succeeds (``onsuccess:`` in the Snakefile). It reads only
existing files under ``--results`` (see diffatlas.run_summary) and prints to stdout.
"""

from __future__ import annotations

from pathlib import Path

from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("summary", __doc__)


def main(argv: list[str]) -> int:
    p = RUNNER.parser()
    p.add_argument("--results", default="results", help="results directory of the run")
    p.add_argument("--fidelity-record", default=None, help="fidelity.json shipped with the model, when the run used it")
    p.add_argument("--rules", default=str(Path(__file__).resolve().parents[3] / "rules"),
                   help="the workflow's rules/ folder, for the time per stage")  # fmt: skip
    args = p.parse_args(argv)

    from diffatlas.run_summary import summarise_run

    result(summarise_run(args.results, args.fidelity_record, args.rules if Path(args.rules).is_dir() else None))
    return 0
