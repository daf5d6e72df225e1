"""``--workers`` before/after a change of the builder: fresh ``ccat-data build cremad``
processes over one raw tree, each code tree in turn and round after round (so that both see
the same load on a shared machine), and the sha256 of every file each build wrote; one
JSON line.

    python benchmarks/_workers.py RAW --code before=/tmp/old-checkout --code after=. \
        [--workers 1 2 0] [--rounds 2] [-- BUILD OPTIONS]

A code tree is a checkout: the builds run in its root (``python -m`` imports from there). The build options default to the
demo's (Makefile ``synth_data``). ``identical`` says, per worker count, whether every tree
wrote the same bytes (every shard and the manifest).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO_BUILD = ["--frame-size", "32", "--seconds", "1.0", "--shard-size", "64"]
PROCESSED = re.compile(r"processed (\d+) clips in ([\d.]+) s .* on (\d+) process")


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file under ``out``, by relative path."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def run(code: Path, raw: Path, workers: int, build: list[str]) -> dict:
    """One fresh build process of ``code``: its wall time, the builder's own time, the
    processes it used and the digest of what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "preprocess.cli", "build", "cremad", "--raw", str(raw),
                   "--out", str(out), *build, "--workers", str(workers)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=code,
                              env={**os.environ, "PYTHONPATH": str(code), "COLUMNS": "200"})
        wall = time.perf_counter() - start
        files = digests(out)
    found = PROCESSED.search(done.stdout.replace("\n", " "))
    whole = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"wall_s": round(wall, 2), "build_s": float(found.group(2)),
            "processes": int(found.group(3)), "files": len(files), "sha256_of_files": whole}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw", type=Path)
    parser.add_argument("--code", action="append", required=True, help="NAME=DIR")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 0])
    parser.add_argument("--rounds", type=int, default=2)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # build options follow "--"
    args = parser.parse_args(argv[:cut])
    args.build = argv[cut + 1:] or DEMO_BUILD
    codes = dict(text.split("=", 1) for text in args.code)
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list[dict]]] = {n: {str(w): [] for w in args.workers} for n in codes}
    for _ in range(args.rounds):
        for workers in args.workers:
            for name, code in codes.items():
                runs[name][str(workers)].append(run(Path(code).resolve(), args.raw, workers,
                                                    args.build))
                print(name, workers, runs[name][str(workers)][-1], file=sys.stderr, flush=True)
    best = {name: {w: min(r, key=lambda x: x["build_s"]) for w, r in by.items()}
            for name, by in runs.items()}
    result = {"benchmark": "workers", "cores": len(os.sched_getaffinity(0)),
              "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "build": args.build, "runs": runs,
              "best_build_s": {n: {w: b["build_s"] for w, b in by.items()} for n, by in best.items()},
              "speedup_vs_workers1": {n: {w: round(by["1"]["build_s"] / b["build_s"], 2)
                                          for w, b in by.items()}
                                      for n, by in best.items() if "1" in by},
              "identical": {str(w): len({r["sha256_of_files"] for by in runs.values()
                                         for r in by[str(w)]}) == 1 for w in args.workers}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
