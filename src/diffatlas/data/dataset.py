"""The dataset directory every later stage reads: ``results/data/{dataset}/``.

Layout::

    images.npy         uint8 [N, H, W, 3]  RGB
    masks.npy          bool  [N, max_objects, H, W]  per-object masks (ShapesWorld only)
    metadata.parquet   one row per sample, in image order: sample_id, label, coarse_label,
                       caption, and per kind more columns (ShapesWorld: n_objects, objects,
                       words, relations, ...; ingested images: path)
    info.json          name, kind, config, counts, classes, skipped files, checksums;
                       ``attributes``: the metadata columns that are categorical attributes of
                       a sample (ShapesWorld: colour, shape, size, position), in order, with
                       their sorted values in ``attribute_classes`` (absent: none)

A dataset larger than ``extract.shard_size`` is a directory of such directories, one per
shard, with an index (:mod:`diffatlas.data.shards`); :func:`load_dataset` reads both layouts.

Writers build the directory under a temporary name and rename it into place when complete
(:func:`diffatlas.io.atomic_dir`), so a failed job never leaves a dataset that looks whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffatlas.errors import UserError
from diffatlas.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGES, MASKS, METADATA, INFO = "images.npy", "masks.npy", "metadata.parquet", "info.json"
REQUIRED_COLUMNS = ("sample_id", "label", "coarse_label", "caption")
#: info.json key naming the metadata columns that are categorical attributes, and the key of their values.
ATTRIBUTES, ATTRIBUTE_CLASSES = "attributes", "attribute_classes"
# An attribute name becomes part of a zarr array name and of column names such as
# ``purity_{name}`` next to ``purity_fine``: lower-case identifiers, never a label granularity.
_ATTRIBUTE_NAME = re.compile(r"[a-z][a-z0-9_]*")
_RESERVED_ATTRIBUTES = ("fine", "coarse")


def check_attribute_names(names: Any, where: str) -> list[str]:
    """``names`` as a list of attribute names, or a :class:`UserError` naming ``where`` and the rule."""
    if names is None:
        return []
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise UserError(f"{where} = {names!r} is not allowed; allowed: a list of column names")
    out = []
    for name in names:
        if not isinstance(name, str) or not _ATTRIBUTE_NAME.fullmatch(name) or name in _RESERVED_ATTRIBUTES \
                or name.startswith("active") or name in REQUIRED_COLUMNS:
            raise UserError(
                f"{where}: attribute name {name!r} is not allowed; allowed: lower-case identifiers [a-z][a-z0-9_]* "
                f"other than {', '.join(_RESERVED_ATTRIBUTES + REQUIRED_COLUMNS)} and not starting with 'active'"
            )
        if name in out:
            raise UserError(f"{where}: attribute {name!r} is listed twice")
        out.append(name)
    return out


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_meta(meta: pd.DataFrame, n: int, attributes: list[str] = ()) -> pd.DataFrame:
    missing = [c for c in (*REQUIRED_COLUMNS, *attributes) if c not in meta.columns]
    if missing:
        raise ValueError(f"dataset metadata lacks columns {missing}; needs {list(REQUIRED_COLUMNS)} and the attributes {list(attributes)}")
    if len(meta) != n:
        raise ValueError(f"dataset metadata has {len(meta)} rows for {n} images")
    meta = meta.reset_index(drop=True).copy()
    meta["sample_id"] = meta["sample_id"].astype("int64")
    for col in ("label", "coarse_label", "caption", *attributes):
        meta[col] = meta[col].fillna("").astype(str)
    return meta


def _finish_info(out: Path, meta: pd.DataFrame, images_shape: tuple[int, ...], masks_shape, info: dict[str, Any]) -> dict:
    full = {
        "format_version": FORMAT_VERSION,
        **info,
        "n_samples": int(images_shape[0]),
        "image_size": [int(images_shape[1]), int(images_shape[2])],
        "max_objects": int(masks_shape[1]) if masks_shape is not None else None,
        "classes": sorted(set(meta["label"])),
        "coarse_classes": sorted(set(meta["coarse_label"])),
        **({ATTRIBUTE_CLASSES: {a: sorted(set(meta[a])) for a in info[ATTRIBUTES]}} if info.get(ATTRIBUTES) else {}),
        "sha256": {IMAGES: _sha256(out / IMAGES), **({MASKS: _sha256(out / MASKS)} if masks_shape is not None else {})},
    }
    write_json(out / INFO, full)
    return full


def write_dataset(
    path: str | os.PathLike,
    images: np.ndarray,
    meta: pd.DataFrame,
    masks: np.ndarray | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write an in-memory dataset atomically.

    images uint8 [N, H, W, 3]; masks bool [N, max_objects, H, W] or None; meta N rows
    with at least sample_id, label, coarse_label, caption; info: extra info.json keys
    (``attributes``: names of meta columns that are categorical attributes, stored as text).
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if masks is not None and (masks.dtype != np.bool_ or masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[1:3]):
        raise ValueError(f"masks must be bool [N, K, H, W] matching images {images.shape}, got {masks.dtype} {masks.shape}")
    info = dict(info or {})
    if ATTRIBUTES in info:
        info[ATTRIBUTES] = check_attribute_names(info[ATTRIBUTES], f"dataset {path} info {ATTRIBUTES!r}")
    meta = _check_meta(meta, images.shape[0], info.get(ATTRIBUTES, []))
    with atomic_dir(path) as tmp:
        np.save(tmp / IMAGES, np.ascontiguousarray(images), allow_pickle=False)
        if masks is not None:
            np.save(tmp / MASKS, np.ascontiguousarray(masks), allow_pickle=False)
        meta.to_parquet(tmp / METADATA, index=False)
        _finish_info(tmp, meta, images.shape, None if masks is None else masks.shape, info)
    log.info("wrote %d samples to %s", images.shape[0], path)
    return Path(path)


@dataclass
class StreamingWriter:
    """Appends images one by one to an on-disk array (for datasets too big for memory).

    Use through :func:`open_streaming_writer`; call :meth:`append` per kept image.
    """

    dir: Path
    capacity: int
    image_size: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _images: np.memmap | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._images = np.lib.format.open_memmap(
            self.dir / ".images_full.npy", mode="w+", dtype=np.uint8, shape=(max(self.capacity, 1), self.image_size, self.image_size, 3)
        )

    def append(self, image: np.ndarray, row: dict[str, Any]) -> None:
        """image uint8 [S, S, 3]; row: its metadata (sample_id, label, ...)."""
        if image.shape != (self.image_size, self.image_size, 3) or image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 [{self.image_size}, {self.image_size}, 3], got {image.dtype} {image.shape}")
        if len(self.rows) >= self.capacity:
            raise ValueError("StreamingWriter is full")
        self._images[len(self.rows)] = image
        self.rows.append(row)

    def _close(self) -> None:
        n = len(self.rows)
        self._images.flush()
        full = self.dir / ".images_full.npy"
        if n == self.capacity:
            del self._images
            os.replace(full, self.dir / IMAGES)
        else:  # some files were skipped: copy the kept prefix into a right-sized array
            out = np.lib.format.open_memmap(self.dir / IMAGES, mode="w+", dtype=np.uint8, shape=(n, self.image_size, self.image_size, 3))
            step = 256
            for i in range(0, n, step):
                out[i : min(i + step, n)] = self._images[i : min(i + step, n)]
            out.flush()
            del out, self._images
            full.unlink()
        attributes = check_attribute_names(self.info.get(ATTRIBUTES), f"dataset {self.dir} info {ATTRIBUTES!r}")
        meta = _check_meta(pd.DataFrame(self.rows, columns=list(self.rows[0]) if self.rows else None), n, attributes)
        meta.to_parquet(self.dir / METADATA, index=False)
        self.info = _finish_info(self.dir, meta, (n, self.image_size, self.image_size, 3), None, self.info)


@contextlib.contextmanager
def open_streaming_writer(path: str | os.PathLike, capacity: int, image_size: int) -> Iterator[StreamingWriter]:
    """Yield a :class:`StreamingWriter`; the dataset appears at ``path`` only on success."""
    with atomic_dir(path) as tmp:
        writer = StreamingWriter(Path(tmp), capacity, image_size)
        yield writer
        if not writer.rows:
            raise UserError(f"dataset {path} would be empty: no image could be read")
        writer._close()
    log.info("wrote %d samples to %s", len(writer.rows), path)


class Dataset:
    """A dataset directory read back.

    Attributes: ``images`` uint8 [N, H, W, 3]; ``masks`` bool [N, K, H, W] or None;
    ``meta`` DataFrame (N rows, in image order); ``info`` dict from info.json.
    """

    def __init__(self, path: Path, images: np.ndarray, masks: np.ndarray | None, meta: pd.DataFrame, info: dict[str, Any]):
        self.path = path
        self.images = images
        self.masks = masks
        self.meta = meta
        self.info = info

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, n={len(self)}, image_size={self.image_size}, kind={self.info.get('kind')!r})"

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def sample_ids(self) -> np.ndarray:
        """int64 [N]."""
        return self.meta["sample_id"].to_numpy(dtype=np.int64)

    @property
    def captions(self) -> list[str]:
        return self.meta["caption"].astype(str).tolist()

    def labels(self, kind: str = "fine") -> np.ndarray:
        """Class names per sample, str [N]; ``kind`` is fine (label) or coarse (coarse_label)."""
        if kind == "fine":
            return self.meta["label"].to_numpy(dtype=str)
        if kind == "coarse":
            return self.meta["coarse_label"].to_numpy(dtype=str)
        raise UserError(f"label kind {kind!r} is not allowed; allowed: fine, coarse")

    @property
    def attribute_names(self) -> list[str]:
        """Names of the categorical attributes of every sample, in order ([] for a dataset without)."""
        return list(self.info.get(ATTRIBUTES) or [])

    def attributes(self) -> dict[str, np.ndarray]:
        """Each categorical attribute's values per sample: name -> str [N] ({} when none)."""
        return {a: self.meta[a].to_numpy(dtype=str) for a in self.attribute_names}


def load_dataset(path: str | os.PathLike, mmap: bool = False) -> Dataset:
    """Read a dataset directory written by :func:`write_dataset` or the ingestion.

    ``mmap=True`` maps the arrays read-only instead of loading them (large real datasets).
    A sharded dataset (:mod:`diffatlas.data.shards`: its directory or its index.json) reads
    as one, rows in shard order. Raises :class:`UserError` naming the missing or
    inconsistent file.
    """
    from diffatlas.data.shards import is_sharded, load_sharded

    if is_sharded(path):
        return load_sharded(path, mmap=mmap)
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"dataset directory not found: {path} (make it with `diffatlas make-dataset` or the make_dataset rule)")
    for name in (IMAGES, METADATA, INFO):
        if not (path / name).exists():
            raise UserError(f"dataset {path} is incomplete: {name} is missing")
    mode = "r" if mmap else None
    try:
        images = np.load(path / IMAGES, mmap_mode=mode, allow_pickle=False)
        masks = np.load(path / MASKS, mmap_mode=mode, allow_pickle=False) if (path / MASKS).exists() else None
        meta = pd.read_parquet(path / METADATA)
    except (ValueError, OSError) as err:
        raise UserError(f"dataset {path} cannot be read: {err}") from err
    info = read_json(path / INFO)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"{path / IMAGES} must hold uint8 [N, H, W, 3], found {images.dtype} {images.shape}")
    if len(meta) != images.shape[0]:
        raise UserError(f"dataset {path}: {METADATA} has {len(meta)} rows but {IMAGES} has {images.shape[0]} images")
    if masks is not None and (masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[1:3]):
        raise UserError(f"dataset {path}: {MASKS} shape {masks.shape} does not match images {images.shape}")
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise UserError(f"dataset {path}: {METADATA} lacks columns {missing}")
    attributes = check_attribute_names(info.get(ATTRIBUTES), f"dataset {path} {INFO} {ATTRIBUTES!r}")
    missing = [a for a in attributes if a not in meta.columns]
    if missing:
        raise UserError(f"dataset {path}: {INFO} names attributes {missing} that {METADATA} lacks as columns; rebuild the dataset")
    return Dataset(path, images, masks, meta, info)

