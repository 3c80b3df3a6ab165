"""``diffatlas gather-activations``: one store from the shard stores of a (model, dataset, timestep).

    diffatlas gather-activations --out results/activations/M/D/t500.zarr \\
        --dataset results/data/D \\
        --parts results/activations/M/D/shards/t500/00000.zarr results/activations/M/D/shards/t500/00001.zarr

The parts, in sample order, are stores that ``diffatlas extract`` wrote for the dataset's
shards (``--dataset results/data/D/shards/NNNNN``). The gathered store reads as one with
``ActivationStore`` and ``xarray.open_zarr``; its chunk files are hard links to the parts'
(see diffatlas.activations.gather), and it appears at ``--out`` only when complete.
"""

from __future__ import annotations

from diffatlas.logs import result
from diffatlas.runner import Runner

RUNNER = Runner("gather-activations", __doc__)


def main(argv: list[str]) -> int:
    parser = RUNNER.parser()
    parser.add_argument("--out", required=True, help="the gathered store, e.g. results/activations/MODEL/DATASET/t500.zarr")
    parser.add_argument("--parts", nargs="+", required=True, help="shard stores in sample order")
    parser.add_argument("--dataset", default=None, help="the dataset directory (recorded as dataset_path)")
    args = parser.parse_args(argv)

    from diffatlas.activations.gather import gather_stores
    from diffatlas.activations.store import ActivationStore

    path = gather_stores(args.parts, args.out, dataset_path=args.dataset)
    store = ActivationStore(path)
    result(f"{len(args.parts)} shards, {len(store)} samples x {len(store.layers)} layers at t {list(map(int, store.timesteps))} -> {path}")
    return 0
