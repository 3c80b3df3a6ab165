"""Train / validation / test split by sample, stratified, shared by Diff-C and the probe.

Stratification uses the joint label of every requested granularity (fine and coarse), so
the split is stratified for both at once. Each stratum gets its share of the test and
validation sets by largest remainders, so the totals are exactly round(N * fraction), and
every stratum keeps at least one training sample: a class too small to appear in the test
split is then reported by the metrics instead of breaking the split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    """Sample positions (rows of the store, not sample ids) of each part, sorted."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def assignment(self, n: int) -> np.ndarray:
        """[n] array of 'train' / 'val' / 'test' per row."""
        out = np.empty(n, dtype=object)
        out[self.train], out[self.val], out[self.test] = "train", "val", "test"
        return out


def _allocate(counts: np.ndarray, caps: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` units over strata in proportion to ``counts``, at most ``caps`` each.

    Floors of the proportional quotas first, then the remaining units one by one to the
    strata with the largest remainders (ties broken by ``rng``), skipping full strata.
    """
    total = int(min(total, caps.sum()))
    quota = counts * (total / max(counts.sum(), 1))
    alloc = np.minimum(np.floor(quota).astype(np.int64), caps)
    remainder = quota - np.floor(quota)
    order = np.lexsort((rng.random(len(counts)), -remainder))
    while alloc.sum() < total:
        progressed = False
        for i in order:
            if alloc.sum() >= total:
                break
            if alloc[i] < caps[i]:
                alloc[i] += 1
                progressed = True
        if not progressed:
            break
    return alloc


def stratified_split(
    strata_labels: Sequence[np.ndarray],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Split:
    """Stratified split of N samples by the joint value of ``strata_labels`` (each [N]).

    Deterministic for a given seed and labels.
    """
    n = len(strata_labels[0])
    joint = np.asarray(["\x1f".join(map(str, row)) for row in zip(*strata_labels)], dtype=object)
    strata, inverse = np.unique(joint, return_inverse=True)
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.nonzero(inverse == s)[0]) for s in range(len(strata))]
    counts = np.asarray([len(m) for m in members], np.int64)

    n_test = _allocate(counts, counts - 1, int(round(n * test_fraction)), rng)
    n_val = _allocate(counts, counts - 1 - n_test, int(round(n * val_fraction)), rng)
    train, val, test = [], [], []
    for m, t, v in zip(members, n_test, n_val):
        test.extend(m[:t])
        val.extend(m[t : t + v])
        train.extend(m[t + v :])
    as_idx = lambda xs: np.sort(np.asarray(xs, dtype=np.int64))  # noqa: E731
    return Split(train=as_idx(train), val=as_idx(val), test=as_idx(test))
