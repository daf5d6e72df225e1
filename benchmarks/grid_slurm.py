"""`ccat grid`'s overhead per run on Slurm; one JSON line.

It starts the tests' single-node Slurm cluster (tests/slurm_cluster.py: Debian's munge,
slurmctld, slurmd and slurmdbd, as root), then runs the same grid of tiny CPU runs twice
into fresh folders: with ``--launcher local --jobs 1`` and with ``--launcher slurm`` where
each job asks for every CPU of the node, so that Slurm too runs one run at a time. The
overhead per run is the difference of the wall times over the number of runs: submission,
scheduling (``sched_interval=2``), the job's start (srun, submitit, Python) and the grid's
polling (every 2 s). Without a cluster it prints the reason and no numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import slurm_cluster  # noqa: E402  (tests/, as the tests import it)
from train_helpers import write_tiny_dataset  # noqa: E402

CONFIG = ("device: cpu\ndata: {batch_size: 4, workers: 0}\n"
          "model: {width: 16, encoder_width: 4, encoder_blocks: [1, 1, 1, 1], heads: 2, "
          "ffn_mult: 2}\noptim: {epochs: 1, lr: 0.01}\n")


def timed_grid(config: Path, data: Path, out: Path, methods: str, seeds: str,
               env: dict[str, str], *extra: str) -> float:
    command = [sys.executable, "-m", "ccat", "grid", "--config", str(config), "--data", str(data),
               "--methods", methods, "--seeds", seeds, "--out", str(out), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the grid failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="sum concat")
    parser.add_argument("--seeds", default="0 1")
    args = parser.parse_args()
    runs = len(args.methods.split()) * len(args.seeds.split())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            cluster = slurm_cluster.start(root / "slurm")
        except slurm_cluster.Unavailable as err:
            print(json.dumps({"benchmark": "grid_slurm", "skipped": str(err)}))
            return
        try:
            data = write_tiny_dataset(root / "data", counts={"train": 8, "val": 4, "test": 4},
                                      size=16, steps=16)
            config = root / "tiny.yaml"
            config.write_text(CONFIG)
            env = {**cluster.env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            local = timed_grid(config, data, root / "local", args.methods, args.seeds, env,
                               "--jobs", "1")
            slurm = timed_grid(config, data, root / "slurm-runs", args.methods, args.seeds, env,
                               "--launcher", "slurm", "--gpus-per-run", "0",
                               "--cpus-per-run", str(os.cpu_count()))
        finally:
            cluster.stop()
    print(json.dumps({"benchmark": "grid_slurm", "runs": runs, "local_s": round(local, 1),
                      "slurm_s": round(slurm, 1),
                      "overhead_per_run_s": round((slurm - local) / runs, 1),
                      "load_avg_1min": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
