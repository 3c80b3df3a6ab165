"""``diffatlas atlas``: the static HTML atlas of a results tree (results/atlas/index.html).

Reads only files under ``--results`` (and the model's fidelity record when given) and writes a
self-contained folder that opens from the file system: no server, no network. A stage whose
files are missing is listed on the index page as missing. See :mod:`diffatlas.atlas`.

Example::

    diffatlas atlas --results results --out results/atlas
"""

from __future__ import annotations

import argparse

from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("atlas", __doc__)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", help="results tree to read (default: results)")
    ap.add_argument("--out", default=None, help="atlas folder (default: RESULTS/atlas)")
    ap.add_argument("--fidelity-record", default=None, help="the model's fidelity.json, when the run did not measure it")
    ap.add_argument("--max-latents", type=int, default=None, help="latents per SAE shown (default: the run's top_latents)")
    args = ap.parse_args(argv)

    from pathlib import Path

    from diffatlas.atlas import build_atlas

    index = build_atlas(args.results, args.out or Path(args.results) / "atlas", args.fidelity_record, args.max_latents)
    result(f"atlas: open {index}")
    return 0
