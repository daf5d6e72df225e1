"""Issue 11, the builder's side: a build is exactly the data it claims, or refused in one
sentence. Identity (membership and raw content in the fingerprint), resuming only the same
plan, no key in two places, and ordinary faults (full disk, read-only or busy --out)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3
import numpy as np
import pytest
import soundfile

from ccat.data import shardio, spec
from conftest import TINY_BUILD, assert_keys_unique, run_cli, synth_tree
from preprocess import outdir, writer

WAIT_S = 120  # the most a subprocess build is given to reach the point a test waits for


def build(raw: Path, out: Path, capsys, *extra) -> tuple[int, str, str]:
    return run_cli(["build", "cremad", "--raw", raw, "--out", out, *TINY_BUILD, *extra], capsys)


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def manifest_of(out: Path) -> dict:
    return json.loads((out / spec.MANIFEST_NAME).read_text())


def one_sentence(err: str) -> str:
    """The error line of a refused command: exactly one line, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def add_clips(raw: Path, scratch: Path, count: int) -> list[str]:
    """Copy ``count`` synthetic clips with ids new to ``raw`` into it; returns their ids."""
    have = {p.stem for p in (raw / "AudioWAV").glob("*.wav")}
    fresh = [i for i in synth_tree(scratch, clips=count + len(have), seed=7) if i not in have]
    for clip_id in fresh[:count]:
        for folder, suffix in (("AudioWAV", ".wav"), ("VideoFlash", ".flv")):
            shutil.copyfile(scratch / folder / f"{clip_id}{suffix}", raw / folder / f"{clip_id}{suffix}")
    return fresh[:count]


def kill_build_part_way(raw: Path, out: Path) -> None:
    """Start `ccat-data build` in a process and SIGKILL it once its first shard is recorded
    (on a tree big enough that much of the build is still to do then)."""
    command = [sys.executable, "-m", "preprocess.cli", "build", "cremad", "--raw", str(raw),
               "--out", str(out), *TINY_BUILD]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + WAIT_S
    record = out / writer.STATE_DIR / "train-000000.tar.json"
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / spec.MANIFEST_NAME).exists(), "the build finished before it was killed"


# ---------------------------------------------------------------- 1. identity


def test_manifest_records_membership_and_raw_content_hashes(built: Path, synth_raw: Path) -> None:
    manifest = manifest_of(built)
    assert manifest["spec_version"] == 2
    files = sorted(p for p in synth_raw.rglob("*") if p.is_file())
    listing = [[p.relative_to(synth_raw).as_posix(), blake3.blake3(p.read_bytes()).hexdigest()]
               for p in files]  # every clip is built, so every file was read
    expected = blake3.blake3(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()
    assert manifest["sources"]["raw"] == {"num_files": 48, "blake3": expected}
    assert_keys_unique(built)  # each split's membership_sha256 matches its shards


def test_more_clips_or_one_changed_file_give_another_fingerprint(
        built: Path, raw_copy: Path, tmp_path: Path, capsys) -> None:
    grown = Path(shutil.copytree(raw_copy, tmp_path / "grown"))
    add_clips(grown, tmp_path / "scratch", 6)
    assert build(grown, tmp_path / "more", capsys)[0] == 0
    first, more = manifest_of(built), manifest_of(tmp_path / "more")
    assert more["fingerprint"] != first["fingerprint"]
    assert more["splits"]["train"]["membership_sha256"] != first["splits"]["train"][
        "membership_sha256"]
    wav = sorted((raw_copy / "AudioWAV").glob("*.wav"))[0]
    signal_, rate = soundfile.read(wav)
    soundfile.write(wav, np.flip(signal_), rate, subtype="PCM_16")  # same length, other content
    assert build(raw_copy, tmp_path / "changed", capsys)[0] == 0
    changed = manifest_of(tmp_path / "changed")
    assert changed["fingerprint"] != first["fingerprint"]
    assert changed["sources"]["raw"]["num_files"] == 48
    assert spec.diff_fingerprint_params(spec.fingerprint_params(first),
                                        spec.fingerprint_params(changed)) == [
        f"sources.raw.blake3 (the content of the raw files): "
        f"{first['sources']['raw']['blake3'][:12]} -> {changed['sources']['raw']['blake3'][:12]}"]


def test_info_shows_membership_and_raw_content_hashes(built: Path, capsys) -> None:
    code, out, _ = run_cli(["info", built], capsys)
    manifest = manifest_of(built)
    assert code == 0
    for entry in manifest["splits"].values():
        assert entry["membership_sha256"] in out
    assert manifest["sources"]["raw"]["blake3"] in out and "raw content (48 files)" in out


# ---------------------------------------------------------------- 2. resume only the same plan


def test_killed_build_of_a_grown_raw_tree_is_refused_then_overwritten(
        tmp_path: Path, capsys) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    synth_tree(raw, clips=48)
    kill_build_part_way(raw, out)
    added = add_clips(raw, tmp_path / "scratch", 6)
    code, _, err = build(raw, out, capsys)
    line = one_sentence(err)
    assert code == 1 and "holds an interrupted build of other data" in line
    assert "raw files: 12 added, 0 removed, 0 changed" in line and "--overwrite" in line
    assert not (out / spec.MANIFEST_NAME).exists()
    code, _, _ = build(raw, out, capsys, "--overwrite")
    assert code == 0
    fresh = tmp_path / "fresh"
    assert build(raw, fresh, capsys)[0] == 0
    assert shard_hashes(out) == shard_hashes(fresh)
    assert manifest_of(out)["fingerprint"] == manifest_of(fresh)["fingerprint"]
    keys = {key for shard in out.glob("*.tar") for key, _ in shardio.iter_tar_samples(
        io.BytesIO(shard.read_bytes()))}
    assert set(added) <= keys and len(keys) == 54


def test_finished_build_of_other_raw_content_is_refused_then_overwritten(
        built: Path, raw_copy: Path, tmp_path: Path, capsys) -> None:
    out = Path(shutil.copytree(built, tmp_path / "copy"))
    add_clips(raw_copy, tmp_path / "scratch", 6)
    code, _, err = build(raw_copy, out, capsys)
    line = one_sentence(err)
    assert code == 1 and "already holds a finished build of other data" in line
    assert "raw files: 48 then, 60 now" in line
    assert shard_hashes(out) == shard_hashes(built) and not (out / writer.STATE_DIR).exists()
    code, stdout, _ = build(raw_copy, out, capsys, "--overwrite")
    assert code == 0 and "processed 30 clips" in stdout
    assert manifest_of(out)["splits"]["train"]["num_samples"] > manifest_of(built)["splits"][
        "train"]["num_samples"]


def test_interrupted_build_resumes_only_while_read_files_are_unchanged(
        raw_copy: Path, tmp_path: Path, built: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    real_finish = writer._finish

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C after the last shard, before the manifest

    monkeypatch.setattr(writer, "_finish", interrupted)
    assert build(raw_copy, out, capsys)[0] != 0
    monkeypatch.setattr(writer, "_finish", real_finish)
    assert (out / writer.STATE_DIR / writer.PLAN_NAME).is_file()
    wav = sorted((raw_copy / "AudioWAV").glob("*.wav"))[3]
    original = wav.read_bytes()
    wav.write_bytes(original[:-2] + bytes([original[-2] ^ 1, original[-1]]))
    code, _, err = build(raw_copy, out, capsys)
    assert code == 1 and "raw files: 0 added, 0 removed, 1 changed" in one_sentence(err)
    wav.write_bytes(original)
    code, stdout, _ = build(raw_copy, out, capsys)
    assert code == 0 and "processed 0 clips" in stdout
    assert shard_hashes(out) == shard_hashes(built)
    assert manifest_of(out)["fingerprint"] == manifest_of(built)["fingerprint"]


# ---------------------------------------------------------------- 3. no sample in two places


def split_file(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(f"{i},{i.split('_')[2]}\r\n" for i in ids))
    return path


def test_a_key_twice_in_one_split_file_names_the_file_and_both_lines(
        synth_raw: Path, tmp_path: Path, capsys) -> None:
    ids = sorted(p.stem for p in (synth_raw / "AudioWAV").glob("*.wav"))
    train = split_file(tmp_path / "train.csv", ids[:18] + [ids[2]])
    code, _, err = build(synth_raw, tmp_path / "out", capsys, "--split", f"train={train}")
    line = one_sentence(err)
    assert code == 1 and f"{ids[2]} is listed twice ({train} lines 3 and 19)" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_key_in_two_split_files_names_both_files_and_lines(
        synth_raw: Path, tmp_path: Path, capsys) -> None:
    ids = sorted(p.stem for p in (synth_raw / "AudioWAV").glob("*.wav"))
    train = split_file(tmp_path / "train.csv", ids[:18])
    test = split_file(tmp_path / "test.csv", ids[18:] + [ids[5]])
    code, _, err = build(synth_raw, tmp_path / "out", capsys, "--split", f"train={train}",
                         "--split", f"test={test}")
    line = one_sentence(err)
    assert code == 1 and f"{ids[5]} is listed twice ({test} line 7 and {train} line 6)" in line


# ---------------------------------------------------------------- 8. faults are sentences


def test_a_full_disk_is_one_sentence_leaves_no_partial_file_and_resumes(
        synth_raw: Path, built: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out, calls = tmp_path / "out", []
    real_fsync = os.fsync

    def full_at_the_third_write(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(writer.os, "fsync", full_at_the_third_write)
    code, _, err = build(synth_raw, out, capsys)
    monkeypatch.setattr(writer.os, "fsync", real_fsync)
    assert code == 1 and "is full" in one_sentence(err) and "run the same command again" in err
    assert not list(out.rglob("*.tmp")) and not (out / spec.MANIFEST_NAME).exists()
    assert build(synth_raw, out, capsys)[0] == 0
    assert shard_hashes(out) == shard_hashes(built)


def test_a_read_only_out_is_one_sentence(synth_raw: Path, tmp_path: Path, capsys,
                                         monkeypatch) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    for name in ("open", "mkdir"):  # a read-only mount at out, which root cannot write either
        real = getattr(os, name)

        def read_only(path, *args, real=real, **kwargs):
            if str(path).startswith(f"{out}{os.sep}"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(writer.os, name, read_only)
    code, _, err = build(synth_raw, out, capsys)
    monkeypatch.undo()
    assert code == 1 and f"cannot write into {out} (Read-only file system)" in one_sentence(err)
    assert "give --out a folder you can write to" in err and not any(out.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder anyway")
def test_a_folder_without_write_permission_is_one_sentence(synth_raw: Path, tmp_path: Path,
                                                            capsys) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, _, err = build(synth_raw, parent / "out", capsys)
    finally:
        parent.chmod(0o755)
    assert code == 1 and "cannot write into" in one_sentence(err)


def test_an_out_that_is_a_file_is_one_sentence(synth_raw: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "out").write_text("not a folder")
    code, _, err = build(synth_raw, tmp_path / "out", capsys)
    assert code == 1 and "is a file, not a folder" in one_sentence(err)


HOLD_LOCK = """
import sys
from pathlib import Path
from preprocess import writer
with writer.locked(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_build_into_a_busy_out_fails_at_once_and_a_dead_lock_does_not_block(
        synth_raw: Path, built: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = build(synth_raw, out, capsys)
        assert code == 1
        assert f"another ccat-data build (process {holder.pid}) is writing into {out}" in \
            one_sentence(err)
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, its lock dies with the process
        holder.wait()
    assert (out / outdir.STATE_DIR / outdir.LOCK_NAME).exists()
    assert build(synth_raw, out, capsys)[0] == 0
    assert shard_hashes(out) == shard_hashes(built)
