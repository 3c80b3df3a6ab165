"""The streaming loader against brute force: every training item exactly once per epoch, never a
validation one; whole-chunk reads only; the whole-split buffer equals the in-memory permutation;
the background thread hands over its errors and stops cleanly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffatlas.activations.loader import (
    ArraySource,
    Prefetcher,
    ShuffleLoader,
    cache_if_fits,
    iter_batches,
    read_items,
    read_rows,
    scan,
    store_source,
)
from diffatlas.activations.store import ActivationStore, LayerSpec, open_writer
from diffatlas.sae.train import split_samples

torch.set_num_threads(1)

N, C, HW, CHUNK = 203, 3, 2, 32  # an uneven last chunk


def _values(n=N):
    """Values that name their place and survive float16: channel 0 = row, channel 1 = position
    in the map (pooled: 0), channel 2 = row mod 7."""
    rows = np.arange(n, dtype=np.float32)
    pos = np.arange(HW * HW, dtype=np.float32).reshape(HW, HW)
    maps = np.zeros((n, C, HW, HW), np.float32)
    maps[:, 0] = rows[:, None, None]
    maps[:, 1] = pos[None]
    maps[:, 2] = (rows % 7)[:, None, None]
    pooled = np.stack([rows, np.zeros(n, np.float32), rows % 7], axis=1)
    return pooled, maps


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "s.zarr"
    pooled, maps = _values()
    with open_writer(path, timesteps=[5], alpha_bar=[0.5], sample_ids=list(range(1000, 1000 + N)), labels=["a"] * N,
                     coarse_labels=None, layers=[LayerSpec("mid", "mid_block", C, HW, HW, True)], attrs={},
                     batch_size=CHUNK) as w:
        w.write("mid", 0, 0, pooled, maps)
    return ActivationStore(path)


class Counting(ArraySource):
    """An in-memory source that records every read and insists it is one whole chunk."""

    def __init__(self, x, chunk):
        super().__init__(x, chunk)
        self.reads: list[tuple[int, int]] = []

    def read(self, start, stop):
        assert start % self.chunk == 0 and stop == min(self.n, start + self.chunk), (start, stop)
        self.reads.append((start, stop))
        return super().read(start, stop)


def _split():
    is_val = split_samples(N, 0.25, 7)
    return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


def _epochs(loader, n_epochs):
    """Per epoch: the rows seen, and every batch's x next to its rows."""
    seen = [[] for _ in range(n_epochs)]
    pairs = [[] for _ in range(n_epochs)]
    for batch in loader:
        seen[batch.epoch].append(batch.rows.numpy())
        pairs[batch.epoch].append((batch.x.numpy(), batch.rows.numpy()))
    return [np.concatenate(s) for s in seen], pairs


@pytest.mark.parametrize("kind", ["pooled", "spatial", "maps"])
@pytest.mark.parametrize("buffer", [10, 70, 100_000])  # under a chunk, a few chunks, the whole split
def test_every_training_item_once_per_epoch_and_never_validation(store, kind, buffer):
    train, val = _split()
    src = store_source(store, "mid", 5, kind)
    loader = ShuffleLoader(src, train, 16, torch.Generator().manual_seed(3), buffer=buffer, drop_last=False, epochs=3)
    seen, pairs = _epochs(loader, 3)
    for rows in seen:  # brute-force count per store row
        counts = np.bincount(rows, minlength=N)
        assert (counts[train] == src.positions).all() and (counts[val] == 0).all()
    for epoch in pairs:
        for x, rows in epoch:  # the values are those of the rows named with them
            np.testing.assert_array_equal(x.reshape(len(x), -1)[:, 0], rows)
        if kind == "spatial":  # every (row, position) exactly once per epoch
            items = sorted((int(v[0]), int(v[1])) for x, _ in epoch for v in x)
            assert items == sorted((int(r), p) for r in train for p in range(HW * HW))
    assert N % CHUNK != 0  # the uneven last chunk is part of the test


def test_drop_last_keeps_full_batches_and_loses_less_than_one(store):
    train, val = _split()
    src = store_source(store, "mid", 5, "pooled")
    loader = ShuffleLoader(src, train, 16, torch.Generator().manual_seed(0), buffer=40, epochs=2)
    assert loader.batches_per_epoch == len(train) // 16
    per_epoch = [0, 0]
    for batch in loader:
        assert len(batch.rows) == 16
        per_epoch[batch.epoch] += 1
        assert not np.isin(batch.rows.numpy(), val).any()
    assert per_epoch == [len(train) // 16] * 2


def test_whole_split_buffer_is_the_in_memory_permutation(store):
    """The oracle is the pre-loader trainer's draw: x_train = train vectors in row order, then
    randperm(M) per epoch from the same generator, batches perm[jB:(j+1)B], the rest dropped."""
    train, _ = _split()
    pooled, _ = _values()
    x_train = torch.from_numpy(pooled[train] * np.float32(0.37))
    ref_gen = torch.Generator().manual_seed(11)
    ref = []
    for _ in range(3):
        perm = torch.randperm(len(train), generator=ref_gen)
        ref += [x_train[perm[j * 20 : (j + 1) * 20]] for j in range(len(train) // 20)]
    loader = ShuffleLoader(store_source(store, "mid", 5, "pooled"), train, 20, torch.Generator().manual_seed(11),
                           buffer=len(train), scale=0.37, epochs=3)
    got = [b.x for b in loader]
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_reads_are_whole_chunks_once_per_window_and_shuffle_across_chunks():
    pooled, _ = _values()
    train, _ = _split()
    src = Counting(pooled[:, None, :], CHUNK)
    loader = ShuffleLoader(src, train, 8, torch.Generator().manual_seed(1), buffer=3 * CHUNK, epochs=2)
    batches = list(loader)
    n_chunks = -(-N // CHUNK)
    assert len(src.reads) == 2 * n_chunks  # each chunk once per epoch, nothing else
    mixed = [len(np.unique(b.rows.numpy() // CHUNK)) for b in batches]
    assert max(mixed) > 1  # batches draw from several chunks
    # same seed, same batches (the thread does not change the order); another seed differs
    again = [b.rows for b in ShuffleLoader(src, train, 8, torch.Generator().manual_seed(1), buffer=3 * CHUNK, epochs=2)]
    other = [b.rows for b in ShuffleLoader(src, train, 8, torch.Generator().manual_seed(2), buffer=3 * CHUNK, epochs=2)]
    assert all(torch.equal(a.rows, b) for a, b in zip(batches, again))
    assert not all(torch.equal(a.rows, b) for a, b in zip(batches, other))


def test_read_rows_items_and_ordered_batches_match_indexing():
    pooled, maps = _values()
    x = maps.reshape(N, C, -1).transpose(0, 2, 1).copy()  # [N, P, C]
    src = Counting(x, CHUNK)
    rows = np.random.default_rng(0).integers(0, N, size=50)  # any order, repeats
    np.testing.assert_array_equal(read_rows(src, rows), x[rows])
    assert len(src.reads) == len(np.unique(rows // CHUNK))
    some = np.sort(rows[:20])
    items = np.array([0, 5, 3, 79, 40])
    src.reads.clear()
    np.testing.assert_array_equal(read_items(src, items, some), x[some].reshape(-1, C)[items])
    assert len(src.reads) == len(np.unique(some[items // (HW * HW)] // CHUNK))  # only the chunks holding them
    src.reads.clear()
    got = list(iter_batches(src, np.arange(N), 50, scale=2.0))
    assert [len(r) for r, _ in got] == [50, 50, 50, 50, 3]
    np.testing.assert_array_equal(torch.cat([b for _, b in got]).numpy(), (x * 2).astype(np.float32))
    assert len(src.reads) == -(-N // CHUNK)


def test_scan_sums_and_finds_nonfinite_rows():
    pooled, _ = _values()
    pooled = pooled.copy()
    pooled[[7, 150], 1] = [np.nan, np.inf]
    src = ArraySource(pooled[:, None, :], CHUNK)
    train, _ = _split()
    m = scan(src, train)
    assert sorted(m.nonfinite_rows.tolist()) == [7, 150] and m.n_nonfinite == 2
    ok = train[~np.isin(train, [7, 150])]
    assert m.count == len(ok)
    assert m.sum_sq == pytest.approx(float((pooled[ok].astype(np.float64) ** 2).sum()), rel=1e-12)


def test_cache_if_fits(store):
    src = store_source(store, "mid", 5, "spatial")
    assert cache_if_fits(src, N * 4 - 1) is src
    cached = cache_if_fits(src, N * 4)
    assert isinstance(cached, ArraySource)
    np.testing.assert_array_equal(cached.x, read_rows(src, np.arange(N)))


def test_errors_on_the_thread_reach_the_consumer_and_early_exit_stops_it():
    pooled, _ = _values()

    class Broken(ArraySource):
        def read(self, start, stop):
            if start >= 2 * CHUNK:
                raise OSError(f"chunk at {start} is missing")
            return super().read(start, stop)

    loader = ShuffleLoader(Broken(pooled[:, None], CHUNK), np.arange(N), 8, torch.Generator().manual_seed(0), buffer=CHUNK)
    consumed = 0
    with pytest.raises(OSError, match="is missing"):
        for _ in loader:
            consumed += 1
    assert consumed <= 2 * CHUNK // 8  # only batches of the two readable chunks came through
    assert not loader._prefetcher._thread.is_alive()  # the failed producer is joined
    loader = ShuffleLoader(ArraySource(pooled[:, None], CHUNK), np.arange(N), 8, torch.Generator().manual_seed(0), buffer=CHUNK)
    for i, _ in enumerate(loader):  # endless epochs: the consumer stops
        if i == 3:
            break
    thread = loader._prefetcher._thread
    assert thread.is_alive()  # blocked on its full queue
    loader.close()
    assert not thread.is_alive()
    with Prefetcher(lambda: iter(range(10**9)), depth=2) as pf:
        assert next(iter(pf)) == 0
    assert not pf._thread.is_alive()
