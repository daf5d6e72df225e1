"""Which entries form each rank's batches: one pure function of the counts, the seed and
the epoch, which the streamed loader and the device cache both consume (mosaicml
streaming's ``partition/``: one function, many consumers).

An epoch's *entries* are the split's samples in manifest order, each followed by its extra
entries (:class:`ccat.data.pipeline.Extra`, sorted by dropped modality); an entry's *id* is
its position in that list. :func:`epoch_partition` deals them to ranks as the module
docstring of :mod:`ccat.data.pipeline` describes: the shards in a seeded order read as one
sequence from a seeded offset, rank r's run of it, then its shuffle buffer. The streamed
path reads a rank's :attr:`Partition.runs` front to back and batches positions in them; the
device cache gathers :meth:`Partition.batches` by id. So both give the same keys in the
same batches, and only how a batch is decoded and augmented differs between them.

Nothing here reads a file or a tensor: counts in, integer arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# First words of the seeds, so the draws of the shard order, the shuffle buffer and the
# augmentation (pipeline.AUGMENT_SEED) never share a stream.
ORDER_SEED, BUFFER_SEED = 0, 1
NO_DROP = -1  # the dropped modality of an entry that keeps every modality


@dataclass(frozen=True)
class Run:
    """Entries ``start..stop - 1`` of shard ``shard`` (its index in the counts), at
    ``first..`` of a rank's sequence."""

    shard: int
    start: int
    stop: int
    first: int


@dataclass(frozen=True)
class Partition:
    """Per rank: the runs it reads, in order (its sequence), and the positions in that
    sequence its batches take, batch after batch."""

    counts: tuple[int, ...]  # entries per shard, manifest order
    runs: tuple[tuple[Run, ...], ...]  # [rank] -> runs in read order
    order: tuple[np.ndarray, ...]  # [rank] -> positions, in the order batches take them
    batch: int

    def num_batches(self, rank: int) -> int:
        return -(-len(self.order[rank]) // self.batch)

    def sequence(self, rank: int) -> np.ndarray:
        """Entry ids of rank ``rank``'s sequence, in read order."""
        first = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        parts = [np.arange(first[r.shard] + r.start, first[r.shard] + r.stop)
                 for r in self.runs[rank]]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def positions(self, rank: int, index: int) -> np.ndarray:
        """Positions in rank ``rank``'s sequence of its batch ``index``."""
        return self.order[rank][index * self.batch:(index + 1) * self.batch]

    def batches(self, rank: int) -> list[np.ndarray]:
        """Entry ids of each of rank ``rank``'s batches (only a last one may be short)."""
        ids = self.sequence(rank)[self.order[rank]]
        return [ids[start:start + self.batch] for start in range(0, len(ids), self.batch)]

    def ids(self) -> np.ndarray:
        """Entry ids as [rank, batch, B], where every rank runs the same full batches."""
        return np.stack([np.stack(self.batches(r)) for r in range(len(self.runs))])


def full_batches(total: int, ranks: int, batch: int) -> int:
    """Full batches every rank runs in a training epoch of ``total`` entries."""
    return total // (ranks * batch)


def epoch_partition(counts: Sequence[int], seed: int, epoch: int, ranks: int, batch: int,
                    buffer: int) -> Partition:
    """A training epoch of the entries (``counts`` per shard, manifest order): the shards in
    the order seeded by (seed, epoch), read as one sequence from a seeded offset, wrapping;
    rank r takes the r-th run of K x batch entries (K = :func:`full_batches`), passed once
    through a shuffle buffer of ``buffer``. The last rank's runs also hold the dropped
    remainder, so that a reader checks every shard's count every epoch."""
    total = int(sum(counts))
    per_rank = full_batches(total, ranks, batch) * batch
    if per_rank < 1:
        raise ValueError(f"{total} entries are fewer than one batch of {batch} for each of "
                         f"{ranks} ranks")
    rng = np.random.default_rng([ORDER_SEED, seed, epoch])
    shards = [int(i) for i in rng.permutation(len(counts))]
    start = int(rng.integers(total))
    runs, order = [], []
    for rank in range(ranks):
        length = per_rank if rank < ranks - 1 else total - rank * per_rank
        runs.append(tuple(cut(counts, shards, start + rank * per_rank, length)))
        order.append(buffer_order(per_rank, buffer,
                                  np.random.default_rng([BUFFER_SEED, seed, epoch, rank])))
    return Partition(tuple(int(c) for c in counts), tuple(runs), tuple(order), batch)


def eval_partition(counts: Sequence[int], ranks: int, batch: int) -> Partition:
    """Evaluation: rank r reads entries ``r * N // ranks`` to ``(r + 1) * N // ranks - 1``
    in manifest order and batches them in that order (its last batch may be short)."""
    total = int(sum(counts))
    runs, order = [], []
    for rank in range(ranks):
        begin, end = rank * total // ranks, (rank + 1) * total // ranks
        runs.append(tuple(cut(counts, range(len(counts)), begin, end - begin)))
        order.append(np.arange(end - begin))
    return Partition(tuple(int(c) for c in counts), tuple(runs), tuple(order), batch)


def cut(counts: Sequence[int], shards: Sequence[int], begin: int, length: int) -> list[Run]:
    """``length`` entries of ``shards`` (indices into ``counts``) read one after another,
    from entry ``begin`` of that sequence on, wrapping from the last shard to the first."""
    size = [counts[s] for s in shards]
    if length == 0:
        return []
    index, start = 0, begin % sum(size)
    while start >= size[index]:
        start -= size[index]
        index += 1
    runs, first = [], 0
    while first < length:
        take = min(size[index] - start, length - first)
        if take > 0:
            runs.append(Run(shards[index], start, start + take, first))
        first, start, index = first + take, 0, (index + 1) % len(shards)
    return runs


def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``size`` emits items 0..n-1 streamed into it:
    each arrival past the first ``size`` replaces a random resident, which leaves; at the
    end of the pass the residents leave in a random order (no second pass refills it).

    Computed without simulating the buffer: the resident a pick of slot s evicts is the
    item its previous pick of s brought in (or s itself, at s's first pick)."""
    size = max(1, min(size, n))
    picks = rng.integers(size, size=max(0, n - size))
    residents, out = np.arange(min(size, n)), np.empty(len(picks), np.int64)
    if len(picks):
        by_slot = np.argsort(picks, kind="stable")  # each slot's picks, in time order
        slots, arrived = picks[by_slot], size + by_slot  # arrived: the item a pick brings
        first = np.concatenate([[True], slots[1:] != slots[:-1]])
        out[by_slot] = np.where(first, slots, np.concatenate([[0], arrived[:-1]]))
        last = np.concatenate([slots[1:] != slots[:-1], [True]])
        residents[slots[last]] = arrived[last]
    tail = residents.tolist()
    rng.shuffle(tail)  # a list, as the buffer always was: the same draws
    return np.concatenate([out, np.array(tail, np.int64)])


def entry_counts(samples: Sequence[int], extra_index: np.ndarray) -> list[int]:
    """Entries per shard: its ``samples`` plus the extra entries of its samples
    (``extra_index``: each extra's sample, by position in the split)."""
    shard = np.searchsorted(np.cumsum(samples), extra_index, side="right")
    extra = np.bincount(shard, minlength=len(samples))
    return [int(n) + int(e) for n, e in zip(samples, extra)]


def entry_table(num_samples: int, extra_index: np.ndarray,
                extra_drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sample, dropped modality) of every entry id: each sample (NO_DROP) followed by its
    extra entries, in the order of their dropped modality's position."""
    sample = np.concatenate([np.arange(num_samples), extra_index]).astype(np.int64)
    drop = np.concatenate([np.full(num_samples, NO_DROP), extra_drop]).astype(np.int64)
    order = np.lexsort((drop, sample))
    return sample[order], drop[order]
