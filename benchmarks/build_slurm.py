"""A build in 3 parts on Slurm against one process and against ``--workers 2``; one JSON line.

It starts the tests' single-node Slurm cluster (tests/slurm_cluster.py: Debian's munge,
slurmctld, slurmd and slurmdbd, as root) and builds one CREMA-D-like raw tree (2.5 s 480x360
FLV1 clips with a 16 kHz wav, copies of a few generated clips under new ids) four times,
each a fresh ``ccat-data build cremad`` process into a fresh folder:

- ``--workers 1`` (one process) and ``--workers 2``;
- ``--parts 3 --launcher local`` (three local processes, then the merge);
- ``--parts 3 --launcher slurm --cpus-per-task 1`` (a job array of three one-CPU tasks on
  the node's cores, then the merge).

Each figure is the command's wall time: imports, planning, the parts' start (for Slurm:
submission, scheduling with ``sched_interval=2``, srun, submitit, Python), the build, and
the merge. ``shards_identical`` says whether every build wrote the same shards, and
``parts_identical_to_workers1`` whether the parts' builds wrote the one-process build's
bytes, every shard and the manifest (which records ``--workers``, outside the
fingerprint). Without a cluster the Slurm figure is left out with the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import slurm_cluster  # noqa: E402  (tests/, as the tests import it)

from preprocess.datasets.synth import replicate_cremad, synthesize_cremad  # noqa: E402

GEOMETRY = {"width": 480, "height": 360, "duration": 2.5, "fps": 30}  # CREMA-D's
MANIFEST = "manifest.json"
BUILD = ["--seconds", "3.0", "--shard-size", "16"]


def digest(out: Path, *, manifest: bool) -> str:
    """One sha256 over the files under ``out`` (relative path and bytes), with or without
    the manifest."""
    whole = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if path.name == MANIFEST and not manifest:
            continue
        whole.update(str(path.relative_to(out)).encode())
        whole.update(hashlib.sha256(path.read_bytes()).digest())
    return whole.hexdigest()


def timed_build(raw: Path, out: Path, env: dict[str, str], *extra: str) -> dict:
    command = [sys.executable, "-m", "preprocess.cli", "build", "cremad", "--raw", str(raw),
               "--out", str(out), *BUILD, *extra]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(extra)}: the build failed: {done.stdout[-1500:]}"
                         f"{done.stderr[-1500:]}")
    return {"wall_s": round(wall, 1), "shards": digest(out, manifest=False),
            "all": digest(out, manifest=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=1024)
    parser.add_argument("--distinct", type=int, default=32)
    args = parser.parse_args()
    result: dict = {"benchmark": "build_slurm", "clips": args.clips,
                    "clip": "CREMA-D-like: 2.5 s 480x360 FLV1 + audio, 16 kHz mono wav",
                    "build": BUILD, "cores": os.cpu_count(),
                    "load_avg_1min_before": round(os.getloadavg()[0], 1)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw = root / "raw"
        replicate_cremad(raw, synthesize_cremad(raw, min(args.distinct, args.clips), seed=0,
                                                **GEOMETRY), args.clips)
        env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
        runs = {"workers1": timed_build(raw, root / "w1", env, "--workers", "1"),
                "workers2": timed_build(raw, root / "w2", env, "--workers", "2"),
                "parts3_local": timed_build(raw, root / "local", env, "--workers", "1",
                                            "--parts", "3", "--launcher", "local")}
        try:
            cluster = slurm_cluster.start(root / "slurm")
        except slurm_cluster.Unavailable as err:
            result["parts3_slurm_skipped"] = str(err)
        else:
            try:
                runs["parts3_slurm"] = timed_build(
                    raw, root / "slurm-out", {**env, "SLURM_CONF": cluster.env["SLURM_CONF"]},
                    "--workers", "1",
                    "--parts", "3", "--launcher", "slurm", "--cpus-per-task", "1")
            finally:
                cluster.stop()
    result.update({name: run["wall_s"] for name, run in runs.items()})
    # the manifest records --workers (outside the fingerprint), so it is compared among the
    # builds on one process each
    result["shards_identical"] = len({run["shards"] for run in runs.values()}) == 1
    result["parts_identical_to_workers1"] = all(
        run["all"] == runs["workers1"]["all"] for name, run in runs.items() if "parts" in name)
    result["load_avg_1min_after"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
