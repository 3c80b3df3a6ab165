"""``diffatlas daam-real``: DAAM word maps of real dataset images, scored against their true masks.

    diffatlas daam-real --model resources/models/shapesworld --model-name shapesworld \\
        --dataset results/data/shapesworld --out results/daam/shapesworld/real/shapesworld \\
        --config-json '{"n_real": 32, "real_t": 400, "real_mode": "noise"}'

Each of the first ``n_real`` images is noised (``real_mode: noise``) or DDIM-inverted
(``invert``) to ``real_t`` and denoised with its caption while the cross-attention is traced.
Writes ``OUT/run/`` and the tables (summary.csv: mIoU of noun masks vs the true object masks
with the whole-image and centre-prior baselines; summary_all_words.csv; summary_by_role.csv
(shape, colour and size words apart); threshold_curve.csv; relations.csv with mIoU/mIoD/mIoH
per relation). An image without a caption is an error.
"""

from __future__ import annotations

import argparse
from diffatlas.logs import result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffatlas daam-real", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers model directory or cached hub id")
    parser.add_argument("--model-name", default=None, help="model name recorded with the maps (default: --model)")
    parser.add_argument("--dataset", required=True, help="dataset directory (results/data/NAME)")
    parser.add_argument("--dataset-name", default=None, help="dataset name recorded (default: folder name)")
    parser.add_argument("--out", required=True, help="output directory, e.g. results/daam/MODEL/real/DATASET")
    parser.add_argument("--config-json", default="", help="the daam section as JSON (default: schema defaults)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: OMP_NUM_THREADS)")
    parser.add_argument("--allow-pickle-weights", action="store_true",
                        help="also read pickle-based .bin weights (models.<name>.allow_pickle_weights)")
    args = parser.parse_args(argv)

    from diffatlas.daam.config import DAAMConfig
    from diffatlas.daam.evaluate import run_real
    from diffatlas.io import pick_device, set_threads
    from diffatlas.models.loader import load_model

    cfg = DAAMConfig.from_json(args.config_json)
    set_threads(args.threads)
    handle = load_model(args.model, device=pick_device(args.device), allow_pickle_weights=args.allow_pickle_weights)
    res = run_real(handle, cfg, args.dataset, args.out, model_name=args.model_name or args.model, dataset_name=args.dataset_name)
    result(f"{res['n_items']} real images traced -> {args.out}")
    if len(res["summary"]):
        result(res["summary"][["source", "method", "miou", "ci95", "n"]].to_string(index=False))
    return 0
