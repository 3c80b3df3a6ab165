"""The streaming loader every trainer reads through: bounded memory, chunk-aware, prefetched.

A *source* is one (layer, timestep) of an activation store seen as N samples (store rows),
each holding P items of one shape: pooled vectors (P = 1, item [C]), the positions of a
spatial map as vectors (P = h·w, item [C]) or whole maps (P = 1, item [C, h, w]). Sources are
read only in whole zarr chunks along the sample axis (:attr:`Source.chunk` samples), never
row by row.

* :class:`ShuffleLoader` draws training batches of items from a set of rows (the training
  split, chosen by sample id before any data is read). Per epoch it visits the chunks in a
  seeded order and fills a *shuffle buffer* of at most ``buffer`` items (at least one chunk)
  with whole chunks; the buffer is permuted with the generator and cut into batches; the
  items left over (fewer than a batch) join the next buffer. When the buffer holds the whole
  split it is read once and each epoch is ``randperm(M)`` over the items in row order — the
  batches an in-memory trainer draws from the same generator, so weights are identical on
  data that fits.
* :func:`iter_batches` streams given rows in their order, in batches of an exact size (for
  evaluation passes whose result depends on the batch boundaries, e.g. BatchNorm statistics).
* :func:`read_rows` gathers arbitrary rows (a small sample: the b_pre initialisation, a
  validation subset) reading each needed chunk once.
* :func:`cache_if_fits` reads a source into memory once when it is smaller than a budget, so
  small data (the demo) pays one decode, as before streaming.

Reading and batch assembly run on a background thread (:class:`Prefetcher`: a bounded queue,
the thread's exceptions re-raised in the consumer, a clean stop when the consumer leaves
early), so the device never waits for zarr.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffatlas.activations.store import ActivationStore
from diffatlas.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("pooled", "spatial", "maps")
"""pooled: one vector per sample; spatial: one vector per position of the stored map
(position-major, [h·w, C]); maps: the whole map [C, h, w] per sample."""

PREFETCH_DEPTH = 4
"""Batches assembled ahead of the consumer: enough to hide a chunk decode behind a few steps,
few enough that host memory stays a handful of batches beyond the shuffle buffer."""


class Source:
    """N samples × P items of shape ``item_shape``, stored in chunks of ``chunk`` samples.

    Subclasses implement :meth:`read` of a contiguous sample range ``[start, stop)``; callers
    only ask for ranges inside one chunk (or whole chunks).
    """

    n: int
    positions: int
    item_shape: tuple[int, ...]
    dtype: np.dtype
    chunk: int
    where: str = "memory"

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start:stop`` as an array [stop - start, P, *item_shape] in ``dtype``."""
        raise NotImplementedError

    @property
    def item_bytes(self) -> int:
        return int(np.prod(self.item_shape)) * np.dtype(self.dtype).itemsize

    def chunk_of(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64) // self.chunk

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk, min(self.n, (c + 1) * self.chunk)


class ArraySource(Source):
    """A source over an in-memory array x [N, P, *item] (``chunk`` only shapes the reads)."""

    def __init__(self, x: np.ndarray, chunk: int | None = None, where: str = "memory") -> None:
        self.x = x
        self.n, self.positions = int(x.shape[0]), int(x.shape[1])
        self.item_shape = tuple(int(s) for s in x.shape[2:])
        self.dtype = x.dtype
        self.chunk = max(1, int(chunk or self.n))
        self.where = where

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.x[start:stop]


class StoreSource(Source):
    """One (layer, timestep) of an :class:`ActivationStore` as a source of ``kind`` (see :data:`KINDS`)."""

    def __init__(self, store: ActivationStore, layer: str, timestep: int, kind: str) -> None:
        if kind not in KINDS:
            raise UserError(f"loader kind {kind!r} is not allowed; allowed: {', '.join(KINDS)}")
        if layer not in store.layers:
            raise UserError(f"layer {layer!r} is not in {store.path}; stored layers: {', '.join(store.layers)}")
        if kind != "pooled" and not store.has_spatial(layer):
            raise UserError(
                f"layer {layer!r} in {store.path} was extracted without spatial maps; layers with maps: "
                f"{', '.join(store.attrs.get('spatial_layers', [])) or 'none'}. Set extract.spatial: true "
                "(or list the layer in extract.spatial_layers) and re-run extract"
            )
        self.array, self._t = store.layer_array(layer, timestep, spatial=kind != "pooled")
        self.kind = kind
        self.n = int(self.array.shape[1])
        self.chunk = int(self.array.chunks[1])
        c = int(self.array.shape[2])
        if kind == "pooled":
            self.positions, self.item_shape = 1, (c,)
        elif kind == "spatial":
            self.positions, self.item_shape = int(self.array.shape[3] * self.array.shape[4]), (c,)
        else:
            self.positions, self.item_shape = 1, tuple(int(s) for s in self.array.shape[2:])
        self.dtype = np.dtype(self.array.dtype)
        self.where = f"{store.path}: layer {layer!r} at timestep {timestep} ({kind})"

    def read(self, start: int, stop: int) -> np.ndarray:
        block = np.asarray(self.array[self._t, start:stop])
        if self.kind == "pooled":
            return block[:, None, :]
        if self.kind == "spatial":  # [B, C, h, w] -> [B, h·w, C], a view: the caller's copy transposes
            b, c = block.shape[:2]
            return block.reshape(b, c, -1).transpose(0, 2, 1)
        return block[:, None]


class LastChunk(Source):
    """A source that keeps its last chunk read, for callers that visit a chunk a few rows at a
    time (e.g. per-sample passes over spatial maps); one chunk of memory. Not thread-safe."""

    def __init__(self, source: Source) -> None:
        self.inner = source
        self.n, self.positions, self.item_shape = source.n, source.positions, source.item_shape
        self.dtype, self.chunk, self.where = source.dtype, source.chunk, source.where
        self._last: tuple[int, int, np.ndarray] | None = None

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._last is None or self._last[:2] != (start, stop):
            self._last = (start, stop, self.inner.read(start, stop))
        return self._last[2]


def store_source(store: ActivationStore, layer: str, timestep: int, kind: str) -> StoreSource:
    """The source of ``layer`` at ``timestep`` of ``store`` (UserError naming what is stored)."""
    return StoreSource(store, layer, timestep, kind)


def cache_if_fits(source: Source, max_items: int) -> Source:
    """The source itself, or (when it holds at most ``max_items`` items) an in-memory copy read once."""
    if isinstance(source, ArraySource) or source.n * source.positions > max_items:
        return source
    parts = [source.read(*source.chunk_range(c)) for c in range(-(-source.n // source.chunk))]
    return ArraySource(np.concatenate(parts), chunk=source.chunk, where=source.where)


def _by_chunk(source: Source, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(chunk, rows of it in the given order) for each chunk holding some of ``rows``, in chunk order."""
    rows = np.asarray(rows, dtype=np.int64)
    chunks = source.chunk_of(rows)
    order = np.argsort(chunks, kind="stable")
    bounds = np.flatnonzero(np.diff(chunks[order])) + 1
    for part in np.split(order, bounds) if len(order) else []:
        yield int(chunks[part[0]]), part


def read_rows(source: Source, rows: np.ndarray) -> np.ndarray:
    """Samples ``rows`` (any order, repeats allowed) as [len(rows), P, *item], each chunk read once."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= source.n):
        raise IndexError(f"rows outside 0..{source.n - 1} of {source.where}")
    out = np.empty((len(rows), source.positions, *source.item_shape), dtype=source.dtype)
    for c, pos in _by_chunk(source, rows):
        start, stop = source.chunk_range(c)
        out[pos] = source.read(start, stop)[rows[pos] - start]
    return out


def read_items(source: Source, items: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Items ``items`` (indices into the flattened [len(rows)·P] items of ``rows``) as
    [len(items), *item]; each needed chunk is read once and only the asked items are kept."""
    items = np.asarray(items, dtype=np.int64)
    p = source.positions
    store_rows = np.asarray(rows, dtype=np.int64)[items // p]
    where = items % p
    out = np.empty((len(items), *source.item_shape), dtype=source.dtype)
    for c, pos in _by_chunk(source, store_rows):
        start, stop = source.chunk_range(c)
        out[pos] = source.read(start, stop)[store_rows[pos] - start, where[pos]]
    return out


# -- the background thread -----------------------------------------------------------------------
class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


class Prefetcher:
    """Runs an iterator on a background thread, ``depth`` items ahead of the consumer.

    Iterate it in the consumer; an exception raised by the producer is re-raised there, and
    :meth:`close` (also on leaving a ``with`` block or when the consumer stops early) stops
    the producer at its next item and joins the thread.
    """

    def __init__(self, produce: Callable[[], Iterable[Any]], depth: int = PREFETCH_DEPTH, name: str = "loader") -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._produce = produce
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._produce():
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(_Failure(err))

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                self.close()
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- batches ---------------------------------------------------------------------------------------
@dataclass
class Batch:
    """x: [B, *item] float32 (CPU; pinned when asked); rows: [B] store rows of the items; epoch: 0-based."""

    x: torch.Tensor
    rows: torch.Tensor
    epoch: int
    last: bool  # the last batch of its epoch


class ShuffleLoader:
    """Seeded, shuffled batches of the items of ``rows`` of ``source``, epoch after epoch.

    Args:
        source: where the items come from.
        rows: the sample rows to draw from (e.g. the training split), any order.
        batch_size: items per batch.
        generator: a ``torch.Generator`` owned by the loader from now on (all its draws happen
            on the loader's thread: per epoch a chunk order when the buffer is smaller than the
            split, and one ``randperm`` per buffer fill).
        buffer: items held in the shuffle buffer (at least one chunk is always read whole).
        drop_last: drop the items of an epoch that do not fill a last batch (else yield them
            as a smaller batch when there are at least ``min_batch``).
        scale: multiply items by this (in float32) as batches are made.
        epochs: stop after this many epochs (None: never; the consumer stops).
        pin_memory: pin batches (for non-blocking copies to a GPU).
    """

    def __init__(
        self,
        source: Source,
        rows: np.ndarray,
        batch_size: int,
        generator: torch.Generator,
        *,
        buffer: int,
        drop_last: bool = True,
        min_batch: int = 1,
        scale: float = 1.0,
        epochs: int | None = None,
        pin_memory: bool = False,
        depth: int = PREFETCH_DEPTH,
    ) -> None:
        self.source = source
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.batch_size = int(batch_size)
        self.gen = generator
        self.buffer = max(1, int(buffer))
        self.drop_last, self.min_batch = drop_last, max(1, int(min_batch))
        self.scale = float(scale)
        self.epochs = epochs
        self.pin_memory = pin_memory
        self.depth = depth
        self._chunks = list(_by_chunk(source, self.rows))  # (chunk, positions into self.rows)
        self.n_items = len(self.rows) * source.positions
        self.resident = self.n_items <= self.buffer
        self._prefetcher: Prefetcher | None = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.n_items, self.batch_size)
        return full + (0 if self.drop_last or rest < self.min_batch else 1)

    # The carried items, then those of a set of chunks in row order within each chunk, written
    # once into one new array: ([m, *item] tensor, [m] rows).
    def _read(
        self, chunks: list[tuple[int, np.ndarray]], carry: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p, item = self.source.positions, self.source.item_shape
        k = 0 if carry is None else len(carry[0])
        m = k + sum(len(pos) for _, pos in chunks) * p
        x = np.empty((m, *item), dtype=self.source.dtype)
        r = np.empty(m, dtype=np.int64)
        if carry is not None:
            x[:k], r[:k] = carry[0].numpy(), carry[1].numpy()
        off = k
        for c, pos in chunks:
            rows = self.rows[pos]
            start, stop = self.source.chunk_range(c)
            block = self.source.read(start, stop)
            if len(rows) != stop - start:  # some rows of the chunk are not ours (rows are sorted)
                block = block[rows - start]
            size = len(rows) * p
            x[off : off + size].reshape(len(rows), p, *item)[...] = block
            r[off : off + size] = np.repeat(rows, p)
            off += size
        return torch.from_numpy(x), torch.from_numpy(r)

    def _batch(self, x: torch.Tensor, r: torch.Tensor, idx: torch.Tensor, epoch: int, last: bool) -> Batch:
        xb = x[idx].to(torch.float32)
        if self.scale != 1.0:
            xb.mul_(self.scale)
        if self.pin_memory:
            xb = xb.pin_memory()
        return Batch(xb, r[idx], epoch, last)

    def _produce(self) -> Iterator[Batch]:
        b = self.batch_size
        resident = self._read(self._chunks) if self.resident and self._chunks else None
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            if resident is not None:
                windows: Iterable[Any] = [resident]
            else:
                order = torch.randperm(len(self._chunks), generator=self.gen).tolist()
                windows = self._windows([self._chunks[i] for i in order])
            carry: tuple[torch.Tensor, torch.Tensor] | None = None
            pending: Batch | None = None
            for window in windows:
                x, r = window if resident is not None else self._read(window, carry)
                perm = torch.randperm(len(x), generator=self.gen)
                full = len(x) // b
                for j in range(full):
                    if pending is not None:
                        yield pending
                    pending = self._batch(x, r, perm[j * b : (j + 1) * b], epoch, False)
                rest = perm[full * b :]
                carry = (x[rest], r[rest]) if len(rest) else None
            if carry is not None and not self.drop_last and len(carry[0]) >= self.min_batch:
                if pending is not None:
                    yield pending
                pending = self._batch(carry[0], carry[1], torch.arange(len(carry[0]), device="cpu"), epoch, False)  # host-side indices
            if pending is None:
                raise UserError(
                    f"{self.source.where}: {self.n_items} items are fewer than one batch of {b}; lower the batch size"
                )
            pending.last = True
            yield pending
            epoch += 1

    def _windows(self, chunks: list[tuple[int, np.ndarray]]) -> Iterator[list[tuple[int, np.ndarray]]]:
        """Consecutive runs of chunks holding at most ``buffer`` items (at least one chunk each)."""
        window, size = [], 0
        p = self.source.positions
        for entry in chunks:
            m = len(entry[1]) * p
            if window and size + m > self.buffer:
                yield window
                window, size = [], 0
            window.append(entry)
            size += m
        if window:
            yield window

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        self._prefetcher = Prefetcher(self._produce, self.depth, name="shuffle-loader")
        return iter(self._prefetcher)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __enter__(self) -> "ShuffleLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def iter_batches(
    source: Source, rows: np.ndarray, batch_size: int, *, scale: float = 1.0, prefetch: bool = True
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Samples ``rows`` in their given order, ``batch_size`` samples at a time (the last may be
    smaller): (rows [B], x [B, P, *item] float32 × scale). Each chunk is read once when ``rows``
    visit chunks in order (sorted rows); otherwise a chunk may be read again for each visit."""
    rows = np.asarray(rows, dtype=np.int64)

    def produce() -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        cached: tuple[int, np.ndarray] | None = None
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            out = np.empty((len(part), source.positions, *source.item_shape), dtype=source.dtype)
            for c, pos in _by_chunk(source, part):
                if cached is None or cached[0] != c:
                    cached = (c, source.read(*source.chunk_range(c)))
                out[pos] = cached[1][part[pos] - c * source.chunk]
            x = torch.from_numpy(out).to(torch.float32)
            if scale != 1.0:
                x.mul_(scale)
            yield part, x

    if not prefetch:
        yield from produce()
        return
    with Prefetcher(produce, name="batch-reader") as pf:
        yield from pf


@dataclass
class Moments:
    """Sums over the items of some rows: count, Σ|v|² (float64), and the rows holding NaN/Inf."""

    count: int
    sum_sq: float
    nonfinite_rows: np.ndarray  # store rows with a non-finite value (over all rows scanned)
    n_nonfinite: int


def scan(source: Source, rows: np.ndarray, check_rows: np.ndarray | None = None) -> Moments:
    """One chunk-ordered pass: Σ|v|² over the items of ``rows`` (float64, per chunk, so no
    float64 copy of the data) and the rows of ``check_rows`` (default: every row) with NaN/Inf."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    check = np.arange(source.n) if check_rows is None else np.sort(np.asarray(check_rows, dtype=np.int64))
    want = np.zeros(source.n, bool)
    want[rows] = True
    total, count, bad, n_bad = 0.0, 0, [], 0
    visit = np.union1d(rows, check)
    for part, x in iter_batches(source, visit, source.chunk, prefetch=False):
        flat = x.reshape(len(part), -1)
        finite = torch.isfinite(flat)
        ok = finite.all(1).numpy()
        if not ok.all():
            in_check = np.isin(part, check)
            bad.append(part[~ok & in_check])
            n_bad += int((~finite[torch.from_numpy(in_check)]).sum())
        sel = want[part] & ok
        if sel.any():
            v = x[torch.from_numpy(sel)].reshape(-1, *source.item_shape).double()
            total += float((v * v).sum())
            count += int(v.shape[0])
    return Moments(count, total, np.concatenate(bad) if bad else np.zeros(0, np.int64), n_bad)
