"""Exact epochs on the streaming path: every training sample once per epoch over all ranks
and workers (the remainder < ranks x batch dropped), equal full batches per rank, a seeded
order that changes with the epoch, and the same batches for any number of workers."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from ccat.config import DataConfig
from ccat.data import open_dataset
from ccat.data.pipeline import make_loader, num_train_batches
from ccat.errors import CcatError
from train_helpers import write_tiny_dataset

BATCH = 4


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    # train: shards of 8, 8, 8 and 5 (29 samples, not a multiple of the batch)
    return open_dataset(write_tiny_dataset(tmp_path_factory.mktemp("uneven"),
                                           counts={"train": 29, "test": 11}, size=16, steps=8))


def epoch_keys(dataset, world, workers, epoch=0, seed=7, buffer=8):
    """Per rank, the list of batches (each a list of keys) of one training epoch."""
    cfg = DataConfig(batch_size=BATCH, workers=workers, shuffle_buffer=buffer)
    return [[b.keys for b in make_loader(dataset, "train", cfg, train=True, seed=seed,
                                         epoch=epoch, rank=rank, world=world)]
            for rank in range(world)]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_an_epoch_draws_every_sample_once_with_equal_full_batches(uneven, world, workers):
    ranks = epoch_keys(uneven, world, workers)
    count = num_train_batches(uneven, BATCH, world)
    assert count == 29 // (BATCH * world)
    assert all(len(batches) == count for batches in ranks)
    assert all(len(b) == BATCH for batches in ranks for b in batches)
    drawn = Counter(k for batches in ranks for b in batches for k in b)
    assert set(drawn.values()) == {1}  # never twice, across ranks and workers
    assert 29 - len(drawn) == 29 % (BATCH * world)  # only the remainder is left out


def test_workers_change_nothing_about_the_batches(uneven):
    for world in (1, 2):
        assert epoch_keys(uneven, world, 0) == epoch_keys(uneven, world, 1) \
            == epoch_keys(uneven, world, 2)


def test_the_order_is_seeded_and_changes_with_the_epoch(uneven):
    assert epoch_keys(uneven, 2, 0, epoch=3) == epoch_keys(uneven, 2, 0, epoch=3)
    assert epoch_keys(uneven, 2, 0, epoch=3) != epoch_keys(uneven, 2, 0, epoch=4)
    assert epoch_keys(uneven, 2, 0, seed=1) != epoch_keys(uneven, 2, 0, seed=2)


def test_the_dropped_remainder_moves_between_epochs(uneven):
    left_out = set()
    for epoch in range(6):
        drawn = {k for rank in epoch_keys(uneven, 1, 0, epoch=epoch) for b in rank for k in b}
        assert len(drawn) == 28
        left_out |= {f"train_{i:04d}" for i in range(29)} - drawn
    assert len(left_out) > 1


def test_the_issue_case_192_samples_batch_16_one_process(tmp_path):
    data = open_dataset(write_tiny_dataset(tmp_path, counts={"train": 192}, shard_size=64,
                                           size=8, steps=4))
    cfg = DataConfig(batch_size=16, workers=0, shuffle_buffer=512)
    keys = [k for b in make_loader(data, "train", cfg, train=True, seed=0, epoch=0)
            for k in b.keys]
    assert len(keys) == len(set(keys)) == 192


def test_a_split_smaller_than_one_batch_per_rank_is_refused(uneven):
    with pytest.raises(CcatError, match="29 samples, fewer than one batch for each of 2"):
        make_loader(uneven, "train", DataConfig(batch_size=16), train=True, seed=0, world=2)


GATHER = """
import json, sys
from ccat import distributed
from ccat.config import DataConfig
from ccat.data import open_dataset
from ccat.data.pipeline import make_loader

ctx = distributed.setup("cpu")
cfg = DataConfig(batch_size=4, workers=1, shuffle_buffer=8)
batches = [b.keys for b in make_loader(open_dataset(sys.argv[1]), "train", cfg, train=True,
                                       seed=7, epoch=0, rank=ctx.rank, world=ctx.world)]
merged = distributed.gather(batches)
if ctx.main:
    open(sys.argv[2], "w").write(json.dumps(merged))
distributed.cleanup()
"""


def test_two_gloo_processes_split_the_epoch_as_computed(uneven, tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    out = tmp_path / "keys.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script), str(uneven.root), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text()) == epoch_keys(uneven, 2, 0)
