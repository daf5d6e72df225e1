"""The GPU check (run through ``benchmarks/gpu_check.sh``): shards at CREMA-D geometry (and
at Kinetics-Sounds' 10 s audio), ``loader.py`` on them (CPU vs GPU JPEG decode, where a
sample's time goes), then ``train_step.py`` in each configuration with nvidia-smi sampled
alongside, then projections of full paper-length CCAT runs on CREMA-D and Kinetics-Sounds. Every result is one JSON line,
printed and appended to ``$OUT/gpu_check.jsonl`` as soon as it is measured, so a run cut
short keeps what it measured.

``--dry-run``: the same steps on the CPU at tiny sizes (a few loader workers, compile
backend ``eager``, no nvidia-smi), to check in seconds that nothing crashes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# name, train_step.py arguments; the most telling first, so a cut-short run loses least.
# Runs named ks_* read the Kinetics-Sounds-geometry shards (10 s audio: 257 x 625).
RUNS = [
    ("stream_w8", ["--loader", "stream", "--workers", "8"]),
    ("device_cache", ["--loader", "device_cache"]),
    ("stream_w16", ["--loader", "stream", "--workers", "16"]),
    ("ks_device_cache", ["--loader", "device_cache"]),
    ("device_cache_b64", ["--loader", "device_cache", "--batch-size", "64"]),
    ("stream_w16_b64", ["--loader", "stream", "--workers", "16", "--batch-size", "64"]),
    ("device_cache_fp32", ["--loader", "device_cache", "--precision", "fp32"]),
    ("device_cache_contiguous", ["--loader", "device_cache", "--memory-format", "contiguous"]),
    ("ks_stream_w16", ["--loader", "stream", "--workers", "16"]),
    ("device_cache_inductor", ["--loader", "device_cache", "--compile", "inductor"]),
]
FULL = {"clips": 960, "frame_size": 224, "seconds": 3.0, "ks_seconds": 10.0, "steps": 30,
        "run_timeout_s": 50, "compile_timeout_s": 150, "shards_timeout_s": 90,
        "loader_timeout_s": 60}
DRY = {"clips": 40, "frame_size": 32, "seconds": 1.0, "ks_seconds": 2.0, "steps": 2,
       "run_timeout_s": 300, "compile_timeout_s": 300, "shards_timeout_s": 300,
       "loader_timeout_s": 300}
# The dry run's stand-ins: a CPU box hosts a few loader workers, its tiny train split is
# smaller than 64 samples, and inductor would compile C++ for minutes.
DRY_ARGUMENTS = {"8": "1", "16": "2", "64": "24", "inductor": "eager"}
# Kinetics-Sounds (GeWu-Lab's lists, /work/shared/data/ks): 14799 train ids, 2597 test; the
# paper trains it as CREMA-D (configs/ks.yaml).
KS_TRAIN_LIST = 14799
SMI_QUERY = "utilization.gpu,memory.used"
BUDGET_S = 540  # the whole check: one device call of at most 10 minutes, with a margin
MIN_RUN_S = 20  # a run that would get less than this is skipped, not started
DEADLINE = [time.monotonic() + BUDGET_S]


def left_s() -> float:
    """Seconds left of the check's budget."""
    return DEADLINE[0] - time.monotonic()
SMI_PERIOD_MS = 200
# CREMA-D (the published split): 6698 train ids, 744 test; ccat-data carves val_fraction
# 0.1 of train out as validation. The paper's run: 150 epochs per stage, validated each.
CREMAD_TRAIN_LIST = 6698
VAL_FRACTION = 0.1
PAPER_EPOCHS = {"stage1": 150, "stage2": 150}


def emit(out: Path, record: dict[str, Any]) -> None:
    """Print ``record`` as one JSON line and append it to ``out/gpu_check.jsonl``."""
    line = json.dumps(record)
    print(line, flush=True)
    with open(out / "gpu_check.jsonl", "a") as f:
        f.write(line + "\n")


def sample_gpu(csv: Path) -> subprocess.Popen | None:
    """nvidia-smi writing utilization and memory to ``csv`` every SMI_PERIOD_MS (None
    without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    with open(csv, "w") as f:
        return subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_QUERY}",
                                 "--format=csv,noheader,nounits", f"-lms={SMI_PERIOD_MS}"],
                                stdout=f, stderr=subprocess.DEVNULL)


def gpu_summary(csv: Path) -> dict[str, Any]:
    """Mean and max utilization (%) and max memory used (MiB) of the samples in ``csv``."""
    rows = []
    for line in csv.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            rows.append((int(parts[0]), int(parts[1])))
    if not rows:
        return {"samples": 0}
    util = [u for u, _ in rows]
    return {"samples": len(rows), "util_mean_pct": round(statistics.mean(util), 1),
            "util_max_pct": max(util), "memory_max_mib": max(m for _, m in rows)}


def run_json(command: list[str], timeout_s: float) -> tuple[dict[str, Any] | None, str]:
    """The last JSON line ``command`` prints, or None and why not."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return None, f"exit {done.returncode}: {' | '.join(tail)}"
    return json.loads(lines[-1]), ""


def measure_run(name: str, extra: list[str], shards: Path, sizes: dict[str, Any],
                dry: bool, out: Path) -> dict[str, Any]:
    """One train_step.py run with nvidia-smi sampled alongside."""
    if dry:
        extra = [DRY_ARGUMENTS.get(a, a) for a in extra] + ["--device", "cpu", "--tiny"]
    command = [sys.executable, str(HERE / "train_step.py"), "--shards", str(shards),
               "--steps", str(sizes["steps"]), "--label", name, *extra]
    timeout = min(sizes["compile_timeout_s" if "--compile" in extra else "run_timeout_s"],
                  left_s())
    csv = out / f"nvidia_smi_{name}.csv"
    sampler = sample_gpu(csv)
    started = time.perf_counter()
    try:
        result, why = run_json(command, timeout)
    finally:
        if sampler is not None:
            sampler.terminate()
            sampler.wait()
    record = {"run": name, "wall_s": round(time.perf_counter() - started, 1)}
    record.update(result if result else {"error": why})
    if sampler is not None:
        record["nvidia_smi"] = gpu_summary(csv)
    return record


def projection(results: list[dict[str, Any]], dataset: str = "cremad") -> dict[str, Any]:
    """Hours of a full CCAT run on ``dataset`` at each measured configuration's rates (the
    ks_* runs for Kinetics-Sounds, the others for CREMA-D): per stage, epochs x (train
    samples / stage samples/s + val samples / validation samples/s), plus the device
    cache's fill once."""
    listed = KS_TRAIN_LIST if dataset == "ks" else CREMAD_TRAIN_LIST
    train = listed - round(VAL_FRACTION * listed)
    val = listed - train
    results = [r for r in results if r["run"].startswith("ks_") == (dataset == "ks")]
    hours: dict[str, float] = {}
    for result in results:
        for loader in ("stream", "device_cache"):
            rates = result.get(loader)
            if not rates:
                continue
            seconds = rates.get("device_cache_fill_s", 0.0) * train / result["train_samples"]
            for stage, epochs in PAPER_EPOCHS.items():
                seconds += epochs * (train / rates[stage]["samples_per_s"]
                                     + val / rates["validation"]["samples_per_s"])
            hours[result["run"]] = round(seconds / 3600, 2)
    return {"projection": f"ccat_{dataset}_paper_run", "train_samples": train, "val_samples": val,
            "epochs": PAPER_EPOCHS,
            "model": "sum over stages of epochs x (train / stage samples/s + val / validation "
                     "samples/s) + cache fill scaled to the train split; loader start-up per "
                     "epoch and checkpoint writes not included",
            "hours_by_run": hours,
            "fastest": min(hours, key=hours.get) if hours else None}


def build(tmp: Path, name: str, seconds: float,
          sizes: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """Synthetic shards at ``seconds`` of audio in ``tmp/name``, emitted as a JSON line."""
    built, why = run_json([sys.executable, str(HERE / "_shards.py"), str(tmp / name), "--clips",
                           str(sizes["clips"]), "--frame-size", str(sizes["frame_size"]),
                           "--seconds", str(seconds)], sizes["shards_timeout_s"])
    return built, why


def loader_check(shards: Path, sizes: dict[str, Any], dry: bool) -> dict[str, Any]:
    """``loader.py`` on the shards: local/device-cache samples/s per core, where a sample's
    time goes, and the CPU decoders beside the GPU's batched nvJPEG decode."""
    batch = ["--batch-size", "8"] if dry else []  # the dry run's train split is 28 samples
    result, why = run_json([sys.executable, str(HERE / "loader.py"), "--shards", str(shards),
                            "--epochs", "1", *batch], sizes["loader_timeout_s"])
    return result or {"benchmark": "loader", "error": why}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--only", nargs="*", help="run only these configurations")
    args = parser.parse_args()
    sizes = DRY if args.dry_run else FULL
    DEADLINE[0] = time.monotonic() + (10 * BUDGET_S if args.dry_run else BUDGET_S)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        built, why = build(Path(tmp), "cremad", sizes["seconds"], sizes)
        emit(args.out, built or {"benchmark": "shards", "error": why})
        if built is None:
            sys.exit(1)
        if not args.only or "loader" in args.only:
            emit(args.out, loader_check(Path(built["shards"]), sizes, args.dry_run))
        wanted = [(n, e) for n, e in RUNS if not args.only or n in args.only]
        ks = None
        if any(name.startswith("ks_") for name, _ in wanted):
            ks, why = build(Path(tmp), "ks", sizes["ks_seconds"], sizes)
            emit(args.out, {**(ks or {"benchmark": "shards", "error": why}), "geometry": "ks"})
        results = []
        for name, extra in wanted:
            shards = ks if name.startswith("ks_") else built
            if shards is None:
                continue
            if left_s() < MIN_RUN_S:
                emit(args.out, {"run": name, "error": f"skipped: the {BUDGET_S} s budget is spent"})
                continue
            results.append(measure_run(name, extra, Path(shards["shards"]), sizes, args.dry_run,
                                       args.out))
            emit(args.out, results[-1])
    measured = [r for r in results if "error" not in r]
    emit(args.out, projection(measured, "cremad"))
    emit(args.out, projection(measured, "ks"))
    failed = [r["run"] for r in results if "error" in r]
    if failed:
        print(f"gpu_check: {', '.join(failed)} failed (see their error lines)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
