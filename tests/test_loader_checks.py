"""The loader checks what it reads: sizes before an epoch, counts, decodes and labels while
reading; a damaged shard, a dead worker or a stalled one is one sentence, never a hang."""

import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tarfile

import pytest

from ccat.cli import main
from ccat.config import ConfigError, DataConfig
from ccat.data import open_dataset, pipeline, shardio, spec
from ccat.data.integrity import ShardError
from ccat.data.reader import DatasetError
from ccat.data.pipeline import ShardStream, Transform, WorkerLoader, make_loader
from ccat.run_config import load_config
from ccat.train import train as run_training
from train_helpers import tiny_config, write_tiny_dataset


@pytest.fixture()
def data(tmp_path):
    """Train shards of 8, 8 and 8, test 8 and 4; manifest with the shards' real sha256."""
    root = write_tiny_dataset(tmp_path / "data", counts={"train": 24, "test": 12},
                              size=16, steps=8)
    edit_manifest(root, lambda m: None)
    return root


def edit_manifest(root, change):
    """Apply ``change`` to the manifest, then refresh bytes and sha256 of untouched shards
    from the files and keep the split totals consistent."""
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            path = root / shard["name"]
            if path.is_file():
                shard["bytes"] = path.stat().st_size
                shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    change(manifest)
    for entry in manifest["splits"].values():
        entry["num_samples"] = sum(s["num_samples"] for s in entry["shards"])
    (root / "manifest.json").write_text(json.dumps(manifest))


def member_offsets(path):
    """The byte offset of each tar member's header, and the names, in file order."""
    with tarfile.open(path) as tar:
        return [(m.offset, m.name) for m in tar.getmembers()]


def epoch(root, split="train", train=True, **fields):
    """The keys of one epoch of ``split`` (batch 4), with DataConfig ``fields``."""
    cfg = DataConfig(batch_size=4, **{"workers": 0, "shuffle_buffer": 8, **fields})
    return [b.keys for b in make_loader(open_dataset(root), split, cfg, train=train, seed=0)]


def test_the_undamaged_data_passes_every_verify_mode(data):
    for mode in ("size", "sha", "none"):
        assert len(epoch(data, verify=mode)) == 6


def test_data_verify_is_a_checked_choice():
    assert load_config(overrides=["data.verify=sha"], method_configs=None).data.verify == "sha"
    with pytest.raises(ConfigError, match="'data.verify' must be one of size, sha, none"):
        load_config(overrides=["data.verify=fast"], method_configs=None)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_truncated_to_zero_bytes_is_refused(data, workers):
    (data / "train-000001.tar").write_bytes(b"")
    with pytest.raises(ShardError, match=r"train-000001.tar .* has 0 bytes but the manifest "
                                         r"lists \d+; run `ccat-data verify"):
        epoch(data, workers=workers)
    with pytest.raises(ShardError, match="train-000001.tar .* holds 0 samples, but the "
                                         "manifest lists 8; run `ccat-data verify"):
        epoch(data, workers=workers, verify="none")


def test_empty_shards_that_match_their_sha_are_refused_not_waited_on(data, tmp_path):
    zero_bytes = tmp_path / "zero"
    shutil.copytree(data, zero_bytes)

    def empty(root, payload):
        def change(manifest):
            for shard in manifest["splits"]["train"]["shards"]:
                (root / shard["name"]).write_bytes(payload)
                shard["bytes"], shard["sha256"] = len(payload), hashlib.sha256(payload).hexdigest()
        return change

    edit_manifest(zero_bytes, empty(zero_bytes, b""))  # no tar is 0 bytes: the schema says so
    with pytest.raises(DatasetError, match=r"splits\.train\.shards\[\d\]\.bytes: 0 is less"):
        open_dataset(zero_bytes)
    no_members = io.BytesIO()
    tarfile.open(fileobj=no_members, mode="w").close()  # a valid tar holding no sample
    edit_manifest(data, empty(data, no_members.getvalue()))
    with pytest.raises(ShardError, match="holds 0 samples, but the manifest lists 8"):
        epoch(data, workers=2, verify="sha")


def test_a_shard_cut_at_a_member_boundary_is_refused(data):
    path = data / "train-000002.tar"
    offsets = member_offsets(path)
    whole = path.read_bytes()
    per_sample = len(offsets) // 8
    path.write_bytes(whole[:offsets[4 * per_sample][0]])  # after the 4th sample
    with pytest.raises(ShardError, match="train-000002.tar .* has .* bytes but the manifest"):
        epoch(data)
    with pytest.raises(ShardError, match="train-000002.tar .* holds 4 samples, the last is "
                                         "'train_0019', but the manifest lists 8"):
        epoch(data, verify="none")
    path.write_bytes(whole[:offsets[4 * per_sample + 2][0]])  # inside the 5th sample
    with pytest.raises(ShardError, match="train-000002.tar .* holds 5 samples, the last is "
                                         "'train_0020'"):
        epoch(data, verify="none", workers=2)


def test_manifest_counts_too_high_or_too_low_are_refused(data):
    """An edited count disagrees with the membership its fingerprint covers (refused on
    open); a shard rewritten with fewer or more samples is refused while it is read."""
    def count(n):
        def change(manifest):
            manifest["splits"]["train"]["shards"][0]["num_samples"] = n
        return change

    for n in (10, 6):
        edit_manifest(data, count(n))
        with pytest.raises(DatasetError, match=f"train-000000.tar has 8 samples in its "
                                               f"membership but num_samples {n}"):
            epoch(data)
    edit_manifest(data, count(8))
    samples = read_samples(data / "train-000000.tar")
    write_samples(data, "train-000000.tar", samples[:6])
    with pytest.raises(ShardError, match="train-000000.tar .* holds 6 samples, the last is "
                                         "'train_0005', but the manifest lists 8"):
        epoch(data)
    write_samples(data, "train-000000.tar", samples + samples[:1])
    with pytest.raises(ShardError, match="train-000000.tar .* holds more than the 8 samples "
                                         "the manifest lists \\('train_0000' is one too many"):
        epoch(data, workers=2)


def read_samples(path):
    with open(path, "rb") as f:
        return list(shardio.iter_tar_samples(f))


def write_samples(root, name, samples):
    """Rewrite shard ``name`` holding ``samples``; the manifest follows its new bytes."""
    with tarfile.open(root / name, "w") as tar:
        for key, members in samples:
            shardio.write_sample(tar, key, members)
    edit_manifest(root, lambda m: None)


def rewrite_sample(root, name, key, change):
    """Rewrite shard ``name`` with ``change(members)`` applied to sample ``key``; the
    manifest follows the new bytes, as a rebuild with a bug would write it."""
    write_samples(root, name, [(k, change(members) if k == key else members)
                               for k, members in read_samples(root / name)])


def test_a_member_that_fails_to_decode_is_named(data):
    rewrite_sample(data, "train-000000.tar", "train_0003",
                   lambda m: {**m, "video.1.jpg": b"not a jpeg"})
    with pytest.raises(ShardError, match="train-000000.tar .* sample 'train_0003' that fails "
                                         "to decode"):
        epoch(data, workers=2)


@pytest.mark.parametrize("label", [b"5", b"1", b"-1", b"x", b"00", b"0 "])
def test_a_label_other_than_the_membership_is_refused_by_every_reader(data, label):
    """test_0009 is class 0 in the membership the fingerprint covers: any other label
    bytes, in the classes or not, are refused as the sample is read."""
    rewrite_sample(data, "test-000001.tar", "test_0009",
                   lambda m: {**m, spec.LABEL_MEMBER: label})
    says = ("test-000001.tar .* labels sample 'test_0009' .*, where the membership its "
            "fingerprint covers says 0")
    with pytest.raises(ShardError, match=says):
        epoch(data, "test", train=False, workers=2)
    with pytest.raises(ShardError, match=says):
        list(open_dataset(data).iter_samples("test"))


def run_main(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ccat", *args])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


def test_eval_refuses_a_test_split_with_a_bad_label_in_one_line(data, tmp_path, monkeypatch,
                                                                capsys):
    cfg = tiny_config(data, tmp_path / "run", method="sum")
    cfg.data.val_split = "test"
    run_training(cfg)
    rewrite_sample(data, "test-000000.tar", "test_0002",
                   lambda m: {**m, spec.LABEL_MEMBER: shardio.encode_label(3)})
    code, err = run_main(["eval", "--ckpt", str(tmp_path / "run" / "last.pt")], monkeypatch,
                         capsys)
    assert code == 2 and err.startswith("error:") and "Traceback" not in err
    assert ("'test_0002' 3, where the membership its fingerprint covers says 2"
            in " ".join(err.split()))
    assert not (tmp_path / "run" / "eval.json").exists()


def test_train_on_a_damaged_shard_is_one_line(data, tmp_path, monkeypatch, capsys):
    (data / "train-000000.tar").write_bytes(b"")
    config = tmp_path / "c.yaml"
    config.write_text("device: cpu\ndata: {batch_size: 4, workers: 1}\n"
                      "model: {width: 16, encoder_width: 4, encoder_blocks: [1, 1, 1, 1], "
                      "heads: 2, ffn_mult: 2}\noptim: {epochs: 1}\nmethod: {name: sum}\n")
    code, err = run_main(["train", "--config", str(config), "--data", str(data), "--out",
                          str(tmp_path / "run")], monkeypatch, capsys)
    flat = " ".join(err.split())
    assert code == 2 and "Traceback" not in err
    assert f"ccat-data verify {data}" in flat and "train-000000.tar" in flat


def test_a_stalled_worker_ends_the_epoch_with_a_sentence(data, monkeypatch):
    path = data / "train-000001.tar"
    path.unlink()
    os.mkfifo(path)  # opening it blocks, as a hung file system would
    monkeypatch.setattr(pipeline, "WORKER_STALL_S", 1)
    with pytest.raises(ShardError, match="workers stopped while reading split 'train' .* "
                                         "timed out after 1 seconds"):
        epoch(data, workers=1, verify="none")
    with pytest.raises(ShardError, match="train-000001.tar .* is not a regular file"):
        epoch(data, workers=1)


class KillsItsWorker(Transform):
    """A transform that dies as the out-of-memory killer would end a worker."""

    def __call__(self, sample, rng):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_that_dies_ends_the_epoch_with_a_sentence(data):
    dataset = open_dataset(data)
    cfg = DataConfig(batch_size=4, workers=1)
    stream = ShardStream(dataset, "train", cfg, train=True, seed=0, epoch=0, rank=0, world=1,
                         transform=KillsItsWorker(dataset.modalities, cfg, train=True))
    with pytest.raises(ShardError, match="workers stopped while reading split 'train' .*"
                                         "exited unexpectedly"):
        list(WorkerLoader(stream, cfg))


class RaisesABug(Transform):
    """A transform with a bug of ccat's own: a RuntimeError, like those DataLoader raises
    when a worker dies or stalls."""

    def __call__(self, sample, rng):
        raise RuntimeError("a bug in the transform")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bug_in_the_stream_is_raised_as_itself_not_as_a_shard_failure(data, workers):
    """Told apart from the loader's own failures by where it comes from, not by its text."""
    dataset = open_dataset(data)
    cfg = DataConfig(batch_size=4, workers=workers)
    stream = ShardStream(dataset, "train", cfg, train=True, seed=0, epoch=0, rank=0, world=1,
                         transform=RaisesABug(dataset.modalities, cfg, train=True))
    with pytest.raises(RuntimeError, match="a bug in the transform") as raised:
        list(WorkerLoader(stream, cfg))
    assert not isinstance(raised.value, ShardError)
    if workers:  # the worker's traceback comes with it, as DataLoader sends one
        assert "in DataLoader worker process 0" in str(raised.value)
        assert "Traceback" in str(raised.value) and "__call__" in str(raised.value)


def test_skipping_samples_seeks_past_them_and_still_finds_a_cut(data):
    path = data / "train-000000.tar"
    with open(path, "rb") as f:
        read = list(shardio.iter_tar_samples(f))
    with open(path, "rb") as f:
        skipped = list(shardio.iter_tar_samples(f, keep=lambda i: i % 3 == 0))
    assert [k for k, _ in skipped] == [k for k, _ in read]
    assert [m for k, m in skipped] == [m if i % 3 == 0 else None for i, (k, m) in
                                       enumerate(read)]
    path.write_bytes(path.read_bytes()[:member_offsets(path)[-1][0] + 700])  # in a member
    with open(path, "rb") as f, pytest.raises(spec.SpecError, match="ends inside a"):
        list(shardio.iter_tar_samples(f, keep=lambda i: False))
