"""Modality imbalance on the built-in synthetic CREMA-D, at the demo's sizes; one JSON line.

The data is built once, as `make demo` builds it (`ccat-data synth cremad`, then `build`
with DEMO_DATA's sizes), then for each seed the demo config (configs/demo.yaml) trains
`unimodal` (each encoder alone, on its own loss) and `concat` (joint training) in this one
process (one intra-op thread, no loader workers). Each run's best.pt is evaluated on the
test split and linearly probed (`ccat probe`: fit on train, scored on test). Per modality:
- alone_test_acc: the unimodal run's own test accuracy for that modality;
- alone_probe and concat_probe: the linear probe of that modality's encoder;
- gap: alone_probe - concat_probe, how much joint training held the encoder back.
Mean and sample std over seeds. Targets: every modality alone reaches 0.80 test accuracy,
and the hard modality's probe gap is at least 0.15.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ccat.analysis.probe import linear_probe
from ccat.evaluate import evaluate_checkpoint
from ccat.run_config import load_config
from ccat.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DATA = {"clips": 480, "frame_size": 32, "seconds": 1.0}  # as the Makefile's demo target
MODALITIES = ("audio", "video")
ALONE_TARGET, GAP_TARGET = 0.80, 0.15


def build(folder: Path, easy: str, hard_strength: float) -> Path:
    """Synthesize and build the demo's shards with the real CLI in a child process."""
    raw, shards = folder / "raw", folder / "shards"
    for args in (["synth", "cremad", "--out", str(raw), "--clips", str(DEMO_DATA["clips"]),
                  "--easy", easy, "--hard-strength", str(hard_strength)],
                 ["build", "cremad", "--raw", str(raw), "--out", str(shards),
                  "--frame-size", str(DEMO_DATA["frame_size"]),
                  "--seconds", str(DEMO_DATA["seconds"]), "--shard-size", "64",
                  "--workers", "1"]):
        subprocess.run([sys.executable, "-m", "preprocess.cli", *args], check=True,
                       capture_output=True)
    return shards


def run(method: str, shards: Path, out: Path, seed: int) -> dict[str, dict[str, float]]:
    """Train `method` with the demo config; its test accuracies and linear probe."""
    cfg = load_config(CONFIG, [f"seed={seed}", "threads=1", "data.workers=0"],
                      {"method.name": method, "data.path": str(shards), "out": str(out)})
    with contextlib.redirect_stdout(io.StringIO()):  # the training and evaluation tables
        train(cfg)
        metrics = evaluate_checkpoint(out / "best.pt")
        probe = linear_probe(out / "best.pt")
    return {"test_acc": {m: metrics["accuracy"][m] for m in MODALITIES},
            "probe": {m: probe["probe"][m] for m in MODALITIES}}


def spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value), rounded."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 4), "std": round(std, 4)}


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per modality: alone test accuracy, alone and Concat probes and their gap, over seeds."""
    summary = {}
    for m in MODALITIES:
        alone = [s["unimodal"]["probe"][m] for s in per_seed]
        joint = [s["concat"]["probe"][m] for s in per_seed]
        summary[m] = {"alone_test_acc": spread([s["unimodal"]["test_acc"][m] for s in per_seed]),
                      "alone_probe": spread(alone), "concat_probe": spread(joint),
                      "gap": spread([a - j for a, j in zip(alone, joint)])}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--easy", choices=MODALITIES, default="audio")
    parser.add_argument("--hard-strength", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hard = next(m for m in MODALITIES if m != args.easy)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shards = build(Path(tmp), args.easy, args.hard_strength)
        per_seed = [{"seed": seed, **{method: run(method, shards, Path(tmp) / f"{method}{seed}",
                                                  seed)
                                      for method in ("unimodal", "concat")}}
                    for seed in args.seeds]
    summary = summarize(per_seed)
    result = {"benchmark": "imbalance", "config": str(CONFIG.relative_to(ROOT)),
              "data": DEMO_DATA, "easy": args.easy, "hard": hard,
              "hard_strength": args.hard_strength, "seeds": args.seeds,
              "modalities": summary, "per_seed": per_seed,
              "seconds": round(time.perf_counter() - started, 1)}
    result["targets"] = {
        "alone_ge_80": all(summary[m]["alone_test_acc"]["mean"] >= ALONE_TARGET
                           for m in MODALITIES),
        "gap_ge_15": summary[hard]["gap"]["mean"] >= GAP_TARGET}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
