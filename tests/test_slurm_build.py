"""Builds launched on a real Slurm cluster (issue 24): `--parts 3 --launcher slurm` submits a
job array through submitit and merges into the one-machine build's bytes; a part killed
mid-way is submitted again and the result is still the same."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_BUILD, run_cli

WAIT_S = 400


def files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def command(raw: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "cremad", "--raw", str(raw), "--out", str(out), *TINY_BUILD, "--parts", "3",
            "--launcher", "slurm", *extra]


def test_three_parts_on_slurm_equal_the_one_machine_build(
        slurm, synth_raw: Path, built: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    out = tmp_path / "cremad"
    code, said, err = run_cli(command(synth_raw, out, "--partition", "debug",
                                      "--slurm-option", "comment=ccat-test"), capsys)
    assert code == 0, err
    assert "merged 3 parts (slurm" in said
    assert files_of(out) == files_of(built)
    tasks = slurm.run("sacct", "-n", "-X", "-o", "JobID", "--name", "ccat-data-cremad").split()
    assert sorted(task.split("_")[1] for task in tasks) == ["0", "1", "2"]  # one array task a part


def test_a_part_killed_mid_way_is_submitted_again_and_the_build_is_unchanged(
        slurm, synth_raw: Path, built: Path, tmp_path: Path) -> None:
    out = tmp_path / "cremad"
    env = {**slurm.env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "preprocess.cli", *command(synth_raw, out)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    record = out / ".build" / "part-1-of-3.json"
    deadline = time.monotonic() + WAIT_S
    while not record.exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    assert json.loads(record.read_text())["finished"] is False
    part = int((out / ".build" / "part-1-of-3.lock").read_text())  # the pid holding its lock
    os.kill(part, signal.SIGKILL)  # as a node lost or the OOM killer would
    said, _ = process.communicate(timeout=WAIT_S)
    assert process.returncode == 0, said
    assert "part 1/3 failed" in said and "submitted again" in said
    assert files_of(out) == files_of(built)
