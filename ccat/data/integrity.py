"""Local shards read against their manifest: what the loaders trust, and what they check.

Before an epoch each shard's byte size is compared with the manifest (``data.verify``:
``size``, the default, a stat per shard; ``sha`` also re-hashes every shard; ``none``
skips it). While reading, every shard must hold exactly the manifest's number of samples,
every sample must decode, and every label must name one of the classes. Each failure is a
:class:`ShardError` naming the shard, the sample and the fix.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, Callable, Iterator

from ccat.data import shardio, spec
from ccat.data.kinds import decode_sample
from ccat.data.shardio import Sample
from ccat.data.spec import ShardInfo
from ccat.errors import CcatError

VERIFY_MODES = ("size", "sha", "none")
# What decoding bytes raises when they are not what the format says: SpecError (members,
# headers), ValueError (.npy, JSON, UTF-8, digits), RuntimeError (torchvision's JPEG
# decoder), OSError (Pillow's).
DECODE_ERRORS = (spec.SpecError, ValueError, RuntimeError, OSError)


class ShardError(CcatError):
    """A local shard does not hold what the manifest says it holds."""


def damaged(root: Path, shard: str, what: str) -> ShardError:
    """The one sentence for a shard that departs from the manifest: which, how, the fix."""
    return ShardError(f"shard {shard} of {root} {what}; run `ccat-data verify {root}`, then "
                      "rebuild or re-download the damaged shards")


def verify_shards(root: Path, shards: list[ShardInfo], mode: str) -> None:
    """Compare each shard's size (``size``), and its sha256 too (``sha``), with the manifest."""
    if mode not in VERIFY_MODES:
        raise CcatError(f"data.verify is {mode!r}; choose one of {', '.join(VERIFY_MODES)}")
    if mode == "none":
        return
    for shard in shards:
        path = root / shard.name
        try:
            info = path.stat()
        except OSError as err:
            raise damaged(root, shard.name, f"cannot be read ({err.strerror or err})") from None
        if not stat.S_ISREG(info.st_mode):
            raise damaged(root, shard.name, "is not a regular file")
        if info.st_size != shard.bytes:
            raise damaged(root, shard.name, f"has {info.st_size} bytes but the manifest lists "
                                            f"{shard.bytes}")
        if mode == "sha" and spec.file_sha256(path) != shard.sha256:
            raise damaged(root, shard.name, "has another sha256 than the manifest lists")


def read_shard(root: Path, shard: ShardInfo, keep: Callable[[int], bool] | None = None
               ) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """``(index, key, members)`` of each sample of ``shard`` in file order, its count
    checked against the manifest's: one sample too many fails when it is reached, one too
    few at the end of the file. ``keep`` as in :func:`ccat.data.shardio.iter_tar_samples`."""
    count, key = 0, None
    try:
        with open(root / shard.name, "rb") as f:
            for key, members in shardio.iter_tar_samples(f, keep):
                if count == shard.num_samples:
                    raise damaged(root, shard.name, f"holds more than the {shard.num_samples} "
                                                    f"samples the manifest lists ({key!r} is "
                                                    "one too many)")
                yield count, key, members
                count += 1
    except spec.SpecError as err:
        after = f"after sample {key!r}" if key is not None else "at its start"
        raise damaged(root, shard.name, f"is unreadable {after}: {err}") from None
    except OSError as err:
        raise damaged(root, shard.name, f"cannot be read ({err.strerror or err})") from None
    if count != shard.num_samples:
        last = f", the last is {key!r}" if key is not None else ""
        raise damaged(root, shard.name, f"holds {count} samples{last}, but the manifest lists "
                                        f"{shard.num_samples}")


def decode_checked(root: Path, shard: str, key: str, members: dict[str, bytes],
                   modalities: dict[str, dict[str, Any]], num_classes: int) -> Sample:
    """:func:`decode_sample`, with a member that fails to decode or a label outside
    ``0..num_classes - 1`` a ShardError naming the shard and the key."""
    try:
        sample = decode_sample(key, members, modalities)
    except DECODE_ERRORS as err:
        reason = " ".join(str(err).split()).removeprefix(f"sample {key!r}, ")
        reason = reason or type(err).__name__
        raise damaged(root, shard, f"has sample {key!r} that fails to decode ({reason})") \
            from None
    if not 0 <= sample.label < num_classes:
        raise damaged(root, shard, f"labels sample {key!r} {sample.label}, outside the "
                                   f"{num_classes} classes (0..{num_classes - 1})")
    return sample
