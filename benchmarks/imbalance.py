"""Modality imbalance on the built-in synthetic CREMA-D, at the demo's sizes; one JSON line.

The data is built once, as `make demo` builds it (`ccat-data synth cremad`, by default
design `fused`, then `build` with DEMO_DATA's sizes), then for each seed the demo config
(configs/demo.yaml) trains `unimodal` (each encoder alone, on its own loss; its fused
prediction is the unimodal ensemble, the mean of the two heads' logits) and `concat` (joint
training) in this one process (one intra-op thread, no loader workers). Each run's best.pt
is evaluated on the test split and linearly probed (`ccat probe`: fit on train, scored on
test). Per modality:
- alone_test_acc: the unimodal run's own test accuracy for that modality;
- alone_probe and concat_probe: the linear probe of that modality's encoder;
- gap: alone_probe - concat_probe, how much joint training held the encoder back.
And `fused`: the fused test accuracy of `unimodal` (the ensemble) and of `concat`, and
their gap (ensemble - concat). Mean and sample std over seeds. Targets (issue 23, design
`fused`): the easy modality alone 0.55-0.80, the hard one alone at least 0.85, the ensemble
at least 0.88, Concat at least 0.10 below the ensemble, the hard modality's probe gap at
least 0.15. Design `probe` (`--design probe`) is the first design, where only the probe gap
is meant to show.
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

# benchmarks/preprocess.py has the package's name: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from ccat.analysis.probe import probe_checkpoint  # noqa: E402
from ccat.evaluate import evaluate_checkpoint  # noqa: E402
from ccat.run_config import load_config  # noqa: E402
from ccat.train import train  # noqa: E402
from preprocess.datasets.designs import DEFAULT_DESIGN, DESIGNS, resolve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_DATA = {"clips": 480, "frame_size": 32, "seconds": 1.0}  # as the Makefile's demo target
MODALITIES = ("audio", "video")
EASY_ALONE_TARGET = (0.55, 0.80)  # the easy modality alone: far from perfect, above chance
HARD_ALONE_TARGET = 0.85  # the hard modality alone learns its cue
ENSEMBLE_TARGET = 0.88  # the unimodal ensemble's fused accuracy
FUSED_GAP_TARGET = 0.10  # ensemble - concat, fused
GAP_TARGET = 0.15  # the hard modality's probe: alone - under concat


def build(folder: Path, easy: str, design: str, knobs: list[str]) -> Path:
    """Synthesize and build the demo's shards with the real CLI in a child process."""
    raw, shards = folder / "raw", folder / "shards"
    for args in (["synth", "cremad", "--out", str(raw), "--clips", str(DEMO_DATA["clips"]),
                  "--easy", easy, "--design", design, *knobs],
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
        metrics = evaluate_checkpoint(out / "best.pt", probe=probe_checkpoint)  # one load
    return {"test_acc": {m: metrics["accuracy"][m] for m in ("fused", *MODALITIES)},
            "probe": {m: metrics["probe"][m] for m in MODALITIES}}


def spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value), rounded."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 4), "std": round(std, 4)}


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per modality: alone test accuracy, alone and Concat probes and their gap; and the
    fused accuracy of the ensemble and of Concat and their gap; over seeds."""
    summary = {}
    for m in MODALITIES:
        alone = [s["unimodal"]["probe"][m] for s in per_seed]
        joint = [s["concat"]["probe"][m] for s in per_seed]
        summary[m] = {"alone_test_acc": spread([s["unimodal"]["test_acc"][m] for s in per_seed]),
                      "alone_probe": spread(alone), "concat_probe": spread(joint),
                      "gap": spread([a - j for a, j in zip(alone, joint)])}
    ensemble = [s["unimodal"]["test_acc"]["fused"] for s in per_seed]
    joint = [s["concat"]["test_acc"]["fused"] for s in per_seed]
    summary["fused"] = {"unimodal": spread(ensemble), "concat": spread(joint),
                        "gap": spread([e - j for e, j in zip(ensemble, joint)])}
    return summary


def targets(summary: dict[str, dict[str, dict[str, float]]], easy: str,
            hard: str) -> dict[str, bool]:
    """Issue 23's targets on the means over seeds."""
    low, high = EASY_ALONE_TARGET
    return {"easy_alone_55_80": low <= summary[easy]["alone_test_acc"]["mean"] <= high,
            "hard_alone_ge_85": summary[hard]["alone_test_acc"]["mean"] >= HARD_ALONE_TARGET,
            "ensemble_ge_88": summary["fused"]["unimodal"]["mean"] >= ENSEMBLE_TARGET,
            "concat_10_below_ensemble": summary["fused"]["gap"]["mean"] >= FUSED_GAP_TARGET,
            "hard_probe_gap_ge_15": summary[hard]["gap"]["mean"] >= GAP_TARGET}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--easy", choices=MODALITIES, default="audio")
    parser.add_argument("--design", choices=sorted(DESIGNS), default=DEFAULT_DESIGN)
    parser.add_argument("--easy-reliability", type=float, help="default: the design's")
    parser.add_argument("--hard-strength", type=float, help="default: the design's")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hard = next(m for m in MODALITIES if m != args.easy)
    design = resolve(args.design, args.easy_reliability, args.hard_strength)
    knobs = ["--easy-reliability", str(design.easy_reliability),
             "--hard-strength", str(design.hard_strength)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shards = build(Path(tmp), args.easy, args.design, knobs)
        per_seed = [{"seed": seed, **{method: run(method, shards, Path(tmp) / f"{method}{seed}",
                                                  seed)
                                      for method in ("unimodal", "concat")}}
                    for seed in args.seeds]
    summary = summarize(per_seed)
    result = {"benchmark": "imbalance", "config": str(CONFIG.relative_to(ROOT)),
              "data": DEMO_DATA, "easy": args.easy, "hard": hard, "design": args.design,
              "easy_reliability": design.easy_reliability,
              "hard_strength": design.hard_strength, "seeds": args.seeds,
              "modalities": {m: summary[m] for m in MODALITIES}, "fused": summary["fused"],
              "per_seed": per_seed, "seconds": round(time.perf_counter() - started, 1)}
    result["targets"] = targets(summary, args.easy, hard)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
