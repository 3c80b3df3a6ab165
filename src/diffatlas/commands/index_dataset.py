"""``diffatlas index-dataset``: write the index of a sharded dataset over its shard directories.

    diffatlas index-dataset --name imagenet --dataset results/data/imagenet \\
        --shards 00000 00001 00002 --config-json '{"kind": "manifest", "path": "train.csv"}' \\
        --shard-size 10000

Each shard is a dataset directory ``DATASET/shards/NAME`` written by ``diffatlas make-dataset
--rows``; the index (``DATASET/index.json``, written atomically) lists them in sample order
with their counts and sample ids, so ``load_dataset(DATASET)`` reads them as one dataset
(layout: diffatlas.data.shards).
"""

from __future__ import annotations

from diffatlas.logs import result
from diffatlas.runner import Runner
from diffatlas.sections import parse_section_json

RUNNER = Runner("index-dataset", __doc__, threads=False, torch_threads=False)


def main(argv: list[str]) -> int:
    parser = RUNNER.parser()
    parser.add_argument("--name", required=True, help="dataset name")
    parser.add_argument("--dataset", required=True, help="the dataset directory holding shards/")
    parser.add_argument("--shards", nargs="+", required=True, help="shard names in sample order")
    parser.add_argument("--config-json", required=True, help="the dataset's config section as JSON (recorded in the index)")
    parser.add_argument("--shard-size", type=int, default=None, help="extract.shard_size (recorded in the index)")
    args = parser.parse_args(argv)
    section = parse_section_json(args.config_json, f"datasets.{args.name}")

    from diffatlas.data.shards import write_index

    index = write_index(args.dataset, args.shards, section, args.name, args.shard_size)
    result(f"{args.name}: {index['n_samples']} images in {len(index['shards'])} shards -> {args.dataset}/index.json")
    return 0
