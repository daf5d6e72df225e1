"""A build in parts: ``ccat-data build NAME ... --part I/N`` and ``ccat-data merge OUT``.

The plan fixes every shard (:mod:`preprocess.plan`), so it also fixes which part builds
which: :func:`assign` deals the shards, longest first, each to the part with the least
estimated work so far (its planned source files), and any machine that plans the same
data gets the same answer. Part ``I`` builds its shards into the shared ``--out`` exactly
as a one-machine build does (same bytes, same shard records in ``.build/``), under a lock
of its own, and resumes them after a kill the same way. It writes
``.build/part-I-of-N.json`` when it starts (``finished: false``) and again, with what the
manifest needs from the plan, when its last shard is recorded. ``merge`` writes
``manifest.json`` through the one-machine build's own ``_finish``, from the records, once
every part is finished and of the plan in ``.build/plan.json``: the manifest is then
byte-identical to a one-machine build's with the parts' ``--workers``
(``sources.build.workers``, which the fingerprint leaves out, records part 0's).

This follows the scale-out of video2dataset's and datatrove's Slurm modes and mosaicml
streaming's ``merge_index``: a task builds a fixed part, leaves a marker, a final step
merges.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ccat.data import spec
from preprocess import outdir, writer
from preprocess.datasets import OptionError, Recipe, check_options
from preprocess.encode import strict_message
from preprocess.outdir import STATE_DIR, BuildError, atomic_write
from preprocess.plan import (PLAN_NAME, BuildOptions, ShardTask, ordered, plan_record,
                             shard_tasks)
from preprocess.plan import plan as make_plan  # "plan" names the recorded plans below
from preprocess.resume import previous_build, read_json, reusable_records
from preprocess.schedule import BuildReport, build_shards, cores
from preprocess.splits import Entry, required_splits

MAX_PARTS = 4096
PART_TEXT = re.compile(r"(\d+)/(\d+)")


@dataclass(frozen=True)
class Part:
    """Part ``index`` (0-based, as ``$SLURM_ARRAY_TASK_ID``) of a build in ``count`` parts."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Part:
        """``"I/N"`` as ``--part`` takes it; anything else is one OptionError sentence."""
        match = PART_TEXT.fullmatch(text.strip())
        if not match or not 0 <= int(match[1]) < int(match[2]) <= MAX_PARTS:
            raise OptionError(f"--part {text!r} is not I/N with 0 <= I < N <= {MAX_PARTS}; "
                              "give e.g. --part 0/3 (parts count from 0, as Slurm array "
                              "task ids do)")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def lock(self) -> str:
        return f"part-{self.index}-of-{self.count}.lock"

    @property
    def record(self) -> str:
        return f"part-{self.index}-of-{self.count}.json"


def cost(task: ShardTask) -> int:
    """A shard's estimated work, from the plan alone: the source files it decodes."""
    return sum(len(entry.sources) for entry in task.entries)


def assign(tasks: list[ShardTask], count: int) -> list[list[ShardTask]]:
    """The shards of each of ``count`` parts, in plan order: the costliest shard first
    (ties in plan order), each to the part with the least cost so far (ties: the lowest
    part), the greedy longest-processing-time rule."""
    loads = [(0, part) for part in range(count)]
    owner: dict[int, int] = {}
    for k in sorted(range(len(tasks)), key=lambda k: (-cost(tasks[k]), k)):
        load, part = heapq.heappop(loads)
        owner[k] = part
        heapq.heappush(loads, (load + cost(tasks[k]), part))
    return [[task for k, task in enumerate(tasks) if owner[k] == part] for part in range(count)]


def build_part(recipe: Recipe, raw: Path, out: Path, split_files: dict[str, Path],
               options: BuildOptions, part: Part,
               on_progress: Callable[[int, int], None] | None = None) -> BuildReport:
    """Build (or resume) the shards of ``part`` into ``out``; the manifest is ``merge``'s.

    Checks as :func:`preprocess.writer.build` does before anything is written: the plan,
    and that ``out`` holds nothing but this plan's build (finished: nothing to do)."""
    start = time.perf_counter()
    check_options(recipe)
    if options.overwrite:
        raise BuildError(f"--overwrite replaces the whole --out, which part {part} shares "
                         "with the other parts; empty --out (or build into another) before "
                         "starting the parts")
    options = dataclasses.replace(options, workers=options.workers or cores())
    head, splits, skipped, unlisted = make_plan(recipe, raw, split_files, options)
    if options.strict and skipped:
        raise BuildError(strict_message(skipped[0]))
    tasks = assign(shard_tasks(splits, options.shard_size), part.count)[part.index]
    new_plan = plan_record(head, splits, raw)
    with outdir.locked(out, part.lock):
        _remove_own_temporaries(out, tasks, part)
        finished, refusal = previous_build(out, head, new_plan, raw, options.workers,
                                                   {t.name for t in tasks})
        if refusal:
            raise BuildError(f"{out} {refusal}; part {part} cannot join it: empty --out (or "
                             "choose another) and start every part again")
        if finished is not None:  # merged already: every shard is there
            return BuildReport(manifest=finished, out=out, resumed_shards=len(tasks),
                                      seconds=time.perf_counter() - start)
        record = {"part": part.index, "parts": part.count, "plan_sha256": plan_digest(new_plan),
                  "shards": [t.name for t in tasks], "finished": False}
        _write_record(out, part, record)
        kept, rebuilt = reusable_records(out, tasks, len(recipe.classes),
                                                 options.workers)
        report, _ = build_shards(recipe, raw, out, tasks, kept, options, on_progress,
                                 start=start)
        required = required_splits(split_files, options.val_fraction, options.test_fraction)
        record.update(finished=True, head=head, skipped=skipped, required=sorted(required))
        _write_record(out, part, record)
    report.rebuilt, report.unlisted = rebuilt, unlisted
    report.seconds = time.perf_counter() - start
    return report


def _write_record(out: Path, part: Part, record: dict[str, Any]) -> None:
    """Write the part's record in its keys' order (not sorted): the manifest that merge
    writes from its head must keep the one-machine build's key order."""
    atomic_write(out / STATE_DIR / part.record,
                         json.dumps(record, ensure_ascii=False).encode())


def plan_digest(plan: dict[str, Any]) -> str:
    """sha256 of a plan record as ``.build/plan.json`` holds it."""
    return hashlib.sha256(spec.encode_json(plan)).hexdigest()


def _remove_own_temporaries(out: Path, tasks: list[ShardTask], part: Part) -> None:
    """Remove what a killed run of this part left half-written (its shards, their records,
    its part record); the other parts' temporary files may be in use."""
    own = {t.name for t in tasks} | {f"{t.name}.json" for t in tasks} | {part.record}
    for folder in (out, out / STATE_DIR):
        for path in folder.glob(f".*{outdir.TMP_SUFFIX}") if folder.is_dir() else []:
            if path.name[1:].rpartition(".")[0].rpartition(".")[0] in own:
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------- merge


def merge(out: Path) -> dict[str, Any]:
    """Write ``out/manifest.json`` from the records of every part, then drop ``.build``;
    returns the manifest. Refuses, in one sentence naming the part, a part that is missing,
    unfinished, of another plan or whose shards are not their records' bytes."""
    if not out.is_dir():
        raise BuildError(f"--out {out} is not a folder; give the folder the parts built into")
    with outdir.locked(out):
        if (out / spec.MANIFEST_NAME).is_file() and not outdir.part_records(out):
            return spec.load_manifest(out)  # merged already
        plan = read_json(out / STATE_DIR / PLAN_NAME)
        names = outdir.part_records(out)
        if plan is None or not names:
            raise BuildError(f"{out} holds no build in parts (no {STATE_DIR}/part-I-of-N.json); "
                             "run `ccat-data build NAME ... --part I/N` for every part first")
        digest = plan_digest(plan)
        records = [_part_record(out, Part(i, count), digest) for i, count in
                   _parts_of(out, names)]
        tasks = _plan_tasks(plan)
        shards = _part_shards(out, records, tasks, len(plan["params"]["classes"]))
        head, skipped = records[0]["head"], records[0]["skipped"]
        by_split = {name: [shards[t.name] for t in tasks if t.split == name]
                    for name in ordered(plan["splits"])}
        writer.check_built_splits(by_split, skipped, set(records[0]["required"]))
        return writer._finish(out, head, by_split, skipped, len(head["classes"]))


def _parts_of(out: Path, names: list[str]) -> list[tuple[int, int]]:
    """``(I, N)`` of every part a build in N parts needs; refuses records of two counts."""
    found = [tuple(map(int, outdir.PART_RECORD.fullmatch(n).groups())) for n in names]
    counts = sorted({n for _, n in found}, key=lambda n: (-sum(c == n for _, c in found), n))
    if len(counts) > 1:
        odd = next(f"{i}/{n}" for i, n in sorted(found) if n == counts[-1])
        raise BuildError(f"part {odd} in {out} belongs to a build in {counts[-1]} parts, the "
                         f"others to one in {counts[0]}; empty --out and build every part of "
                         "one count again")
    return [(i, counts[0]) for i in range(counts[0])]


def _part_record(out: Path, part: Part, digest: str) -> dict[str, Any]:
    """Part ``part``'s finished record, of the plan whose sha256 is ``digest``."""
    path = out / STATE_DIR / part.record
    if not path.exists():
        raise BuildError(f"part {part} is missing from {out}: run `ccat-data build NAME ... "
                         f"--part {part}` with the other parts' options, then merge again")
    record = read_json(path) or {}
    if record.get("plan_sha256") != digest:
        raise BuildError(f"part {part} in {out} was built from another plan (other "
                         "parameters, samples or raw files) than .build/plan.json; build the "
                         "parts again from one command into an empty --out")
    if record.get("finished") is not True or not {"head", "skipped", "required"} <= set(record):
        raise BuildError(f"part {part} in {out} is unfinished (still running, or stopped); "
                         f"run `ccat-data build NAME ... --part {part}` again to finish it, "
                         "then merge again")
    return record


def _plan_tasks(plan: dict[str, Any]) -> list[ShardTask]:
    """The shards of the plan recorded in ``.build/plan.json``."""
    splits = {name: [Entry(key, label, dict(enumerate(files))) for key, label, files in rows]
              for name, rows in plan["splits"].items()}
    return shard_tasks(splits, plan["params"]["sources"]["shard_size"])


def _part_shards(out: Path, records: list[dict[str, Any]], tasks: list[ShardTask],
                 num_classes: int) -> dict[str, dict[str, Any]]:
    """Every shard's record, checked: the parts' options agree, each part holds the shards
    the plan gives it, and every shard's record is whole and its bytes are the recorded ones."""
    count, shards = len(records), {}
    dealt = assign(tasks, count)
    for record in records:
        part = Part(record["part"], count)
        if _options(record["head"]) != _options(records[0]["head"]):
            raise BuildError(f"part {part} in {out} was built with other options than part "
                             f"0/{count} (--strict or the tool version); build it again "
                             "with the same command")
        mine = dealt[part.index]
        if record["shards"] != [t.name for t in mine]:
            raise BuildError(f"part {part} in {out} built other shards than the plan gives it; "
                             "build the parts again from one command into an empty --out")
        found, damaged = reusable_records(out, mine, num_classes, cores())
        missing = [t.name for t in mine if t.name not in found]
        if missing:
            why = damaged.get(missing[0], "its record is missing")
            raise BuildError(f"part {part}'s shard {missing[0]} in {out} is not as recorded "
                             f"({why}); run `ccat-data build NAME ... --part {part}` again "
                             "(it builds that shard again), then merge again")
        shards.update(found)
    return shards


def _options(head: dict[str, Any]) -> dict[str, Any]:
    """A part's head without its --workers, which each part may choose."""
    build = {k: v for k, v in head["sources"]["build"].items() if k != "workers"}
    return {**head, "sources": {**head["sources"], "build": build}}
