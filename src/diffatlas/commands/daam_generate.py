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

from diffatlas.daam.config import DAAMConfig
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("daam-generate", __doc__, section=DAAMConfig, model="required", device=True, threads=True)


def main(argv: list[str]) -> int:
    parser = RUNNER.parser()
    parser.add_argument("--prompt-set", required=True, help="name of a daam.prompt_sets entry")
    parser.add_argument("--out", required=True, help="output directory, e.g. results/daam/MODEL/prompts/SET")
    args = parser.parse_args(argv)

    from diffatlas.daam.run import run_prompt_set

    cfg = RUNNER.config(args)
    cfg.prompt_set(args.prompt_set)  # a bad name fails before the model loads
    handle = RUNNER.load_model(args)
    res = run_prompt_set(handle, cfg, args.prompt_set, args.out, model_name=RUNNER.model_name(args))
    result(f"{res['n_items']} images traced for prompt set {args.prompt_set!r} -> {args.out}")
    if len(res["summary"]):
        result(res["summary"][["source", "method", "miou", "ci95", "n"]].to_string(index=False))
    return 0
