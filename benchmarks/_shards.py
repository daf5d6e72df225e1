"""Synthetic CREMA-D shards for the benchmarks, built by the real CLI in a child process.

Run as a script (``python benchmarks/_shards.py FOLDER --clips N ...``) it builds them
and prints one JSON line with the seconds each command took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def build_shards(folder: Path, clips: int, frame_size: int, seconds: float,
                 workers: int = 0, timings: dict[str, float] | None = None) -> Path:
    """``ccat-data synth cremad`` then ``ccat-data build cremad`` into ``folder/shards``
    (``workers`` 0: all cores); the seconds of each go into ``timings``."""
    for name, args in (("synth_s", ["synth", "cremad", "--out", str(folder / "raw"),
                                    "--clips", str(clips)]),
                       ("build_s", ["build", "cremad", "--raw", str(folder / "raw"),
                                    "--out", str(folder / "shards"),
                                    "--frame-size", str(frame_size), "--seconds", str(seconds),
                                    "--shard-size", "64", "--workers", str(workers)])):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "preprocess.cli", *args], check=True,
                       capture_output=True)
        if timings is not None:
            timings[name] = round(time.perf_counter() - started, 2)
    return folder / "shards"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--clips", type=int, default=480)
    parser.add_argument("--frame-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    timings: dict[str, float] = {}
    shards = build_shards(args.folder, args.clips, args.frame_size, args.seconds, args.workers,
                          timings)
    print(json.dumps({"benchmark": "shards", "shards": str(shards), "clips": args.clips,
                      "frame_size": args.frame_size, "seconds": args.seconds, **timings}))


if __name__ == "__main__":
    main()
