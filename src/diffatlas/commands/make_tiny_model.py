"""``diffatlas make-tiny-model FAMILY OUT [--size SIZE]``: write a random model in diffusers layout.

Families: sd, sdxl, dit, pixel. The result loads with ``load_model(OUT)`` and with the
workflow's ``models: {name: {path: OUT}}`` config, which makes it a quick stand-in for a real
checkpoint when trying a stage end to end. Prints the output path and its revision hash.

``--size tiny`` (default) builds the 32-pixel test models of :mod:`diffatlas.models.tiny`;
``--size sd15`` / ``sd2v`` (family sd) build Stable Diffusion 1.5 / 2.1-v at their published
size with random weights (:mod:`diffatlas.models.fullsize`; several GB, for benches and GPU
checks at real size without a download).
"""

from __future__ import annotations

from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("make-tiny-model", __doc__)


def main(argv: list[str]) -> int:
    from diffatlas.errors import UserError
    from diffatlas.models.fullsize import SIZES
    from diffatlas.models.tiny import FAMILIES, make_tiny_model

    ap = RUNNER.parser()
    ap.add_argument("family", choices=FAMILIES, help="model family")
    ap.add_argument("out", help="output directory (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default 0)")
    ap.add_argument("--size", choices=("tiny", *SIZES), default="tiny",
                    help="tiny (default; 32 px test model) or a published architecture (family sd): sd15, sd2v")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                    help="precision of the saved weights of a full-size model (default float32)")
    args = ap.parse_args(argv)
    from diffatlas.models.loader import weights_hash

    if args.size == "tiny":
        path = make_tiny_model(args.family, args.out, seed=args.seed)
    else:
        if args.family != "sd":
            raise UserError(f"--size {args.size} is a Stable Diffusion architecture: use family sd, not {args.family!r}")
        import torch

        from diffatlas.models.fullsize import make_full_size_model

        path = make_full_size_model(args.size, args.out, seed=args.seed, dtype=getattr(torch, args.dtype))
    result(f"{path}\t{args.family}\tsize={args.size}\trevision={weights_hash(path)}")
    return 0
