"""The fingerprint binds the shards' contents (issue 22): `ccat-data verify` and every loader
path check that the shards hold exactly the membership the fingerprint covers. Each
tampering below rewrites real tars and updates the manifest's sha256, bytes and counts, so
that only the membership check can catch it; each is tried on a manifest that records
every shard's membership and on one written before builds recorded it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from ccat.config import DataConfig
from ccat.data import open_dataset, shardio, spec
from ccat.data.device_cache import DeviceCache
from ccat.data.pipeline import make_loader
from ccat.errors import UserError
from conftest import run_cli

Samples = list[tuple[str, dict[str, bytes]]]


def manifest_of(root: Path) -> dict[str, Any]:
    return json.loads((root / spec.MANIFEST_NAME).read_text())


def save(root: Path, manifest: dict[str, Any]) -> None:
    (root / spec.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def read(root: Path, name: str) -> Samples:
    with open(root / name, "rb") as f:
        return list(shardio.iter_tar_samples(f))


def label(members: dict[str, bytes]) -> int:
    return int(members[spec.LABEL_MEMBER])


def write(root: Path, name: str, samples: Samples) -> None:
    """Rewrite shard ``name`` holding ``samples``, then bring the manifest's bytes, sha256,
    sample and class counts in line with the files, as a careful forger would; the
    fingerprint, the membership hashes and any recorded membership stay as built."""
    with tarfile.open(root / name, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            shardio.write_sample(tar, key, members)
    recount(root)


def recount(root: Path) -> None:
    manifest = manifest_of(root)
    for entry in manifest["splits"].values():
        labels: Counter[int] = Counter()
        for shard in entry["shards"]:
            data = (root / shard["name"]).read_bytes()
            here = read(root, shard["name"])
            shard.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                         num_samples=len(here))
            labels.update(label(m) for _, m in here)
        entry["num_samples"] = sum(s["num_samples"] for s in entry["shards"])
        entry["class_counts"] = [labels[c] for c in range(len(manifest["classes"]))]
    save(root, manifest)


def list_first_train_shard_again(root: Path) -> None:
    manifest = manifest_of(root)
    manifest["splits"]["train"]["shards"].append(manifest["splits"]["train"]["shards"][0])
    save(root, manifest)
    recount(root)


def copy_first_train_shard_under_a_new_name(root: Path) -> None:
    manifest = manifest_of(root)
    shards = manifest["splits"]["train"]["shards"]
    copy = {**shards[0], "name": spec.shard_name("train", len(shards))}
    shutil.copy(root / shards[0]["name"], root / copy["name"])
    shards.append(copy)
    save(root, manifest)
    recount(root)


def copy_a_train_sample_into_a_test_shard(root: Path) -> None:
    write(root, "test-000000.tar", read(root, "test-000000.tar") + read(root, "train-000000.tar")[:1])


def same_label_pair(root: Path) -> tuple[str, int, int]:
    """(train shard, sample in it, sample of test-000000.tar) of one label, so that moving
    one for the other leaves every class count as built."""
    test = read(root, "test-000000.tar")
    for shard in manifest_of(root)["splits"]["train"]["shards"]:
        train = read(root, shard["name"])
        for i, (_, a) in enumerate(train):
            for j, (_, b) in enumerate(test):
                if label(a) == label(b):
                    return shard["name"], i, j
    raise AssertionError("the tiny build has no label in both splits")


def swap_a_train_and_a_test_sample(root: Path) -> None:
    name, i, j = same_label_pair(root)
    train, test = read(root, name), read(root, "test-000000.tar")
    train[i], test[j] = test[j], train[i]
    write(root, name, train)
    write(root, "test-000000.tar", test)


def replace_a_test_sample_by_a_train_sample(root: Path) -> None:
    name, i, j = same_label_pair(root)
    test = read(root, "test-000000.tar")
    test[j] = read(root, name)[i]
    write(root, "test-000000.tar", test)


def swap_two_labels_in_a_test_shard(root: Path) -> None:
    test = read(root, "test-000000.tar")
    (k0, m0), (k1, m1) = test[0], next(s for s in test if label(s[1]) != label(test[0][1]))
    m0[spec.LABEL_MEMBER], m1[spec.LABEL_MEMBER] = m1[spec.LABEL_MEMBER], m0[spec.LABEL_MEMBER]
    write(root, "test-000000.tar", test)


def drop_a_test_sample(root: Path) -> None:
    write(root, "test-000000.tar", read(root, "test-000000.tar")[1:])


# each tampering, and the splits whose shards it changes
TAMPERINGS: dict[str, tuple[Callable[[Path], None], set[str]]] = {
    "a shard listed twice": (list_first_train_shard_again, {"train"}),
    "a shard copied under a new name": (copy_first_train_shard_under_a_new_name, {"train"}),
    "a train sample copied into a test shard": (copy_a_train_sample_into_a_test_shard, {"test"}),
    "a train and a test sample swapped": (swap_a_train_and_a_test_sample, {"train", "test"}),
    "a test sample replaced by a train sample": (replace_a_test_sample_by_a_train_sample,
                                                 {"test"}),
    "two labels swapped": (swap_two_labels_in_a_test_shard, {"test"}),
    "a sample removed": (drop_a_test_sample, {"test"}),
}


@pytest.fixture(params=["recorded", "older"])
def build(request, built: Path, tmp_path: Path) -> Path:
    """A copy of the tiny build: its manifest as built now (every shard's membership
    recorded), or as builds wrote it before (no membership: readers learn it from the
    shards). The fingerprint is the same."""
    root = Path(shutil.copytree(built, tmp_path / "ds"))
    if request.param == "older":
        manifest = manifest_of(root)
        for entry in manifest["splits"].values():
            for shard in entry["shards"]:
                del shard["membership"]
        save(root, manifest)
    return root


def one_sentence(text: str) -> str:
    """``text`` (a CLI's stderr, wrapped by rich) as one line, checked to be one message."""
    assert "Traceback" not in text and text.count("error") <= 1, text
    return " ".join(text.split())


PATHS = [(cached, split) for cached in (False, True) for split in ("train", "test")]


def loader_refusals(root: Path) -> dict[tuple[bool, str], str | None]:
    """What each loader path says about ``root`` (None: it read the split): training
    (``train``) and evaluation (``test``), streamed and from the device cache, each opening
    the data afresh."""
    cfg = DataConfig(batch_size=2, workers=0, frame_size=32)
    said: dict[tuple[bool, str], str | None] = {}
    for cached, split in PATHS:
        said[(cached, split)] = None
        try:
            data = open_dataset(root)
            cache = DeviceCache(data, cfg, torch.device("cpu")) if cached else None
            list(make_loader(data, split, cfg, train=split == "train", seed=0, cache=cache))
        except UserError as err:
            said[(cached, split)] = str(err)
    return said


def test_the_untampered_build_passes_verify_and_every_loader_path(build: Path, capsys) -> None:
    code, out, _ = run_cli(["verify", build], capsys)
    assert code == 0 and set(loader_refusals(build).values()) == {None}
    assert "match the manifest of" in out and "membership" in " ".join(out.split())


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_verify_refuses_shards_that_are_not_the_fingerprints_membership(
        build: Path, tampering: str, capsys) -> None:
    TAMPERINGS[tampering][0](build)
    code, out, err = run_cli(["verify", build], capsys)
    said = one_sentence(err)
    assert code == 1 and "ok:" not in out and "rebuild" in said, said


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_every_loader_path_that_reads_them_refuses_them(build: Path, tampering: str) -> None:
    """Training and evaluation, streamed and cached: each path that reads a changed split
    refuses it in one sentence naming the data and the fix (a manifest that records the
    membership is refused on open where it contradicts itself, else as the shard is read)."""
    change, splits = TAMPERINGS[tampering]
    change(build)
    for (cached, split), sentence in loader_refusals(build).items():
        if split in splits:
            assert sentence is not None, (cached, split)
        if sentence is not None:
            assert "\n" not in sentence and "rebuild" in sentence and str(build) in sentence


def test_a_moved_sample_is_named_with_its_shard(build: Path) -> None:
    name, i, j = same_label_pair(build)
    was, moved = read(build, "test-000000.tar")[j][0], read(build, name)[i][0]
    recorded = "membership" in manifest_of(build)["splits"]["test"]["shards"][0]
    replace_a_test_sample_by_a_train_sample(build)
    said = loader_refusals(build)
    if recorded:  # checked as the shard is read
        assert said[(False, "test")] == said[(True, "test")] == (
            f"shard test-000000.tar of {build} holds sample {moved!r} where the membership "
            f"its fingerprint covers lists {was!r}; run `ccat-data verify {build}`, then "
            "rebuild or re-download the damaged shards")
    else:  # learnt from the shards on open, so every path refuses before reading
        assert all(f"sample {moved!r} is in {name} and in test-000000.tar" in s
                   for s in said.values())


def test_a_membership_rewritten_to_match_is_refused_as_an_edited_manifest(built: Path,
                                                                          tmp_path: Path) -> None:
    """The forger also rewrites the shard's recorded membership (no key twice, every count
    kept): it no longer hashes to the split's membership_sha256, which the fingerprint
    covers."""
    root = Path(shutil.copytree(built, tmp_path / "ds"))
    swap_two_labels_in_a_test_shard(root)
    manifest = manifest_of(root)
    shard = manifest["splits"]["test"]["shards"][0]
    shard["membership"] = spec.format_membership(
        [(k, label(m)) for k, m in read(root, shard["name"])])
    save(root, manifest)
    with pytest.raises(UserError, match="manifest edited after build: the keys and labels of "
                                        "split 'test' are not the membership its fingerprint "
                                        "covers"):
        open_dataset(root)


def test_a_malformed_or_partial_membership_is_refused(built: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(built, tmp_path / "ds"))
    manifest = manifest_of(root)
    first = manifest["splits"]["train"]["shards"][0]
    for bad in ("a.b=0", "k=01", "k=0  k2=1", "k=-1", "k 0", "k=0,k2=1", "", "k=" + "9" * 5000):
        save(root, {**manifest, "splits": {**manifest["splits"], "train": {
            **manifest["splits"]["train"], "shards": [{**first, "membership": bad},
                                                      *manifest["splits"]["train"]["shards"][1:]]}}})
        with pytest.raises(UserError, match=r"splits.train.shards\[0\].membership: .* does not "
                                            "match"):
            open_dataset(root)
    del first["membership"]
    save(root, manifest)
    with pytest.raises(UserError, match="manifest edited after build: some shards record their "
                                        "membership and others do not"):
        open_dataset(root)


def damage(root: Path) -> list[tuple[str, Callable[[], None]]]:
    """Ways to damage test-000000.tar of ``root`` (a FIFO where it was, a cut inside a
    member, a sample without a label), each followed by the sentence's words."""
    path = root / "test-000000.tar"
    whole = path.read_bytes()

    def fifo() -> None:
        path.unlink()
        os.mkfifo(path)

    def cut() -> None:
        path.write_bytes(whole[:len(whole) // 2 + 100])

    def unlabelled() -> None:  # the manifest's bytes and sha256 follow; its counts stay
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in read_bytes_samples(whole):
                members.pop(spec.LABEL_MEMBER)
                shardio.write_sample(tar, key, members)
        manifest = manifest_of(root)
        shard = manifest["splits"]["test"]["shards"][0]
        shard.update(bytes=path.stat().st_size,
                     sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        save(root, manifest)

    return [("is not a regular file", fifo), ("bytes but the manifest lists", cut),
            ("with no label, not a class index", unlabelled)]


def read_bytes_samples(data: bytes) -> Samples:
    return list(shardio.iter_tar_samples(io.BytesIO(data)))


@pytest.mark.parametrize("index", range(3))
def test_learning_an_older_builds_membership_never_hangs_on_damaged_shards(
        built: Path, tmp_path: Path, index: int) -> None:
    root = Path(shutil.copytree(built, tmp_path / "ds"))
    manifest = manifest_of(root)
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            del shard["membership"]
    save(root, manifest)
    says, change = damage(root)[index]
    change()
    with pytest.raises(UserError) as refused:
        open_dataset(root)
    assert says in str(refused.value) and "test-000000.tar" in str(refused.value)


CONFIG = ("device: cpu\ndata: {batch_size: 4, workers: 0, frame_size: 32}\nmodel: {width: 16, "
          "encoder_width: 4, encoder_blocks: [1, 1, 1, 1], heads: 2, ffn_mult: 2}\n"
          "optim: {epochs: 1}\nmethod: {name: sum}\n")


def run_ccat(args: list, monkeypatch, capsys) -> tuple[int, str]:
    from ccat.cli import main

    monkeypatch.setattr(sys, "argv", ["ccat", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


def test_ccat_train_and_eval_refuse_them(build: Path, tmp_path: Path, monkeypatch,
                                         capsys) -> None:
    """The entry points: `ccat train` on a build listing a shard twice writes no run;
    `ccat eval` of a run trained on the genuine build, on the same build after a train
    sample replaced a test sample, scores nothing."""
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    run = tmp_path / "run"
    code, err = run_ccat(["train", "--config", config, "--data", build, "--out", run],
                         monkeypatch, capsys)
    assert code == 0, err
    replace_a_test_sample_by_a_train_sample(build)
    code, err = run_ccat(["eval", "--ckpt", run / "last.pt", "--json", tmp_path / "eval.json"],
                         monkeypatch, capsys)
    said = one_sentence(err)
    assert code == 2 and "test-000000.tar" in said and "rebuild" in said, said
    assert not (tmp_path / "eval.json").exists()
    list_first_train_shard_again(build)
    code, err = run_ccat(["train", "--config", config, "--data", build, "--out",
                          tmp_path / "run2"], monkeypatch, capsys)
    said = one_sentence(err)
    assert code != 0 and "train-000000.tar" in said, said
    assert not (tmp_path / "run2" / "last.pt").exists()
