"""Two processes under torchrun (gloo on CPU): training finishes, evaluation counts once."""

import json
import os
import subprocess
import sys

from train_helpers import write_tiny_dataset

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def torchrun(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.run([*TORCHRUN, "-m", "ccat", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_process_gloo_run_trains_both_stages_and_counts_every_test_sample_once(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 32, "val": 7, "test": 13},
                              shard_size=8)
    config = tmp_path / "ddp.yaml"
    config.write_text(
        "device: cpu\ndata: {batch_size: 4, workers: 1}\n"
        "model: {width: 16, encoder_width: 4, encoder_blocks: [1, 1, 1, 1], heads: 2, ffn_mult: 2}\n"
        "optim: {epochs: 2, lr: 0.01}\nmethod: {name: ccat, params: {beta: 0.6, temperature: 0.1}}\n")
    out = tmp_path / "run"
    torchrun(["train", "--config", str(config), "--data", str(data), "--out", str(out)], tmp_path)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["pretrain", "alternate"]  # rank 0 alone writes
    torchrun(["eval", "--ckpt", str(out / "last.pt"), "--json", str(out / "eval.json")], tmp_path)
    assert json.loads((out / "eval.json").read_text())["num_samples"] == 13


def test_two_process_relearning_diagnoses_the_whole_splits_and_reinitializes_alike(tmp_path):
    """Re-learning's diagnosis under torchrun goes through the gather of every rank's
    features and the broadcast of rank 0's strengths (a hang there fails the run), and the
    re-init epoch logs them."""
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "val": 6, "test": 4},
                              size=16, steps=16)
    config = tmp_path / "ddp.yaml"
    config.write_text(
        "device: cpu\ndata: {batch_size: 4, workers: 0}\n"
        "model: {width: 16, encoder_width: 4, encoder_blocks: [1, 1, 1, 1], heads: 2, ffn_mult: 2}\n"
        "optim: {epochs: 3, lr: 0.01}\n"
        "method: {name: relearning, params: {reinit_epoch: 1, reinit_num: 1}}\n")
    out = tmp_path / "run"
    torchrun(["train", "--config", str(config), "--data", str(data), "--out", str(out)], tmp_path)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    strengths = [[r[f"reinit/{m}"] for m in ("audio", "video")] for r in rows]
    assert strengths[:2] == [[0.0, 0.0], [0.0, 0.0]] and any(s > 0 for s in strengths[2])


def test_a_two_process_run_resumes_on_two_only_and_its_folder_has_one_writer(tmp_path):
    """Issue 22: the checkpoint records the number of processes, so a 2-process run cut
    after its first epoch is not resumed on 1 (one sentence naming both); and while another
    process holds the run folder's lock, a 2-process --resume is refused by rank 0 (naming
    the holder) without leaving rank 1 waiting."""
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "val": 4, "test": 4},
                              size=16, steps=16)
    config = tmp_path / "ddp.yaml"
    config.write_text(
        "device: cpu\ndata: {batch_size: 4, workers: 0}\n"
        "model: {width: 16, encoder_width: 4, encoder_blocks: [1, 1, 1, 1], heads: 2, ffn_mult: 2}\n"
        "optim: {epochs: 2, lr: 0.01}\nmethod: {name: sum}\n")
    out = tmp_path / "run"
    args = ["-m", "ccat", "train", "--config", str(config), "--data", str(data), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    cut = subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, timeout=300,
                         env={**env, "CCAT_KILL_AFTER": "best.pt:1"}, cwd=tmp_path)
    assert cut.returncode != 0 and (out / "last.pt").is_file()
    one = subprocess.run([sys.executable, *args, "--resume"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert one.returncode == 2 and (
        f"{out / 'last.pt'} was trained by 2 processes (torchrun world size 2) but this resume "
        f"runs 1 process (torchrun world size 1)") in one.stderr
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from ccat import folder_lock; folder_lock.acquire(Path(sys.argv[1])); "
         "print('held', flush=True); time.sleep(600)", str(out / ".lock")],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = subprocess.run([*TORCHRUN, *args, "--resume"], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert busy.returncode != 0
    assert (f"error (rank 0 of 2): {out} is being written by another ccat train (process "
            f"{holder.pid} on host") in busy.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # the cut run's epoch
