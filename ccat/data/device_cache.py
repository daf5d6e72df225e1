"""The device-resident cache: each split decoded once into tensors on the accelerator,
batches gathered and augmented there (``data.device_cache``).

CREMA-D, MVSA and Kinetics-Sounds at three 224 px frames fit in one H100's memory as
uint8 pixels and float16 spectrograms. After the first pass, an epoch is the streaming
path's partition (:mod:`ccat.data.partition`: the same entries in the same batches), a
gather and one batched random-resized-crop-and-flip per batch, all on the device, so
training never waits for JPEG decoding on the CPU.

What differs from the streaming path: the crop is resampled bilinearly by
``grid_sample`` (no antialiasing when a crop is shrunk; at the paper's sizes crops are
mostly enlarged), the augmentation's draws, and an image modality is cached as its center
square (side ``size / EVAL_CROP_FRACTION``) from which
training crops are drawn, since images of different sizes cannot share one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ccat.config import DataConfig
from ccat.data import kinds, spec
from ccat.data.integrity import verify_shards
from ccat.data.kinds import EVAL_CROP_FRACTION, PAD_ID
from ccat.data.pipeline import (Batch, Extra, ShardStream, Transform, WorkerLoader, center_square,
                                crop_box, plan_epoch)
from ccat.data.reader import BuiltDataset
from ccat.errors import CcatError
from ccat.ui import make_console

console = make_console()


class CacheTransform(Transform):
    """What the cache keeps of a sample for training: frames at their stored size, an
    image as its center square, spectrograms and token ids as they are; no augmentation."""

    def __init__(self, modalities: dict[str, dict[str, Any]], cfg: DataConfig):
        super().__init__(modalities, cfg, train=False)

    def image(self, image: np.ndarray, size: int, rng: np.random.Generator) -> torch.Tensor:
        side = round(size / EVAL_CROP_FRACTION)
        return center_square(torch.from_numpy(np.array(image)).permute(2, 0, 1), side)

    def frames(self, frames: np.ndarray, size: int, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(frames).permute(0, 3, 1, 2)

    def flow(self, snippets: np.ndarray, size: int, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(np.array(snippets))


@dataclass
class SplitTensors:
    """One split on the device: keys, labels (N,) and one tensor per modality (N, ...)."""

    keys: list[str]
    label: torch.Tensor
    inputs: dict[str, torch.Tensor]
    lengths: dict[str, torch.Tensor]  # real tokens per sample, for token modalities

    def gather(self, index: torch.Tensor) -> Batch:
        """The samples at ``index`` (on the CPU, so the keys need no copy back from the
        device); token ids trimmed to the batch's longest, as collate pads."""
        on_device = index.to(self.label.device, non_blocking=True)
        inputs = {}
        for m, x in self.inputs.items():
            picked = x[on_device]
            if m in self.lengths:
                picked = picked[:, :int(self.lengths[m][index].max())]
            inputs[m] = picked
        return Batch([self.keys[i] for i in index.tolist()], self.label[on_device], inputs,
                     index)


def cache_bytes(dataset: BuiltDataset, split: str, frame_size: int) -> int:
    """Bytes a split takes in the cache, from the manifest's shapes."""
    per_sample = sum(kinds.of(name, params).cache_bytes(params, frame_size)
                     for name, params in dataset.modalities.items())
    return per_sample * dataset.num_samples(split)


class DeviceCache:
    """Splits of ``dataset`` decoded on first use into tensors on ``device``."""

    def __init__(self, dataset: BuiltDataset, cfg: DataConfig, device: torch.device):
        self.dataset, self.cfg, self.device = dataset, cfg, torch.device(device)
        self._splits: dict[tuple[str, bool], SplitTensors] = {}

    def split(self, name: str, train: bool) -> SplitTensors:
        """The training view (frames uncropped) or evaluation view of split ``name``."""
        if (name, train) not in self._splits:
            self._splits[(name, train)] = self._load(name, train)
        return self._splits[(name, train)]

    def _load(self, name: str, train: bool) -> SplitTensors:
        """Decode every sample of the split once, in the loader's workers, into tensors."""
        self._check_fits(name)
        modalities = self.dataset.modalities
        transform = (CacheTransform(modalities, self.cfg) if train
                     else Transform(modalities, self.cfg, train=False))
        verify_shards(self.dataset.root, spec.shards_of(self.dataset.manifest, name),
                      self.cfg.verify)
        stream = ShardStream(self.dataset, name, self.cfg, train=False, seed=0, epoch=0, rank=0,
                             world=1, transform=transform)
        total = self.dataset.num_samples(name)
        keys: list[str] = []
        labels, inputs = [], {m: [] for m in self.dataset.modalities}
        progress = Progress(TextColumn(f"caching {name} on {self.device.type}"), BarColumn(),
                            MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                            transient=True)
        with progress:
            task = progress.add_task("cache", total=total)
            for batch in WorkerLoader(stream, self.cfg):
                keys += batch.keys
                labels.append(batch.label)
                for m, x in batch.inputs.items():
                    inputs[m].append(x.to(self.device, non_blocking=True))
                progress.update(task, advance=len(batch.keys))
        tensors, lengths = {}, {}
        for m, parts in inputs.items():
            if kinds.of(m, modalities[m]).cache_padded:
                width = max(p.shape[1] for p in parts)
                parts = [F.pad(p, (0, width - p.shape[1]), value=PAD_ID) for p in parts]
                tensors[m] = torch.cat(parts)
                lengths[m] = (tensors[m] != PAD_ID).sum(1).cpu()  # read per batch on the CPU
            else:
                tensors[m] = torch.cat(parts)
        return SplitTensors(keys, torch.cat(labels).to(self.device), tensors, lengths)

    def _check_fits(self, name: str) -> None:
        """On CUDA, refuse a split that would not fit in free memory, before decoding it."""
        if self.device.type != "cuda":
            return
        need = cache_bytes(self.dataset, name, self.cfg.frame_size)
        free, _ = torch.cuda.mem_get_info(self.device)
        if need > 0.8 * free:
            raise CcatError(f"split {name!r} needs {need / 2**30:.1f} GiB in the device cache "
                            f"but the GPU has {free / 2**30:.1f} GiB free; set "
                            f"data.device_cache=false to stream it from the shards")

    def batches(self, split: str, *, train: bool, seed: int, epoch: int = 0, rank: int = 0,
                world: int = 1, extras: Sequence[Extra] = ()) -> Iterator[Batch]:
        """Rank ``rank``'s batches of the epoch that the streaming path also serves
        (:func:`plan_epoch`): the same entries in the same batches, in the same order,
        gathered from the cache. Training batches are then augmented here, by one generator
        per rank and epoch drawn batch after batch."""
        data = self.split(split, train)
        plan = plan_epoch(self.dataset, split, self.cfg, train=train, seed=seed, epoch=epoch,
                          world=world, extras=extras)
        rng = np.random.default_rng([seed, epoch, rank])
        for ids in plan.partition.batches(rank):
            batch = data.gather(torch.from_numpy(plan.sample[ids]))
            if not train:
                yield batch
                continue
            batch.drop = None if plan.drop is None else torch.from_numpy(plan.drop[ids])
            yield self._augment(batch, rng)

    def _augment(self, batch: Batch, rng: np.random.Generator) -> Batch:
        """Random resized crop and flip per sample, one draw for all frames of a clip."""
        inputs = dict(batch.inputs)
        for m, params in self.dataset.modalities.items():
            inputs[m] = kinds.of(m, params).cache_augment(self, inputs[m], params, rng)
        return Batch(batch.keys, batch.label, inputs, batch.index, batch.drop)

    def crop(self, frames: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
        """uint8 [B, N, 3, H, W] -> uint8 [B, N, 3, size, size] by one batched grid_sample."""
        theta, _ = self._crop_maps(frames.shape, rng)
        return resample(frames, theta.to(frames.device), size)

    def crop_flow(self, snippets: torch.Tensor, size: int,
                  rng: np.random.Generator) -> torch.Tensor:
        """uint8 [B, N, 2 * stack, H, W] cropped as :meth:`crop`; a flipped sample's u planes
        become 255 - u (the streaming path's :meth:`Transform.flow`)."""
        theta, flips = self._crop_maps(snippets.shape, rng)
        x = resample(snippets, theta.to(snippets.device), size)
        flipped = torch.tensor(flips, device=x.device)
        x[:, :, 0::2] = torch.where(flipped.view(-1, 1, 1, 1, 1), 255 - x[:, :, 0::2],
                                    x[:, :, 0::2])
        return x

    def _crop_maps(self, shape: torch.Size, rng: np.random.Generator
                   ) -> tuple[torch.Tensor, list[bool]]:
        """Per sample, the crop's affine map and whether it flips: the streaming path's box
        distribution (crop_box) and flip, drawn in its order."""
        b, n, c, h, w = shape
        thetas, flips = [], []
        for _ in range(b):
            box = crop_box(h, w, self.cfg.crop_scale_min, rng)
            flips.append(bool(rng.random() < 0.5))
            thetas.append(crop_theta(box, h, w, flip=flips[-1]))
        return torch.stack(thetas), flips


def crop_theta(box: tuple[int, int, int, int], height: int, width: int,
               flip: bool) -> torch.Tensor:
    """The affine map (2, 3) that ``affine_grid`` turns into the crop ``box`` (top, left, h,
    w) of a height x width image, mirrored left-right when ``flip``."""
    top, left, h, w = box
    return torch.tensor([[(-1.0 if flip else 1.0) * w / width, 0.0, (2 * left + w) / width - 1],
                         [0.0, h / height, (2 * top + h) / height - 1]])


def resample(frames: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, N, 3, H, W] -> uint8 [B, N, 3, size, size]: each sample's frames through
    its map ``theta[b]``, bilinear, in one ``grid_sample``."""
    b, n, c, h, w = frames.shape
    grid = F.affine_grid(theta, [b, n * c, size, size], align_corners=False)
    x = F.grid_sample(frames.reshape(b, n * c, h, w).float(), grid, mode="bilinear",
                      padding_mode="border", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).reshape(b, n, c, size, size)
