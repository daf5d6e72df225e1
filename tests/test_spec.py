"""The shard format: member names, tar round trip, manifest checks and the fingerprint."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from ccat.data import kinds, shardio, spec

MODALITIES = {"audio": {"kind": "spectrogram", "shape": [257, 4], "dtype": "float16"},
              "video": {"kind": "frames", "num_frames": 3, "size": 8}}


def manifest(**changes) -> dict:
    """A valid manifest with ``changes`` (a split without a membership hash gets the empty
    one), its fingerprint computed for them."""
    base = {"spec_version": spec.SPEC_VERSION, "dataset": "cremad", "classes": ["A", "B"],
            "modalities": MODALITIES, "splits": {"train": {"num_samples": 0, "shards": []}},
            "skipped": [], "sources": {"split": {"seed": 0}, "build": {"workers": 2},
                                       "raw": {"num_files": 2, "sha256": "1" * 64}},
            "fingerprint": "", "tool_version": "0.1.0"}
    result = {**base, **changes}
    if isinstance(result["splits"], dict):
        result["splits"] = {name: {"membership_sha256": spec.membership_sha256([]), **entry}
                            for name, entry in result["splits"].items()}
    result["fingerprint"] = spec.compute_fingerprint(result)
    return result


def test_audio_video_member_names_are_exactly_the_spec() -> None:
    assert kinds.sample_members(MODALITIES) == [
        "audio.npy", "label.cls", "meta.json", "video.0.jpg", "video.1.jpg", "video.2.jpg"]


def test_tar_round_trip_is_deterministic_and_decodes() -> None:
    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(jpeg, format="JPEG", quality=95)
    members = {"audio.npy": shardio.encode_npy(np.ones((257, 4), np.float16)),
               "label.cls": shardio.encode_label(1), "meta.json": spec.encode_json({"id": "k_1"}),
               **{f"video.{i}.jpg": jpeg.getvalue() for i in range(3)}}

    def tar_bytes() -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            shardio.write_sample(tar, "k_1", members)
        return buf.getvalue()

    assert tar_bytes() == tar_bytes()
    [(key, read)] = list(shardio.iter_tar_samples(io.BytesIO(tar_bytes())))
    sample = kinds.decode_sample(key, read, MODALITIES)
    assert sample.label == 1 and sample.meta == {"id": "k_1"}
    assert sample.data["audio"].dtype == np.float16
    assert sample.data["video"].shape == (3, 8, 8, 3)
    with pytest.raises(spec.SpecError, match="expected"):
        kinds.decode_sample(key, {k: v for k, v in read.items() if k != "video.2.jpg"}, MODALITIES)


def test_keys_with_dots_are_refused() -> None:
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as tar, pytest.raises(spec.SpecError):
        shardio.write_sample(tar, "a.b", {"label.cls": b"0"})


@pytest.mark.parametrize("name", [
    "pipe:curl x", "../x.tar", "/etc/x.tar", "train-0.tar", "../train-000000.tar",
    "sub/train-000000.tar", "/tmp/train-000000.tar", "http://host/train-000000.tar",
    "s3://bucket/train-000000.tar", "file:///train-000000.tar", "train-000000.tar\n",
    "train-000000.tar/..", "..\\train-000000.tar", "~/train-000000.tar", " train-000000.tar",
    "train-000000.tar?x=1", "train-000000.tar#", "TRAIN-000000.tar", "train-0000000.tar"])
def test_shard_names_that_could_leave_the_dataset_are_refused(name: str) -> None:
    bad = manifest(splits={"train": {"num_samples": 1, "shards": [
        {"name": name, "num_samples": 1, "bytes": 1, "sha256": "0" * 64}]}})
    with pytest.raises(spec.SpecError, match="shard names must look like"):
        spec.check_manifest(bad)


def shard(name: str) -> dict:
    return {"name": name, "num_samples": 1, "bytes": 1, "sha256": "0" * 64}


@pytest.mark.parametrize("splits, says", [
    ({"train": [shard("train-000000.tar"), shard("train-000000.tar")]},
     r"splits.train.shards\[1\] lists train-000000.tar, which splits.train.shards\[0\] lists "
     "too; a shard is listed once"),
    ({"train": [shard("train-000000.tar")], "test": [shard("train-000000.tar")]},
     r"splits.test.shards\[0\] is named 'train-000000.tar', a shard of another split"),
    ({"val": [shard("val-000001.tar")], "test": [shard("test-000000.tar"),
                                                 shard("val-000001.tar")]},
     r"splits.test.shards\[1\] is named 'val-000001.tar', a shard of another split"),
])
def test_a_shard_listed_twice_in_one_or_two_splits_is_refused(splits: dict, says: str) -> None:
    bad = manifest(splits={name: {"num_samples": len(shards), "shards": shards}
                           for name, shards in splits.items()})
    with pytest.raises(spec.SpecError, match=says):
        spec.check_manifest(bad)


def test_manifest_keys_are_fixed() -> None:
    spec.check_manifest(manifest())
    with pytest.raises(spec.SpecError, match="'extra' was unexpected"):
        spec.check_manifest(manifest(extra=1))
    with pytest.raises(spec.SpecError, match="spec version 1"):
        spec.check_manifest(manifest(spec_version=1))
    with pytest.raises(spec.SpecError, match=f"spec version {spec.SPEC_VERSION + 1}, this "
                       f"toolkit reads version {spec.SPEC_VERSION}; upgrade ccat"):
        spec.check_manifest(manifest(spec_version=spec.SPEC_VERSION + 1))


def test_fingerprint_ignores_build_only_settings_and_names_what_differs() -> None:
    a = manifest()
    b = manifest(sources={**a["sources"], "build": {"workers": 16}})
    c = manifest(sources={**a["sources"], "split": {"seed": 3}})
    assert spec.compute_fingerprint(a) == spec.compute_fingerprint(b)
    assert spec.compute_fingerprint(a) != spec.compute_fingerprint(c)
    assert spec.diff_fingerprint_params(spec.fingerprint_params(a), spec.fingerprint_params(c)) == [
        "sources.split.seed: 0 -> 3"]


def test_fingerprint_covers_membership_and_raw_content_and_names_them_in_words() -> None:
    raw = {"num_files": 4, "sha256": "a" * 64}
    train = {"num_samples": 0, "shards": [],
             "membership_sha256": spec.membership_sha256([("k_2", 1), ("k_1", 0)])}
    a = manifest(splits={"train": train}, sources={"split": {"seed": 0}, "raw": raw})
    assert train["membership_sha256"] == spec.membership_sha256([["k_1", 0], ["k_2", 1]])
    other_members = spec.membership_sha256([("k_1", 0), ("k_2", 1), ("k_3", 1)])
    b = manifest(splits={"train": {**train, "membership_sha256": other_members}},
                 sources=a["sources"])
    c = manifest(splits=a["splits"], sources={"split": {"seed": 0},
                                              "raw": {**raw, "sha256": "b" * 64}})
    assert len({spec.compute_fingerprint(m) for m in (a, b, c)}) == 3
    assert spec.compute_fingerprint(a) == spec.compute_fingerprint(json_copy(a))  # pure
    params = spec.fingerprint_params
    assert spec.diff_fingerprint_params(params(a), params(b)) == [
        f"splits.train.membership_sha256 (which samples the split holds): "
        f"{train['membership_sha256'][:12]} -> {other_members[:12]}"]
    assert spec.diff_fingerprint_params(params(a), params(c)) == [
        "sources.raw.sha256 (the content of the raw files): aaaaaaaaaaaa -> bbbbbbbbbbbb"]


def json_copy(value: dict) -> dict:
    return json.loads(json.dumps(value))

@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_read_as_tarfile_reads_them(fmt) -> None:
    buf = io.BytesIO()
    names = ["k_1.label.cls", "deep/" * 30 + "k_2.audio.npy"]  # ustar: a prefix holds folders
    if fmt != tarfile.USTAR_FORMAT:  # ustar cannot hold a file name over 100 characters
        names.append("k_3." + "x" * 120 + ".json")
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(_folder("a-folder"))
        for i, name in enumerate(names):
            tar.addfile(shardio.tar_member_info(name, i * 700), io.BytesIO(bytes([i]) * (i * 700)))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(shardio.iter_tar_members(io.BytesIO(data))) == expected
    with pytest.raises(spec.SpecError, match="truncated"):
        list(shardio.iter_tar_members(io.BytesIO(data[:2000])))
    corrupt = bytearray(data)
    corrupt[512 + 10] ^= 0xFF  # a name byte of the first file's header
    with pytest.raises(spec.SpecError, match="checksum"):
        list(shardio.iter_tar_members(io.BytesIO(bytes(corrupt))))


def _folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info
