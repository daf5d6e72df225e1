"""Training-loader throughput per core; one JSON line.

Synthetic CREMA-D shards at the paper's geometry (three 224 px frames, a 3 s
spectrogram), read with train augmentation in this one process (``data.workers=0``, one
intra-op thread), so samples/s is per core. Measured:
- local: shards from a folder (tar reading, JPEG decoding, crops included);
- http: the same shards served by ``http.server`` on 127.0.0.1, first epoch (the shards
  fetched into the cache and verified) and the epochs after it (read from the cache);
- device_cache: the cache filled once, then batches gathered and augmented on the
  device (the CPU here; a GPU when there is one);
- breakdown: where a local sample's time goes, stage by stage on the same samples (tar
  read, JPEG decode, .npy decode, crop + resize, flip, collate), in ms per sample;
- jpeg_decoders: ms per frame of each CPU decoder on the shards' JPEGs (Pillow,
  torchvision, simplejpeg: the loader's) and whether each gives the loader's pixels; with
  CUDA, torchvision's batched GPU decode (nvJPEG) in ms per frame and its largest pixel
  difference from the CPU decode.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import tempfile
import threading
import time
from pathlib import Path

import io

import numpy as np
import torch
from _shards import build_shards
from torchvision.transforms.v2 import functional as TF

from ccat.config import DataConfig
from ccat.data import open_dataset, shardio, spec
from ccat.data.device_cache import DeviceCache
from ccat.data.pipeline import collate, crop_box, make_loader
from ccat.data.reader import BuiltDataset

BREAKDOWN_SAMPLES = 128


def samples_per_s(dataset: BuiltDataset, cfg: DataConfig, epochs: int,
                  cache: DeviceCache | None = None) -> float:
    """Training batches of ``epochs`` epochs, consumed as fast as they come."""
    samples, started = 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in make_loader(dataset, "train", cfg, train=True, seed=0, epoch=epoch,
                                 cache=cache):
            samples += len(batch.keys)
    if cache is not None and cache.device.type == "cuda":
        torch.cuda.synchronize()
    return round(samples / (time.perf_counter() - started), 1)


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """An HTTP server for ``folder`` on a free port of 127.0.0.1, in a daemon thread."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def raw_samples(dataset: BuiltDataset, count: int) -> list[tuple[str, dict[str, bytes]]]:
    """The first ``count`` training samples' members, as bytes."""
    found = []
    for shard in spec.shards_of(dataset.manifest, "train"):
        with open(dataset.root / shard.name, "rb") as f:
            found += list(shardio.iter_tar_samples(f))
        if len(found) >= count:
            break
    return found[:count]


def timed(function, items: list) -> tuple[list, float]:
    """``function`` over ``items``: the results and the seconds taken."""
    started = time.perf_counter()
    results = [function(item) for item in items]
    return results, time.perf_counter() - started


def breakdown(dataset: BuiltDataset, cfg: DataConfig) -> dict[str, float]:
    """ms per sample of each stage of a training sample, as the pipeline runs them
    (``Transform.frames``, ``collate``), each timed over the same samples."""
    started = time.perf_counter()
    samples = raw_samples(dataset, BREAKDOWN_SAMPLES)
    read = time.perf_counter() - started
    n = len(samples)
    jpgs = [[m for suffix, m in sorted(members.items()) if suffix.endswith(".jpg")]
            for _, members in samples]
    npys = [m for _, members in samples for suffix, m in members.items() if suffix.endswith(".npy")]
    frames, jpeg_s = timed(lambda group: np.stack([shardio.decode_jpeg(j) for j in group]), jpgs)
    _, npy_s = timed(shardio.decode_npy, npys)
    rng = np.random.default_rng(0)
    tensors = [torch.from_numpy(f).permute(0, 3, 1, 2) for f in frames]
    boxes = [crop_box(x.shape[2], x.shape[3], cfg.crop_scale_min, rng) for x in tensors]
    size = [cfg.frame_size, cfg.frame_size]
    cropped, crop_s = timed(lambda xb: TF.resized_crop(xb[0], *xb[1], size, antialias=True),
                            list(zip(tensors, boxes)))
    flipped, flip_s = timed(lambda x: x.flip(-1), cropped)
    spectrograms = [torch.from_numpy(shardio.decode_npy(m)) for m in npys]
    inputs = [{"audio": a, "video": v} for a, v in zip(spectrograms, flipped)]
    batches = [inputs[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    _, collate_s = timed(lambda b: collate([""] * len(b), [0] * len(b), b), batches)
    stages = {"tar_read": read, "jpeg_decode": jpeg_s, "npy_decode": npy_s,
              "crop_resize": crop_s, "flip": flip_s, "collate": collate_s}
    total = sum(stages.values())
    return {"samples": n, **{f"{k}_ms": round(1000 * v / n, 3) for k, v in stages.items()},
            "total_ms": round(1000 * total / n, 3),
            "shares": {k: round(v / total, 3) for k, v in stages.items()}}


def jpeg_decoders(dataset: BuiltDataset, device: torch.device) -> dict[str, object]:
    """ms per frame of each available decoder, and whether it gives the loader's pixels."""
    from PIL import Image

    jpgs = [m for _, members in raw_samples(dataset, BREAKDOWN_SAMPLES)
            for suffix, m in members.items() if suffix.endswith(".jpg")]
    reference = [shardio.decode_jpeg(j) for j in jpgs]

    def pillow(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))

    decoders = {"pillow": pillow, "torchvision": shardio._torchvision_decoder(),
                "simplejpeg": shardio._decode_simplejpeg if shardio.simplejpeg else None}
    result: dict[str, object] = {"frames": len(jpgs), "loader_uses": shardio._jpeg_decoder().__name__}
    for name, decode in decoders.items():
        if decode is None:
            continue
        decode(jpgs[0])  # warm-up
        out, seconds = timed(decode, jpgs)
        same = all(np.array_equal(a, b) for a, b in zip(out, reference))
        result[name] = {"ms_per_frame": round(1000 * seconds / len(jpgs), 4), "same_pixels": same}
    if device.type == "cuda":
        result["cuda_nvjpeg"] = gpu_decode(jpgs, reference, device)
    return result


def gpu_decode(jpgs: list[bytes], reference: list[np.ndarray], device: torch.device,
               batch: int = 96) -> dict[str, float]:
    """torchvision's batched nvJPEG decode: ms per frame (host bytes in, device pixels out)
    and the largest difference from the CPU decode (its IDCT and upsampling differ)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpgs]
    decode_jpeg(data[:batch], mode=ImageReadMode.RGB, device=device)  # warm-up: nvJPEG init
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = []
    for i in range(0, len(data), batch):
        out += decode_jpeg(data[i:i + batch], mode=ImageReadMode.RGB, device=device)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    diff = max(int((o.permute(1, 2, 0).cpu().int() - torch.from_numpy(r).int()).abs().max())
               for o, r in zip(out, reference))
    return {"ms_per_frame": round(1000 * seconds / len(jpgs), 4), "batch": batch,
            "max_abs_diff_vs_cpu": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shards", type=Path, help="prebuilt shards (default: build synth ones)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DataConfig(batch_size=args.batch_size, workers=0, frame_size=224)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or build_shards(Path(tmp), args.clips, 224, 3.0)
        local = open_dataset(shards)
        samples_per_s(local, cfg, 1)  # warm-up: page cache, lazy imports
        result = {"benchmark": "loader", "device": str(device), "samples": local.num_samples(
            "train"), "batch_size": cfg.batch_size, "per_core": True,
                  "local": samples_per_s(local, cfg, args.epochs)}
        server, url = serve(shards)
        try:
            started = time.perf_counter()
            remote = open_dataset(url, Path(tmp) / "cache")
            fetch_s = time.perf_counter() - started
            first = samples_per_s(remote, cfg, 1)
            n = remote.num_samples("train") // cfg.batch_size * cfg.batch_size
            result["http_first_epoch"] = round(n / (fetch_s + n / first), 1)
            result["http"] = samples_per_s(open_dataset(url, Path(tmp) / "cache"), cfg,
                                           args.epochs)
        finally:
            server.shutdown()
        result["http_vs_local"] = round(result["http"] / result["local"], 3)
        cache = DeviceCache(local, cfg, device)
        started = time.perf_counter()
        cache.split("train", train=True)
        result["device_cache_fill_s"] = round(time.perf_counter() - started, 2)
        result["device_cache"] = samples_per_s(local, cfg, args.epochs, cache)
        result["breakdown"] = breakdown(local, cfg)
        result["jpeg_decoders"] = jpeg_decoders(local, device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
