"""``diffatlas extract``: every selected layer x timestep of a model on a dataset, into zarr.

    diffatlas extract --model resources/models/shapesworld --dataset results/data/shapesworld \\
        --out results/activations/shapesworld/shapesworld.zarr \\
        --config-json '{"layers": ["mid", "up_ft1"], "timesteps": [50, 500]}' --threads 2

``--config-json`` is the workflow's ``extract`` section as JSON (keys and defaults in
config.schema.yaml; absent keys take their defaults). ``--model`` is a diffusers model
directory or a hub id already in the local cache. The store appears at ``--out`` only when
complete; read it with ``diffatlas.activations.store.ActivationStore`` or ``xarray.open_zarr``.
"""

from __future__ import annotations

import argparse
from diffatlas.logs import result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffatlas extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers model directory or cached hub id")
    parser.add_argument("--dataset", required=True, help="dataset directory (results/data/NAME)")
    parser.add_argument("--out", required=True, help="output store, e.g. results/activations/MODEL/DATASET.zarr")
    parser.add_argument("--config-json", default="", help="the extract section as JSON (default: schema defaults)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: OMP_NUM_THREADS)")
    parser.add_argument("--model-name", default=None, help="model name recorded in the store (default: folder name)")
    parser.add_argument("--dataset-name", default=None, help="dataset name recorded in the store (default: folder name)")
    parser.add_argument("--revision", default=None, help="hub revision of --model (cache only)")
    parser.add_argument("--allow-pickle-weights", action="store_true",
                        help="also read pickle-based .bin weights (models.<name>.allow_pickle_weights)")
    args = parser.parse_args(argv)

    from diffatlas.activations.config import ExtractConfig
    from diffatlas.activations.extract import extract
    from diffatlas.activations.store import ActivationStore
    from diffatlas.io import set_threads

    cfg = ExtractConfig.from_json(args.config_json)
    set_threads(args.threads)
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
