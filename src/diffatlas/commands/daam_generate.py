"""``diffatlas daam-generate``: DAAM word maps while generating a prompt set, scored against the world.

    diffatlas daam-generate --model resources/models/shapesworld --model-name shapesworld \\
        --prompt-set captions --out results/daam/shapesworld/prompts/captions \\
        --config-json '{"prompt_sets": {"captions": {"kind": "shapesworld_captions", "n_prompts": 8}}}'

``--config-json`` is the workflow's ``daam`` section as JSON (keys and defaults in
config.schema.yaml; absent keys take their defaults); ``--prompt-set`` names one of its
``prompt_sets``. Writes ``OUT/run/`` (maps.zarr with images and token maps, items.parquet,
words.parquet, info.json) and the tables: summary.csv (mIoU vs detected objects with the
whole-image and centre-prior baselines), threshold_curve.csv, relations.csv, detections.csv,
and for entanglement sets cohyponym.csv and adjective_swaps.csv. OUT appears only when complete.
"""

from __future__ import annotations

import argparse
from diffatlas.logs import result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffatlas daam-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers model directory or cached hub id")
    parser.add_argument("--model-name", default=None, help="model name recorded with the maps (default: --model)")
    parser.add_argument("--prompt-set", required=True, help="name of a daam.prompt_sets entry")
    parser.add_argument("--out", required=True, help="output directory, e.g. results/daam/MODEL/prompts/SET")
    parser.add_argument("--config-json", default="", help="the daam section as JSON (default: schema defaults)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: OMP_NUM_THREADS)")
    parser.add_argument("--allow-pickle-weights", action="store_true",
                        help="also read pickle-based .bin weights (models.<name>.allow_pickle_weights)")
    args = parser.parse_args(argv)

    from diffatlas.daam.config import DAAMConfig
    from diffatlas.daam.evaluate import run_prompt_set
    from diffatlas.io import pick_device, set_threads
    from diffatlas.models.loader import load_model

    cfg = DAAMConfig.from_json(args.config_json)
    cfg.prompt_set(args.prompt_set)  # a bad name fails before the model loads
    set_threads(args.threads)
    handle = load_model(args.model, device=pick_device(args.device), allow_pickle_weights=args.allow_pickle_weights)
    res = run_prompt_set(handle, cfg, args.prompt_set, args.out, model_name=args.model_name or args.model)
    result(f"{res['n_items']} images traced for prompt set {args.prompt_set!r} -> {args.out}")
    if len(res["summary"]):
        result(res["summary"][["source", "method", "miou", "ci95", "n"]].to_string(index=False))
    return 0
