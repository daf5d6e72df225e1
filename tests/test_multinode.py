"""Two "nodes" of one process each, meeting through a c10d rendezvous on 127.0.0.1 (gloo),
train the same weights as two processes on one node and count every test sample once:
the multi-node torchrun of docs/cluster.md, on one machine (issue 24)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from train_helpers import write_tiny_dataset

RUN = [sys.executable, "-m", "torch.distributed.run"]
CONFIG = ("device: cpu\ndata: {batch_size: 4, workers: 0}\n"
          "model: {width: 16, encoder_width: 4, encoder_blocks: [1, 1, 1, 1], heads: 2, "
          "ffn_mult: 2}\noptim: {epochs: 2, lr: 0.01}\n"
          "method: {name: ccat, params: {beta: 0.6, temperature: 0.1}}\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())


def one_node(args: list[str], cwd: Path) -> None:
    proc = subprocess.run([*RUN, "--standalone", "--nproc-per-node", "2", "-m", "ccat", *args],
                          capture_output=True, text=True, env=env(), cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def two_nodes(args: list[str], cwd: Path) -> None:
    """Two torchrun agents, as two nodes' `srun torchrun` would start them."""
    port = free_port()
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"ccat-{port}"]
    nodes = [subprocess.Popen([*RUN, *rendezvous, "-m", "ccat", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env(), cwd=cwd)
             for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=900)
        assert node.returncode == 0, err[-3000:]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_two_nodes_train_the_weights_of_one_node_and_evaluate_each_sample_once(
        tmp_path: Path) -> None:
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "val": 5, "test": 13},
                              shard_size=8)
    config = tmp_path / "ccat.yaml"
    config.write_text(CONFIG)
    runs = {"one": tmp_path / "one", "two": tmp_path / "two"}
    one_node(["train", "--config", str(config), "--data", str(data), "--out", str(runs["one"])],
             tmp_path)
    two_nodes(["train", "--config", str(config), "--data", str(data), "--out", str(runs["two"])],
              tmp_path)
    one, two = weights(runs["one"] / "last.pt"), weights(runs["two"] / "last.pt")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    two_nodes(["eval", "--ckpt", str(runs["two"] / "last.pt"), "--json",
               str(runs["two"] / "eval.json")], tmp_path)
    one_node(["eval", "--ckpt", str(runs["one"] / "last.pt"), "--json",
              str(runs["one"] / "eval.json")], tmp_path)
    scores = {k: json.loads((run / "eval.json").read_text()) for k, run in runs.items()}
    assert scores["two"]["num_samples"] == 13
    assert scores["two"]["accuracy"] == scores["one"]["accuracy"]
