"""`ccat grid` (issue 24): the (method, seed) runs of a table as local processes or Slurm
jobs, then the report; finished runs are not trained again, a changed config is refused,
Slurm gives the local eval.json, and a requeued (preempted) run resumes to the same result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import write_tiny_dataset

CONFIG = ("device: cpu\ndata: {batch_size: 4, workers: 0}\n"
          "model: {width: 16, encoder_width: 4, encoder_blocks: [1, 1, 1, 1], heads: 2, "
          "ffn_mult: 2}\noptim: {epochs: 2, lr: 0.01}\n")
WAIT_S = 900


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grid")
    data = write_tiny_dataset(root / "data", counts={"train": 8, "val": 4, "test": 4},
                              size=16, steps=16)
    config = root / "tiny.yaml"
    config.write_text(CONFIG)
    return config, data


def grid(config: Path, data: Path, out: Path, *extra: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ccat", "grid", "--config", str(config), "--data", str(data),
               "--methods", "sum concat", "--seeds", "0,1", "--out", str(out), *extra]
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                   "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment,
                          timeout=WAIT_S)


def scores(out: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())
            for p in sorted(out.glob("*/s*/eval.json"))}


@pytest.fixture(scope="module")
def local(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    config, data = setup
    out = tmp_path_factory.mktemp("local") / "runs"
    done = grid(config, data, out, "--jobs", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_local_grid_trains_every_run_once_then_reports_and_refuses_a_changed_config(
        setup: tuple[Path, Path], local: Path) -> None:
    config, data = setup
    assert sorted(scores(local)) == ["concat/s0", "concat/s1", "sum/s0", "sum/s1"]
    assert (local / "table.md").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in local.glob("*/s*/*.pt")}
    again = grid(config, data, local, "--jobs", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in local.glob("*/s*/*.pt")} == stamps
    changed = grid(config, data, local, "--set", "optim.lr=0.02")
    assert changed.returncode == 2 and "optim.lr" in changed.stderr  # ccat train's refusal


def test_slurm_grid_gives_the_local_eval_json(setup: tuple[Path, Path], local: Path, slurm,
                                              tmp_path: Path) -> None:
    config, data = setup
    out = tmp_path / "runs"
    done = grid(config, data, out, "--launcher", "slurm", "--gpus-per-run", "0",
                "--cpus-per-run", "1", env={"SLURM_CONF": slurm.env["SLURM_CONF"]})
    assert done.returncode == 0, done.stderr[-2000:]
    assert scores(out) == scores(local)
