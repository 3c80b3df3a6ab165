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

import argparse
import json
from diffatlas.logs import result


def main(argv: list[str]) -> int:
    from diffatlas.errors import UserError
    from diffatlas.io import pick_device, read_json, set_threads

    ap = argparse.ArgumentParser(prog="diffatlas world-fidelity", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (diffusers layout) to evaluate")
    ap.add_argument("--out-json", help="fidelity JSON to write")
    ap.add_argument("--out-samples", default=None, help="generated images to write (.npy, uint8 [N, S, S, 3])")
    ap.add_argument("--figure", default=None, help="figure mode: sample grid PNG to write")
    ap.add_argument("--fidelity-json", default=None, help="figure mode: the fidelity JSON")
    ap.add_argument("--samples", default=None, help="figure mode: the images (.npy)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--config-json", default=None, help="JSON of the world_model.fidelity section")
    src.add_argument("--config", default=None, help="workflow config YAML; its world_model.fidelity section is used")
    ap.add_argument("--n-single", type=int, default=None)
    ap.add_argument("--n-two", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    from diffatlas.world.config import FidelityConfig

    if args.config_json is not None:
        try:
            section = json.loads(args.config_json)
        except json.JSONDecodeError as err:
            raise UserError(f"--config-json is not valid JSON: {err}") from err
    elif args.config is not None:
        from diffatlas.config import load_config

        section = load_config(args.config).get("world_model", {}).get("fidelity", {})
    else:
        section = {}
    overrides = {"n_single": args.n_single, "n_two": args.n_two, "num_inference_steps": args.steps,
                 "guidance_scale": args.guidance}
    section = {**section, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = FidelityConfig.from_dict(section)
    set_threads(args.threads)

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

    record = run_fidelity(args.model, cfg, args.out_json, args.out_samples, device=pick_device(args.device))
    gate = record["gate"]
    values = "  ".join(f"{k} {v:.3f} (>= {gate['thresholds'][k]})" for k, v in gate["values"].items() if v is not None)
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}[gate["passed"]]
    result(f"{args.model}\t{values}\tgate {verdict}")
    return 0
