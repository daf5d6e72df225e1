"""Issue 28's before/after, measured in one process, alternating, in CPU time (a shared
machine's load moves wall time by far more than the changes); one JSON line per round.

The "before" paths are the code before issue 28, switched on in this process:
- build: raw files hashed with sha256 from disk before decoding, decoders opening paths
  (``rawhash.media_source`` returns the path; ``--raw-hash sha256`` hashes from disk);
- loader: torchvision's decode_jpeg, Pillow's header parser, .npy headers parsed per
  sample (no simplejpeg, ``_npy_header`` uncached).
The in-place log of the spectrogram stays on in both (same bytes, a few µs a clip).

    python benchmarks/_before_after.py build RAW SECONDS [--rounds N]   # a CREMA-D-like tree
    python benchmarks/_before_after.py loader SHARDS [--rounds N]       # a built dataset
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# This folder holds preprocess.py, whose name is the package's: keep it off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import av  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402

from ccat.config import DataConfig  # noqa: E402
from ccat.data import open_dataset, shardio  # noqa: E402
from ccat.data.pipeline import make_loader  # noqa: E402
from preprocess import media, rawhash, writer  # noqa: E402
from preprocess.datasets.cremad import Cremad  # noqa: E402

CLOCK = time.process_time
SOURCE, SIMPLEJPEG, NPY_HEADER = rawhash.media_source, shardio.simplejpeg, shardio._npy_header


def use_build(before: bool) -> str:
    """Switch the build's raw hashing; returns the --raw-hash to build with."""
    rawhash.media_source = (lambda path: str(path)) if before else SOURCE
    return "sha256" if before else "blake3"


def use_loader(before: bool) -> None:
    """Switch the loader's decoders."""
    shardio.simplejpeg = None if before else SIMPLEJPEG
    shardio._npy_header = NPY_HEADER.__wrapped__ if before else NPY_HEADER
    shardio._jpeg_decoder.cache_clear()


def floor(raw: Path, ids: list[str]) -> float:
    """CPU seconds a clip to decode its wav and three frames, nothing else (preprocess.py's)."""
    started = CLOCK()
    for clip_id in ids:
        soundfile.read(raw / "AudioWAV" / f"{clip_id}.wav", dtype="float64")
        with av.open(str(raw / "VideoFlash" / f"{clip_id}.flv")) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            packets = [p for p in container.demux(stream) if p.size]
            media._decode_at(stream.codec_context, packets, media.segment_centres(len(packets), 3))
    return (CLOCK() - started) / len(ids)


def build(raw: Path, seconds: float, before: bool) -> float:
    """CPU seconds a clip of a --workers 1 build."""
    raw_hash = use_build(before)
    started = CLOCK()
    with tempfile.TemporaryDirectory() as out:
        options = writer.BuildOptions(workers=1, shard_size=64, test_fraction=0.0,
                                      val_fraction=0.0, raw_hash=raw_hash)
        report = writer.build(Cremad(seconds=seconds), raw, Path(out), {}, options)
    return (CLOCK() - started) / report.processed


def loader_rate(dataset, cfg: DataConfig, before: bool, epoch: int = 0) -> float:
    """Training samples per CPU second, one epoch, in this process."""
    use_loader(before)
    count, started = 0, CLOCK()
    for batch in make_loader(dataset, "train", cfg, train=True, seed=0, epoch=epoch):
        count += len(batch.keys)
    return count / (CLOCK() - started)


def same_batches(dataset, cfg: DataConfig) -> bool:
    """Whether an epoch's batches are the same bytes before and after."""
    epochs = []
    for before in (True, False):
        use_loader(before)
        epochs.append(list(make_loader(dataset, "train", cfg, train=True, seed=0, epoch=1)))
    return all(a.keys == b.keys and all(torch.equal(a.inputs[m], b.inputs[m]) for m in a.inputs)
               for a, b in zip(*epochs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("build", "loader"))
    parser.add_argument("path", type=Path)
    parser.add_argument("seconds", type=float, nargs="?", default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs: dict[str, list[float]] = {}
    if args.what == "build":
        ids = sorted(p.stem for p in (args.path / "AudioWAV").glob("*.wav"))
        floor(args.path, ids[:4]), build(args.path, args.seconds, True), build(args.path, args.seconds, False)
        for r in range(args.rounds):
            for name, measure in (("floor", lambda: floor(args.path, ids)),
                                  ("before", lambda: build(args.path, args.seconds, True)),
                                  ("after", lambda: build(args.path, args.seconds, False))):
                runs.setdefault(name, []).append(measure())
            best = {k: min(v) for k, v in runs.items()}
            print(json.dumps({"round": r, "seconds": args.seconds, "cpu_ms_per_clip": {
                k: round(v * 1000, 3) for k, v in best.items()},
                "ratio_to_floor_before": round(best["before"] / best["floor"], 3),
                "ratio_to_floor_after": round(best["after"] / best["floor"], 3),
                "speedup": round(best["before"] / best["after"], 3)}), flush=True)
        return
    dataset = open_dataset(args.path)
    cfg = DataConfig(batch_size=32, workers=0, frame_size=224)
    loader_rate(dataset, cfg, True), loader_rate(dataset, cfg, False)
    identical = same_batches(dataset, cfg)
    for r in range(args.rounds):
        for name in ("before", "after"):
            runs.setdefault(name, []).append(loader_rate(dataset, cfg, name == "before"))
        best = {k: max(v) for k, v in runs.items()}
        print(json.dumps({"round": r, "identical_batches": identical,
                          "samples_per_cpu_s": {k: round(v, 1) for k, v in best.items()},
                          "speedup": round(best["after"] / best["before"], 3),
                          "pairwise": [round(a / b, 3) for a, b in zip(runs["after"],
                                                                       runs["before"])]}),
              flush=True)


if __name__ == "__main__":
    main()
