"""Synthetic CREMA-D shards for the benchmarks, built by the real CLI in a child process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def build_shards(folder: Path, clips: int, frame_size: int, seconds: float) -> Path:
    """``ccat-data synth cremad`` then ``ccat-data build cremad`` into ``folder/shards``."""
    for args in (["synth", "cremad", "--out", str(folder / "raw"), "--clips", str(clips)],
                 ["build", "cremad", "--raw", str(folder / "raw"), "--out", str(folder / "shards"),
                  "--frame-size", str(frame_size), "--seconds", str(seconds),
                  "--shard-size", "64"]):
        subprocess.run([sys.executable, "-m", "preprocess.cli", *args], check=True,
                       capture_output=True)
    return folder / "shards"
