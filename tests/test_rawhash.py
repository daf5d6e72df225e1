"""Issue 28, the build: raw files hashed from the bytes the decoders decode (one read), with
BLAKE3 by default and sha256 on request; builds hashed either way keep verifying, and a
build from before ``--raw-hash`` (sha256) is reused as it is."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ccat.data import spec
from conftest import TINY_BUILD, run_cli
from preprocess import media, rawhash, verify


def build(raw: Path, out: Path, capsys, *extra) -> tuple[int, str, str]:
    return run_cli(["build", "cremad", "--raw", raw, "--out", out, *TINY_BUILD, *extra], capsys)


def manifest_of(out: Path) -> dict:
    return json.loads((out / spec.MANIFEST_NAME).read_text())


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def sha256_build(synth_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic tree built with ``--raw-hash sha256``: a manifest as builds before the
    option wrote it."""
    from conftest import invoke

    out = tmp_path_factory.mktemp("sha256") / "cremad"
    assert invoke(["build", "cremad", "--raw", synth_raw, "--out", out, *TINY_BUILD,
                   "--raw-hash", "sha256"]) == 0
    return out


def test_sha256_build_records_the_digest_builds_before_the_option_did(
        sha256_build: Path, built: Path, synth_raw: Path) -> None:
    """The fingerprint formula of builds before --raw-hash, written out: sha256 of each raw
    file, sha256 of the canonical JSON listing. The shards are the default build's bytes."""
    files = sorted(p for p in synth_raw.rglob("*") if p.is_file())
    listing = [[p.relative_to(synth_raw).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()]
               for p in files]
    expected = hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()
    old, new = manifest_of(sha256_build), manifest_of(built)
    assert old["sources"]["raw"] == {"num_files": 48, "sha256": expected}
    assert tars(sha256_build) == tars(built)
    assert spec.compute_fingerprint(old) == old["fingerprint"]
    differing = {line.split(" ")[0] for line in spec.diff_fingerprint_params(
        spec.fingerprint_params(old), spec.fingerprint_params(new))}
    assert differing == {"sources.raw.sha256", "sources.raw.blake3"}


def test_builds_hashed_either_way_verify(sha256_build: Path, built: Path) -> None:
    for out in (sha256_build, built):
        assert verify.verify(out).samples == sum(
            e["num_samples"] for e in manifest_of(out)["splits"].values())


def test_a_sha256_build_is_reused_by_a_default_build_and_checked_with_sha256(
        sha256_build: Path, raw_copy: Path, tmp_path: Path, capsys) -> None:
    out = Path(shutil.copytree(sha256_build, tmp_path / "old"))
    before = (out / spec.MANIFEST_NAME).read_bytes()
    code, stdout, _ = build(raw_copy, out, capsys)  # default --raw-hash blake3
    assert code == 0 and (out / spec.MANIFEST_NAME).read_bytes() == before
    wav = sorted((raw_copy / "AudioWAV").glob("*.wav"))[0]
    data = wav.read_bytes()
    wav.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of one file
    code, _, err = build(raw_copy, out, capsys)
    assert code == 1 and "raw files: 48 then, 48 now, their content differs" in err


def test_an_unknown_raw_hash_is_refused_in_one_sentence(
        synth_raw: Path, tmp_path: Path, capsys) -> None:
    code, _, err = build(synth_raw, tmp_path / "out", capsys, "--raw-hash", "md5")
    assert code != 0 and "--raw-hash 'md5': choose blake3 or sha256" in err
    assert not (tmp_path / "out").exists()


def test_decoding_the_bytes_read_gives_the_features_of_decoding_the_file(
        synth_raw: Path) -> None:
    wav = sorted((synth_raw / "AudioWAV").glob("*.wav"))[0]
    flv = sorted((synth_raw / "VideoFlash").glob("*.flv"))[0]
    audio, video = media.AudioParams(seconds=1.0), media.VideoParams(size=32)
    from_files = media.audio_features(wav, audio), media.sample_frames(flv, video)
    with rawhash.recording("blake3") as read:
        from_memory = media.audio_features(wav, audio), media.sample_frames(flv, video)
    assert np.array_equal(from_files[0][0], from_memory[0][0])
    assert from_files[0][1] == from_memory[0][1]
    assert from_files[1] == from_memory[1]
    assert read == {p: rawhash.file_digest(p, "blake3") for p in (wav, flv)}


def test_errors_name_the_file_as_before_when_decoding_from_memory(tmp_path: Path) -> None:
    """Skip records quote the decoder's error: reading from memory must not put a buffer
    object's address (or PyAV's '<none>') into a manifest."""
    for name, decode in (("bad.wav", lambda p: media.audio_features(p, media.AudioParams())),
                         ("bad.flv", lambda p: media.sample_frames(p, media.VideoParams())),
                         ("bad.mp4", lambda p: media.audio_features(p, media.AudioParams())),
                         ("bad.png", lambda p: media.image_features(p, media.ImageParams()))):
        path = tmp_path / name
        path.write_bytes(b"not media at all")
        with pytest.raises(media.MediaError) as from_file:
            decode(path)
        with rawhash.recording("sha256") as read, pytest.raises(media.MediaError) as from_memory:
            decode(path)
        assert str(from_memory.value) == str(from_file.value) and str(path) in str(from_file.value)
        assert read == {path: hashlib.sha256(b"not media at all").hexdigest()}


def test_files_the_decoders_do_not_read_are_hashed_from_disk(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"text a recipe reads itself")
    seen = {tmp_path / "b.wav": "f" * 64}
    assert rawhash.source_hashes(tmp_path, ["a.txt", "b.wav", "missing.wav"], "blake3", seen) == {
        "a.txt": rawhash.digest(b"text a recipe reads itself", "blake3"), "b.wav": "f" * 64}


def test_a_build_interrupted_before_the_option_resumes_only_with_sha256(
        raw_copy: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from preprocess import writer

    out, real_finish = tmp_path / "out", writer._finish

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C after the last shard, before the manifest

    monkeypatch.setattr(writer, "_finish", interrupted)
    assert build(raw_copy, out, capsys, "--raw-hash", "sha256")[0] != 0
    monkeypatch.setattr(writer, "_finish", real_finish)
    plan = out / writer.STATE_DIR / writer.PLAN_NAME
    record = json.loads(plan.read_text())
    del record["raw_hash"]  # as ccat-data before --raw-hash recorded its plan
    plan.write_text(json.dumps(record))
    code, _, err = build(raw_copy, out, capsys)
    assert code == 1 and "raw files hashed with sha256, now blake3 (--raw-hash sha256 resumes it)" in err
    code, stdout, _ = build(raw_copy, out, capsys, "--raw-hash", "sha256")
    assert code == 0 and "processed 0 clips" in stdout
    assert set(manifest_of(out)["sources"]["raw"]) == {"num_files", "sha256"}
