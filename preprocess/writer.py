"""A build: ``ccat-data build NAME``, from its options to its manifest.

A build is four steps, each a module a reader can name:
- the plan (:mod:`preprocess.plan`): the samples, their splits and the shards they fill,
  from the options alone;
- the ``--out`` folder (:mod:`preprocess.outdir`): its lock, and the build an
  ``--overwrite`` replaces, kept until the new build has shards; and resume
  (:mod:`preprocess.resume`): what an interrupted or finished build of the same plan there
  leaves that this one may keep, or why it refuses;
- the shards (:mod:`preprocess.schedule`, :mod:`preprocess.encode`): every shard not kept,
  each built whole by one process, on as many processes as ``--workers``; a part
  (:mod:`preprocess.parts`) and a Slurm task (:mod:`preprocess.launch`) build theirs
  through the same :func:`preprocess.schedule.build_shards`;
- the manifest, here: ``manifest.json`` is written last, atomically, with each shard's
  membership (its keys and labels, in order) and the membership and raw-content hashes the
  fingerprint covers; then the shard records are removed.

Shard bytes depend on the plan alone, never on timing or worker count.
"""

from __future__ import annotations

import dataclasses
import json
import os  # noqa: F401 - tests patch writer.os (fsync) to simulate a full disk
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from ccat.data import spec
from preprocess import outdir, rawhash
from preprocess.datasets import Recipe, check_options
from preprocess.encode import strict_message
from preprocess.outdir import STATE_DIR, BuildError, atomic_write, locked
from preprocess.plan import (MAX_SHARD_SIZE, MAX_WORKERS, PLAN_NAME, BuildOptions, ShardTask,
                             ordered, plan, plan_record, shard_tasks)
from preprocess.resume import previous_build, reusable_records, shard_mismatch
from preprocess.schedule import BuildReport, build_shards, cores
from preprocess.splits import Entry, empty_splits, required_splits

__all__ = ["BuildError", "BuildOptions", "BuildReport", "MAX_SHARD_SIZE", "MAX_WORKERS",
           "PLAN_NAME", "STATE_DIR", "ShardTask", "build", "cores", "locked",
           "plan", "plan_record", "shard_tasks", "split_entry"]


def build(recipe: Recipe, raw: Path, out: Path, split_files: dict[str, Path],
          options: BuildOptions, on_progress: Callable[[int, int], None] | None = None,
          ) -> BuildReport:
    """Build (or resume, or repair) the shards of ``recipe`` from ``raw`` into ``out``.

    The options, the raw folder, the split files and the plan are all checked before
    ``out`` is touched. ``on_progress(done, total)`` is called as samples finish, in
    whichever worker.
    """
    start = time.perf_counter()
    check_options(recipe)
    # a recipe may cap its processes (MOSEI: every worker would load the whole pickle)
    workers = min(options.workers or cores(), getattr(recipe, "max_workers", MAX_WORKERS))
    options = dataclasses.replace(options, workers=workers)
    head, splits, skipped, unlisted = plan(recipe, raw, split_files, options)
    if options.strict and skipped:
        raise BuildError(strict_message(skipped[0]))
    with locked(out):
        outdir.restore_aside(out)  # an --overwrite killed before its build had shards
        outdir.remove_temporaries(out)
        _refuse_parts(out, options)
        try:
            finished = _prepare_out(out, head, plan_record(head, splits, raw), raw, options)
            if finished is not None:
                report = _repair(recipe, raw, out, finished, splits, options, on_progress, start)
            else:
                required = required_splits(split_files, options.val_fraction,
                                           options.test_fraction)
                report = _write_build(recipe, raw, out, head, splits, skipped, required,
                                      options, on_progress, start)
        except BaseException:
            outdir.restore_aside(out)  # a replaced build comes back until the new one has shards
            raise
    report.unlisted = unlisted
    report.seconds = time.perf_counter() - start
    return report


def _refuse_parts(out: Path, options: BuildOptions) -> None:
    """A one-machine build does not write into a build in parts (preprocess.parts), whose
    parts may be running elsewhere, unless it replaces it (--overwrite)."""
    records = outdir.part_records(out)
    if records and not options.overwrite:
        raise BuildError(f"{out} holds a build in parts ({', '.join(records[:3])} in "
                         f"{STATE_DIR}/); finish its parts and run `ccat-data merge {out}`, or "
                         "run with --overwrite to replace it")


def _write_build(recipe: Recipe, raw: Path, out: Path, head: dict[str, Any],
                 splits: dict[str, list[Entry]], skipped: list[dict[str, Any]],
                 required: set[str], options: BuildOptions,
                 on_progress: Callable[[int, int], None] | None, start: float) -> BuildReport:
    """Build every shard that no earlier run of this plan left whole, then the manifest.

    A build that ``--overwrite`` moved aside is dropped once every required split has a
    finished shard with samples (:func:`build` puts it back when this stops before).
    """
    num_classes = len(recipe.classes)
    tasks = shard_tasks(splits, options.shard_size)
    kept, rebuilt = reusable_records(out, tasks, num_classes, options.workers)
    pending = set(required) if (out / STATE_DIR / outdir.ASIDE).is_dir() else set()

    def recorded(task: ShardTask, record: dict[str, Any]) -> None:
        if pending and record["num_samples"]:
            pending.discard(task.split)
            if not pending:
                outdir.drop_aside(out)

    report, by_name = build_shards(recipe, raw, out, tasks, kept, options, on_progress,
                                   recorded, start)
    report.rebuilt = rebuilt
    records = {name: [by_name[t.name] for t in tasks if t.split == name]
               for name in ordered(splits)}
    check_built_splits(records, skipped, required)
    report.manifest = _finish(out, head, records, skipped, num_classes)
    return report


def _repair(recipe: Recipe, raw: Path, out: Path, finished: dict[str, Any],
            splits: dict[str, list[Entry]], options: BuildOptions,
            on_progress: Callable[[int, int], None] | None, start: float) -> BuildReport:
    """Reuse the finished build of this very plan in ``out``, first building again each
    shard whose bytes are not those its manifest records (missing, cut or changed)."""
    listed = {s["name"]: s for entry in finished["splits"].values() for s in entry["shards"]}
    with ThreadPoolExecutor(options.workers) as pool:  # hashing releases the GIL
        whys = pool.map(lambda s: shard_mismatch(out / s["name"], s["bytes"], s["sha256"]),
                        listed.values())
        damaged = {name: why for name, why in zip(listed, whys) if why}
    tasks = {task.name: task for task in shard_tasks(splits, options.shard_size)}
    if set(damaged) - set(tasks):
        raise BuildError(f"{out / spec.MANIFEST_NAME} lists shards that this plan does not "
                         f"make ({', '.join(sorted(set(damaged) - set(tasks))[:3])}); run with "
                         "--overwrite to build it again")
    report, records = build_shards(recipe, raw, out, [tasks[n] for n in damaged], {},
                                   options, on_progress, start=start)
    for name in damaged:
        if any(records[name][k] != listed[name][k] for k in ("num_samples", "bytes",
                                                                    "sha256")):
            raise BuildError(f"shard {name}, built again, differs from its record in "
                             f"{spec.MANIFEST_NAME} (the decoders here give other bytes than "
                             "the build's); run with --overwrite to build the dataset again")
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    report.manifest, report.rebuilt = finished, damaged
    report.resumed_shards = len(listed) - len(damaged)
    return report


def check_built_splits(records: dict[str, list[dict[str, Any]]], skipped: list[dict[str, Any]],
                        required: set[str]) -> None:
    """Refuse to finish a build whose skipped samples leave a split it must fill empty (a
    class losing its samples to bad media is recorded in ``skipped``, not refused)."""
    counts = {name: [sum(r["num_samples"] for r in split)] for name, split in records.items()}
    gap = empty_splits(counts, required)
    if gap:
        every = skipped + [s for split in records.values() for r in split for s in r["skipped"]]
        reason, count = Counter(s["reason"] for s in every).most_common(1)[0]
        raise BuildError(f"{gap} once the bad samples are skipped ({len(every)} skipped, "
                         f"{count} for '{reason}'); fix or replace those raw files (--strict "
                         "stops at the first and names it), then build again with --overwrite")


def split_entry(records: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """A split's manifest entry from its shard records (shards without samples left out)."""
    kept = [r for r in records if r["num_samples"]]
    shards = [{**{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")},
               "membership": spec.format_membership(r["members"])} for r in kept]
    counts = [sum(r["class_counts"][c] for r in kept) for c in range(num_classes)]
    members = [row for r in kept for row in r["members"]]
    return {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
            "class_counts": counts, "membership_sha256": spec.membership_sha256(members)}


def _prepare_out(out: Path, head: dict[str, Any], new_plan: dict[str, Any], raw: Path,
                 options: BuildOptions) -> dict[str, Any] | None:
    """Check that ``out`` may take this build, starting it afresh or resuming it.

    Returns the manifest when ``out`` already holds this build, finished. Refuses (one
    sentence) a folder holding other files, another finished build or another plan. With
    ``--overwrite`` the build there is moved aside (:mod:`preprocess.outdir`), not removed.
    """
    foreign = outdir.foreign_files(out)
    if foreign:
        raise BuildError(f"{out} holds files that are not a build of this toolkit "
                         f"({', '.join(foreign[:3])}); choose an empty --out folder")
    if not options.overwrite:
        finished, refusal = previous_build(out, head, new_plan, raw, options.workers)
        if refusal:
            raise BuildError(f"{out} {refusal}; run with --overwrite to replace it, or choose "
                             "another --out")
        return finished
    outdir.move_aside(out)
    atomic_write(out / STATE_DIR / PLAN_NAME, spec.encode_json(new_plan))
    return None


def _finish(out: Path, head: dict[str, Any], records: dict[str, list[dict[str, Any]]],
            skipped: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """Write manifest.json atomically, with its identity fields, then drop the records."""
    every = [record for split in records.values() for record in split]
    every_skip = skipped + [s for record in every for s in record["skipped"]]
    hashes = {rel: digest for record in every for rel, digest in record["hashes"].items()}
    manifest = {
        **{k: head[k] for k in ("spec_version", "dataset", "classes", "modalities")},
        "splits": {name: split_entry(split, num_classes) for name, split in records.items()},
        "skipped": sorted(every_skip, key=lambda s: (s["split"] or "", s["id"])),
        "sources": {**head["sources"],
                    "raw": rawhash.raw_content(hashes, head["sources"]["build"]["raw_hash"])},
        "fingerprint": "",
        "tool_version": head["tool_version"],
    }
    manifest["fingerprint"] = spec.compute_fingerprint(manifest)
    spec.check_manifest(manifest, str(out / spec.MANIFEST_NAME))
    atomic_write(out / spec.MANIFEST_NAME,
                  json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n")
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest

