"""CCAT step throughput, stage 1 and stage 2, and where the time goes; one JSON line.

It builds synthetic CREMA-D shards (or reads --shards), then runs the real loader, model
and method steps. With --tiny (the default without CUDA) the sizes are reduced (32 px
frames, 1 s audio, a narrow ResNet18); otherwise they are the paper's CREMA-D geometry:
batch 32, three 224 px frames, a 257 x 188 spectrogram, full ResNet18 encoders, width 512.

Per loader (streamed from the shards, or the device cache) and stage: samples/s, the mean
step time, the share of time spent waiting for data, the warm-up (first two steps:
cudnn autotuning, torch.compile), the peak device memory and, on CUDA, the host syncs of
one step (torch's sync debug mode); then one validation pass as `ccat train` runs it each
epoch (``ccat.evaluate.evaluate``), and the device cache's fill time.

``--precision fp32`` and ``--memory-format contiguous`` turn off, in this process only, what
``ccat train`` always does on CUDA (bf16 autocast; channels-last convolutions), to measure
what each gives.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from _shards import build_shards

from ccat import distributed
from ccat.data.device_cache import DeviceCache
from ccat.data.pipeline import Batch, make_loader
from ccat.evaluate import evaluate
from ccat.models import encoders
from ccat.run_config import load_config
from ccat.step import Step
from ccat.train import Run, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 2
GIB = 2 ** 30
TINY = {"clips": 96, "frame_size": 32, "seconds": 1.0,
        "sets": ["model.width=32", "model.encoder_width=8", "model.encoder_blocks=[1, 1, 1, 1]",
                 "model.heads=4", "data.batch_size=16", "data.workers=1", "threads=1"]}
FULL = {"clips": 480, "frame_size": 224, "seconds": 3.0,
        "sets": ["data.batch_size=32", "data.workers=8"]}
LOADERS = ("stream", "device_cache")
GEOMETRY = ("seconds", "shape", "num_frames", "size")  # of the shards read, from their manifest


def batches(run: Run, cache: DeviceCache | None) -> Iterator[Batch]:
    """Training batches without end: epoch after epoch, as ``ccat train`` draws them."""
    epoch = 0
    while True:
        yield from make_loader(run.dataset, "train", run.cfg.data, train=True, seed=0,
                               epoch=epoch, rank=0, world=1, cache=cache)
        epoch += 1


def fp32_everywhere() -> None:
    """No autocast (``--precision fp32``): every caller of ``distributed.autocast`` (the
    steps here, validation, methods) gets none."""
    distributed.autocast = lambda device: contextlib.nullcontext()


def contiguous_convolutions(run: Run) -> None:
    """Undo channels-last (``--memory-format contiguous``): the model's weights back to
    contiguous, and the ResNet encoders no longer convert their input."""
    run.model.to(memory_format=torch.contiguous_format)
    encoders.ResNet.forward = lambda self, x: self.layers(self.stem(x))


def count_host_syncs(run: Run, batch: Batch, step: Step) -> int | None:
    """The synchronizing CUDA calls of one training step (None off CUDA)."""
    if run.ctx.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with distributed.autocast(run.ctx.device):
                run.method.train_step(run.model, batch, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def time_stage(run: Run, index: int, steps: int, cache: DeviceCache | None) -> dict[str, Any]:
    """Throughput, data wait, warm-up, memory and host syncs over ``steps`` timed steps of
    stage ``index`` (after WARMUP_STEPS untimed ones)."""
    run.method.begin_stage(run.method.stages()[index], run.model)
    step = Step(make_optimizer(run.model, run.cfg)[0], run.cfg.optim.grad_clip)
    cuda = run.ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loader, waited, computed, samples = batches(run, cache), 0.0, 0.0, 0
    warmup_started = time.perf_counter()
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            warmup_s = time.perf_counter() - warmup_started
        t0 = time.perf_counter()
        batch = next(loader).to(run.ctx.device)
        t1 = time.perf_counter()
        with distributed.autocast(run.ctx.device):
            run.method.train_step(run.model, batch, step)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= WARMUP_STEPS:
            waited, computed, samples = waited + t1 - t0, computed + t2 - t1, samples + len(batch.keys)
    return {"samples_per_s": round(samples / (waited + computed), 1),
            "step_ms": round(1000 * (waited + computed) / steps, 2),
            "data_wait_share": round(waited / (waited + computed), 3),
            "warmup_s": round(warmup_s, 2),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
            "host_syncs_per_step": count_host_syncs(run, next(loader).to(run.ctx.device), step)}


def time_validation(run: Run, cache: DeviceCache | None) -> dict[str, Any]:
    """One validation pass as ``ccat train`` runs it after every epoch (a first, untimed
    pass warms it up)."""
    split = run.val_split or "test"
    evaluate(run.method, run.model, run.dataset, split, run.ctx, run.cfg, cache)
    started = time.perf_counter()
    evaluate(run.method, run.model, run.dataset, split, run.ctx, run.cfg, cache)
    seconds = time.perf_counter() - started
    count = run.dataset.num_samples(split)
    return {"split": split, "samples": count, "seconds": round(seconds, 3),
            "samples_per_s": round(count / seconds, 1)}


def measure(run: Run, loader: str, steps: int) -> dict[str, Any]:
    """Both stages and a validation pass from ``loader`` (the cache is filled first)."""
    result: dict[str, Any] = {}
    cache = None
    if loader == "device_cache":
        cache = DeviceCache(run.dataset, run.cfg.data, run.ctx.device)
        started = time.perf_counter()
        cache.split("train", train=True)
        result["device_cache_fill_s"] = round(time.perf_counter() - started, 2)
    result["stage1"] = time_stage(run, 0, steps, cache)
    result["stage2"] = time_stage(run, 1, steps, cache)
    result["validation"] = time_validation(run, cache)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per stage")
    parser.add_argument("--shards", type=Path, help="prebuilt shards (default: build synth ones)")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="reduced sizes (the default on CPU), for a quick check")
    parser.add_argument("--loader", choices=(*LOADERS, "both"), default="both")
    parser.add_argument("--workers", type=int, help="data.workers (loader processes)")
    parser.add_argument("--batch-size", type=int, help="data.batch_size")
    parser.add_argument("--compile", default="", help="torch.compile backend of the encoders")
    parser.add_argument("--label", default="", help="a name for this run in the JSON line")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16 autocast on CUDA (as ccat train), or none")
    parser.add_argument("--memory-format", choices=("channels_last", "contiguous"),
                        default="channels_last", help="of the convolutions on CUDA")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    size = TINY if args.tiny or args.device == "cpu" else FULL
    sets = list(size["sets"])
    sets += [f"data.workers={args.workers}"] if args.workers is not None else []
    sets += [f"data.batch_size={args.batch_size}"] if args.batch_size else []
    sets += [f"compile={args.compile}"] if args.compile else []
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or build_shards(Path(tmp), size["clips"], size["frame_size"],
                                             size["seconds"])
        cfg = load_config(ROOT / "configs" / "cremad.yaml", sets,
                          {"data.path": str(shards), "out": str(Path(tmp) / "run"),
                           "device": args.device})
        if args.precision == "fp32":
            fp32_everywhere()  # before the run binds distributed.autocast
        run = Run(cfg, distributed.setup(cfg.device))
        if args.memory_format == "contiguous":
            contiguous_convolutions(run)
        result = {"benchmark": "train_step", "label": args.label,
                  "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  "geometry": {name: {k: params[k] for k in GEOMETRY if k in params}
                               for name, params in run.dataset.modalities.items()},
                  "train_samples": run.dataset.num_samples("train"),
                  "batch_size": cfg.data.batch_size, "workers": cfg.data.workers,
                  "compile": cfg.compile or "eager", "steps": args.steps,
                  "precision": args.precision if args.device == "cuda" else "fp32",
                  "memory_format": args.memory_format if args.device == "cuda" else "contiguous"}
        for loader in (LOADERS if args.loader == "both" else (args.loader,)):
            result[loader] = measure(run, loader, args.steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
