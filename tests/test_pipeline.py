"""The shard pipeline: equal batches per rank, eval exactly once, one crop per clip."""

from collections import Counter

import numpy as np
import pytest
import torch

from ccat.config import DataConfig
from ccat.data import kinds, open_dataset
from ccat.data.pipeline import Transform, make_loader, num_train_batches
from ccat.data.reader import Sample
from train_helpers import TINY_MODALITIES, write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 3 train shards of 8, 2 val shards (8 + 1), 2 test shards (8 + 4).
    return open_dataset(write_tiny_dataset(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (3, 2), (4, 0), (6, 0)])
def test_every_rank_runs_the_same_number_of_batches(tiny, world, workers):
    cfg = DataConfig(batch_size=4, workers=workers, shuffle_buffer=4)
    expected = num_train_batches(tiny, 4, world)
    for rank in range(world):
        batches = list(make_loader(tiny, "train", cfg, train=True, seed=1, epoch=2,
                                   rank=rank, world=world))
        assert len(batches) == expected and all(len(b.keys) == 4 for b in batches)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (5, 0)])
def test_evaluation_sees_every_sample_exactly_once(tiny, world, workers):
    cfg = DataConfig(batch_size=5, workers=workers)
    for split in ("val", "test"):
        keys = Counter(k for rank in range(world)
                       for b in make_loader(tiny, split, cfg, train=False, seed=0,
                                            rank=rank, world=world) for k in b.keys)
        assert len(keys) == tiny.num_samples(split) and set(keys.values()) == {1}


def test_train_order_is_seeded_and_changes_with_the_epoch(tiny):
    cfg = DataConfig(batch_size=4, workers=0, shuffle_buffer=8)

    def keys(epoch):
        return [k for b in make_loader(tiny, "train", cfg, train=True, seed=3, epoch=epoch)
                for k in b.keys]

    assert keys(0) == keys(0) and keys(0) != keys(1)


def test_train_augmentation_uses_one_crop_for_all_frames_of_a_clip():
    frame = np.random.default_rng(0).integers(0, 255, (40, 48, 3)).astype(np.uint8)
    sample = Sample("k", 0, {"audio": np.zeros((257, 8), np.float16),
                             "video": np.stack([frame] * 3)}, {})
    out = Transform(TINY_MODALITIES, DataConfig(), train=True)(sample, np.random.default_rng(1))
    video = out["video"]
    assert video.shape == (3, 3, 32, 32)
    assert torch.equal(video[0], video[1]) and torch.equal(video[1], video[2])
    assert (video.dtype, out["audio"].dtype) == (torch.uint8, torch.float16)


def test_pixels_travel_as_uint8_and_the_encoder_normalizes_them():
    frame = np.full((32, 32, 3), 255, np.uint8)
    sample = Sample("k", 0, {"audio": np.zeros((257, 8), np.float16),
                             "video": np.stack([frame] * 3)}, {})
    video = Transform(TINY_MODALITIES, DataConfig(), train=False)(sample, None)["video"]
    assert video.dtype == torch.uint8 and torch.equal(video, torch.full_like(video, 255))
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(kinds.FRAMES.normalize(video)[0, :, 5, 5], expected)
