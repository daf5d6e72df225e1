"""Workers build whole shards (issue 17): the plan fixes every shard, so the bytes and the
manifest are the same for any worker count, bad clips included; a killed multi-worker build
resumes keeping its finished shards; progress and --strict work across processes."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import pytest

from ccat.data import spec
from preprocess import schedule, writer
from preprocess.datasets.cremad import Cremad
from preprocess.encode import Encoder
from conftest import TINY_BUILD, run_cli, synth_tree

ALL_TRAIN = ["--test-fraction", "0", "--val-fraction", "0"]
WAIT_S = 120  # the most a subprocess build is given to record its first shard


def build(raw: Path, out: Path, capsys, workers: int, *extra: str) -> tuple[int, str, str]:
    args = ["build", "cremad", "--raw", raw, "--out", out, *TINY_BUILD, "--workers",
            str(workers), *extra]
    return run_cli(args, capsys)


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def manifest_of(out: Path) -> dict:
    return json.loads((out / spec.MANIFEST_NAME).read_text())


def break_clips(raw: Path, ids: list[str]) -> None:
    for clip_id in ids:
        (raw / "VideoFlash" / f"{clip_id}.flv").write_bytes(b"this is not a video")


def session_alive(session: int) -> list[int]:
    """The processes of ``session`` still running (zombies left out), from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[3]) == session and fields[0] != "Z":
                alive.append(int(stat.parent.name))
    return alive


@pytest.fixture()
def damaged(raw_copy: Path) -> tuple[Path, list[str]]:
    """The synthetic tree with the first shard's four clips broken (all train, shard size
    4: that shard keeps no sample) and one clip of the second shard broken."""
    ids = sorted(p.stem for p in (raw_copy / "AudioWAV").glob("*.wav"))
    bad = ids[:4] + [ids[5]]
    break_clips(raw_copy, bad)
    return raw_copy, bad


def test_same_shards_and_manifest_for_one_two_and_three_workers_with_bad_clips(
        damaged: tuple[Path, list[str]], tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(schedule, "WORKER_START_MIN_S", 0.0)  # start the workers at once
    raw, bad = damaged
    outs = [tmp_path / f"w{n}" for n in (1, 2, 3)]
    for n, out in zip((1, 2, 3), outs):
        assert build(raw, out, capsys, n, *ALL_TRAIN)[0] == 0
    manifests = [manifest_of(out) for out in outs]
    assert [m["sources"]["build"]["workers"] for m in manifests] == [1, 2, 3]
    for manifest in manifests:
        del manifest["sources"]["build"]["workers"]  # the record of how it was built
    assert manifests[1] == manifests[0] and manifests[2] == manifests[0]
    assert shard_hashes(outs[1]) == shard_hashes(outs[0]) == shard_hashes(outs[2])
    shards = {s["name"]: s["num_samples"] for s in manifests[0]["splits"]["train"]["shards"]}
    assert "train-000000.tar" not in shards and shards["train-000001.tar"] == 3
    assert not (outs[0] / "train-000000.tar").exists()  # a shard of only bad clips: no file
    assert sorted(s["id"] for s in manifests[0]["skipped"]) == bad
    assert {s["reason"] for s in manifests[0]["skipped"]} == {"video is unreadable"}
    assert manifests[0]["splits"]["train"]["num_samples"] == 24 - len(bad)


def test_progress_reaches_every_sample_once_across_workers(synth_raw: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    monkeypatch.setattr(schedule, "WORKER_START_MIN_S", 0.0)  # start the workers at once
    seen: list[tuple[int, int]] = []
    recipe = Cremad(seconds=1.0, frame_size=32)
    options = writer.BuildOptions(workers=2, shard_size=4)
    report = writer.build(recipe, synth_raw, tmp_path / "out", {}, options,
                          on_progress=lambda done, total: seen.append((done, total)))
    assert report.workers in (1, 2) and report.processed == 24  # 1: done before one started
    assert report.first_sample_s is not None and report.first_sample_s <= report.seconds
    assert {total for _, total in seen} == {24} and seen[-1] == (24, 24)
    assert [done for done, _ in seen] == sorted({done for done, _ in seen})  # rises, no repeat


def test_strict_with_two_workers_is_one_sentence_naming_the_clip(
        damaged: tuple[Path, list[str]], tmp_path: Path, capsys) -> None:
    raw, bad = damaged
    code, _, err = build(raw, tmp_path / "out", capsys, 2, "--strict")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "video is unreadable" in err and any(f"VideoFlash/{i}.flv" in err for i in bad)
    assert not (tmp_path / "out" / spec.MANIFEST_NAME).exists()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux's /proc")
def test_a_killed_two_worker_build_resumes_keeping_its_finished_shards(tmp_path: Path,
                                                                      capsys) -> None:
    raw, out = tmp_path / "raw", tmp_path / "killed"
    synth_tree(raw, clips=48)  # big enough that a loaded machine cannot finish before the kill
    command = [sys.executable, "-m", "preprocess.cli", "build", "cremad", "--raw", str(raw),
               "--out", str(out), *TINY_BUILD, "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + WAIT_S
    state = out / writer.STATE_DIR
    while not list(state.glob("*.tar.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # the build's process alone, as the OOM killer
    process.wait()
    ends = time.monotonic() + WAIT_S  # the fork server may still be importing torch
    while session_alive(process.pid) and time.monotonic() < ends:
        time.sleep(0.05)
    left = session_alive(process.pid)
    if left:
        os.killpg(process.pid, signal.SIGKILL)  # the test's own session, not to linger
    assert not left, "a worker (or the fork server) outlived its killed build"
    assert not (out / spec.MANIFEST_NAME).exists(), "the build finished before it was killed"
    kept = {p.name.removesuffix(".json"): (out / p.name.removesuffix(".json")).stat().st_mtime_ns
            for p in state.glob("*.tar.json")}
    code, stdout, _ = build(raw, out, capsys, 1)
    assert code == 0 and f"reused {len(kept)} finished shards" in stdout
    assert build(raw, tmp_path / "whole", capsys, 2)[0] == 0
    assert shard_hashes(out) == shard_hashes(tmp_path / "whole")
    assert manifest_of(out)["fingerprint"] == manifest_of(tmp_path / "whole")["fingerprint"]
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert not list(out.glob("*.tmp")) and not state.exists()


def test_an_interrupted_build_of_the_older_shard_layout_is_refused(
        synth_raw: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C after the last shard, before the manifest

    monkeypatch.setattr(writer, "_finish", interrupted)
    assert build(synth_raw, out, capsys, 1)[0] != 0
    monkeypatch.undo()
    plan = out / writer.STATE_DIR / writer.PLAN_NAME
    older = json.loads(plan.read_text())
    del older["layout"]  # as the builder before issue 17 wrote it
    plan.write_text(json.dumps(older))
    code, _, err = build(synth_raw, out, capsys, 1)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "started by an older ccat-data, which cut shards differently" in err
    assert "--overwrite" in err


def pool_tasks(raw: Path, tmp_path: Path) -> tuple[Encoder, list[writer.ShardTask]]:
    """An encoder writing into a fresh --out, and the shard tasks of ``raw``."""
    recipe = Cremad(seconds=1.0, frame_size=32)
    options = writer.BuildOptions(shard_size=4, val_fraction=0.0, test_fraction=0.0)
    _, splits, _, _ = writer.plan(recipe, raw, {}, options)
    out = tmp_path / "out"
    (out / writer.STATE_DIR).mkdir(parents=True)
    return (Encoder(recipe, raw, out, len(recipe.classes), False, options.raw_hash),
            writer.shard_tasks(splits, 4))


def test_worker_processes_build_the_same_shard_records_as_this_process(
        synth_raw: Path, tmp_path: Path) -> None:
    encoder, tasks = pool_tasks(synth_raw, tmp_path)
    queue, samples = deque(tasks[:3]), []
    pool = schedule.Workers(encoder, 2, queue, samples.append)
    pool.start()
    records = []
    try:
        while queue or pool.running or len(records) < 3:
            pool.service(wait_s=schedule.PROGRESS_POLL_S)  # only the workers build
            records += pool.take_finished()
    finally:
        started = pool.stop()
    assert sum(samples) == 12 and 1 <= started <= 2 and os.getpid() not in pool.pids
    here = tmp_path / "here"
    (here / writer.STATE_DIR).mkdir(parents=True)
    local = dataclasses.replace(encoder, out=here)
    expected = {t.name: local.shard(t, lambda: None) for t in tasks[:3]}
    assert {r["name"]: r for r in records} == expected
    assert shard_hashes(encoder.out) == shard_hashes(here)


def test_a_worker_that_dies_is_one_build_error_not_a_hang(synth_raw: Path,
                                                          tmp_path: Path) -> None:
    encoder, tasks = pool_tasks(synth_raw, tmp_path)
    queue = deque(tasks)
    pool = schedule.Workers(encoder, 1, queue, lambda n: None)
    pool.start()
    deadline = time.monotonic() + WAIT_S
    try:
        while not (pool.running and pool.pids) and time.monotonic() < deadline:
            pool.service(wait_s=schedule.PROGRESS_POLL_S)
        os.kill(next(iter(pool.pids)), signal.SIGKILL)  # as the out-of-memory killer
        with pytest.raises(writer.BuildError, match="a build worker process died"):
            while time.monotonic() < deadline:
                pool.service(wait_s=schedule.PROGRESS_POLL_S)
                pool.take_finished()
    finally:
        pool.stop()
    assert not list(encoder.out.glob(".*.tmp")) and not list(encoder.out.glob("*.tmp"))


def test_a_build_too_short_for_workers_starts_none_and_says_so(
        synth_raw: Path, built: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(schedule, "WORKER_START_MIN_S", 1e9)  # no build is long enough
    code, stdout, _ = build(synth_raw, tmp_path / "out", capsys, 2)
    assert code == 0 and "on 1 process;" in stdout
    assert shard_hashes(tmp_path / "out") == shard_hashes(built)
