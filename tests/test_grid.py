"""`ccat grid` (issue 24): the (method, seed) runs of a table as local processes or Slurm
jobs, then the report; finished runs are not trained again, a changed config is refused,
Slurm gives the local eval.json, and a requeued (preempted) run resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ccat.grid import GridError, Variant, variants_of
from ccat.train import TIMING_KEYS
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


def test_ctrl_c_stops_the_grid_and_its_run_even_with_keep_going(
        setup: tuple[Path, Path], tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the grid's process group, as a terminal sends it) interrupts the
    running run once (its own one line), starts no further run although --keep-going
    would go past a failed one, and ends the grid in one line, exit 130."""
    config, data = setup
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "ccat", "grid", "--config", str(config), "--data",
               str(data), "--methods", "sum concat", "--seeds", "0", "--out", str(out),
               "--keep-going", "--set", "optim.epochs=500"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1", "COLUMNS": "500"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first = out / "sum" / "s0" / "last.pt"
    deadline = time.monotonic() + WAIT_S  # a bound for a hang, not a speed check
    while not first.is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    said, _ = process.communicate(timeout=WAIT_S)
    assert process.returncode == 130, said
    assert said.count("interrupted: training of") == 1 and "Traceback" not in said, said
    assert said.rstrip().splitlines()[-1].startswith("interrupted: the grid stopped; run the "
                                                     "same command again")
    assert not (out / "concat").exists()  # no further run started


def test_slurm_grid_gives_the_local_eval_json(setup: tuple[Path, Path], local: Path, slurm,
                                              tmp_path: Path) -> None:
    config, data = setup
    out = tmp_path / "runs"
    done = grid(config, data, out, "--launcher", "slurm", "--gpus-per-run", "0",
                "--cpus-per-run", "1", env={"SLURM_CONF": slurm.env["SLURM_CONF"]})
    assert done.returncode == 0, done.stderr[-2000:]
    assert scores(out) == scores(local)


def test_a_sweep_on_slurm_chooses_and_trains_as_the_local_sweep(
        setup: tuple[Path, Path], slurm, tmp_path: Path) -> None:
    """`ccat sweep` sends its trials through the grid's launchers: on Slurm (one job a
    trial) it trains the same runs to the same validation rows and the same choice."""
    config, data = setup
    chosen = {}
    for launcher, env in (("local", {}), ("slurm", {"SLURM_CONF": slurm.env["SLURM_CONF"]})):
        out = tmp_path / launcher
        command = [sys.executable, "-m", "ccat", "sweep", "--config", str(config), "--data",
                   str(data), "--rank", "1,2", "--beta", "0.1", "--out", str(out),
                   "--launcher", launcher, "--gpus-per-run", "0", "--cpus-per-run", "1",
                   "--set", "method.name=ccat", "--set", "method.params.pretrain_epochs=1",
                   "--set", "method.params.beta=0.1"]  # the beta phase reuses its best rank
        done = subprocess.run(command, capture_output=True, text=True, timeout=WAIT_S,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env,
                                   "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        chosen[launcher] = json.loads((out / "sweep.json").read_text())
        chosen[launcher]["rows"] = {  # the rows without their wall times
            p.parent.name: [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                            for line in p.read_text().splitlines()]
            for p in sorted(out.glob("r*_b*/metrics.jsonl"))}
        assert not list(out.glob("r*_b*/eval.json"))  # trials are scored on validation only
    assert len(chosen["local"]["rows"]) == 2
    assert list((tmp_path / "slurm" / "grid.logs").iterdir())  # the trials were Slurm jobs
    assert chosen["slurm"] == chosen["local"]


def test_a_requeued_slurm_run_resumes_to_the_uninterrupted_result(
        setup: tuple[Path, Path], local: Path, slurm, tmp_path: Path) -> None:
    """`scontrol requeue` after the first epoch, as a preemption with PreemptMode=REQUEUE
    does (SIGTERM, then SIGKILL, then the job runs again): the job continues through
    --resume, and the run's eval.json and best.pt weights are the uninterrupted run's."""
    config, data = setup
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "ccat", "grid", "--config", str(config), "--data", str(data),
               "--methods", "sum", "--seeds", "1", "--out", str(out), "--launcher", "slurm",
               "--gpus-per-run", "0", "--cpus-per-run", "1"]
    env = {**slurm.env, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics = out / "sum" / "s1" / "metrics.jsonl"
    deadline = time.monotonic() + WAIT_S
    while (not metrics.is_file() or not metrics.read_text().strip()) and \
            time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    job = next(p.name for p in (out / "grid.logs").iterdir() if p.name.isdigit())
    slurm.run("scontrol", "requeue", job)
    _, err = process.communicate(timeout=WAIT_S)
    assert process.returncode == 0, err[-2000:]
    assert "REQUEUED" in slurm.run("sacct", "-n", "-D", "-o", "State", "-j", job)
    log = next((out / "grid.logs" / job).glob("*_log.out")).read_text()
    assert "resuming" in log  # the second start continued the run
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]  # each epoch once
    assert scores(out)["sum/s1"] == scores(local)["sum/s1"]
    weights = [torch.load(run / "sum" / "s1" / "best.pt", map_location="cpu",
                          weights_only=False)["model"] for run in (out, local)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_methods_arguments_and_variants_are_checked() -> None:
    found = variants_of(["sum", "ccat"], ["ccat=--set method.params.rank=2"],
                        ["ablation/no_lora=ccat --set method.params.lora=false"])
    assert found == [Variant("sum", "sum"),
                     Variant("ccat", "ccat", ("--set", "method.params.rank=2")),
                     Variant("ablation/no_lora", "ccat", ("--set", "method.params.lora=false"))]
    for method_args, variants, named in ((["mla=--set x=1"], [], "--method-args 'mla"),
                                         ([], ["../up=ccat"], "--variant '../up"),
                                         ([], ["no_method="], "--variant 'no_method=")):
        with pytest.raises(GridError, match=named):
            variants_of(["sum", "ccat"], method_args, variants)
