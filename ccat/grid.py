"""``ccat grid``: the (method, seed) runs of a table, on a machine's GPUs or on Slurm, then
the report.

Each run is what the Makefile's ``train_eval`` does for one run folder: ``ccat train``
(with ``--resume`` when the folder holds a run: a finished run returns at once, one whose
config changed is refused naming the keys), then ``ccat eval --probe`` when ``eval.json``
is missing or older than ``best.pt``. Every run is its own process, so that it can be
pinned to a GPU (``CUDA_VISIBLE_DEVICES``) or be a Slurm job.

- ``local``: ``jobs`` runs at once; with GPUs, run slot ``k`` gets GPU ``k mod count``.
- ``slurm``: one submitit job per run. A job is a ``submitit.helpers.Checkpointable``:
  preempted or out of time, it is requeued and calls the same run again, which continues
  through ``--resume``.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import submitit

from ccat import run_dir
from ccat.errors import UserError

LAUNCHERS = ("local", "slurm")
POLL_S = 2.0
STATE_CHECK_S = 10.0  # how often Slurm is asked for the job states (one sacct call for all)
ERROR_TAIL = 2000  # characters of a failed command's output kept in its error


class GridError(UserError):
    """A grid cannot run, or one of its runs failed; the message names the run."""


@dataclass(frozen=True)
class GridRun:
    """One run of the grid: its method, seed, folder and the ``ccat train`` arguments."""

    method: str
    seed: int
    folder: Path
    config: Path
    data: str
    train_args: tuple[str, ...] = ()

    def train_command(self) -> list[str]:
        """``ccat train`` of this run; ``--resume`` once its folder holds a run (the Makefile's
        ``resume_flag``), unless the arguments ask for ``--overwrite``."""
        command = [sys.executable, "-m", "ccat", "train", "--config", str(self.config),
                   "--method", self.method, "--data", self.data, "--out", str(self.folder),
                   "--set", f"seed={self.seed}", *self.train_args]
        holds_run = (self.folder / run_dir.CONFIG).is_file()
        return command + ["--resume"] if holds_run and "--overwrite" not in command else command

    def eval_command(self) -> list[str] | None:
        """``ccat eval --probe`` of best.pt, or None when eval.json is newer than best.pt."""
        best, scores = self.folder / run_dir.BEST, self.folder / run_dir.EVAL
        if scores.is_file() and scores.stat().st_mtime > best.stat().st_mtime:
            return None
        return [sys.executable, "-m", "ccat", "eval", "--ckpt", str(best), "--data", self.data,
                "--probe", "--json", str(scores)]


@dataclass(frozen=True)
class GridOptions:
    """Where and how the runs go."""

    launcher: str = "local"
    jobs: int = 1
    partition: str = ""
    time: int = 24 * 60  # minutes
    gpus_per_run: int = 1  # Slurm only
    cpus_per_run: int = 4
    slurm_options: dict[str, str] = field(default_factory=dict)


def runs_of(config: Path, data: str, methods: Sequence[str], seeds: Sequence[int], out: Path,
            train_args: Sequence[str] = ()) -> list[GridRun]:
    """The grid's runs, as the Makefile names their folders: ``OUT/<method>/s<seed>``."""
    return [GridRun(m, s, out / m / f"s{s}", config, data, tuple(train_args))
            for m in methods for s in seeds]


def run_one(run: GridRun, env: dict[str, str] | None = None) -> Path:
    """Train (or continue, or skip) and evaluate one run; returns its eval.json."""
    for command in (run.train_command(), run.eval_command()):
        if command is None:
            continue
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            said = (done.stderr.strip() or done.stdout.strip())[-ERROR_TAIL:]
            raise GridError(f"run {run.folder} failed in `ccat {command[3]}` (exit "
                            f"{done.returncode}): {said.splitlines()[-1] if said else ''}")
    return run.folder / run_dir.EVAL


class RunTask(submitit.helpers.Checkpointable):
    """A run as a Slurm job: requeued (preempted, out of time), submitit calls it again,
    and the run continues through --resume."""

    def __call__(self, run: GridRun) -> str:
        return str(run_one(run))


def run_local(runs: list[GridRun], jobs: int, gpus: int,
              on_done: Callable[[GridRun], None] | None = None) -> None:
    """``jobs`` runs at once, slot ``k`` pinned to GPU ``k mod gpus`` when there are GPUs."""
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(jobs):
        slots.put(slot)

    def pinned(run: GridRun) -> GridRun:
        slot = slots.get()
        try:
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            run_one(run, env)
        finally:
            slots.put(slot)
        if on_done:
            on_done(run)
        return run

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(pinned, runs))


def run_slurm(runs: list[GridRun], options: GridOptions, logs: Path,
              on_done: Callable[[GridRun], None] | None = None) -> None:
    """One Slurm job per run through submitit; a failed run stops the grid with its log."""
    executor = submitit.SlurmExecutor(folder=logs / "%j")
    extra = dict(options.slurm_options)
    if options.gpus_per_run:
        extra["gpus"] = str(options.gpus_per_run)
    executor.update_parameters(job_name="ccat-grid", time=options.time, nodes=1,
                               ntasks_per_node=1, cpus_per_task=options.cpus_per_run,
                               additional_parameters=extra,
                               **({"partition": options.partition} if options.partition else {}))
    with executor.batch():
        jobs = [executor.submit(RunTask(), run) for run in runs]
    pending, asked = dict(enumerate(jobs)), time.monotonic()
    while pending:
        ask = time.monotonic() - asked >= STATE_CHECK_S
        asked = time.monotonic() if ask else asked
        for i, job in list(pending.items()):
            if job.done(force_check=ask):
                del pending[i]
                err = job.exception()
                if err is not None:
                    raise GridError(f"run {runs[i].folder} failed on Slurm (job {job.job_id}); "
                                    f"its log: {job.paths.stderr}")
                if on_done:
                    on_done(runs[i])
        if pending:
            time.sleep(POLL_S)


def gpu_count() -> int:
    """The GPUs this machine has (0 without torch's CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def grid(runs: list[GridRun], options: GridOptions, out: Path,
         on_done: Callable[[GridRun], None] | None = None) -> None:
    """Run every run of the grid on ``options.launcher`` (finished ones return at once)."""
    if options.launcher not in LAUNCHERS:
        raise GridError(f"--launcher {options.launcher!r}: choose local or slurm")
    if not runs:
        raise GridError("the grid has no runs: give --methods and --seeds")
    if options.launcher == "local":
        run_local(runs, max(1, options.jobs), gpu_count(), on_done)
    else:
        run_slurm(runs, options, out / "grid.logs", on_done)


def split_list(text: str) -> list[str]:
    """``'a b'`` or ``a,b``: the items of a list option."""
    return [item for item in text.replace(",", " ").split() if item]


def seeds_of(items: list[str]) -> list[int]:
    """The seeds as integers; anything else is one sentence."""
    try:
        return [int(item) for item in items]
    except ValueError:
        raise GridError(f"--seeds {' '.join(items)!r}: give whole numbers, e.g. '0 1 2'") from None


def slurm_options(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` sbatch options; anything else is one sentence."""
    bad = [item for item in items if "=" not in item or not item.partition("=")[0]]
    if bad:
        raise GridError(f"--slurm-option {bad[0]!r} is not KEY=VALUE; give e.g. account=abc")
    return dict(item.split("=", 1) for item in items)
