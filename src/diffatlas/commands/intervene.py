"""``diffatlas intervene``: generate prompts with and without an SAE-latent intervention, same seeds.

    diffatlas intervene --model resources/models/shapesworld --model-name shapesworld \\
        --sae results/sae/shapesworld/shapesworld/mid/t500 --layer mid --latent 12 \\
        --mode steer --alpha 4 --direction unit --where all --t-max 999 --t-min 0 \\
        --cfg-branch both --prompt "a red circle" --prompt "a blue square" --seed 0 \\
        --steps 20 --guidance-scale 3 --out results/intervene/shapesworld/mid/j12

``--mode steer`` adds α · direction of latent j to the layer's output (``--direction unit``:
the unit decoder atom, α in raw activation units; ``atom``: W_dec[j] / input_scale, α in units
of the latent's code); ``clamp`` sets the code z_j to ``--value`` through the SAE and ``ablate``
to 0, keeping the SAE's reconstruction error. ``--where active`` edits only where latent j is
active. The window ``--t-max .. --t-min`` is in training steps (inclusive) and must hold at
least one of the sampler's timesteps. Writes OUT/images.safetensors and OUT/intervention.json
(see :mod:`diffatlas.interventions.generate`); OUT appears only when complete.
"""

from __future__ import annotations

from diffatlas.interventions.spec import CFG_BRANCHES, DIRECTIONS, MODES, WHERE
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("intervene", __doc__, model="required", device=True, threads=True)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser()
    ap.add_argument("--sae", required=True, help="SAE directory (train-sae output: sae.safetensors + cfg.json)")
    ap.add_argument("--layer", required=True, help="layer alias (mid, up_ft1, block0, ...) or module path the SAE was trained on")
    ap.add_argument("--latent", type=int, required=True, help="SAE latent index j")
    ap.add_argument("--mode", choices=MODES, default="steer")
    ap.add_argument("--alpha", type=float, default=0.0, help="steering strength (steer)")
    ap.add_argument("--value", type=float, default=0.0, help="code z_j is clamped to (clamp)")
    ap.add_argument("--direction", choices=DIRECTIONS, default="unit", help="steering direction (steer)")
    ap.add_argument("--where", choices=WHERE, default="all", help="every position, or where latent j is active")
    ap.add_argument("--t-max", type=int, default=None, help="window start, training step (default: T-1)")
    ap.add_argument("--t-min", type=int, default=0, help="window end, training step (default 0)")
    ap.add_argument("--cfg-branch", choices=CFG_BRANCHES, default="both", help="CFG rows edited")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several; DiT: class names)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--guidance-scale", type=float, default=3.0, help="CFG weight (<= 1: no CFG)")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)

    from diffatlas.errors import UserError
    from diffatlas.interventions.generate import run
    from diffatlas.interventions.spec import Intervention

    if not args.prompt:
        raise UserError("intervene: give at least one --prompt")
    handle = RUNNER.load_model(args)
    spec = Intervention(
        latent=args.latent, mode=args.mode, alpha=args.alpha, value=args.value, direction=args.direction,
        where=args.where, t_max=handle.num_train_timesteps - 1 if args.t_max is None else args.t_max,
        t_min=args.t_min, cfg_branch=args.cfg_branch,
    )
    info = run(handle, args.sae, args.layer, spec, args.prompt, args.out, model=RUNNER.model_name(args),
               seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale)
    result(f"{len(args.prompt)} prompts, {info['changed_images']} images changed by {args.mode} of latent {args.latent} "
           f"at {info['layer']} ({info['edited_passes']}/{info['passes']} passes edited) -> {args.out}")
    return 0
