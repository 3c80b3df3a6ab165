"""``diffatlas intervene-experiment``: the judged steering experiment at one layer and timestep.

    diffatlas intervene-experiment --model resources/models/shapesworld --model-name shapesworld \\
        --sae results/intervene/shapesworld/sae/mid/t500 --layer mid --timestep 500 \\
        --config-json '{"alphas": [2, 4], "n_prompts": 3}' --out results/intervene/shapesworld/mid/t500

For each colour and shape word, the SAE latent chosen by label statistics steers prompts of
other values over the α grid (with a random-latent and a random-direction control of the same
norm) and is ablated on prompts that name it; the ShapesWorld judge says what each image shows.
Writes OUT/rates.csv (dose-response with Wilson 95% intervals), verdicts.csv, selection.csv,
judged.csv, images.safetensors and record.json (see :mod:`diffatlas.interventions.experiment`);
OUT appears only when complete. Settings: the ``intervene`` config section.
"""

from __future__ import annotations

from diffatlas.interventions.config import InterventionConfig
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("intervene-experiment", __doc__, section=InterventionConfig, model="required", device=True, threads=True)


def main(argv: list[str]) -> int:
    ap = RUNNER.parser()
    ap.add_argument("--sae", required=True, help="SAE directory (train-sae output) trained at --layer and --timestep")
    ap.add_argument("--layer", required=True, help="layer alias or module path the SAE was trained on")
    ap.add_argument("--timestep", type=int, required=True, help="training-scale timestep: centre of the steering window")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    cfg = RUNNER.config(args)

    from diffatlas.interventions.experiment import run_experiment

    handle = RUNNER.load_model(args)
    table = run_experiment(handle, args.sae, args.layer, args.timestep, cfg, args.out, model=RUNNER.model_name(args))
    chosen = table[table["latent"] >= 0]
    result(f"{len(table)} words ({len(chosen)} with a latent): {int(chosen['steers'].sum())} steer, "
           f"{int(chosen['removes'].sum())} removed by ablation -> {args.out}")
    return 0
