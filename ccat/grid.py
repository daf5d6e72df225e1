"""``ccat grid``: the (method, seed) runs of a table, on a machine's GPUs or on Slurm, then
the report. ``make table``, ``make ablation`` and ``make results`` train through it.

Each run is what the Makefile's ``train_eval`` did for one run folder: ``ccat train``
(with ``--resume`` when the folder holds a run: a finished run returns at once, one whose
config changed is refused naming the keys), then ``ccat eval --probe`` when ``eval.json``
is missing or older than ``best.pt``. Every run is its own process, so that it can be
pinned to a GPU (``CUDA_VISIBLE_DEVICES``) or be a Slurm job.

- ``local``: ``jobs`` runs at once; with GPUs, run slot ``k`` gets GPU ``k mod count``.
- ``slurm``: one submitit job per run. A job is a ``submitit.helpers.Checkpointable``:
  preempted or out of time, it is requeued and calls the same run again, which continues
  through ``--resume``. Slurm signals every process of a job it stops; the ``ccat``
  processes of a run ignore SIGTERM and USR2, and the job stops them itself
  (:func:`run_one`), so that a preemption is never mistaken for a failed run.

A failed run stops the grid: no other run starts (on Slurm the others are cancelled), and
the error names the run. ``keep_going`` (``make -k``) trains every other run first, then
names each failed one; neither writes the report.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import submitit

from ccat import run_dir
from ccat.errors import UserError

LAUNCHERS = ("local", "slurm")
POLL_S = 2.0
STATE_CHECK_S = 10.0  # how often Slurm is asked for the job states (one sacct call for all)
ERROR_LINES = 20  # lines of a failed command's stderr kept for its error
# What Slurm sends a job it preempts, requeues or times out (submitit's USR2 comes 90 s
# before the time limit); a run's processes ignore them and leave the decision to the job.
JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
STOP_GRACE_S = 300.0  # longer than Slurm's KillWait (default 30 s) and usual GraceTimes


class GridError(UserError):
    """A grid cannot run, or one of its runs failed; the message names the run."""


@dataclass(frozen=True)
class Variant:
    """Runs ``OUT/<name>/s<seed>`` of ``method`` with extra ``ccat train`` arguments of their
    own: a method (name = method) with its per-method schedule, or an ablation."""

    name: str
    method: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class GridRun:
    """One run of the grid: its method, seed, folder and the ``ccat train`` arguments."""

    method: str
    seed: int
    folder: Path
    config: Path
    data: str
    train_args: tuple[str, ...] = ()
    evaluate: bool = True  # ``ccat eval --probe`` after training (a sweep's trials: no)

    def train_command(self) -> list[str]:
        """``ccat train`` of this run; ``--resume`` once its folder holds a run (the Makefile's
        ``resume_flag``), unless the arguments ask for ``--overwrite``."""
        command = [sys.executable, "-m", "ccat", "train", "--config", str(self.config),
                   "--method", self.method, "--data", self.data, "--out", str(self.folder),
                   "--set", f"seed={self.seed}", *self.train_args]
        holds_run = (self.folder / run_dir.CONFIG).is_file()
        return command + ["--resume"] if holds_run and "--overwrite" not in command else command

    def eval_command(self) -> list[str] | None:
        """``ccat eval --probe`` of best.pt, or None when eval.json is newer than best.pt
        (``test eval.json -nt best.pt``, to the nanosecond), or when the run is not evaluated."""
        if not self.evaluate:
            return None
        best, scores = self.folder / run_dir.BEST, self.folder / run_dir.EVAL
        if scores.is_file() and best.is_file() and \
                scores.stat().st_mtime_ns > best.stat().st_mtime_ns:
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
    keep_going: bool = False


def runs_of(config: Path, data: str, variants: Sequence[Variant], seeds: Sequence[int],
            out: Path, before: Sequence[str] = (), after: Sequence[str] = ()) -> list[GridRun]:
    """The grid's runs, as the Makefile names their folders: ``OUT/<name>/s<seed>``, each
    variant's seeds in turn. A run's ``ccat train`` arguments are ``before``, its variant's,
    then ``after``: the order of the Makefile's ``--set protocol=P $(3) $(ARGS)``."""
    return [GridRun(v.method, s, out / v.name / f"s{s}", config, data,
                    (*before, *v.args, *after)) for v in variants for s in seeds]


def _ignore_job_signals() -> None:
    for number in JOB_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def run_one(run: GridRun, env: dict[str, str] | None = None, in_job: bool = False) -> Path:
    """Train (or continue, or skip) and evaluate one run; returns its eval.json.

    ``in_job``: a Slurm job's run. Slurm's SIGTERM (preemption, requeue, cancel) ends the
    running command at once and writes no result; the job then waits for what follows:
    Slurm's SIGKILL (requeued, or ended) or submitit's USR2 (checkpoint and requeue). A
    SIGTERM that nothing follows within ``STOP_GRACE_S`` continues the run (--resume)."""
    while _run_commands(run, env, in_job):
        print(f"ccat grid: Slurm stopped run {run.folder} (SIGTERM); waiting to be requeued "
              f"or ended, else continuing in {STOP_GRACE_S:.0f} s", file=sys.stderr, flush=True)
        time.sleep(STOP_GRACE_S)
    return run.folder / run_dir.EVAL


def _run_commands(run: GridRun, env: dict[str, str] | None, in_job: bool) -> bool:
    """``ccat train``, then ``ccat eval`` when best.pt is newer than eval.json (decided after
    training); their output passes through, stderr also kept for the error. True when a
    SIGTERM stopped them (``in_job`` only)."""
    for make in (run.train_command, run.eval_command):
        command = make()
        if command is None:
            continue
        # Locally a run's commands are a process group of their own, so Ctrl-C reaches the
        # grid alone and the grid interrupts each run once (run_local); in a Slurm job,
        # Slurm signals every process of the job and the job decides (module docstring).
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=_ignore_job_signals if in_job else None,
                                   process_group=None if in_job else 0)
        with _RUNNING_LOCK:
            _RUNNING.add(process)
        stopped: list[int] = []

        def stop(number: int, frame: object) -> None:
            stopped.append(number)
            process.kill()  # safe: every run-folder write is atomic (tests/test_run_folder.py)

        previous = signal.signal(signal.SIGTERM, stop) if in_job else None
        tail: collections.deque[str] = collections.deque(maxlen=ERROR_LINES)
        try:
            for line in process.stderr:
                sys.stderr.write(line)
                tail.append(line.rstrip())
            code = process.wait()
        except BaseException:  # submitit's USR2 handler exits here after requeueing the job
            process.kill()
            process.wait()
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(process)
            if in_job:
                signal.signal(signal.SIGTERM, previous)
        if stopped:
            return True
        if code:
            said = [line for line in tail if line.strip()]
            raise GridError(f"run {run.folder} failed in `ccat {command[3]}` (exit {code}): "
                            f"{said[-1] if said else 'no message'}")
    return False


_RUNNING: set[subprocess.Popen] = set()  # the runs' commands running now (local launcher)
_RUNNING_LOCK = threading.Lock()


def _interrupt_running() -> None:
    """Ctrl-C for each running command: ``ccat train`` says where it stopped and exits 130."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)


def dry_run(runs: list[GridRun]) -> None:
    """Print each run's commands as they would run now, running nothing (``make -n``)."""
    for run in runs:
        for command in (run.train_command(), run.eval_command()):
            if command is not None:
                print(shlex.join(command), flush=True)


class RunTask(submitit.helpers.Checkpointable):
    """A run as a Slurm job: requeued (preempted, out of time), submitit calls it again,
    and the run continues through --resume."""

    def __call__(self, run: GridRun) -> str:
        return str(run_one(run, in_job=True))


def failures_error(failed: list[tuple[GridRun, str]], total: int, keep_going: bool,
                   others_then: str) -> GridError:
    """One sentence for the failed runs: the first one's reason, and the others' folders."""
    first, reason = failed[0]
    more = "" if len(failed) == 1 else (
        f"; {len(failed) - 1} more failed: " + ", ".join(str(r.folder) for r, _ in failed[1:]))
    rest = (f"the other {total - len(failed)} runs went on (--keep-going)" if keep_going
            else f"{others_then}; run the grid again to continue, or pass --keep-going "
                 "(make -k) to train the other runs past a failure")
    return GridError(f"{reason}{more}; {rest}; no report was written")


def run_local(runs: list[GridRun], jobs: int, gpus: int, keep_going: bool = False,
              on_done: Callable[[GridRun], None] | None = None) -> None:
    """``jobs`` runs at once, slot ``k`` pinned to GPU ``k mod gpus`` when there are GPUs.
    A failure starts no further run unless ``keep_going``; the running ones finish."""
    slots: collections.deque[int] = collections.deque(range(jobs))
    lock, stop = threading.Lock(), threading.Event()
    failed: list[tuple[GridRun, str]] = []

    def pinned(run: GridRun) -> None:
        if stop.is_set():
            return
        with lock:
            slot = slots.popleft()
        try:
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            run_one(run, env)
        except GridError as err:
            with lock:
                failed.append((run, str(err)))
            if not keep_going:
                stop.set()  # here, before this thread takes the next run
            return
        finally:
            with lock:
                slots.append(slot)
        if on_done:
            on_done(run)

    pool = ThreadPoolExecutor(jobs)
    try:
        for future in [pool.submit(pinned, run) for run in runs]:
            future.result()  # anything but a failed run (GridError) is raised here
    except KeyboardInterrupt:  # no further run starts, --keep-going or not
        stop.set()
        _interrupt_running()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        raise failures_error(failed, len(runs), keep_going,
                             "no further run was started (the running ones finished)")


def run_slurm(runs: list[GridRun], options: GridOptions, logs: Path,
              on_done: Callable[[GridRun], None] | None = None) -> None:
    """One Slurm job per run through submitit. A failed run cancels the others unless
    ``options.keep_going``; the error names each failed run's log."""
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
    failed: list[tuple[GridRun, str]] = []
    while pending:
        ask = time.monotonic() - asked >= STATE_CHECK_S
        asked = time.monotonic() if ask else asked
        for i, job in list(pending.items()):
            if not job.done(force_check=ask):
                continue
            del pending[i]
            err = job.exception()
            if err is None:
                if on_done:
                    on_done(runs[i])
                continue
            said = [line for line in str(err).splitlines() if line.strip()]
            failed.append((runs[i], f"run {runs[i].folder} failed on Slurm (job {job.job_id}, "
                                    f"{job.state}): {said[-1] if said else 'no message'}; "
                                    f"its log: {job.paths.stderr}"))
            if not options.keep_going:
                for other in pending.values():
                    other.cancel(check=False)
                pending.clear()
        if pending:
            time.sleep(POLL_S)
    if failed:
        raise failures_error(failed, len(runs), options.keep_going,
                             "the other jobs were cancelled")


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
        run_local(runs, max(1, options.jobs), gpu_count(), options.keep_going, on_done)
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


def variants_of(methods: list[str], method_args: list[str], variants: list[str]) -> list[Variant]:
    """Each method (with its ``--method-args METHOD=ARGS``), then each ``--variant
    NAME=METHOD ARGS``; a malformed item or one naming no method of the grid is refused."""
    per_method: dict[str, tuple[str, ...]] = {}
    for item in method_args:
        method, sep, args = item.partition("=")
        if not sep or method not in methods:
            raise GridError(f"--method-args {item!r}: give METHOD=ARGS for a method in "
                            f"--methods, e.g. relearning='--set method.params.reinit_epoch=3'")
        per_method[method] = per_method.get(method, ()) + tuple(shlex.split(args))
    found = [Variant(m, m, per_method.get(m, ())) for m in methods]
    for item in variants:
        name, sep, spec = item.partition("=")
        words = shlex.split(spec)
        folder = PurePosixPath(name)
        if not sep or not words or not name or folder.is_absolute() or ".." in folder.parts:
            raise GridError(f"--variant {item!r}: give NAME=METHOD [ARGS] with NAME a folder "
                            "inside --out, e.g. 'ablation/no_lora=ccat --set "
                            "method.params.lora=false'")
        found.append(Variant(name, words[0], tuple(words[1:])))
    return found
