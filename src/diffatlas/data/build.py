"""Build one configured dataset into its directory (what `diffatlas make-dataset` runs)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from diffatlas.data.config import ShapesWorldConfig, dataset_config_from_dict
from diffatlas.data.dataset import write_dataset
from diffatlas.errors import UserError

log = logging.getLogger(__name__)


def make_dataset(
    section: dict[str, Any],
    out: str | os.PathLike,
    name: str = "dataset",
    threads: int = 1,
    rows: tuple[int, int] | None = None,
    digest: str | None = None,
) -> Path:
    """Render (ShapesWorld) or ingest (image_folder, manifest) the dataset ``section`` into ``out``.

    ``section`` is one entry of the workflow's ``datasets`` config (a dict with ``kind``).
    ``rows = (start, stop)`` writes only candidates ``start:stop``: one shard of a sharded
    dataset (:mod:`diffatlas.data.shards`; a ShapesWorld shard's section may omit n_samples,
    and ``digest`` is the shard's planned fingerprint). The directory appears only when complete.
    """
    if rows is not None:
        start, stop = rows
        if not 0 <= start < stop:
            raise UserError(f"dataset {name}: shard rows {start}:{stop} are not allowed; allowed: 0 <= start < stop")
        if section.get("kind") == "shapesworld":
            section = {**section, "n_samples": max(stop, int(section.get("n_samples") or 0))}
    cfg = dataset_config_from_dict(section, name)
    if isinstance(cfg, ShapesWorldConfig):
        from diffatlas.data import shapesworld as sw

        data = sw.generate_shapesworld(cfg, rows=None if rows is None else range(*rows))
        shard = {} if rows is None else {"rows": list(rows), "digest": digest}
        config = dataclasses.asdict(cfg)
        if rows is not None:
            config.pop("n_samples")  # a shard's samples are its rows, whatever the dataset's size
        info = {
            **shard,
            "name": name,
            "kind": cfg.kind,
            "config": config,
            "shapes": list(sw.SHAPES),
            "colours": list(sw.COLOURS),
            "sizes": list(sw.SIZES),
            "positions": list(sw.POSITIONS),
            "attributes": list(sw.ATTRIBUTES),
            "vocabulary": list(sw.VOCABULARY),
            "palette": {k: list(v) for k, v in sw.PALETTE.items()},
            "background": list(sw.BACKGROUND),
            "diameter_px": {s: sw.diameter(s, cfg.image_size) for s in sw.SIZES},
        }
        return write_dataset(out, data.images, data.meta, data.masks, info)
    from diffatlas.data.ingest import ingest

    ingest(cfg, out, name=name, threads=threads, rows=rows, digest=digest)
    return Path(out)
