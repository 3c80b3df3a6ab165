"""``diffatlas make-tiny-model FAMILY OUT``: write a tiny random model in diffusers layout.

Families: sd, sdxl, dit, pixel. The result loads with ``load_model(OUT)`` and with the
workflow's ``models: {name: {path: OUT}}`` config, which makes it a quick stand-in for a real
checkpoint when trying a stage end to end. Prints the output path and its revision hash.
"""

from __future__ import annotations

from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("make-tiny-model", __doc__)


def main(argv: list[str]) -> int:
    from diffatlas.models.tiny import FAMILIES, make_tiny_model

    ap = RUNNER.parser()
    ap.add_argument("family", choices=FAMILIES, help="model family")
    ap.add_argument("out", help="output directory (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    args = ap.parse_args(argv)
    from diffatlas.models.loader import weights_hash

    path = make_tiny_model(args.family, args.out, seed=args.seed)
    result(f"{path}\t{args.family}\trevision={weights_hash(path)}")
    return 0
