"""Datasets in shards: the layout a dataset takes when ``extract.shard_size`` splits it.

A dataset of at most ``shard_size`` samples (or with no ``shard_size``) keeps the plain layout
of :mod:`diffatlas.data.dataset`. A larger one is written as shards::

    results/data/{dataset}/
        index.json        the shards in sample order (name, n, candidate rows, first and last
                          sample id, checksums) and the dataset-level info (name, kind,
                          config, n_samples, image_size, classes, ...)
        shards/00000/     a complete plain dataset directory (images.npy, masks.npy for
        shards/00001/     ShapesWorld, metadata.parquet, info.json)
        ...

Shard ``k`` holds the candidates ``k * shard_size .. (k + 1) * shard_size - 1`` of the source,
in the source's own order (ShapesWorld sample ids; an image folder's files sorted by path; a
manifest's rows). Each shard is written by its own job under a temporary name and renamed into
place, and the index is written atomically after them. So adding images at the end of a source
adds shards and leaves the finished ones untouched (their files keep their mtime, so nothing
downstream of them re-runs); only the last, partial shard is rebuilt when it grows. An image
folder's new file that sorts before others shifts the shards after it: they are rebuilt (each
shard job carries a digest of its candidates, so exactly the shards whose candidates changed
re-run). An image edited in place under the same name is not noticed: rename it, or force the
shard's job.

:func:`plan_shards` cuts a dataset config into shards from the config alone (ShapesWorld) or a
listing of the source (image folder, manifest: no image is decoded); :func:`write_index` writes
the index; :func:`load_sharded` reads the shards back as one :class:`~diffatlas.data.dataset.Dataset`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffatlas.errors import UserError
from diffatlas.io import read_json, write_json

log = logging.getLogger(__name__)

SHARDS, INDEX = "shards", "index.json"
# Keys of a shard's info.json that describe that shard only (the index sums or merges them).
_PER_SHARD_KEYS = ("n_samples", "sha256", "classes", "coarse_classes", "config", "rows", "digest",
                   "n_candidates", "n_skipped", "skipped", "attribute_classes")


def shard_name(k: int) -> str:
    """Name of shard ``k`` (zero-padded, so names sort in sample order)."""
    return f"{k:05d}"


@dataclass(frozen=True)
class ShardPlan:
    """One shard: candidates ``start:stop`` of the source; ``digest`` fingerprints them."""

    name: str
    start: int
    stop: int
    digest: str


def check_shard_size(value: Any, where: str = "extract.shard_size") -> int | None:
    """``value`` as a shard size (None: no sharding); 0, negatives and non-integers are refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"config {where} = {value!r} is not allowed; allowed: null (one shard) or an integer >= 1")
    return value


def _candidate_rows(section: dict[str, Any], name: str) -> list[str] | int:
    """Per candidate one text line fingerprinting it (ingested kinds), or the sample count
    (ShapesWorld, whose sample ``i`` depends on the seed and ``i`` only)."""
    from diffatlas.data.config import ShapesWorldConfig, dataset_config_from_dict

    cfg = dataset_config_from_dict(section, name)
    if isinstance(cfg, ShapesWorldConfig):
        return cfg.n_samples
    from diffatlas.data.ingest import candidates_of

    return [c.fingerprint() for c in candidates_of(cfg)]


def digest_lines(lines: list[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "backslashreplace") + b"\n")
    return h.hexdigest()[:16]


def plan_shards(section: dict[str, Any], name: str, shard_size: int | None) -> list[ShardPlan] | None:
    """The shards of dataset ``name`` (one entry of the ``datasets`` config), or None when it
    keeps the plain one-directory layout (no ``shard_size``, or at most that many candidates)."""
    size = check_shard_size(shard_size)
    if size is None:
        return None
    rows = _candidate_rows(section, name)
    n = rows if isinstance(rows, int) else len(rows)
    if n <= size:
        return None
    plans = []
    for k, start in enumerate(range(0, n, size)):
        stop = min(n, start + size)
        digest = f"rows{start}-{stop}" if isinstance(rows, int) else digest_lines(rows[start:stop])
        plans.append(ShardPlan(shard_name(k), start, stop, digest))
    return plans


def shard_section(section: dict[str, Any]) -> dict[str, Any]:
    """What a shard's job needs of the dataset config: all but the ShapesWorld sample count
    (its rows say which samples), so growing the dataset changes no finished shard's job."""
    return {k: v for k, v in section.items() if not (section.get("kind") == "shapesworld" and k == "n_samples")}


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a dataset directory or its index.json) is a sharded dataset."""
    path = Path(path)
    return path.name == INDEX and path.is_file() or (path / INDEX).is_file()


def write_index(path: str | os.PathLike, shards: list[str], section: dict[str, Any], name: str,
                shard_size: int | None = None) -> dict[str, Any]:
    """Write ``path``/index.json over the shard directories ``path``/shards/<name> (in sample
    order) after checking them; returns the index. Sample ids must be unique across shards."""
    path = Path(path)
    entries, seen, infos = [], {}, []
    for sname in shards:
        d = path / SHARDS / sname
        info_path = d / "info.json"
        if not info_path.is_file():
            raise UserError(f"dataset {path}: shard {sname} is missing or incomplete ({info_path} not found); re-run its make_dataset_shard job")
        info = read_json(info_path)
        ids = pd.read_parquet(d / "metadata.parquet", columns=["sample_id"])["sample_id"].to_numpy(dtype=np.int64)
        for sid in ids:
            if int(sid) in seen:
                raise UserError(f"dataset {path}: sample id {int(sid)} is in shard {seen[int(sid)]} and again in shard {sname}")
            seen[int(sid)] = sname
        rows = info.get("rows") or [None, None]
        entries.append({
            "name": sname, "n": int(info["n_samples"]), "rows": rows,
            "first_sample_id": int(ids[0]) if len(ids) else None, "last_sample_id": int(ids[-1]) if len(ids) else None,
            "digest": info.get("digest"), "sha256": info.get("sha256", {}),
        })
        infos.append(info)
    if not infos:
        raise UserError(f"dataset {path}: no shards to index")
    first = infos[0]
    sizes = {tuple(i["image_size"]) for i in infos}
    if len(sizes) > 1:
        raise UserError(f"dataset {path}: shards have different image sizes {sorted(sizes)}; rebuild them with one config")
    attributes = [list(i.get("attributes") or []) for i in infos]
    for sname, names in zip(shards, attributes):
        if names != attributes[0]:
            raise UserError(f"dataset {path}: shard {sname} has attributes {names}, shard {shards[0]} {attributes[0]}; "
                            "rebuild them with one config")
    index = {
        **{k: v for k, v in first.items() if k not in _PER_SHARD_KEYS},
        "layout": "shards",
        "config": section,
        "shard_size": shard_size,
        "n_samples": sum(e["n"] for e in entries),
        "classes": sorted(set().union(*(i["classes"] for i in infos))),
        "coarse_classes": sorted(set().union(*(i["coarse_classes"] for i in infos))),
        **({"attribute_classes": {a: sorted(set().union(*(i["attribute_classes"][a] for i in infos))) for a in attributes[0]}}
           if attributes[0] else {}),
        "n_skipped": sum(int(i.get("n_skipped", 0)) for i in infos),
        "skipped": [s for i in infos for s in i.get("skipped", [])],
        "shards": entries,
    }
    write_json(path / INDEX, index)
    log.info("indexed %d shards (%d samples) of %s", len(entries), index["n_samples"], path)
    return index


class RowConcat:
    """Read-only rows of several arrays [N_k, ...] as one [sum N_k, ...] array, without copying.

    Supports ``len``, ``shape``, ``dtype``, ``ndim``, indexing by an integer, a slice, an integer
    or boolean array (optionally followed by indices of the other axes), and ``np.asarray``
    (which does copy everything). The parts may be memory maps.
    """

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.bounds = np.cumsum([0] + [int(p.shape[0]) for p in parts])
        self.shape = (int(self.bounds[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        part = np.searchsorted(self.bounds, idx, side="right") - 1
        for k in np.unique(part):
            sel = part == k
            out[sel] = self.parts[k][idx[sel] - self.bounds[k]]
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if int(key) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {int(key)} out of range for {n} rows")
            k = int(np.searchsorted(self.bounds, i, side="right") - 1)
            return np.asarray(self.parts[k][i - self.bounds[k]])[rest] if rest else np.asarray(self.parts[k][i - self.bounds[k]])
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                pieces = [np.asarray(p[max(start - b0, 0): max(min(stop, b1) - b0, 0)])
                          for p, b0, b1 in zip(self.parts, self.bounds[:-1], self.bounds[1:]) if start < b1 and stop > b0]
                out = np.concatenate(pieces) if pieces else np.empty((0, *self.shape[1:]), self.dtype)
            else:
                out = self._rows(np.arange(start, stop, step))
        else:
            idx = np.asarray(key)
            idx = np.nonzero(idx)[0] if idx.dtype == bool else idx.astype(np.int64)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"row index out of range for {n} rows")
            out = self._rows(np.where(idx < 0, idx + n, idx))
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype)


def load_sharded(path: str | os.PathLike, mmap: bool = False) -> Any:
    """Read a sharded dataset (its directory or its index.json) as one Dataset, rows in shard
    order. ``mmap=True`` maps each shard's arrays and joins them lazily (:class:`RowConcat`);
    otherwise they are loaded and concatenated. Raises :class:`UserError` naming a missing or
    inconsistent shard."""
    from diffatlas.data.dataset import Dataset, load_dataset

    path = Path(path)
    root = path.parent if path.name == INDEX else path
    index = read_json(root / INDEX)
    shards = index.get("shards") or []
    if not shards:
        raise UserError(f"dataset {root}: {INDEX} lists no shards")
    parts = []
    for entry in shards:
        d = root / SHARDS / entry["name"]
        if not d.is_dir():
            raise UserError(f"dataset {root}: shard {entry['name']} listed in {INDEX} is missing ({d}); re-run its make_dataset_shard job")
        part = load_dataset(d, mmap=mmap)
        if len(part) != int(entry["n"]):
            raise UserError(f"dataset {root}: shard {entry['name']} holds {len(part)} samples but {INDEX} says {entry['n']}; re-run the dataset_index job")
        parts.append(part)
    have_masks = {p.masks is not None for p in parts}
    if len(have_masks) > 1:
        raise UserError(f"dataset {root}: some shards have masks.npy and some do not; rebuild them with one config")

    def join(arrays: list[Any]) -> Any:
        return RowConcat(arrays) if mmap else np.concatenate(arrays)

    images = join([p.images for p in parts])
    masks = join([p.masks for p in parts]) if parts[0].masks is not None else None
    meta = pd.concat([p.meta for p in parts], ignore_index=True)
    info = {k: v for k, v in index.items() if k != "shards"}
    info["shards"] = shards
    return Dataset(root, images, masks, meta, info)
