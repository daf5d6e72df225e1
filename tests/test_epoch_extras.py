"""An epoch with extra entries (Method.epoch_extras): exactly the training split once plus
the named copies, each carrying its dropped modality, with equal full batches per rank, on
the streaming path and from the device cache; without extras the epoch is unchanged."""

import random
from collections import Counter

import pytest
import torch

from ccat.config import DataConfig
from ccat.data import open_dataset
from ccat.data.device_cache import DeviceCache
from ccat.data.pipeline import Extra, make_loader, num_train_batches
from train_helpers import write_tiny_dataset

BATCH = 4
MODALITIES = ["audio", "video"]  # the tiny data's manifest order: Batch.drop's positions
# 11 extra entries on the 29-sample split: 40 = 5 x 2 ranks x 4, so nothing is dropped
EXTRAS = [Extra(0, "video"), Extra(0, "video"), Extra(0, "audio"), Extra(3, "video"),
          Extra(7, "audio"), Extra(7, "audio"), Extra(7, "audio"), Extra(8, "video"),
          Extra(15, "audio"), Extra(23, "video"), Extra(28, "audio")]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    # train: shards of 8, 8, 8 and 5 (29 samples)
    return open_dataset(write_tiny_dataset(tmp_path_factory.mktemp("extras"),
                                           counts={"train": 29, "test": 3}, size=16, steps=8))


def entries(dataset, world, extras, cached=False, workers=0, epoch=0, seed=5):
    """Per rank, the epoch's batches as lists of (key, index, dropped modality or None)."""
    cfg = DataConfig(batch_size=BATCH, workers=workers, shuffle_buffer=8)
    cache = DeviceCache(dataset, cfg, torch.device("cpu")) if cached else None
    ranks = []
    for rank in range(world):
        batches = []
        for b in make_loader(dataset, "train", cfg, train=True, seed=seed, epoch=epoch,
                             rank=rank, world=world, cache=cache, extras=extras):
            drops = b.drop.tolist() if b.drop is not None else [-1] * len(b.keys)
            batches.append([(k, i, MODALITIES[d] if d >= 0 else None)
                            for k, i, d in zip(b.keys, b.index.tolist(), drops)])
        ranks.append(batches)
    return ranks


def expected_entries(extras, n=29):
    """The split once (no drop) plus each extra, as a multiset of (key, index, drop)."""
    return Counter([(f"train_{i:04d}", i, None) for i in range(n)]
                   + [(f"train_{e.index:04d}", e.index, e.drop) for e in extras])


@pytest.mark.parametrize("cached,world,workers", [(False, 1, 0), (False, 2, 0), (False, 2, 2),
                                                  (True, 1, 0), (True, 2, 0)])
def test_the_epoch_is_the_split_once_plus_the_named_copies(uneven, cached, world, workers):
    ranks = entries(uneven, world, EXTRAS, cached, workers)
    count = num_train_batches(uneven, BATCH, world, len(EXTRAS))
    assert count == (29 + 11) // (BATCH * world)
    assert all(len(batches) == count for batches in ranks)
    assert all(len(b) == BATCH for batches in ranks for b in batches)
    drawn = Counter(e for batches in ranks for b in batches for e in b)
    assert drawn == expected_entries(EXTRAS)


@pytest.mark.parametrize("cached", [False, True], ids=["streaming", "device_cache"])
def test_only_the_remainder_of_split_and_copies_is_left_out(uneven, cached):
    extras = EXTRAS[:6]  # 35 entries: 3 dropped at 2 ranks x 4
    ranks = entries(uneven, 2, extras, cached)
    assert all(len(batches) == num_train_batches(uneven, BATCH, 2, 6) == 4 for batches in ranks)
    drawn = Counter(e for batches in ranks for b in batches for e in b)
    expected = expected_entries(extras)
    assert all(drawn[e] <= expected[e] for e in drawn)
    assert sum(expected.values()) - sum(drawn.values()) == 35 % (BATCH * 2)


@pytest.mark.parametrize("cached", [False, True], ids=["streaming", "device_cache"])
def test_the_epoch_is_seeded_by_seed_epoch_and_the_list_not_its_order(uneven, cached):
    shuffled = list(EXTRAS)
    random.Random(0).shuffle(shuffled)
    first = entries(uneven, 2, EXTRAS, cached)
    assert entries(uneven, 2, shuffled, cached) == first
    assert entries(uneven, 2, EXTRAS, cached, epoch=1) != first
    assert entries(uneven, 2, EXTRAS[:-1], cached) != first


@pytest.mark.parametrize("cached", [False, True], ids=["streaming", "device_cache"])
def test_without_extras_batches_carry_no_drop_and_the_epoch_is_unchanged(uneven, cached):
    cfg = DataConfig(batch_size=BATCH, workers=0, shuffle_buffer=8)
    cache = DeviceCache(uneven, cfg, torch.device("cpu")) if cached else None
    plain = list(make_loader(uneven, "train", cfg, train=True, seed=5, cache=cache))
    assert all(b.drop is None for b in plain)
    assert [b.keys for b in plain] == [[k for k, _, _ in b] for b in entries(uneven, 1, [],
                                                                              cached)[0]]
    assert all(b.index.tolist() == [int(k[-4:]) for k in b.keys] for b in plain)


def test_an_extra_naming_no_sample_or_modality_is_refused(uneven):
    cfg = DataConfig(batch_size=BATCH, workers=0)
    for bad in (Extra(29, "audio"), Extra(-1, "audio"), Extra(0, "text")):
        with pytest.raises(ValueError, match="names no sample of split 'train'"):
            list(make_loader(uneven, "train", cfg, train=True, seed=0, extras=[bad]))


def test_the_loop_trains_the_methods_extras_and_logs_them_per_modality(tmp_path, monkeypatch):
    from ccat.methods.joint import JointMethod
    from ccat.train import train
    from train_helpers import tiny_config

    data = write_tiny_dataset(tmp_path / "data", counts={"train": 8, "val": 2}, size=16, steps=8)
    extras = [Extra(1, "video"), Extra(1, "video"), Extra(2, "audio"), Extra(3, "video")] * 3
    monkeypatch.setattr(JointMethod, "epoch_extras",
                        lambda self: extras if self.epoch == 1 else None)
    trained = []
    real_step = JointMethod.train_step

    def step(self, model, batch, step):
        drops = batch.drop.tolist() if batch.drop is not None else [-1] * len(batch.keys)
        trained.append((self.epoch, list(zip(batch.keys, drops))))
        return real_step(self, model, batch, step)

    monkeypatch.setattr(JointMethod, "train_step", step)
    cfg = tiny_config(data, tmp_path / "run", method="concat", epochs=2)
    cfg.data.batch_size = 4
    rows = train(cfg)
    assert "extra/drop_audio" not in rows[0]  # None: the split once, nothing logged
    assert (rows[1]["extra/drop_audio"], rows[1]["extra/drop_video"]) == (3, 9)
    second = Counter(e for epoch, batch in trained if epoch == 1 for e in batch)
    assert sum(second.values()) == 20 == 4 * num_train_batches(open_dataset(data), 4, 1, 12)
    assert second == Counter([(f"train_{i:04d}", -1) for i in range(8)]
                             + [(f"train_{e.index:04d}", MODALITIES.index(e.drop))
                                for e in extras])
