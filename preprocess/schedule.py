"""Scheduling: which process builds which shard.

:func:`build_shards` is the one "build these shards" step of every way a build runs: one
process, ``--workers N``, a part (``--part I/N``, :mod:`preprocess.parts`) and a Slurm task
(:mod:`preprocess.launch`, which runs a part). Each shard is built whole by one process
(:meth:`preprocess.encode.Encoder.shard`), so the bytes never depend on this schedule.

With ``--workers N`` this process builds shards too, so a build never waits for the
workers to start (they import torch and PyAV first), and it starts the other ``N - 1`` only
when the work left is worth it, so a small build is not slower with more workers. They are
a :class:`concurrent.futures.ProcessPoolExecutor` forked from a clean fork server, handed
one shard each at a time, the longest first, so that none is left alone at the end. A
worker that dies is one BuildError, never a hang (the pool breaks). On a worker's error the
shards under way are finished and recorded (kept for a resume), no other is started, and
the error is raised here; on an error of this process (or Ctrl-C) the workers are ended
and their partial files removed.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ccat import fileio
from preprocess.datasets import Recipe
from preprocess.encode import Encoder, single_threaded
from preprocess.outdir import STATE_DIR, BuildError
from preprocess.plan import BuildOptions, ShardTask

PROGRESS_POLL_S = 0.05  # how often this process reads the workers' per-sample reports
# Workers are started only when the work left, estimated from this process's first
# PROBE_SAMPLES, would take longer than WORKER_START_MIN_S here alone: the fork server
# first spends about a second of CPU importing torch and PyAV, which a shorter build
# (the 240-clip demo) would only lose to.
PROBE_SAMPLES = 8
WORKER_START_MIN_S = 2.0
WORKER_DIED = ("a build worker process died (killed, or out of memory); the shards finished "
               "are kept: run the same command again to resume, with fewer --workers if "
               "memory is short")


@dataclass
class BuildReport:
    """What a build did, for the summary table."""

    manifest: dict[str, Any]
    processed: int = 0
    resumed_shards: int = 0
    seconds: float = 0.0
    unlisted: int = 0
    out: Path = Path(".")
    workers: int = 1  # processes that built shards: this one and the workers it started
    first_sample_s: float | None = None  # from the call of build() to the first sample done
    rebuilt: dict[str, str] = field(default_factory=dict)  # shard -> why its bytes were not kept

    @property
    def clips_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def cores() -> int:
    """The CPU cores this process may run on (``--workers 0``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_shards(recipe: Recipe, raw: Path, out: Path, tasks: list[ShardTask],
                 kept: dict[str, dict[str, Any]], options: BuildOptions,
                 on_progress: Callable[[int, int], None] | None = None,
                 on_record: Callable[[ShardTask, dict[str, Any]], None] | None = None,
                 start: float | None = None) -> tuple[BuildReport, dict[str, dict[str, Any]]]:
    """Build each of ``tasks`` whose record is not in ``kept``, on ``options.workers``
    processes; returns the report and every task's record, by shard name.

    ``on_progress(done, total)`` hears of every sample done, in any process;
    ``on_record(task, record)`` of every shard recorded. ``start`` (perf_counter) is when
    the build began, for the report's time to the first sample."""
    start = time.perf_counter() if start is None else start
    todo = [task for task in build_order(tasks) if task.name not in kept]
    total = sum(len(task.entries) for task in tasks)
    report = BuildReport(manifest={}, out=out, resumed_shards=len(tasks) - len(todo),
                         processed=sum(len(task.entries) for task in todo))
    done = total - report.processed

    def sample_done(count: int = 1) -> None:
        nonlocal done
        if report.first_sample_s is None:
            report.first_sample_s = time.perf_counter() - start
        done += count
        if on_progress:
            on_progress(done, total)

    records, by_name = dict(kept), {task.name: task for task in tasks}
    encoder = Encoder(recipe, raw, out, len(recipe.classes), options.strict, options.raw_hash)
    for record in _run_shards(todo, encoder, min(options.workers, len(todo)), sample_done,
                              report):
        records[record["name"]] = record
        if on_record:
            on_record(by_name[record["name"]], record)
    return report, records


def build_order(tasks: list[ShardTask]) -> list[ShardTask]:
    """The first shard of every split, then the others: a build that replaces another
    learns early whether every split gets samples, and drops the old build sooner."""
    return [t for t in tasks if t.index == 0] + [t for t in tasks if t.index != 0]


def _run_shards(tasks: list[ShardTask], encoder: Encoder, workers: int,
                sample_done: Callable[[int], None], report: BuildReport,
                ) -> Iterator[dict[str, Any]]:
    """Build ``tasks`` here and, once the work left is worth it, on ``workers - 1`` more
    processes (the longest shards first); yields their records and sets
    ``report.workers``."""
    single_threaded()
    if workers <= 1:
        yield from (encoder.shard(task, sample_done) for task in tasks)
        return
    queue = deque(sorted(tasks, key=lambda task: -len(task.entries)))
    pool = Workers(encoder, workers - 1, queue, sample_done)
    try:
        while queue or pool.running:
            if queue:
                pool.finished.append(encoder.shard(queue.popleft(), pool.sample_done_here))
            else:
                pool.service(wait_s=PROGRESS_POLL_S)
            yield from pool.take_finished()
    finally:
        report.workers = 1 + pool.stop()


def worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a clean, single-threaded server that has imported the decoders.

    Plain fork deadlocked: by then the parent may hold threads (codecs, BLAS, OpenMP, the
    progress bar, the pool's own) whose locks a forked child inherits taken; spawn would
    re-import torch and PyAV per worker.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["preprocess.writer"])
    return context


class Workers:
    """The worker processes of one build: a ProcessPoolExecutor of ``size`` processes, each
    handed one shard at a time from ``queue`` (which this process also builds from), and
    the per-sample reports they send back.

    They start on a thread of their own (starting a process waits for the fork server's
    imports), when :meth:`start` is called or this process's first samples say the work
    left is worth it; :meth:`service`, called between this process's samples, collects
    their records and progress and hands each free one the next shard.
    """

    def __init__(self, encoder: Encoder, size: int, queue: deque[ShardTask],
                 sample_done: Callable[[int], None]) -> None:
        self.encoder, self.size = encoder, size
        self.queue, self.sample_done = queue, sample_done
        self.left = sum(len(task.entries) for task in queue)  # samples not yet done
        self.done_here, self.first_here = 0, time.perf_counter()
        self.executor: ProcessPoolExecutor | None = None  # set once its processes exist
        self.progress: Any = None  # the workers' per-sample reports (a SimpleQueue)
        self.running: set[Future] = set()
        self.finished: list[dict[str, Any]] = []
        self.warm_ups: list[Future] = []  # one task a worker, to start them all
        self.pids: set[int] = set()  # the workers seen running
        self.error: BaseException | None = None
        self.started = False
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # between the starting thread and stop()

    def _start_if_worth_it(self) -> None:
        """Start the workers when the work left would take this process alone longer than
        WORKER_START_MIN_S (estimated from its first PROBE_SAMPLES)."""
        if self.started or self.done_here < PROBE_SAMPLES:
            return
        per_sample = (time.perf_counter() - self.first_here) / self.done_here
        if per_sample * self.left > WORKER_START_MIN_S:
            self.start()

    def start(self) -> None:
        """Start the workers, off this thread."""
        self.started = True
        context = worker_context()
        self.progress = context.SimpleQueue()
        threading.Thread(target=self._start, args=(context,), daemon=True).start()

    def _start(self, context: multiprocessing.context.BaseContext) -> None:
        """Make the executor and its ``size`` processes (an executor starts a process per
        task submitted while none is idle: ``size`` warm-up tasks start them all here, so
        that handing out shards never waits); none once the pool is stopping."""
        executor = ProcessPoolExecutor(self.size, mp_context=context, initializer=_init_worker,
                                       initargs=(self.encoder, self.progress))
        self.warm_ups = [executor.submit(os.getpid) for _ in range(self.size)]
        for future in self.warm_ups:
            future.add_done_callback(self._seen)
        with self.lock:
            if not self.stopping.is_set():
                self.executor = executor
                return
        _end(executor)

    def _seen(self, future: Future) -> None:
        """A warm-up's outcome: the worker that ran it is up."""
        if not future.cancelled() and future.exception() is None:
            self.pids.add(future.result())

    def sample_done_here(self) -> None:
        """One sample of this process's shard is done: count it and service the workers."""
        self.sample_done(1)
        self.done_here, self.left = self.done_here + 1, self.left - 1
        self._start_if_worth_it()
        self.service(wait_s=0.0)

    def service(self, wait_s: float) -> None:
        """Read the workers' reports and records (waiting up to ``wait_s`` for a shard to
        finish), then hand each free worker the next shard."""
        executor = self.executor
        if executor is None:  # not started yet (or still starting)
            if wait_s > 0:  # sleep(0) is a system call: 0.1 ms a sample on a small build
                time.sleep(wait_s)
            return
        if wait_s > 0 and self.running:
            concurrent.futures.wait(self.running, wait_s, concurrent.futures.FIRST_COMPLETED)
        self._read_progress()
        for future in [f for f in self.running if f.done()]:
            self.running.discard(future)
            self._collect(future)
        while self.queue and self.error is None and len(self.running) < self.size:
            try:
                self.running.add(executor.submit(_build_there, self.queue.popleft()))
            except BrokenProcessPool:
                self.error = self.error or BuildError(WORKER_DIED)

    def _read_progress(self) -> None:
        """Count the samples the workers have reported."""
        progress = self.progress
        while not progress.empty():
            count = progress.get()
            self.sample_done(count)
            self.left -= count

    def _collect(self, future: Future) -> None:
        """A shard a worker finished: its record, or the error that stops the build."""
        try:
            pid, record = future.result()
        except BrokenProcessPool:
            self.error = self.error or BuildError(WORKER_DIED)
        except BaseException as err:  # noqa: BLE001 - raised here once no shard is under way
            self.error = self.error or err
        else:
            self.pids.add(pid)
            self.finished.append(record)

    def take_finished(self) -> list[dict[str, Any]]:
        """The records finished since the last call; raises a worker's error instead, once
        no shard is under way any more."""
        if self.error is not None:
            self.queue.clear()
            while self.running:
                self.service(wait_s=PROGRESS_POLL_S)
            raise self.error
        finished, self.finished = self.finished, []
        return finished

    def stop(self) -> int:
        """End the workers: with nothing under way, as a pool shuts down; otherwise (an
        error here, Ctrl-C) they are terminated and their partial files removed. Workers
        still starting are ended as they start, without waiting for them. Returns how many
        had started."""
        with self.lock:
            self.stopping.set()
            executor = self.executor
        if executor is None:
            return len(self.pids)
        if self.running or self.error is not None or not all(f.done() for f in self.warm_ups):
            _remove_partial_files(self.encoder.out, _end(executor) | self.pids)
        else:
            executor.shutdown(wait=True)
            self._read_progress()  # the last reports of the shards already collected
        return len(self.pids)


def _end(executor: ProcessPoolExecutor) -> set[int]:
    """Terminate the processes of ``executor`` at once (what they were building is lost);
    returns their ids. Python 3.14 has ``terminate_workers``; before it, the executor's
    process table is the only handle on them."""
    processes = dict(getattr(executor, "_processes", None) or {})
    terminate = getattr(executor, "terminate_workers", None)
    if terminate is not None:
        terminate()
    else:
        for process in processes.values():
            process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)
    return set(processes)


def _remove_partial_files(out: Path, pids: set[int]) -> None:
    """Remove the temporary files (``.<name>.<pid>.tmp``) of the worker processes ``pids``
    in ``out`` and ``out/.build``; other processes' (another part's) are left alone."""
    for pid in pids:
        for folder in (out, out / STATE_DIR):
            for tmp in folder.glob(f".*.{pid}{fileio.TMP_MARK}"):
                tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- in a worker process

_ENCODER: list[tuple[Encoder, Callable[[], None]]] = []  # this worker's, set when it starts


def _init_worker(encoder: Encoder, progress: Any) -> None:
    """Set up a worker: one thread, Ctrl-C left to the parent (which ends the workers), an
    end with the parent, and a report per sample done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    single_threaded()
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_end_with, args=(parent,), daemon=True).start()
    _ENCODER.append((encoder, lambda: progress.put(1)))


def _end_with(parent: multiprocessing.process.BaseProcess) -> None:
    """End this worker when the build's process is gone (killed): the executor's queues,
    whose ends every worker holds too, would never tell it."""
    parent.join()
    os._exit(1)


def _build_there(task: ShardTask) -> tuple[int, dict[str, Any]]:
    """Build one shard in a worker; returns this worker's id and the shard's record."""
    encoder, report = _ENCODER[-1]
    return os.getpid(), encoder.shard(task, report)
