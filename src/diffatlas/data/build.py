"""Build one configured dataset into its directory (what `diffatlas make-dataset` runs)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from diffatlas.data.config import ShapesWorldConfig, dataset_config_from_dict
from diffatlas.data.dataset import write_dataset

log = logging.getLogger(__name__)


def make_dataset(section: dict[str, Any], out: str | os.PathLike, name: str = "dataset", threads: int = 1) -> Path:
    """Render (ShapesWorld) or ingest (image_folder, manifest) the dataset ``section`` into ``out``.

    ``section`` is one entry of the workflow's ``datasets`` config (a dict with ``kind``).
    The directory appears only when complete.
    """
    cfg = dataset_config_from_dict(section, name)
    if isinstance(cfg, ShapesWorldConfig):
        from diffatlas.data import shapesworld as sw

        data = sw.generate_shapesworld(cfg)
        info = {
            "name": name,
            "kind": cfg.kind,
            "config": dataclasses.asdict(cfg),
            "shapes": list(sw.SHAPES),
            "colours": list(sw.COLOURS),
            "sizes": list(sw.SIZES),
            "vocabulary": list(sw.VOCABULARY),
            "palette": {k: list(v) for k, v in sw.PALETTE.items()},
            "background": list(sw.BACKGROUND),
            "diameter_px": {s: sw.diameter(s, cfg.image_size) for s in sw.SIZES},
        }
        return write_dataset(out, data.images, data.meta, data.masks, info)
    from diffatlas.data.ingest import ingest

    ingest(cfg, out, name=name, threads=threads)
    return Path(out)
