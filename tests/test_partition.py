"""One epoch partition (ccat/data/partition.py) for both loaders: over seeds, epochs, world
sizes, workers, batch sizes, buffers and extra entries, the streamed path and the device
cache give the same keys, in the same batches, in the same order, and those are the
partition's; the partition deals every entry once but the remainder."""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccat.config import DataConfig
from ccat.data import open_dataset
from ccat.data.device_cache import DeviceCache
from ccat.data.partition import NO_DROP, buffer_order, entry_counts, entry_table, epoch_partition
from ccat.data.pipeline import Extra, make_loader, plan_epoch
from train_helpers import write_tiny_dataset

MODALITIES = ["audio", "video"]  # the tiny data's manifest order: Batch.drop's positions
BUILDS = {"uneven": ({"train": 29, "test": 3}, 8),  # shards of 8, 8, 8 and 5
          "small shards": ({"train": 23, "test": 3}, 3),
          "one shard": ({"train": 13, "test": 3}, 64)}


def simulated_buffer(n, size, rng):
    """The shuffle buffer, item by item: each arrival past the first ``size`` evicts a
    random resident; the residents leave shuffled at the end."""
    size = max(1, min(size, n))
    buffer, out = list(range(min(size, n))), []
    for item, pick in zip(range(size, n), rng.integers(size, size=max(0, n - size))):
        out.append(buffer[pick])
        buffer[pick] = item
    rng.shuffle(buffer)
    return out + buffer


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(n=st.integers(0, 300), size=st.integers(0, 400), seed=st.integers(0, 2**32))
def test_the_buffer_order_is_the_buffer_simulated_item_by_item(n, size, seed):
    got = buffer_order(n, size, np.random.default_rng(seed))
    assert got.tolist() == simulated_buffer(n, size, np.random.default_rng(seed))
    assert sorted(got.tolist()) == list(range(n))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=12), seed=st.integers(0, 99),
       epoch=st.integers(0, 5), ranks=st.integers(1, 4), batch=st.integers(1, 9),
       buffer=st.integers(1, 64))
def test_an_epoch_deals_every_entry_once_but_the_remainder(counts, seed, epoch, ranks, batch,
                                                           buffer):
    total = sum(counts)
    if total < ranks * batch:
        with pytest.raises(ValueError, match="fewer than one batch"):
            epoch_partition(counts, seed, epoch, ranks, batch, buffer)
        return
    part = epoch_partition(counts, seed, epoch, ranks, batch, buffer)
    ids = part.ids()
    assert ids.shape == (ranks, total // (ranks * batch), batch)
    assert len(set(ids.ravel().tolist())) == ids.size  # each entry at most once
    assert total - ids.size < ranks * batch  # only the remainder is dropped
    every = np.concatenate([part.sequence(r) for r in range(ranks)])
    assert sorted(every.tolist()) == list(range(total))  # every shard read in full
    assert np.array_equal(ids, epoch_partition(counts, seed, epoch, ranks, batch, buffer).ids())


def test_extra_entries_follow_their_sample_in_modality_order():
    sample, drop = entry_table(4, np.array([2, 0, 2, 2]), np.array([1, 0, 0, 1]))
    assert sample.tolist() == [0, 0, 1, 2, 2, 2, 2, 3]
    assert drop.tolist() == [NO_DROP, 0, NO_DROP, NO_DROP, 0, 1, 1, NO_DROP]
    assert entry_counts([2, 2], np.array([2, 0, 2, 2])) == [3, 5]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("partition")
    return {name: open_dataset(write_tiny_dataset(root / name.replace(" ", "_"), counts=counts,
                                                  shard_size=shard, size=16, steps=8))
            for name, (counts, shard) in BUILDS.items()}


def rank_batches(batches):
    """A rank's batches as lists of (key, position in the split, dropped modality)."""
    out = []
    for b in batches:
        drops = b.drop.tolist() if b.drop is not None else [NO_DROP] * len(b.keys)
        out.append(list(zip(b.keys, b.index.tolist(), drops, b.label.tolist())))
    return out


@st.composite
def settings_of_an_epoch(draw):
    build = draw(st.sampled_from(sorted(BUILDS)))
    n = BUILDS[build][0]["train"]
    extras = draw(st.lists(st.builds(Extra, st.integers(0, n - 1), st.sampled_from(MODALITIES)),
                           max_size=2 * n))
    world = draw(st.integers(1, 3))
    batch = draw(st.integers(1, (n + len(extras)) // world))
    return dict(build=build, extras=extras, world=world, batch=batch,
                seed=draw(st.integers(0, 2**31)), epoch=draw(st.integers(0, 9)),
                buffer=draw(st.sampled_from([1, 4, 8, 1000])),
                workers=draw(st.sampled_from([0, 0, 1, 2])), train=draw(st.booleans()))


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=settings_of_an_epoch())
def test_the_streamed_path_and_the_device_cache_give_the_partitions_batches(builds, case):
    dataset = builds[case["build"]]
    cfg = DataConfig(batch_size=case["batch"], workers=case["workers"],
                     shuffle_buffer=case["buffer"], frame_size=16)
    cache = DeviceCache(dataset, replace(cfg, workers=0), torch.device("cpu"))
    extras = case["extras"] if case["train"] else ()
    args = dict(train=case["train"], seed=case["seed"], epoch=case["epoch"],
                world=case["world"], extras=extras)
    plan = plan_epoch(dataset, "train", cfg, **args)
    for rank in range(case["world"]):
        streamed = rank_batches(make_loader(dataset, "train", cfg, rank=rank, **args))
        cached = rank_batches(make_loader(dataset, "train", cfg, rank=rank, cache=cache, **args))
        assert streamed == cached
        ids = plan.partition.batches(rank)
        assert [[i for _, i, _, _ in b] for b in streamed] == [plan.sample[b].tolist()
                                                               for b in ids]
        if extras:
            assert [[d for _, _, d, _ in b] for b in streamed] == [plan.drop[b].tolist()
                                                                   for b in ids]
    if not case["train"]:
        return
    # the epoch is the split once plus the extras, but for a remainder < world x batch
    n = dataset.num_samples("train")
    dealt = Counter(e for rank in range(case["world"]) for b in rank_batches(
        make_loader(dataset, "train", cfg, rank=rank, cache=cache, **args)) for e in b)
    assert sum(dealt.values()) == (n + len(extras)) // (case["world"] * case["batch"]) \
        * case["world"] * case["batch"]
    entries = Counter([(i, NO_DROP) for i in range(n)]
                      + [(e.index, MODALITIES.index(e.drop)) for e in extras])
    assert all(count <= entries[(i, d)] for (_, i, d, _), count in dealt.items())
