"""The device-resident cache (run here on the CPU): the same batches as the streaming path
for evaluation; for training the same shapes, dtypes and value ranges, every sample once
per epoch, and crops that are exactly the boxes asked for."""

from collections import Counter

import pytest
import torch

from ccat.config import DataConfig
from ccat.data import open_dataset
from ccat.data.device_cache import DeviceCache, crop_theta, resample
from ccat.data.pipeline import make_loader, num_train_batches
from ccat.train import train
from train_helpers import tiny_config, write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_dataset(write_tiny_dataset(tmp_path_factory.mktemp("tiny"), size=40))


def test_evaluation_batches_equal_the_streaming_path(tiny):
    cfg = DataConfig(batch_size=5, workers=0, frame_size=32)
    cache = DeviceCache(tiny, cfg, torch.device("cpu"))
    streamed = list(make_loader(tiny, "test", cfg, train=False, seed=0))
    cached = list(make_loader(tiny, "test", cfg, train=False, seed=0, cache=cache))
    assert [b.keys for b in cached] == [b.keys for b in streamed]
    for got, want in zip(cached, streamed):
        assert torch.equal(got.label, want.label)
        for m in want.inputs:
            assert got.inputs[m].dtype == want.inputs[m].dtype
            assert torch.equal(got.inputs[m], want.inputs[m])


def test_training_batches_match_the_streaming_path_in_shape_dtype_and_range(tiny):
    cfg = DataConfig(batch_size=4, workers=0, frame_size=32, shuffle_buffer=8)
    cache = DeviceCache(tiny, cfg, torch.device("cpu"))
    streamed = list(make_loader(tiny, "train", cfg, train=True, seed=1, epoch=0))
    cached = list(make_loader(tiny, "train", cfg, train=True, seed=1, epoch=0, cache=cache))
    assert len(cached) == len(streamed) == num_train_batches(tiny, 4, 1)
    for got, want in zip(cached, streamed):
        for m in want.inputs:
            assert got.inputs[m].shape == want.inputs[m].shape
            assert got.inputs[m].dtype == want.inputs[m].dtype
        video = got.inputs["video"]
        assert video.shape[-2:] == (32, 32) and video.min() >= 0 and int(video.max()) > 128
    keys = [k for b in cached for k in b.keys]
    assert len(set(keys)) == len(keys) == tiny.num_samples("train")  # a permutation
    labels = {k: int(v) for b in make_loader(tiny, "train", cfg, train=False, seed=0)
              for k, v in zip(b.keys, b.label)}
    assert all(labels[k] == int(v) for b in cached for k, v in zip(b.keys, b.label))


def test_training_order_is_seeded_per_epoch_and_split_across_ranks(tiny):
    cfg = DataConfig(batch_size=4, workers=0, frame_size=32)
    cache = DeviceCache(tiny, cfg, torch.device("cpu"))

    def keys(epoch, rank=0, world=1):
        return [k for b in cache.batches("train", train=True, seed=3, epoch=epoch, rank=rank,
                                         world=world) for k in b.keys]

    assert keys(0) == keys(0) and keys(0) != keys(1)
    ranks = [keys(0, r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4 * num_train_batches(tiny, 4, 2)
    assert not set(ranks[0]) & set(ranks[1])
    assert Counter(k for b in cache.batches("val", train=False, seed=0, rank=1, world=2)
                   for k in b.keys).keys().isdisjoint(
        k for b in cache.batches("val", train=False, seed=0, rank=0, world=2) for k in b.keys)


def test_a_crop_is_exactly_its_box_and_a_flip_mirrors_it():
    frames = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8)
    frames = frames.reshape(1, 2, 3, 32, 32)
    whole = resample(frames, crop_theta((0, 0, 32, 32), 32, 32, flip=False)[None], 32)
    assert torch.equal(whole, frames)
    box = resample(frames, crop_theta((8, 4, 16, 16), 32, 32, flip=False)[None], 16)
    assert torch.equal(box, frames[..., 8:24, 4:20])
    mirrored = resample(frames, crop_theta((8, 4, 16, 16), 32, 32, flip=True)[None], 16)
    assert torch.equal(mirrored, frames[..., 8:24, 4:20].flip(-1))


def test_training_with_the_device_cache_runs_and_fits(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 48, "val": 6, "test": 6})
    cfg = tiny_config(data, tmp_path / "run", method="sum", epochs=3)
    cfg.data.device_cache, cfg.optim.lr = True, 0.05
    history = train(cfg)
    assert len(history) == 3 and (tmp_path / "run" / "best.pt").is_file()
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
