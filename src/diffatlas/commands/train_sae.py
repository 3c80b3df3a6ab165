"""``diffatlas train-sae``: train one TopK SAE on a (layer, timestep) of an activation store.

Writes ``sae.safetensors``, ``cfg.json``, ``metrics.json`` and ``latents.parquet`` into
``--out`` (atomically: the directory appears only when everything is written). Settings come
from ``--config-json`` (the ``sae`` section of config.yaml as JSON; missing keys take their
defaults) and may be overridden one by one with ``--set key=value`` (value parsed as JSON).

Example::

    diffatlas train-sae --store results/activations/shapesworld/shapesworld/t50.zarr \\
        --layer mid --timestep 50 --out results/sae/shapesworld/shapesworld/mid/t50 \\
        --config-json '{"k": 32, "expansion": 4}' --set steps=200
"""

from __future__ import annotations

import argparse

from diffatlas.logs import result
from diffatlas.runner import Runner
from diffatlas.sae.config import SAEConfig

RUNNER = Runner("train-sae", __doc__, section=SAEConfig, device=True, threads=True)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser(formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="activation store: one per-time store (results/activations/{model}/{dataset}/t{timestep}.zarr) or the folder of them")
    ap.add_argument("--layer", required=True, help="layer name as stored (e.g. mid, up_ft1)")
    ap.add_argument("--timestep", required=True, type=int, help="training-scale timestep present in the store")
    ap.add_argument("--out", required=True, help="output directory (results/sae/{model}/{dataset}/{layer}/t{timestep})")
    ap.add_argument("--model-name", default=None, help="model name recorded in the artifacts (default: from the store)")
    ap.add_argument("--dataset-name", default=None, help="dataset name recorded in the artifacts (default: from the store)")
    args = ap.parse_args(argv)

    cfg = RUNNER.config(args)
    device = RUNNER.setup(args)

    from diffatlas.sae.train import run

    metrics = run(
        args.store, args.layer, args.timestep, cfg, args.out, device=device, model=args.model_name, dataset=args.dataset_name
    )
    val, lab = metrics, metrics["labels"]
    result(
        f"{args.out}: fve {val['fve']:.3f} nmse {val['nmse']:.3f} l0 {val['l0']:.1f} dead {val['dead_fraction']:.3f} "
        f"dense {val['dense_fraction']:.3f} | top-{lab['n_top_latents']} latents: purity fine {lab['purity_fine']:.3f} "
        f"coarse {lab['purity_coarse']:.3f}, sigma_label fine {lab['sigma_label_fine']:.3f}"
    )
    return 0
