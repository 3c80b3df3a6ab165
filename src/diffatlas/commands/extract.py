"""``diffatlas extract``: every selected layer x timestep of a model on a dataset, into zarr.

    diffatlas extract --model resources/models/shapesworld --dataset results/data/shapesworld \\
        --out results/activations/shapesworld/shapesworld/t500.zarr --timestep 500 \\
        --config-json '{"layers": ["mid", "up_ft1"]}' --threads 2

``--config-json`` is the workflow's ``extract`` section as JSON (keys and defaults in
config.schema.yaml; absent keys take their defaults); ``--timestep`` replaces its
``timesteps`` with one (the workflow runs one job per timestep). ``--model`` is a diffusers
model directory or a hub id already in the local cache. The store appears at ``--out`` only
when complete; read it, or the directory of a model's per-time stores as one, with
``diffatlas.activations.store.ActivationStore`` (or ``open_dataset`` for xarray).
"""

from __future__ import annotations

from diffatlas.activations.config import ExtractConfig
from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("extract", __doc__, section=ExtractConfig, model="required", device=True, threads=True)


def _time(text: str) -> int | str:
    """``--timestep``: a step as an int (the config's form), a sigma as its string ``s0.500``."""
    from diffatlas.models.diffusion import Time

    time = Time.parse(text)
    return time.value if time.kind == "step" else str(time)


def main(argv: list[str]) -> int:
    parser = RUNNER.parser()
    parser.add_argument("--dataset", required=True, help="dataset directory (results/data/NAME)")
    parser.add_argument("--out", required=True, help="output store, e.g. results/activations/MODEL/DATASET/t500.zarr")
    parser.add_argument("--timestep", type=_time, default=None,
                        help="extract this time only (replaces the config's timesteps): a training step (500, t500) "
                             "or, for flow-matching models, a sigma (s0.500)")
    parser.add_argument("--dataset-name", default=None, help="dataset name recorded in the store (default: folder name)")
    args = parser.parse_args(argv)

    from diffatlas.activations.extract import extract
    from diffatlas.activations.store import ActivationStore

    cfg = RUNNER.config(args, overrides=None if args.timestep is None else {"timesteps": [args.timestep]})
    RUNNER.setup(args)  # threads; extract() picks the device from --device itself
    path = extract(
        cfg,
        model=args.model,
        dataset=args.dataset,
        out=args.out,
        device=args.device,
        model_name=args.model_name,
        dataset_name=args.dataset_name,
        revision=args.revision,
        allow_pickle_weights=args.allow_pickle_weights,
    )
    store = ActivationStore(path)
    result(
        f"{len(store)} samples x {len(store.timesteps)} timesteps {list(map(int, store.timesteps))} x "
        f"{len(store.layers)} layers ({', '.join(store.layers)}) -> {path}"
    )
    return 0
