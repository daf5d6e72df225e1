"""Shards -> decoded, augmented batches, split by rank then worker (open_clip's stage list).

Training: a seeded shard order identical on every rank, shards dealt to (rank, worker)
slots, a shuffle buffer over undecoded samples, decode, augment, batch in the worker.
Every rank yields the same number of batches per epoch (``num_train_batches``); a slot
that runs out of samples starts over on its shards, so fewer shards than ranks x workers
never hangs. Evaluation: every sample of the split exactly once across all slots.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

from ccat.config import DataConfig
from ccat.data import spec
from ccat.data.reader import BuiltDataset, Sample, decode_sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
IMAGE_SIZE = 224  # crop side of image modalities when data.frame_size is 0 (the paper's)
EVAL_CROP_FRACTION = 224 / 256  # eval: resize the shorter side to size / this, center crop
PAD_ID = 0  # token id of padding: [PAD] in BERT WordPiece vocabularies, never real text
KINDS = ("spectrogram", "frames", "image", "tokens")


@dataclass
class Batch:
    """A batch: sample keys, labels (B,) and one input tensor per modality."""

    keys: list[str]
    label: torch.Tensor
    inputs: dict[str, torch.Tensor]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.keys, self.label.to(device, non_blocking=True),
                     {m: x.to(device, non_blocking=True) for m, x in self.inputs.items()})

    def pin_memory(self) -> Batch:
        return Batch(self.keys, self.label.pin_memory(),
                     {m: x.pin_memory() for m, x in self.inputs.items()})


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


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> ImageNet-normalized float, on ``x``'s device.

    Batches carry pixels as uint8 to the accelerator (a quarter of the bytes, and no float
    work on the CPU); encoders call this first. Float input is taken as already normalized.
    """
    if x.dtype != torch.uint8:
        return x
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x.float() / 255 - mean) / std


class Transform:
    """Per-sample arrays -> tensors, by modality kind (train: augment; eval: resize).

    Pixels stay uint8 and spectrograms float16: the encoder normalizes and widens them on
    the device (:func:`normalize_pixels`).
    """

    def __init__(self, modalities: dict[str, dict[str, Any]], cfg: DataConfig, train: bool):
        self.modalities = modalities
        self.cfg = cfg
        self.train = train
        for name, params in modalities.items():
            if params["kind"] not in KINDS:
                raise ValueError(f"modality {name!r} of kind {params['kind']!r} has no "
                                 f"training transform yet ({', '.join(KINDS)} do)")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for name, params in self.modalities.items():
            array, kind = sample.data[name], params["kind"]
            if kind == "spectrogram":
                out[name] = torch.from_numpy(array.astype(np.float16))
            elif kind == "tokens":
                out[name] = torch.from_numpy(array.astype(np.int64))
            elif kind == "image":
                out[name] = self.image(array, self.cfg.frame_size or IMAGE_SIZE, rng)
            else:
                out[name] = self.frames(array, self.cfg.frame_size or params["size"], rng)
        return out

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


def center_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> [3, size, size]: shorter side to size / EVAL_CROP_FRACTION, then
    the center crop (the evaluation view of an image)."""
    x = TF.resize(image[None], round(size / EVAL_CROP_FRACTION), antialias=True)
    return TF.center_crop(x, [size, size])[0]


def collate(keys: list[str], labels: list[int], inputs: list[dict[str, torch.Tensor]]) -> Batch:
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
    return Batch(list(keys), torch.tensor(labels, dtype=torch.long), stacked)


class ShardStream(IterableDataset):
    """Batches of one split for one rank; see the module docstring for the contract."""

    def __init__(self, shards: list[Path], modalities: dict[str, dict[str, Any]],
                 cfg: DataConfig, *, train: bool, seed: int, epoch: int, rank: int, world: int,
                 num_batches: int = 0, num_samples: int = 0,
                 transform: Transform | None = None):
        self.shards, self.modalities, self.cfg = shards, modalities, cfg
        self.train, self.seed, self.epoch = train, seed, epoch
        self.rank, self.world, self.num_batches = rank, world, num_batches
        self.num_samples = num_samples  # of the split; caps the shuffle buffer
        self.transform = transform or Transform(modalities, cfg, train)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        if self.train:
            quota = self.num_batches // workers + (worker < self.num_batches % workers)
            # A buffer larger than this slot's share would read samples twice before
            # yielding the first, and discard them at the end of the epoch.
            buffer = min(self.cfg.shuffle_buffer, max(1, self.num_samples // slots))
            samples = self._shuffled(self._train_raw(slot, slots, rng), rng, buffer)
        else:
            quota, samples = -1, self._eval_raw(slot, slots)
        yield from self._batches(samples, quota, rng)

    def _read(self, path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
        with open(path, "rb") as f:
            yield from spec.iter_tar_samples(f)

    def _train_raw(self, slot: int, slots: int,
                   rng: np.random.Generator) -> Iterator[tuple[str, dict[str, bytes]]]:
        """This slot's shards, endlessly; the first pass order is the same on every rank."""
        order = list(self.shards)
        random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        order = order * math.ceil(slots / len(order))  # every slot gets at least one shard
        mine = order[slot::slots]
        while True:
            for path in mine:
                yield from self._read(path)
            rng.shuffle(mine)

    def _eval_raw(self, slot: int, slots: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Whole shards per slot when there are enough, else every slots-th sample."""
        if len(self.shards) >= slots:
            for path in self.shards[slot::slots]:
                yield from self._read(path)
            return
        index = 0
        for path in self.shards:
            for raw in self._read(path):
                if index % slots == slot:
                    yield raw
                index += 1

    def _shuffled(self, raw: Iterator, rng: np.random.Generator, size: int) -> Iterator:
        """A shuffle buffer of ``size`` undecoded samples."""
        buffer: list = []
        for item in raw:
            if len(buffer) < size:
                buffer.append(item)
                continue
            pick = int(rng.integers(len(buffer)))
            buffer[pick], item = item, buffer[pick]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def _batches(self, raw: Iterator, quota: int, rng: np.random.Generator) -> Iterator[Batch]:
        """Decode, transform and collate; stop after ``quota`` batches (-1: at the end)."""
        keys, labels, inputs, made = [], [], [], 0
        for key, members in raw:
            if made == quota:
                return
            sample = decode_sample(key, members, self.modalities)
            keys.append(key)
            labels.append(sample.label)
            inputs.append(self.transform(sample, rng))
            if len(keys) == self.cfg.batch_size:
                yield collate(keys, labels, inputs)
                keys, labels, inputs, made = [], [], [], made + 1
        if keys and quota < 0:
            yield collate(keys, labels, inputs)


def num_train_batches(dataset: BuiltDataset, batch_size: int, world: int) -> int:
    """Batches every rank runs per epoch: the split divided evenly, the remainder dropped."""
    return max(1, dataset.num_samples("train") // (batch_size * world))


def make_loader(dataset: BuiltDataset, split: str, cfg: DataConfig, *, train: bool, seed: int,
                epoch: int = 0, rank: int = 0, world: int = 1,
                cache: Any = None) -> Iterable[Batch]:
    """Batches of ``split`` for this rank: from ``cache`` (a :class:`DeviceCache`) when
    given, else a DataLoader whose workers read, decode and augment the shards."""
    if cache is not None:
        return cache.batches(split, train=train, seed=seed, epoch=epoch, rank=rank, world=world)
    stream = ShardStream(dataset.shard_paths(split), dataset.modalities, cfg, train=train,
                         seed=seed, epoch=epoch, rank=rank, world=world,
                         num_batches=num_train_batches(dataset, cfg.batch_size, world),
                         num_samples=dataset.num_samples(split))
    return worker_loader(stream, cfg)


def worker_loader(stream: ShardStream, cfg: DataConfig) -> DataLoader:
    """``stream`` in ``cfg.workers`` processes, ``cfg.prefetch`` batches ahead each, pinned
    for asynchronous copies when a GPU is there."""
    return DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                      prefetch_factor=cfg.prefetch if cfg.workers > 0 else None,
                      pin_memory=cfg.pin_memory and torch.cuda.is_available())
