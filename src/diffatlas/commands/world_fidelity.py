"""``diffatlas world-fidelity``: caption fidelity of a ShapesWorld model, and its sample grid.

Two modes:

* ``--model DIR --out-json F [--out-samples S.npy]``: generate samples for single- and
  two-object captions (DDIM + CFG), judge them, write the scores (shape / colour accuracy,
  two-object rate, the quality gate) to F and the images (uint8 [N, S, S, 3]) to S;
* ``--figure PNG --fidelity-json F --samples S.npy``: draw the sample grid from those files
  (rebuilds the figure alone, without sampling again).

Settings: ``--config-json '<json of world_model.fidelity>'`` or ``--config config.yaml``;
``--n-single``, ``--n-two``, ``--steps``, ``--guidance`` override them.
Prints the gate values and PASS/FAIL.
"""

from __future__ import annotations

from diffatlas.logs import result
from diffatlas.runner import Runner
from diffatlas.world.config import FidelityConfig

RUNNER = Runner("world-fidelity", __doc__, section=FidelityConfig, model="optional", device=True, threads=True)


def main(argv: list[str]) -> int:
    from diffatlas.errors import UserError
    from diffatlas.io import read_json

    ap = RUNNER.parser()
    ap.add_argument("--out-json", help="fidelity JSON to write")
    ap.add_argument("--out-samples", default=None, help="generated images to write (.npy, uint8 [N, S, S, 3])")
    ap.add_argument("--figure", default=None, help="figure mode: sample grid PNG to write")
    ap.add_argument("--fidelity-json", default=None, help="figure mode: the fidelity JSON")
    ap.add_argument("--samples", default=None, help="figure mode: the images (.npy)")
    ap.add_argument("--n-single", type=int, default=None, help="override fidelity.n_single")
    ap.add_argument("--n-two", type=int, default=None, help="override fidelity.n_two")
    ap.add_argument("--steps", type=int, default=None, help="override fidelity.num_inference_steps (DDIM steps)")
    ap.add_argument("--guidance", type=float, default=None, help="override fidelity.guidance_scale (CFG scale)")
    args = ap.parse_args(argv)

    cfg = RUNNER.config(args, {"n_single": args.n_single, "n_two": args.n_two, "num_inference_steps": args.steps,
                               "guidance_scale": args.guidance})

    if args.figure:
        if not (args.fidelity_json and args.samples):
            raise UserError("--figure needs --fidelity-json and --samples (written by a run with --out-json/--out-samples)")
        import numpy as np

        from diffatlas.world.fidelity import sample_grid

        try:
            images = np.load(args.samples, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read samples {args.samples}: {err}") from err
        sample_grid(images, read_json(args.fidelity_json), args.figure, rows=cfg.grid_rows, cols=cfg.grid_cols)
        result(args.figure)
        return 0

    if not (args.model and args.out_json):
        raise UserError("give --model and --out-json (or --figure with --fidelity-json and --samples)")
    from diffatlas.world.fidelity import run_fidelity

    device = RUNNER.setup(args)
    record = run_fidelity(args.model, cfg, args.out_json, args.out_samples, device=device, revision=args.revision,
                          allow_pickle_weights=args.allow_pickle_weights)
    gate = record["gate"]
    values = "  ".join(f"{k} {v:.3f} (>= {gate['thresholds'][k]})" for k, v in gate["values"].items() if v is not None)
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}[gate["passed"]]
    result(f"{args.model}\t{values}\tgate {verdict}")
    return 0
