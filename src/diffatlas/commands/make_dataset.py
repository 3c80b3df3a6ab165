"""``diffatlas make-dataset``: render ShapesWorld or ingest real images into a dataset directory.

    diffatlas make-dataset --name shapesworld \\
        --config-json '{"kind": "shapesworld", "n_samples": 512, "seed": 0}' \\
        --out results/data/shapesworld

``--config-json`` is one entry of the workflow's ``datasets`` section as JSON (keys and
defaults in config.schema.yaml). The output directory holds images.npy, masks.npy
(ShapesWorld), metadata.parquet and info.json, and appears only when complete.
``--rows START:STOP`` writes one shard of a sharded dataset (candidates START..STOP-1, see
diffatlas.data.shards; ``--digest`` is the shard's fingerprint from planning) into e.g.
results/data/NAME/shards/00000; ``diffatlas index-dataset`` then indexes the shards.
"""

from __future__ import annotations

from diffatlas.errors import UserError
from diffatlas.logs import result
from diffatlas.runner import Runner
from diffatlas.sections import parse_section_json

RUNNER = Runner("make-dataset", __doc__, threads=True, torch_threads=False)


def main(argv: list[str]) -> int:
    parser = RUNNER.parser()
    parser.add_argument("--name", required=True, help="dataset name (recorded in info.json)")
    parser.add_argument("--config-json", required=True, help="the dataset's config section as JSON, with 'kind'")
    parser.add_argument("--out", required=True, help="output directory, e.g. results/data/NAME")
    parser.add_argument("--rows", default=None, help="START:STOP: write only these candidates (one shard)")
    parser.add_argument("--digest", default=None, help="the shard's planned fingerprint (checked for ingested sources)")
    args = parser.parse_args(argv)
    section = parse_section_json(args.config_json, f"datasets.{args.name}")
    rows = None
    if args.rows is not None:
        try:
            start, stop = (int(x) for x in args.rows.split(":"))
        except ValueError:
            raise UserError(f"--rows {args.rows!r} is not allowed; allowed: START:STOP (integers)") from None
        rows = (start, stop)

    from diffatlas.data.build import make_dataset
    from diffatlas.data.dataset import load_dataset
    # No torch here (importing it only to set its thread count costs seconds): --threads
    # sizes the image-decoding pool; numpy work is single-threaded and small.
    path = make_dataset(section, args.out, name=args.name, threads=args.threads or 1, rows=rows, digest=args.digest)
    ds = load_dataset(path, mmap=True)
    skipped = ds.info.get("n_skipped", 0)
    result(
        f"{args.name}: {len(ds)} images {ds.image_size}x{ds.image_size}, "
        f"{len(ds.info['classes'])} classes, {len(ds.info['coarse_classes'])} coarse classes"
        + (f", {skipped} unreadable files skipped" if skipped else "")
        + f" -> {path}"
    )
    return 0
