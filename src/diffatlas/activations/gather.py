"""Gather the shard stores of one (model, dataset, timestep) into one store.

Sharded extraction (``extract.shard_size``) writes one store per dataset shard,
``results/activations/{model}/{dataset}/shards/t{timestep}/{shard}.zarr``, each a complete
store of :mod:`diffatlas.activations.store` over the shard's samples. :func:`gather_stores`
makes ``t{timestep}.zarr`` from them: a real zarr v3 store, so :class:`ActivationStore`,
``xarray.open_zarr`` and every later stage read it as if one job had written it, with the
samples in shard order (the dataset's order).

It is light: the per-time arrays (``pooled__*``, ``spatial__*``) are not copied. Every part is
chunked ``(1, batch_size, ...)`` along (timestep, sample), so when every shard but the last
holds a whole number of chunks, chunk ``s`` of shard ``k`` IS chunk ``offset_k / batch + s``
of the gathered array: the gather writes the arrays' metadata with the full shape and
hard-links each chunk file under its new key (on another file system, where a hard link is
impossible, that chunk is copied). Only the small sample-level arrays (sample ids, label
codes and attribute codes, re-coded over the union of the shards' classes) are written anew. So the gathered store
costs metadata and one directory entry per chunk, and its chunks are the shards' files: treat
it as read-only. When a shard is not chunk-aligned (a shard_size that is not a multiple of
batch_size, or images skipped at ingestion), every array is copied instead, a chunk-row block
at a time (bounded memory; disk and time as for writing the store once more); the log says so.

Before anything is written every part is checked: it is a store, it was extracted with the
same model and settings as the first (the attributes that say what was extracted), it holds
the same timesteps and layers, its sample ids are new, and every chunk file of every per-time
array is on disk (a complete store has them all; a missing one means a damaged shard). Each
failure is a :class:`UserError` naming the shard. The store appears only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from diffatlas.activations.store import ATTRIBUTE_CLASSES, ATTRIBUTE_CODE, POOLED, SPATIAL, _codes, _extraction_attrs, _is_store
from diffatlas.errors import UserError
from diffatlas.io import atomic_dir

log = logging.getLogger(__name__)

# Attributes a shard has of its own: where its samples came from and their classes.
_PER_SHARD = ("dataset_path", "label_classes", "coarse_label_classes", ATTRIBUTE_CLASSES, "shards")


def _what(attrs: Any) -> dict[str, Any]:
    """The attributes that say what was extracted, less those a shard has of its own."""
    return {k: v for k, v in _extraction_attrs(dict(attrs)).items() if k not in _PER_SHARD}


def _per_time_arrays(attrs: dict[str, Any]) -> list[str]:
    layers = list(attrs.get("layers", {}))
    return [POOLED.format(x) for x in layers] + [SPATIAL.format(x) for x in attrs.get("spatial_layers", [])]


def _chunk_keys(shape: Sequence[int], chunks: Sequence[int]) -> list[tuple[int, ...]]:
    return list(product(*(range(-(-int(n) // int(c))) for n, c in zip(shape, chunks))))


def _array_meta(part: Path, name: str) -> dict[str, Any]:
    return json.loads((part / name / "zarr.json").read_text())


def _key(meta: dict[str, Any], index: Sequence[int]) -> str:
    enc = meta["chunk_key_encoding"]
    sep = enc.get("configuration", {}).get("separator", "/")
    prefix = "c" + sep if enc["name"] == "default" else ""
    return prefix + sep.join(map(str, index))


def gather_stores(parts: Sequence[str | os.PathLike], out: str | os.PathLike, *, names: Sequence[str] | None = None,
                  dataset_path: str | None = None) -> Path:
    """Gather the shard stores ``parts`` (in sample order) into one store at ``out``.

    ``names`` name the shards in messages and in the ``shards`` attribute (default: the
    parts' file names); ``dataset_path`` replaces the shards' own dataset path in the attributes.
    """
    parts = [Path(p) for p in parts]
    names = list(names) if names is not None else [p.name.removesuffix(".zarr") for p in parts]
    if not parts:
        raise UserError(f"no shard stores to gather into {out}")
    for name, part in zip(names, parts):
        if not _is_store(part):
            raise UserError(f"shard {name}: {part} is not an activation store (no zarr.json); re-run its extract_shard job")
    groups = [zarr.open_group(str(p), mode="r") for p in parts]
    first = dict(groups[0].attrs)
    arrays = _per_time_arrays(first)
    timesteps = np.asarray(groups[0]["timestep"][:])
    alpha_bar = np.asarray(groups[0]["alpha_bar"][:])
    # flow-matching stores: sigma beside the scheduler timestep (alpha_bar is NaN there)
    sigma = np.asarray(groups[0]["sigma"][:]) if "sigma" in groups[0] else None
    metas: list[dict[str, dict[str, Any]]] = []
    ids, labels, coarse, seen = [], [], [], {}
    attribute_names = list(first.get(ATTRIBUTE_CLASSES) or {})
    attributes: dict[str, list[str]] = {a: [] for a in attribute_names}
    for name, part, g in zip(names, parts, groups):
        attrs = dict(g.attrs)
        ref, mine = _what(first), _what(attrs)
        for key in sorted(set(ref) | set(mine)):
            if ref.get(key) != mine.get(key):
                raise UserError(
                    f"shard {name} ({part}) differs from shard {names[0]} in {key!r} ({mine.get(key)!r} vs {ref.get(key)!r}): "
                    "shards of other models or settings cannot be gathered; re-extract it with this config"
                )
        sigma_g = np.asarray(g["sigma"][:]) if "sigma" in g else None
        same_sigma = (sigma is None and sigma_g is None) or (
            sigma is not None and sigma_g is not None and np.array_equal(sigma_g, sigma))
        if (not np.array_equal(np.asarray(g["timestep"][:]), timesteps)
                or not np.array_equal(np.asarray(g["alpha_bar"][:]), alpha_bar, equal_nan=True) or not same_sigma):
            raise UserError(f"shard {name} ({part}) holds timesteps {list(map(int, g['timestep'][:]))}, shard {names[0]} {list(map(int, timesteps))}")
        sample = np.asarray(g["sample"][:], dtype=np.int64)
        for sid in sample:
            if int(sid) in seen:
                raise UserError(f"sample id {int(sid)} is in shard {seen[int(sid)]} and again in shard {name}: shards must hold disjoint samples")
            seen[int(sid)] = name
        ids.append(sample)
        labels += list(np.asarray(attrs["label_classes"], dtype=object)[np.asarray(g["label_code"][:])])
        coarse += list(np.asarray(attrs["coarse_label_classes"], dtype=object)[np.asarray(g["coarse_label_code"][:])])
        mine_attributes = dict(attrs.get(ATTRIBUTE_CLASSES) or {})
        if list(mine_attributes) != attribute_names:
            raise UserError(
                f"shard {name} ({part}) stores attributes {list(mine_attributes)}, shard {names[0]} {attribute_names}: "
                "shards of one dataset carry the same attributes; rebuild the dataset shards and re-extract them"
            )
        for a, classes_a in mine_attributes.items():
            attributes[a] += list(np.asarray(classes_a, dtype=object)[np.asarray(g[ATTRIBUTE_CODE.format(a)][:])])
        metas.append(_check_chunks(name, part, arrays, len(sample)))
    counts = [len(x) for x in ids]
    n = sum(counts)
    offsets = np.cumsum([0] + counts[:-1])
    chunk = max(int(metas[k][arrays[0]]["chunk_grid"]["configuration"]["chunk_shape"][1]) for k in range(len(parts)))
    linkable = all(
        int(m[a]["chunk_grid"]["configuration"]["chunk_shape"][1]) == chunk for m in metas for a in arrays
    ) and all(off % chunk == 0 for off in offsets) and all(c % chunk == 0 for c in counts[:-1])

    codes, classes = _codes(labels)
    coarse_codes, coarse_classes = _codes(coarse)
    attribute_codes = {a: _codes(values) for a, values in attributes.items()}
    with atomic_dir(out) as tmp:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for cname, values, dim in (("timestep", timesteps, "timestep"), ("alpha_bar", alpha_bar, "timestep"),
                                   *((("sigma", sigma, "timestep"),) if sigma is not None else ()),
                                   ("sample", np.concatenate(ids), "sample"), ("label_code", codes, "sample"),
                                   ("coarse_label_code", coarse_codes, "sample"),
                                   *((ATTRIBUTE_CODE.format(a), c, "sample") for a, (c, _) in attribute_codes.items())):
            arr = g.create_array(cname, shape=values.shape, dtype=values.dtype, dimension_names=[dim])
            arr[:] = values
        g.attrs.update({
            **first,
            "label_classes": classes,
            "coarse_label_classes": coarse_classes,
            **({ATTRIBUTE_CLASSES: {a: cl for a, (_, cl) in attribute_codes.items()}} if attribute_codes else {}),
            **({"dataset_path": dataset_path} if dataset_path is not None else {}),
            "shards": [{"name": nm, "n": c} for nm, c in zip(names, counts)],
        })
        copied = 0
        for name in arrays:
            meta = json.loads(json.dumps(metas[0][name]))
            meta["shape"][1] = n
            meta["chunk_grid"]["configuration"]["chunk_shape"][1] = chunk
            (tmp / name).mkdir()
            (tmp / name / "zarr.json").write_text(json.dumps(meta, indent=2))
            if linkable:
                copied += _link_chunks(tmp / name, parts, name, metas, offsets, chunk)
            else:
                _copy_values(tmp / name, parts, name, offsets, chunk)
        with warnings.catch_warnings():  # consolidated metadata is not in the v3 spec yet
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(str(tmp))
    if not linkable:
        log.warning("shards of %s are not chunk-aligned (sizes %s, chunk %d): their arrays were copied; "
                    "a shard_size that is a multiple of batch_size (and no skipped images) lets the gather link them",
                    out, counts, chunk)
    elif copied:
        log.warning("%d chunk files could not be hard-linked into %s (another file system?) and were copied", copied, out)
    log.info("gathered %d shards (%d samples) into %s (%s)", len(parts), n, out, "linked" if linkable else "copied")
    return Path(out)


def _check_chunks(name: str, part: Path, arrays: list[str], n: int) -> dict[str, dict[str, Any]]:
    """Array metadata of one shard; every chunk file of every per-time array must exist."""
    metas = {}
    for arr in arrays:
        if not (part / arr / "zarr.json").is_file():
            raise UserError(f"shard {name} ({part}) lacks array {arr}; re-run its extract_shard job")
        meta = _array_meta(part, arr)
        if int(meta["shape"][1]) != n:
            raise UserError(f"shard {name} ({part}): {arr} has {meta['shape'][1]} samples, its sample ids {n}")
        for index in _chunk_keys(meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]):
            key = _key(meta, index)
            if not (part / arr / key).is_file():
                raise UserError(
                    f"shard {name} ({part}) is incomplete: chunk {key} of {arr} is missing; "
                    "delete the shard store and re-run its extract_shard job"
                )
        metas[arr] = meta
    return metas


def _link_chunks(dest: Path, parts: list[Path], name: str, metas: list[dict], offsets: np.ndarray, chunk: int) -> int:
    """Hard-link every chunk of array ``name`` of every part under its gathered key; returns
    how many had to be copied instead (no hard links across file systems)."""
    copied = 0
    for part, meta, off in zip(parts, metas, offsets):
        m = meta[name]
        for index in _chunk_keys(m["shape"], m["chunk_grid"]["configuration"]["chunk_shape"]):
            target = dest / _key(m, (index[0], index[1] + int(off) // chunk, *index[2:]))
            target.parent.mkdir(parents=True, exist_ok=True)
            source = part / name / _key(m, index)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
                copied += 1
    return copied


def _copy_values(dest: Path, parts: list[Path], name: str, offsets: np.ndarray, chunk: int) -> None:
    """Write array ``name`` of every part into the gathered array by value, in blocks of rows."""
    out = zarr.open_array(str(dest), mode="r+", config={"write_empty_chunks": True})  # every chunk on disk, as written
    for part, off in zip(parts, offsets):
        src = zarr.open_array(str(part / name), mode="r")
        for t in range(src.shape[0]):
            for a in range(0, src.shape[1], chunk):
                b = min(src.shape[1], a + chunk)
                out[t, int(off) + a : int(off) + b] = src[t, a:b]
