"""Shards -> decoded, augmented batches for one rank (open_clip's stage list).

The guarantee, per epoch, computed from the manifest's sample counts alone:

- Training: every rank runs ``num_train_batches`` = floor(N / (world x batch)) full
  batches. The remainder, N mod (world x batch) samples, is **dropped** for that epoch,
  and every other training sample is drawn exactly once over all ranks and workers.
  Which samples are dropped changes with the epoch.
- The order is seeded by (seed, epoch) and differs per epoch: the shards are put in a
  seeded order and read as one sequence, started at a seeded offset (so the dropped
  remainder falls anywhere); rank r takes the r-th run of ``num_train_batches x batch``
  samples of it. Shards are read sequentially, front to back (one split between two runs
  is read by both, each seeking past the other's part). A rank's samples pass once through
  a shuffle buffer of ``data.shuffle_buffer`` that is flushed at the end of the pass.
  Which entries form which batches is :func:`ccat.data.partition.epoch_partition`, a pure
  function that the device cache consumes too (:func:`plan_epoch`), so both loaders give
  the same keys in the same batches.
- Workers split a rank's batches, not its samples: batch j is made by worker
  j % workers, which reads the rank's sequence and seeks past the samples of other
  workers' batches. With DataLoader's in-order round robin the batches, their order and
  their augmentation (seeded per batch) are the same for any ``data.workers``.
- Extra entries (``extras``, named by a method for one epoch: :class:`Extra`): the epoch
  is the split once plus those entries, each a sample read again with one modality left
  out (``Batch.drop``). In the sequence each sample's extra entries follow it (read once,
  decoded per entry), and the counts, the cut between ranks and the dropped remainder
  are those of the N + E entries: every rank runs floor((N + E) / (world x batch))
  batches, and every entry but the remainder is drawn exactly once. Without extras the
  epoch is exactly the one described above.
- Evaluation: rank r reads the r-th of ``world`` near-equal runs of the split in manifest
  order, so every sample is seen exactly once over all ranks; only the last batch of a
  rank may be short.
- Checks (:mod:`ccat.data.integrity`): shard sizes before the epoch (``data.verify``),
  each shard's keys and labels against the membership its fingerprint covers, its sample
  count and every decode while reading. A failure, a worker that dies, or one that sends
  nothing for ``WORKER_STALL_S`` seconds ends the iteration in the main process with a
  :class:`ShardError` naming the shard and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

from ccat.config import DataConfig
from ccat.data import kinds, partition, spec
from ccat.data.integrity import ShardError, decode_checked, read_shard, verify_shards
from ccat.data.kinds import EVAL_CROP_FRACTION, PAD_ID
from ccat.data.partition import NO_DROP  # Batch.drop of an entry that keeps every modality
from ccat.data.reader import BuiltDataset, Sample
from ccat.errors import CcatError

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range


@dataclass
class Batch:
    """A batch: sample keys, labels (B,) and one input tensor per modality; each sample's
    position in its split (manifest order) where the loader knows it; and, in an epoch with
    extra entries, which modality each entry leaves out (its position in the manifest's
    modality order, ``NO_DROP`` for none)."""

    keys: list[str]
    label: torch.Tensor
    inputs: dict[str, torch.Tensor]
    index: torch.Tensor | None = None  # (B,) int64
    drop: torch.Tensor | None = None  # (B,) int64; None: an epoch without extra entries

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda x: x.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        return self._map(torch.Tensor.pin_memory)

    def _map(self, move: Any) -> Batch:
        return Batch(self.keys, move(self.label), {m: move(x) for m, x in self.inputs.items()},
                     None if self.index is None else move(self.index),
                     None if self.drop is None else move(self.drop))


@dataclass(frozen=True, order=True)
class Extra:
    """An entry a method adds to one training epoch (``Method.epoch_extras``): sample
    ``index`` of the training split (its position in manifest order, as ``Batch.index``)
    once more, with modality ``drop`` left out."""

    index: int
    drop: str


def crop_box(height: int, width: int, scale_min: float,
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w), drawn from ``rng``; center crop fallback."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


class Transform:
    """Per-sample arrays -> tensors, the view of each modality's kind (:mod:`ccat.data.kinds`;
    train: augment; eval: resize) built from the operations below (:class:`kinds.Views`).

    Pixels stay uint8 and spectrograms float16: the encoder normalizes and widens them on
    the device (:meth:`kinds.Kind.normalize`).
    """

    def __init__(self, modalities: dict[str, dict[str, Any]], cfg: DataConfig, train: bool):
        self.modalities = modalities
        self.cfg = cfg
        self.train = train
        self.kinds = {name: kinds.of(name, params) for name, params in modalities.items()}

    def __call__(self, sample: Sample, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return {name: self.kinds[name].view(self, sample.data[name], params, rng)
                for name, params in self.modalities.items()}

    def tensor(self, array: np.ndarray, dtype: type) -> torch.Tensor:
        """An array as a tensor of ``dtype``, unaugmented."""
        return torch.from_numpy(array.astype(dtype))

    def image(self, image: np.ndarray, size: int, rng: np.random.Generator) -> torch.Tensor:
        """uint8 [H, W, 3] of any size -> uint8 [3, size, size].

        Train: RandomResizedCrop + flip; eval: shorter side to size / EVAL_CROP_FRACTION,
        then the center size x size crop.
        """
        image = np.array(image)  # a writable copy: decoded images are read-only
        if self.train:
            return self.frames(image[None], size, rng)[0]
        return center_square(torch.from_numpy(image).permute(2, 0, 1), size)

    def frames(self, frames: np.ndarray, size: int, rng: np.random.Generator) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> uint8 [N, 3, size, size]; one crop per clip."""
        x = torch.from_numpy(frames).permute(0, 3, 1, 2)
        if self.train:
            top, left, h, w = crop_box(x.shape[2], x.shape[3], self.cfg.crop_scale_min, rng)
            x = TF.resized_crop(x, top, left, h, w, [size, size], antialias=True)
            if rng.random() < 0.5:
                x = x.flip(-1)
        elif tuple(x.shape[2:]) != (size, size):
            x = TF.resize(x, [size, size], antialias=True)
        return x


    def flow(self, snippets: np.ndarray, size: int, rng: np.random.Generator) -> torch.Tensor:
        """uint8 [N, 2 * stack, H, W] -> [N, 2 * stack, size, size]; one crop per clip.

        A flip mirrors the field left-right, so it also negates the horizontal component:
        u planes (even) become 255 - u, as TSN's GroupRandomHorizontalFlip(is_flow=True)
        inverts them (yjxiong/tsn-pytorch transforms.py)."""
        x = torch.from_numpy(np.array(snippets))
        if self.train:
            top, left, h, w = crop_box(x.shape[2], x.shape[3], self.cfg.crop_scale_min, rng)
            x = TF.resized_crop(x, top, left, h, w, [size, size], antialias=True)
            if rng.random() < 0.5:
                x = x.flip(-1)
                x[:, 0::2] = 255 - x[:, 0::2]
        elif tuple(x.shape[2:]) != (size, size):
            x = TF.resize(x, [size, size], antialias=True)
        return x


def center_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> [3, size, size]: shorter side to size / EVAL_CROP_FRACTION, then
    the center crop (the evaluation view of an image)."""
    x = TF.resize(image[None], round(size / EVAL_CROP_FRACTION), antialias=True)
    return TF.center_crop(x, [size, size])[0]


def collate(keys: list[str], labels: list[int], inputs: list[dict[str, torch.Tensor]],
            index: list[int] | None = None, drop: list[int] | None = None) -> Batch:
    """Stack each modality; token sequences (1-D, int64) are padded with PAD_ID to the
    batch's longest, and the encoder reads the attention mask back as ``ids != PAD_ID``."""
    stacked = {}
    for m in inputs[0]:
        items = [x[m] for x in inputs]
        if items[0].dim() == 1 and not items[0].is_floating_point():
            stacked[m] = torch.nn.utils.rnn.pad_sequence(items, batch_first=True,
                                                         padding_value=PAD_ID)
        else:
            stacked[m] = torch.stack(items)
    return Batch(list(keys), torch.tensor(labels, dtype=torch.long), stacked,
                 None if index is None else torch.tensor(index, dtype=torch.long),
                 None if drop is None else torch.tensor(drop, dtype=torch.long))


# First word of a batch's augmentation seed; partition's ORDER_SEED and BUFFER_SEED are 0
# and 1, so that the shard order, the shuffle buffer and the augmentation never share a stream.
AUGMENT_SEED = 2
WORKER_STALL_S = 300  # a worker that sends no batch for this long ends the run


def _full_batches(dataset: BuiltDataset, split: str, batch_size: int, world: int,
                  extras: int = 0) -> int:
    count = partition.full_batches(dataset.num_samples(split) + extras, world, batch_size)
    if count < 1:
        raise CcatError(f"split {split!r} of {dataset.root} has {dataset.num_samples(split)} "
                        f"samples, fewer than one batch for each of {world} process(es) "
                        f"({world} x data.batch_size {batch_size}); lower data.batch_size")
    return count


def num_train_batches(dataset: BuiltDataset, batch_size: int, world: int,
                      extras: int = 0) -> int:
    """Full batches every rank runs per epoch of the training split plus ``extras`` extra
    entries; the remainder, fewer than world x batch entries, is dropped (see the module
    docstring)."""
    return _full_batches(dataset, "train", batch_size, world, extras)


def extra_codes(dataset: BuiltDataset, split: str,
                extras: Sequence[Extra]) -> tuple[np.ndarray, np.ndarray]:
    """``extras`` as (sample index, dropped modality's position) arrays, sorted, so that the
    epoch does not depend on the order a method lists them in."""
    names, total = list(dataset.modalities), dataset.num_samples(split)
    for extra in extras:
        if not 0 <= extra.index < total or extra.drop not in names:
            raise ValueError(f"extra entry {extra} names no sample of split {split!r} "
                             f"(0..{total - 1}) or no modality of the data ({names})")
    pairs = sorted((e.index, names.index(e.drop)) for e in extras)
    codes = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return codes[:, 0], codes[:, 1]


@dataclass(frozen=True)
class EpochPlan:
    """A split's epoch for every rank, as both loaders read it: the partition of its
    entries (:mod:`ccat.data.partition`), the shards its counts are, and what each entry
    id is."""

    shards: list[spec.ShardInfo]  # manifest order, as the partition's counts
    partition: partition.Partition
    sample: np.ndarray  # entry id -> its sample's position in the split (manifest order)
    drop: np.ndarray | None  # entry id -> dropped modality's position; None: no extras

    def entry(self, run: partition.Run, at: int) -> tuple[int, int]:
        """(sample in the shard, dropped modality) of entry ``at`` of ``run``'s shard."""
        entry = self._first_entry[run.shard] + at
        drop = NO_DROP if self.drop is None else int(self.drop[entry])
        return int(self.sample[entry]) - self._first_sample[run.shard], drop

    @functools.cached_property
    def _first_entry(self) -> list[int]:
        return list(itertools.accumulate(self.partition.counts, initial=0))

    @functools.cached_property
    def _first_sample(self) -> list[int]:
        return list(itertools.accumulate((s.num_samples for s in self.shards), initial=0))


def plan_epoch(dataset: BuiltDataset, split: str, cfg: DataConfig, *, train: bool, seed: int,
               epoch: int, world: int, extras: Sequence[Extra] = ()) -> EpochPlan:
    """The epoch of ``split`` that the streamed path and the device cache both serve.
    Training: the split's samples, each followed by its ``extras``, dealt by
    :func:`partition.epoch_partition`; evaluation: :func:`partition.eval_partition`."""
    shards = spec.shards_of(dataset.manifest, split)
    samples = [s.num_samples for s in shards]
    if not train:
        return EpochPlan(shards, partition.eval_partition(samples, world, cfg.batch_size),
                         np.arange(sum(samples)), None)
    _full_batches(dataset, split, cfg.batch_size, world, len(extras))
    index, drop = extra_codes(dataset, split, extras)
    sample, drops = partition.entry_table(sum(samples), index, drop)
    counts = partition.entry_counts(samples, index)
    part = partition.epoch_partition(counts, seed, epoch, world, cfg.batch_size,
                                     cfg.shuffle_buffer)
    return EpochPlan(shards, part, sample, drops if extras else None)


class Read(NamedTuple):
    """One entry of a rank's sequence, read: the sample's bytes, its position in the
    split and the modality the entry drops."""

    shard: str
    key: str
    members: dict[str, bytes]
    index: int
    drop: int


@dataclass(frozen=True)
class LoaderFailure:
    """A worker's error on its way to the main process, where it is raised as itself."""

    message: str


@dataclass
class WorkerBug:
    """An error of a worker's own code (not a damaged shard) on its way to the main
    process, where it is raised as DataLoader raises one: its type, the worker's traceback
    in its message. Sent as an item, so that the RuntimeErrors DataLoader raises itself (a
    worker died or stalled) are the only ones :class:`WorkerLoader` reads as a failure."""

    error: ExceptionWrapper


class ShardStream(IterableDataset):
    """Batches of one split for one rank; see the module docstring for the contract."""

    def __init__(self, dataset: BuiltDataset, split: str, cfg: DataConfig, *, train: bool,
                 seed: int, epoch: int, rank: int, world: int,
                 transform: Transform | None = None, extras: Sequence[Extra] = ()):
        self.dataset, self.split, self.cfg = dataset, split, cfg
        self.train, self.seed, self.epoch = train, seed, epoch
        self.rank, self.world = rank, world
        self.transform = transform or Transform(dataset.modalities, cfg, train)
        self.plan = plan_epoch(dataset, split, cfg, train=train, seed=seed, epoch=epoch,
                               world=world, extras=extras)
        starts = itertools.accumulate((s.num_samples for s in self.plan.shards), initial=0)
        self.offsets = list(starts)  # each shard's first sample's position in the split

    def __iter__(self) -> Iterator[Batch | LoaderFailure | WorkerBug]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            yield from self._batches(range(worker, self.plan.partition.num_batches(self.rank),
                                           workers))
        except ShardError as err:
            yield LoaderFailure(str(err))
        except Exception:  # noqa: BLE001 - any other error is a bug, raised as itself
            if info is None:
                raise
            yield WorkerBug(ExceptionWrapper(where=f"in DataLoader worker process {worker}"))

    def _batches(self, mine: range) -> Iterator[Batch]:
        """Batches ``mine`` of the plan, each made once its entries have been read (they
        come in position order); then the rest of the rank's shards, to check their counts."""
        if not mine:
            return
        part = self.plan.partition
        reads = self._read(part.runs[self.rank],
                           {int(p) for j in mine for p in part.positions(self.rank, j)})
        held: dict[int, Read] = {}
        last = -1
        for j in mine:
            positions = part.positions(self.rank, j).tolist()
            while last < max(positions):
                last, read = next(reads)
                held[last] = read
            rng = np.random.default_rng([AUGMENT_SEED, self.seed, self.epoch, self.rank, j])
            yield self._collate([held.pop(p) for p in positions], rng)
        for _ in reads:
            pass

    def _read(self, runs: Sequence[partition.Run],
              wanted: set[int]) -> Iterator[tuple[int, Read]]:
        """``(position, read)`` of the wanted entries, in file order (a sample with several
        wanted entries is read once); the other samples are seeked past."""
        root = self.dataset.root
        for run in runs:
            shard, offset = self.plan.shards[run.shard], self.offsets[run.shard]
            here: dict[int, list[tuple[int, int]]] = {}  # sample -> its (position, drop)s
            for at in range(run.start, run.stop):
                if run.first + at - run.start in wanted:
                    sample, drop = self.plan.entry(run, at)
                    here.setdefault(sample, []).append((run.first + at - run.start, drop))
            last = self.plan.entry(run, run.stop - 1)[0]
            with contextlib.closing(read_shard(root, shard, here.__contains__)) as reading:
                for index, key, members in reading:
                    if index > last:  # the shard goes on, in another rank's run
                        break
                    if members is not None:
                        for position, drop in here[index]:
                            yield position, Read(shard.name, key, members, offset + index, drop)

    def _collate(self, reads: list[Read], rng: np.random.Generator) -> Batch:
        """Decode (checked), transform and stack one batch."""
        keys, labels, inputs = [], [], []
        for read in reads:
            sample = decode_checked(self.dataset.root, read.shard, read.key, read.members,
                                    self.dataset.modalities)
            keys.append(read.key)
            labels.append(sample.label)
            inputs.append(self.transform(sample, rng))
        return collate(keys, labels, inputs, [r.index for r in reads],
                       [r.drop for r in reads] if self.plan.drop is not None else None)


def make_loader(dataset: BuiltDataset, split: str, cfg: DataConfig, *, train: bool, seed: int,
                epoch: int = 0, rank: int = 0, world: int = 1, cache: Any = None,
                extras: Sequence[Extra] = ()) -> Iterable[Batch]:
    """Batches of ``split`` for this rank: from ``cache`` (a :class:`DeviceCache`) when
    given, else, once the shards' sizes are checked (``cfg.verify``), from workers that
    read, decode and augment the shards. A training epoch holds ``extras`` besides the
    split (the same on every rank)."""
    if cache is not None:
        return cache.batches(split, train=train, seed=seed, epoch=epoch, rank=rank, world=world,
                             extras=extras)
    verify_shards(dataset.root, spec.shards_of(dataset.manifest, split), cfg.verify)
    stream = ShardStream(dataset, split, cfg, train=train, seed=seed, epoch=epoch, rank=rank,
                         world=world, extras=extras)
    return WorkerLoader(stream, cfg)


class WorkerLoader:
    """``stream`` in ``cfg.workers`` processes, ``cfg.prefetch`` batches ahead each, pinned
    for asynchronous copies when a GPU is there; a worker's error, death or stall is one
    ShardError here in the main process."""

    def __init__(self, stream: ShardStream, cfg: DataConfig):
        self.stream = stream
        self.loader = DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                 prefetch_factor=cfg.prefetch if cfg.workers > 0 else None,
                                 pin_memory=cfg.pin_memory and torch.cuda.is_available(),
                                 timeout=WORKER_STALL_S if cfg.workers > 0 else 0,
                                 in_order=True)  # batch j from worker j % workers, in turn

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        while True:
            item = self._next(batches)
            if item is None:
                return
            if isinstance(item, (LoaderFailure, WorkerBug)):
                del batches  # stops the workers now, not when the error is collected
                if isinstance(item, WorkerBug):
                    item.error.reraise()  # its type, with the worker's traceback
                raise ShardError(item.message)
            yield item

    def _next(self, batches: Iterator) -> Batch | LoaderFailure | WorkerBug | None:
        """The next batch, None at the end, or the reason the workers stopped."""
        try:
            return next(batches)
        except StopIteration:
            return None
        except RuntimeError as err:  # the DataLoader's own: a worker died or stalled
            if self.loader.num_workers == 0:
                raise  # no workers: the stream's own error, as itself
            reason = str(err).splitlines()[0].rstrip(". ")
            root = self.stream.dataset.root
            return LoaderFailure(f"the loader's workers stopped while reading split "
                                 f"{self.stream.split!r} of {root} ({reason}); run `ccat-data "
                                 f"verify {root}`, and check that its file system answers and "
                                 "that memory suffices for data.workers")
