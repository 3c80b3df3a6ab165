"""``diffatlas daam-real``: DAAM word maps of real dataset images, scored against their true masks.

    diffatlas daam-real --model resources/models/shapesworld --model-name shapesworld \\
        --dataset results/data/shapesworld --out results/daam/shapesworld/real/shapesworld \\
        --config-json '{"n_real": 32, "real_t": 400, "real_mode": "noise"}'

Each of the first ``n_real`` images is noised (``real_mode: noise``) or inverted (``invert``:
DDIM inversion) to ``real_t`` and denoised with its caption while the cross-attention is traced.
Flow-matching models (SD3, Flux) start from ``real_sigma`` instead (``x = (1 - σ) x0 + σ ε``,
or Euler flow inversion) and denoise with Euler steps on their scheduler's σ grid; their joint
attention is traced (``diffatlas.daam.joint``).
Writes ``OUT/run/`` and the tables (summary.csv: mIoU of noun masks vs the true object masks
with the whole-image and centre-prior baselines; summary_all_words.csv; summary_by_role.csv
(shape, colour and size words apart); threshold_curve.csv; relations.csv with mIoU/mIoD/mIoH
per relation). An image without a caption is an error.
"""

from __future__ import annotations

from diffatlas.daam.config import DAAMConfig
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("daam-real", __doc__, section=DAAMConfig, model="required", device=True, threads=True)


def main(argv: list[str]) -> int:
    parser = RUNNER.parser()
    parser.add_argument("--dataset", required=True, help="dataset directory (results/data/NAME)")
    parser.add_argument("--dataset-name", default=None, help="dataset name recorded (default: folder name)")
    parser.add_argument("--out", required=True, help="output directory, e.g. results/daam/MODEL/real/DATASET")
    args = parser.parse_args(argv)

    from diffatlas.daam.run import run_real

    cfg = RUNNER.config(args)
    handle = RUNNER.load_model(args)
    res = run_real(handle, cfg, args.dataset, args.out, model_name=RUNNER.model_name(args), dataset_name=args.dataset_name)
    result(f"{res['n_items']} real images traced -> {args.out}")
    if len(res["summary"]):
        result(res["summary"][["source", "method", "miou", "ci95", "n"]].to_string(index=False))
    return 0
