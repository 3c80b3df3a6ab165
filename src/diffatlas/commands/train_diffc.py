"""``diffatlas train-diffc``: Diff-C and the linear probe for one (layer, timestep) of a store.

Example::

    diffatlas train-diffc --store results/activations/shapesworld/shapesworld/t250.zarr \\
        --layer mid --timestep 250 --out results/diffc/shapesworld/shapesworld/mid/t250 \\
        --config-json '{"epochs": 10, "feature_dim": 128}'

``--config-json`` takes the workflow's ``diffc`` section (any subset; missing keys take the
paper's defaults, see config.schema.yaml). Writes metrics.json, diffc.safetensors,
probe.safetensors and predictions.csv into ``--out``; prints one line per granularity.
"""

from __future__ import annotations

from diffatlas.diffc.config import DiffCConfig
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("train-diffc", __doc__, section=DiffCConfig, device=True, threads=True)


def main(argv: list[str]) -> int:
    p = RUNNER.parser()
    p.add_argument("--store", required=True, help="activation store: one per-time store (results/activations/{model}/{dataset}/t{timestep}.zarr) or the folder of them")
    p.add_argument("--layer", required=True, help="layer name as stored (alias or module path)")
    p.add_argument("--timestep", required=True, type=int, help="training-scale timestep stored in the store")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--model-name", default=None, help="model name recorded in the outputs (default: the store's model id)")
    p.add_argument("--dataset-name", default=None, help="dataset name recorded in the outputs")
    args = p.parse_args(argv)
    cfg = RUNNER.config(args)
    device = RUNNER.setup(args)

    from diffatlas.diffc.train import run_diffc_job  # torch import only once the arguments are good

    job = run_diffc_job(
        args.store, args.layer, args.timestep, args.out, cfg, device=str(device), model_name=args.model_name,
        dataset_name=args.dataset_name,
    )
    def acc(m: dict) -> str:
        lo, hi = m["accuracy_ci95"]
        seeds = m["seeds"]
        over = f", {seeds['n']} seeds {seeds['mean']:.3f} ± {seeds['std']:.3f}" if seeds["n"] > 1 else ""
        return f"{m['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]{over}"

    for gran, entry in job.metrics["results"].items():
        result(
            f"{args.layer} t={args.timestep} {gran}: Diff-C {acc(entry['diffc'])}  "
            f"probe {acc(entry['probe'])}  chance {entry['diffc']['chance_uniform']:.3f}"
        )
    for w in job.metrics["warnings"]:
        result(f"warning: {w}")
    return 0
