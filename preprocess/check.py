"""Check a built dataset against its manifest (``verify``) and describe it (``info``)."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ccat.data import spec


class VerifyError(RuntimeError):
    """The first shard or sample that does not match the manifest."""


@dataclass
class VerifyReport:
    manifest: dict[str, Any]
    shards: int = 0
    samples: int = 0
    bytes: int = 0


def verify(root: Path, on_shard: Callable[[str], None] | None = None) -> VerifyReport:
    """Recompute every hash and count, decode every sample, check shapes and dtypes.

    Raises VerifyError naming the first shard (and sample) that does not hold.
    """
    manifest = spec.load_manifest(root)
    report = VerifyReport(manifest)
    for split, entry in manifest["splits"].items():
        labels: Counter[int] = Counter()
        for shard in spec.shards_of(manifest, split):
            labels.update(_verify_shard(root, shard, manifest))
            report.shards += 1
            report.samples += shard.num_samples
            report.bytes += shard.bytes
            if on_shard:
                on_shard(shard.name)
        expected = entry.get("class_counts")
        counted = [labels[c] for c in range(len(manifest["classes"]))]
        if expected is not None and counted != expected:
            raise VerifyError(f"split {split}: class counts {counted} differ from the "
                              f"manifest's {expected}")
    return report


def _verify_shard(root: Path, shard: spec.ShardInfo, manifest: dict[str, Any]) -> Counter[int]:
    path = root / shard.name
    if not path.is_file():
        raise VerifyError(f"{shard.name}: the file is missing from {root}")
    data = path.read_bytes()
    if len(data) != shard.bytes:
        raise VerifyError(f"{shard.name}: {len(data)} bytes, the manifest says {shard.bytes}")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise VerifyError(f"{shard.name}: sha256 differs from the manifest (the file changed "
                          "after the build); rebuild or fetch it again")
    labels: Counter[int] = Counter()
    count = 0
    try:
        for key, members in spec.iter_tar_samples(io.BytesIO(data)):
            labels[_verify_sample(key, members, manifest, shard.name)] += 1
            count += 1
    except spec.SpecError as err:
        raise VerifyError(f"{shard.name}: {err}") from None
    if count != shard.num_samples:
        raise VerifyError(f"{shard.name}: {count} samples, the manifest says {shard.num_samples}")
    return labels


def _verify_sample(key: str, members: dict[str, bytes], manifest: dict[str, Any],
                   shard: str) -> int:
    where = f"{shard}, sample {key}"
    try:
        sample = spec.decode_sample(key, members, manifest["modalities"])
    except Exception as err:  # noqa: BLE001 - any decode failure is a verify failure
        raise VerifyError(f"{where}: does not decode ({err})") from None
    for name, params in manifest["modalities"].items():
        problem = _check_array(sample.data[name], params)
        if problem:
            raise VerifyError(f"{where}: {name} {problem}")
    if not 0 <= sample.label < len(manifest["classes"]):
        raise VerifyError(f"{where}: label {sample.label} is not a class index "
                          f"(0..{len(manifest['classes']) - 1})")
    return sample.label


def _check_array(array: np.ndarray, params: dict[str, Any]) -> str:
    """What is wrong with a decoded modality array, or '' when it matches the manifest."""
    kind = params["kind"]
    if kind == "spectrogram":
        want_shape, want_dtype = tuple(params["shape"]), np.dtype(params["dtype"])
    elif kind == "frames":
        want_shape = (params["num_frames"], params["size"], params["size"], 3)
        want_dtype = np.dtype(np.uint8)
    elif kind == "tokens":
        return "" if array.dtype == np.int32 and array.ndim == 1 else (
            f"has dtype {array.dtype} and {array.ndim} dims, expected int32 [L]")
    else:
        return "" if array.ndim == 3 and array.shape[2] == 3 else (
            f"has shape {list(array.shape)}, expected [H, W, 3]")
    if array.shape != want_shape or array.dtype != want_dtype:
        return (f"has shape {list(array.shape)} {array.dtype}, the manifest says "
                f"{list(want_shape)} {want_dtype}")
    return ""


def skipped_by_reason(manifest: dict[str, Any]) -> Counter[str]:
    return Counter(s["reason"] for s in manifest["skipped"])
