"""CCAT step throughput, stage 1 and stage 2, and the share of step time spent waiting for
data; one JSON line.

It builds synthetic CREMA-D shards, then runs the real loader, model and method steps.
On CPU the sizes are reduced (32 px frames, 1 s audio, a narrow ResNet18); on CUDA they
are the paper's CREMA-D geometry: batch 32, three 224 px frames, a 257 x 188 spectrogram,
full ResNet18 encoders, model width 512.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _shards import build_shards

from ccat import distributed
from ccat.run_config import load_config
from ccat.data.device_cache import DeviceCache
from ccat.data.pipeline import make_loader
from ccat.step import Step
from ccat.train import Run, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
CPU = {"clips": 96, "frame_size": 32, "seconds": 1.0,
       "sets": ["model.width=32", "model.encoder_width=8", "model.encoder_blocks=[1, 1, 1, 1]",
                "model.heads=4", "data.batch_size=16", "data.workers=1", "threads=1"]}
CUDA = {"clips": 480, "frame_size": 224, "seconds": 3.0,
        "sets": ["data.batch_size=32", "data.workers=8"]}


def time_stage(run: Run, index: int, steps: int,
               cache: DeviceCache | None = None) -> dict[str, float]:
    """samples/s and the data-wait share over ``steps`` steps of stage ``index``, from the
    shards or from ``cache`` (filled before timing)."""
    stage = run.method.stages()[index]
    run.method.begin_stage(stage, run.model)
    opt, _ = make_optimizer(run.model, run.cfg)
    step = Step(opt, run.cfg.optim.grad_clip)

    def batches(epoch: int):
        return iter(make_loader(run.dataset, "train", run.cfg.data, train=True, seed=0,
                                epoch=epoch, rank=0, world=1, cache=cache))

    loader = batches(0)
    waited = computed = 0.0
    samples = 0
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        try:
            batch = next(loader)
        except StopIteration:
            loader = batches(i)
            batch = next(loader)
        batch = batch.to(run.ctx.device)
        t1 = time.perf_counter()
        with distributed.autocast(run.ctx.device):
            run.method.train_step(run.model, batch, step)
        if run.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= 2:
            waited, computed, samples = waited + t1 - t0, computed + t2 - t1, samples + len(batch.keys)
    return {"samples_per_s": round(samples / (waited + computed), 1),
            "data_wait_share": round(waited / (waited + computed), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shards", type=Path, help="prebuilt shards (default: build synth ones)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    size = CUDA if cuda else CPU
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or build_shards(Path(tmp), size["clips"], size["frame_size"],
                                             size["seconds"])
        cfg = load_config(ROOT / "configs" / "cremad.yaml", size["sets"],
                          {"data.path": str(shards), "out": str(Path(tmp) / "run"),
                           "device": "cuda" if cuda else "cpu"})
        run = Run(cfg, distributed.setup(cfg.device))
        result = {"benchmark": "train_step", "device": torch.cuda.get_device_name() if cuda
                  else "cpu", "geometry": {k: size[k] for k in ("frame_size", "seconds")},
                  "batch_size": cfg.data.batch_size}
        for name, cache in (("stream", None),
                            ("device_cache", DeviceCache(run.dataset, cfg.data, run.ctx.device))):
            if cache is not None:
                started = time.perf_counter()
                cache.split("train", train=True)
                result["device_cache_fill_s"] = round(time.perf_counter() - started, 1)
            result[name] = {"stage1": time_stage(run, 0, args.steps, cache),
                            "stage2": time_stage(run, 1, args.steps, cache)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
