"""A build in parts (issue 24): `--part I/N` builds a share of the plan's shards, `merge`
writes the manifest once every part is finished, and the result is byte for byte the
one-machine build's, for any N; a missing, unfinished or other-plan part is refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ccat.data import spec
from preprocess import parts, writer
from preprocess.splits import Entry
from conftest import TINY_BUILD, run_cli

WAIT_S = 120


def build(raw: Path, out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    return run_cli(["build", "cremad", "--raw", raw, "--out", out, *TINY_BUILD, *extra], capsys)


def files_of(out: Path) -> dict[str, bytes]:
    """Every file a build leaves, by relative path (.build included, if any is left)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_machine(synth_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from conftest import invoke

    out = tmp_path_factory.mktemp("one") / "cremad"
    assert invoke(["build", "cremad", "--raw", synth_raw, "--out", out, *TINY_BUILD]) == 0
    return files_of(out)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_parts_merged_are_byte_identical_to_a_one_machine_build(
        count: int, synth_raw: Path, one_machine: dict[str, bytes], tmp_path: Path,
        capsys) -> None:
    out = tmp_path / "cremad"
    for index in reversed(range(count)):  # any order
        code, said, err = build(synth_raw, out, capsys, "--part", f"{index}/{count}")
        assert code == 0, err
        assert "ccat-data merge" in said
    assert not (out / spec.MANIFEST_NAME).exists()
    code, _, err = run_cli(["merge", out], capsys)
    assert code == 0, err
    assert files_of(out) == one_machine


def test_shards_are_dealt_from_the_plan_balanced_by_cost() -> None:
    tasks = writer.shard_tasks({"train": [Entry(f"k{i}", 0, {"a": f"{i}.wav", "v": f"{i}.flv"})
                                          for i in range(10)],
                                "test": [Entry(f"t{i}", 0, {"a": f"t{i}.wav"}) for i in range(3)]},
                               shard_size=4)
    dealt = parts.assign(tasks, 2)
    assert [[t.name for t in part] for part in dealt] == [
        ["train-000000.tar", "train-000002.tar"], ["train-000001.tar", "test-000000.tar"]]
    assert [sum(map(parts.cost, part)) for part in dealt] == [8 + 4, 8 + 3]
    assert sorted(t.name for part in parts.assign(tasks, 5) for t in part) == sorted(
        t.name for t in tasks)  # more parts than shards: some parts have none


def test_merge_names_a_missing_unfinished_or_other_plan_part(
        synth_raw: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cremad"
    assert build(synth_raw, out, capsys, "--part", "0/3")[0] == 0
    code, _, err = run_cli(["merge", out], capsys)
    assert code == 1 and "part 1/3 is missing" in err
    record = out / ".build" / "part-1-of-3.json"
    record.write_text(json.dumps({"part": 1, "parts": 3, "finished": False, "plan_sha256":
                                  json.loads((out / ".build" / "part-0-of-3.json")
                                             .read_text())["plan_sha256"]}))
    code, _, err = run_cli(["merge", out], capsys)
    assert code == 1 and "part 1/3" in err and "is unfinished" in err
    record.unlink()
    code, _, err = build(synth_raw, out, capsys, "--part", "1/3", "--seed", "7")
    assert code == 1 and "part 1/3 cannot join it" in err and "split.seed" in err
    assert build(synth_raw, out, capsys, "--part", "1/3")[0] == 0
    assert build(synth_raw, out, capsys, "--part", "2/3")[0] == 0
    other = dict(json.loads(record.read_text()), plan_sha256="0" * 64)
    record.write_text(json.dumps(other))
    code, _, err = run_cli(["merge", out], capsys)
    assert code == 1 and "part 1/3" in err and "another plan" in err
    code, _, err = build(synth_raw, out, capsys)
    assert code == 1 and "holds a build in parts" in err and "ccat-data merge" in err


def test_a_part_killed_mid_way_resumes_its_own_shards(
        synth_raw: Path, one_machine: dict[str, bytes], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cremad"
    command = [sys.executable, "-m", "preprocess.cli", "build", "cremad", "--raw", str(synth_raw),
               "--out", str(out), *TINY_BUILD, "--part", "0/2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + WAIT_S
    while not list((out / ".build").glob("*.tar.json")) and time.monotonic() < deadline:
        assert process.poll() is None, "the part ended before its first shard was recorded"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert build(synth_raw, out, capsys, "--part", "1/2")[0] == 0
    code, _, err = run_cli(["merge", out], capsys)
    assert code == 1 and "part 0/2" in err and "unfinished" in err
    code, said, _ = build(synth_raw, out, capsys, "--part", "0/2")
    assert code == 0 and "reused 0 finished shards" not in said
    assert run_cli(["merge", out], capsys)[0] == 0
    assert files_of(out) == one_machine


def test_a_bad_part_is_one_sentence(synth_raw: Path, tmp_path: Path, capsys) -> None:
    code, _, err = build(synth_raw, tmp_path / "o", capsys, "--part", "3/3")
    assert code == 2 and "--part '3/3' is not I/N" in err
