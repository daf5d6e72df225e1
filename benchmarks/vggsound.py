"""VGGSound build cost per clip at 10 s clips, and the projected time of a 200k-clip build;
one JSON line.

Clips: synthetic 10 s H.264 + AAC ``.mp4`` at a YouTube-like 640x360, 25 fps (or a
``--raw`` tree of real clips). Per clip, the recipe's whole ``process`` (audio decode,
resample, 10 s STFT; three frames decoded, resized to 224 and JPEG-encoded), timed as this
process's CPU time (``time.process_time``, torch on one thread) so that a loaded machine
does not inflate it, and as wall time. Projection: clips x CPU seconds per clip / cores,
for 16 cores and for 8 machines of 16 cores, assuming cores scale evenly (the CREMA-D
benchmark measured 0.83-0.95 at 2 workers) and the disk keeps up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This file's folder holds a module named like the package: keep it off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from preprocess.datasets.synth_clips import (ClipStyle, synthesize_vggsound,  # noqa: E402
                                             youtube_ids)
from preprocess.datasets.vggsound import Vggsound, clip_key  # noqa: E402
from preprocess.splits import Entry  # noqa: E402

LISTED_CLIPS = 199_176  # rows of vggsound.csv (the sum of stat.csv)
CORES = 16
MACHINES = 8


def measure(raw: Path) -> tuple[list[float], list[float]]:
    """CPU and wall seconds of ``Vggsound().process`` for every clip under ``raw``."""
    recipe = Vggsound()
    cpu, wall = [], []
    for path in sorted(raw.rglob("*.mp4")):
        entry = Entry(clip_key(path.stem), 0, {"clip": path.relative_to(raw).as_posix()})
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        recipe.process(raw, entry)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, help="a folder of 10 s clips (default: synthetic)")
    parser.add_argument("--clips", type=int, default=6, help="synthetic clips to time")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, as a build worker
    with tempfile.TemporaryDirectory() as scratch:
        raw = args.raw
        if raw is None:
            raw = Path(scratch)
            clips = [(video, 0, "dog barking") for video in youtube_ids(args.clips, 0)]
            synthesize_vggsound(raw, clips, ["dog barking"], 0,
                                ClipStyle(width=640, height=360, fps=25, seconds=10.0))
        cpu, wall = measure(raw)
    per_clip = statistics.median(cpu[1:] or cpu)  # the first clip warms caches and codecs
    print(json.dumps({
        "clips_timed": len(cpu), "clip": "10 s, 640x360 25 fps H.264 + AAC" if args.raw is None
        else str(args.raw),
        "cpu_s_per_clip": round(per_clip, 4), "wall_s_per_clip": round(statistics.median(wall), 4),
        "clips_per_core_s": round(1 / per_clip, 2),
        "projected_200k_h_16_cores": round(LISTED_CLIPS * per_clip / CORES / 3600, 2),
        "projected_200k_min_8x16_cores": round(LISTED_CLIPS * per_clip / (CORES * MACHINES) / 60, 1),
    }))


if __name__ == "__main__":
    main()
