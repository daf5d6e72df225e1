"""Helpers for the training tests: tiny shards in the real format, tiny configs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterator

import io

import numpy as np
import pytest
from PIL import Image

from ccat.config import RunConfig
from ccat.data import shardio, spec

CLASSES = ["A", "B", "C"]


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def tiny_members(label: int, rng: np.random.Generator, frames: int, size: int,
                 steps: int) -> dict[str, bytes]:
    """A sample whose audio shows its class clearly and whose video only faintly."""
    spec_arr = rng.normal(0, 1, (257, steps)).astype(np.float32)
    spec_arr[label * 40:label * 40 + 40] += 2.0
    members = {"audio.npy": shardio.encode_npy(spec_arr.astype(np.float16)),
               spec.LABEL_MEMBER: shardio.encode_label(label),
               spec.META_MEMBER: spec.encode_json({"source": "tiny"})}
    for i in range(frames):
        pixels = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
        pixels[..., label % 3] = np.clip(pixels[..., label % 3].astype(int) + 30, 0, 255)
        members[f"video.{i}.jpg"] = _jpeg(pixels)
    return members


def write_tiny_dataset(root: Path, counts: dict[str, int] | None = None, shard_size: int = 8,
                       size: int = 32, steps: int = 32, seed: int = 0) -> Path:
    """Write shards + manifest.json for a 3-class audio/video dataset under ``root``."""
    counts = counts or {"train": 24, "val": 9, "test": 12}
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    modalities = {"audio": {"kind": "spectrogram", "shape": [257, steps], "dtype": "float16"},
                  "video": {"kind": "frames", "num_frames": 3, "size": size,
                            "encoding": "jpeg", "quality": 95}}
    splits = {}
    for split, n in counts.items():
        shards = []
        for start in range(0, n, shard_size):
            name = spec.shard_name(split, len(shards))
            with tarfile.open(root / name, "w") as tar:
                for i in range(start, min(n, start + shard_size)):
                    members = tiny_members(i % len(CLASSES), rng, 3, size, steps)
                    shardio.write_sample(tar, f"{split}_{i:04d}", members)
            data = (root / name).read_bytes()
            rows = [(f"{split}_{i:04d}", i % len(CLASSES))
                    for i in range(start, min(n, start + shard_size))]
            shards.append({"name": name, "num_samples": len(rows), "bytes": len(data),
                           "sha256": "0" * 64, "membership": spec.format_membership(rows)})
        keys = [[f"{split}_{i:04d}", i % len(CLASSES)] for i in range(n)]
        splits[split] = {"num_samples": n, "shards": shards,
                         "membership_sha256": spec.membership_sha256(keys)}
    manifest = {"spec_version": spec.SPEC_VERSION, "dataset": "tiny", "classes": CLASSES,
                "modalities": modalities, "splits": splits, "skipped": [],
                "sources": {"seed": seed, "raw": {"num_files": 0, "sha256": "0" * 64}},
                "fingerprint": "", "tool_version": "0.1.0"}
    manifest["fingerprint"] = spec.compute_fingerprint(manifest)
    (root / spec.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return root


def tiny_config(data: Path, out: Path, method: str = "ccat", epochs: int = 1) -> RunConfig:
    """A config small enough to train in seconds on a CPU."""
    cfg = RunConfig(seed=0, out=str(out), device="cpu")
    cfg.data.path, cfg.data.batch_size, cfg.data.workers = str(data), 8, 0
    cfg.model.width, cfg.model.encoder_width, cfg.model.encoder_blocks = 16, 4, [1, 1, 1, 1]
    cfg.model.heads, cfg.model.ffn_mult = 2, 2
    cfg.optim.epochs, cfg.optim.lr = epochs, 0.01
    cfg.method.name = method
    return cfg


TINY_MODALITIES = {"audio": {"kind": "spectrogram", "shape": [257, 32], "dtype": "float16"},
                   "video": {"kind": "frames", "num_frames": 3, "size": 32}}


def random_batch(size: int = 6, seed: int = 0):
    """A hand-built batch for TINY_MODALITIES: every class present."""
    import torch

    from ccat.data.pipeline import Batch

    gen = torch.Generator().manual_seed(seed)
    return Batch(keys=[f"k{i}" for i in range(size)],
                 label=torch.arange(size) % len(CLASSES),
                 inputs={"audio": torch.randn(size, 257, 32, generator=gen),
                         "video": torch.randn(size, 3, 3, 32, 32, generator=gen)})


def interrupt(cfg: RunConfig, monkeypatch, at_epoch: int) -> None:
    """Train ``cfg`` stopped by Ctrl-C at the start of its ``at_epoch``-th epoch (counted
    over all stages)."""
    import pytest

    from ccat import train as train_module

    real, calls = train_module._train_epoch, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == at_epoch:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_module, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(cfg)
    monkeypatch.setattr(train_module, "_train_epoch", real)


def interrupt_then_resume(cfg: RunConfig, monkeypatch, at_epoch: int) -> list[dict]:
    """:func:`interrupt`, then ``--resume``; returns the resumed run's history."""
    from ccat.train import train

    interrupt(cfg, monkeypatch, at_epoch)
    return train(cfg, resume=True)


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` with ``options`` (``ro``, ``size=1M``), so that a
    read-only or full file system is real; the test is skipped where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}), so a read-only or "
                    "full file system cannot be made for real")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def cli_train(config_file: Path, data: Path, out: Path, *extra: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``ccat train`` in a subprocess (its own torch, lock and signals)."""
    return subprocess.run([sys.executable, "-m", "ccat", "train", "--config", str(config_file),
                           "--data", str(data), "--out", str(out), *extra],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
