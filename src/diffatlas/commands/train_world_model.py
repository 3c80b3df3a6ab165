"""``diffatlas train-world-model --out DIR``: train the ShapesWorld text-to-image model.

Settings come from ``--config-json '<json of world_model.train>'`` or ``--config FILE``
(a workflow config; its ``world_model.train`` section), then ``--steps`` overrides.
The resumable checkpoint lives in ``--checkpoint-dir`` (default ``DIR/../checkpoints``, kept
outside the rule's output so Snakemake's cleanup of a failed job does not erase it): a
re-run with the same config resumes from it. SIGTERM/Ctrl-C write a checkpoint first.

Example (the shipped model)::

    diffatlas train-world-model --config config.yaml --out resources/models/shapesworld \\
        --checkpoint-dir results/world_model/checkpoints --threads 2
"""

from __future__ import annotations

import signal
from pathlib import Path

from diffatlas.logs import result
from diffatlas.runner import Runner
from diffatlas.world.config import WorldModelConfig

RUNNER = Runner("train-world-model", __doc__, section=WorldModelConfig, device=True, threads=True)


def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    ap = RUNNER.parser()
    ap.add_argument("--out", required=True, help="output model directory (diffusers layout; replaced at the end)")
    ap.add_argument("--checkpoint-dir", default=None, help="resumable checkpoint directory (default: OUT/../checkpoints)")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop after this many seconds with a checkpoint and no final model (train in slices)")
    ap.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    args = ap.parse_args(argv)

    from diffatlas.world.train import train_world_model

    cfg = RUNNER.config(args, {"steps": args.steps})
    device = RUNNER.setup(args)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(args.out).resolve().parent / "checkpoints"
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = train_world_model(cfg, args.out, checkpoint_dir=ckpt, device=device, resume=not args.no_resume,
                                    max_seconds=args.max_seconds)
    except KeyboardInterrupt:
        result(f"{args.out}\tinterrupted (checkpoint in {ckpt}; run again to resume)")
        return 130
    state = "finished" if summary["finished"] else "paused (checkpoint kept)"
    result(f"{args.out}\t{state}\tstep={summary['step']}/{summary['steps']}\tloss={summary['final_loss']}"
          f"\timages/s={summary['images_per_second']}")
    return 0
