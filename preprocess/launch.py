"""``ccat-data build NAME ... --parts N --launcher local|slurm``: the parts of
:mod:`preprocess.parts` as a submitit job array, then the merge.

submitit (the bridge to Slurm that dinov2 and Hydra's launcher use) submits one array
task a part, or runs them as local processes. A part is a
``submitit.helpers.Checkpointable``: a preempted or timed-out task is requeued and, being
a part, resumes its own shards. A part that fails (an error, a killed node) is submitted
once more; a second failure stops the launch with its log path. The logs go beside
``--out`` (``<out>.logs/``), never into it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import submitit

from preprocess import parts as parting, writer
from preprocess.datasets import OptionError, Range, Recipe, check_choice, option
from preprocess.outdir import STATE_DIR, BuildError

LAUNCHERS = ("local", "slurm")
POLL_S = 1.0  # how often the launcher looks at the parts' jobs and shard records
# How often Slurm is asked for the job states (one sacct call for all): a job that ends
# without a result (killed, cancelled) is seen within this, not after submitit's own delay,
# which grows to 10 minutes.
STATE_CHECK_S = 10.0
ATTEMPTS = 2  # a part is submitted at most twice
MINUTES = Range(1, 60 * 24 * 30)


@dataclass(frozen=True)
class LaunchOptions:
    """How ``ccat-data build NAME`` splits a build over machines (docs/cluster.md)."""

    part: str = option("", "I/N: build only part I (from 0) of N into a shared --out; "
                           "`ccat-data merge OUT` writes the manifest once all are there.")
    parts: int = option(0, "Build in N parts on --launcher, then merge; 0 = in this "
                           "process.", within=Range(0, parting.MAX_PARTS))
    launcher: str = option("local", "Where --parts run: local (processes here) or slurm (a "
                                     "job array through submitit).")
    partition: str = option("", "Slurm partition of the parts (default: the cluster's).")
    time: int = option(240, "Time limit of a part, minutes (a part past it is requeued and "
                            "resumes).", within=MINUTES)
    cpus_per_task: int = option(1, "CPUs of a part's Slurm task; with --workers 0 a part "
                                   "uses all of them.", within=Range(1, writer.MAX_WORKERS))
    slurm_option: Optional[list[str]] = option(
        None, "KEY=VALUE, an sbatch option passed through (e.g. account=abc, "
              "constraint=cpu); repeatable.")

    def __post_init__(self) -> None:
        check_choice("--launcher", self.launcher, LAUNCHERS)
        if self.part and self.parts:
            raise OptionError("--part builds one part here and --parts launches them all; "
                              "give one of them")
        for text in self.slurm_option or []:
            if "=" not in text or not text.partition("=")[0]:
                raise OptionError(f"--slurm-option {text!r} is not KEY=VALUE; give e.g. "
                                  "--slurm-option account=abc")


class PartTask(submitit.helpers.Checkpointable):
    """One part, as a submitit job: preempted or out of time, submitit requeues it with the
    same arguments, and the part resumes its shards."""

    def __call__(self, recipe: Recipe, raw: Path, out: Path, split_files: dict[str, Path],
                 options: writer.BuildOptions, part: parting.Part) -> int:
        return parting.build_part(recipe, raw, out, split_files, options, part).processed


def executor(out: Path, launch: LaunchOptions, name: str) -> submitit.Executor:
    """The submitit executor of the parts, its logs in ``<out>.logs``."""
    folder = log_folder(out) / "%j"
    if launch.launcher == "local":
        made: submitit.Executor = submitit.LocalExecutor(folder=folder)
        made.update_parameters(timeout_min=launch.time)
        return made
    made = submitit.SlurmExecutor(folder=folder)
    extra = dict(text.split("=", 1) for text in launch.slurm_option or [])
    made.update_parameters(job_name=f"ccat-data-{name}", time=launch.time,
                           cpus_per_task=launch.cpus_per_task, ntasks_per_node=1, nodes=1,
                           additional_parameters=extra,
                           **({"partition": launch.partition} if launch.partition else {}))
    return made


def log_folder(out: Path) -> Path:
    return out.parent / f"{out.name}.logs"


def launch(recipe: Recipe, raw: Path, out: Path, split_files: dict[str, Path],
           options: writer.BuildOptions, launch: LaunchOptions,
           on_progress: Callable[[int, int, int], None] | None = None,
           on_retry: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build every part on ``launch.launcher`` and merge; returns the manifest.

    The plan is made here first, so bad options or raw data stop the launch before any job
    is submitted. ``on_progress(parts done, shards recorded, shards)`` is called as they
    finish, ``on_retry(sentence)`` when a failed part is submitted again."""
    _, splits, _, _ = writer.plan(recipe, raw, split_files, options)
    total = len(writer.shard_tasks(splits, options.shard_size))
    count = min(launch.parts, total)
    run = executor(out, launch, recipe.name)
    args = [(recipe, raw, out, split_files, options, parting.Part(i, count)) for i in range(count)]
    with run.batch():
        jobs = [run.submit(PartTask(), *a) for a in args]
    tries, done, asked = [1] * count, set(), time.monotonic()
    while len(done) < count:
        ask = time.monotonic() - asked >= STATE_CHECK_S
        asked = time.monotonic() if ask else asked
        for i, job in enumerate(jobs):
            if i in done or not job.done(force_check=ask):
                continue
            why = _failure(job)
            if not why:
                done.add(i)
            elif tries[i] == ATTEMPTS:
                raise BuildError(f"part {i}/{count} failed {ATTEMPTS} times ({why}); its log: "
                                 f"{job.paths.stderr}")
            else:
                if on_retry:
                    on_retry(f"part {i}/{count} failed ({why}; log {job.paths.stderr}); "
                             "submitted again")
                tries[i] += 1
                jobs[i] = run.submit(PartTask(), *args[i])
        if on_progress:
            on_progress(len(done), _recorded(out), total)
        if len(done) < count:
            time.sleep(POLL_S)
    return parting.merge(out)


def _failure(job: submitit.Job) -> str:
    """Why a finished job failed, in words, or "" when it succeeded."""
    err = job.exception()  # a job killed without a result waits a few seconds for it
    if err is None:
        return ""
    if isinstance(err, submitit.core.utils.UncompletedJobError):
        return "it ended without a result: killed, cancelled or its node lost"
    lines = [line for line in str(err).splitlines() if line.strip() and "---" not in line]
    last = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
    return last.strip()[:300]


def _recorded(out: Path) -> int:
    """The shards recorded in ``out/.build`` so far (all of them once merged)."""
    state = out / STATE_DIR
    if not state.is_dir():
        return 0
    return sum(1 for p in state.glob("*.tar.json"))
