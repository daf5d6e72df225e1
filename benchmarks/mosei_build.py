"""CMU-MOSEI build throughput on a synthetic MulT-layout pickle; one JSON line.

Measured in one process (the recipe builds in one: every worker would unpickle the whole
file): the pickle's safe load and indexing, and the full build (plan, the pickle's sha256,
features, shards, manifest), each as wall and CPU seconds, and the full build of the real
aligned pickle's 22,856 segments projected from the CPU rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# This folder holds a preprocess.py: keep it off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from preprocess import writer  # noqa: E402
from preprocess.datasets import mosei  # noqa: E402
from preprocess.datasets.synth_mosei import synthesize_mosei  # noqa: E402

REAL_SEGMENTS = 16326 + 1871 + 4659  # MulT's train / valid / test


def timed(work) -> tuple[float, float]:
    """(wall s, CPU s of this process) of ``work()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--segments", type=int, default=2000)
    parser.add_argument("--variant", default="aligned", choices=sorted(mosei.VARIANTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        synthesize_mosei(raw, args.segments, 0, args.variant, 1.0, lambda n: None)
        pickle_mb = (raw / mosei.VARIANTS[args.variant][0]).stat().st_size / 2**20
        load_wall, load_cpu = timed(lambda: mosei.Mosei(variant=args.variant).find(raw))
        mosei._LOADED.clear()  # the build loads it again, as a fresh command would
        folds = raw / "splits" / mosei.FOLDS_FILE
        recipe = mosei.Mosei(variant=args.variant)
        build_wall, build_cpu = timed(lambda: writer.build(
            recipe, raw, Path(tmp) / "out", dict.fromkeys(("train", "val", "test"), folds),
            writer.BuildOptions(workers=1)))
    print(json.dumps({
        "benchmark": "mosei_build", "variant": args.variant, "segments": args.segments,
        "pickle_mb": round(pickle_mb, 1),
        "load_wall_s": round(load_wall, 2), "load_cpu_s": round(load_cpu, 2),
        "build_wall_s": round(build_wall, 2), "build_cpu_s": round(build_cpu, 2),
        "segments_per_cpu_s": round(args.segments / build_cpu, 1),
        "projected_real_build_cpu_s": round(REAL_SEGMENTS * build_cpu / args.segments, 1)}))


if __name__ == "__main__":
    main()
