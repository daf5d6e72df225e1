"""Training-loader throughput per core; one JSON line.

Synthetic CREMA-D shards at the paper's geometry (three 224 px frames, a 3 s
spectrogram), read with train augmentation in this one process (``data.workers=0``, one
intra-op thread), so samples/s is per core. Measured:
- local: shards from a folder (tar reading, JPEG decoding, crops included);
- http: the same shards served by ``http.server`` on 127.0.0.1, first epoch (the shards
  fetched into the cache and verified) and the epochs after it (read from the cache);
- device_cache: the cache filled once, then batches gathered and augmented on the
  device (the CPU here; a GPU when there is one).
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

import torch
from _shards import build_shards

from ccat.config import DataConfig
from ccat.data import open_dataset
from ccat.data.device_cache import DeviceCache
from ccat.data.pipeline import make_loader
from ccat.data.reader import BuiltDataset


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shards", type=Path, help="prebuilt shards (default: build synth ones)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = DataConfig(batch_size=32, workers=0, frame_size=224)
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
