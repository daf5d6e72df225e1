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
