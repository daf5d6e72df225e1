"""Local shards read against their manifest: what the loaders trust, and what they check.

Before an epoch each shard's byte size is compared with the manifest (``data.verify``:
``size``, the default, a stat per shard; ``sha`` also re-hashes every shard; ``none``
skips it). While reading, every shard must hold exactly the samples its ``membership``
lists, in order (each key as it is read, each label as its sample is decoded: the
membership the fingerprint covers), and every sample must decode. Each failure is a
:class:`ShardError` naming the shard, the sample and the fix.

A manifest written before builds recorded each shard's membership gets it here, once,
from the shards' tar headers and label members (:func:`with_membership`), checked against
the fingerprint's membership hashes before anything is read for training.
"""

from __future__ import annotations

import copy
import stat
from pathlib import Path
from typing import Any, Callable, Iterator

from ccat.data import shardio, spec
from ccat.data.kinds import decode_sample
from ccat.data.shardio import Sample
from ccat.data.spec import ShardInfo
from ccat.errors import CcatError

VERIFY_MODES = ("size", "sha", "none")
SHOWN_LABEL = 20  # bytes of a wrong label quoted in a message (a class index is far shorter)
SHOWN_KEY = 80  # characters of a malformed key quoted in a message
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
    """``(index, key, members)`` of each sample of ``shard`` in file order, checked against
    its ``membership`` as it is read: each key, and each label that is read (a sample
    skipped by ``keep``, as in :func:`ccat.data.shardio.iter_tar_samples`, is not decoded
    here); one sample too many fails when it is reached, one too few at the end of the file."""
    if shard.membership is None:
        raise ValueError(f"{shard.name} has no membership; open datasets with open_dataset")
    expected = spec.parse_membership(shard.membership)
    count, key = 0, None
    try:
        with open(root / shard.name, "rb") as f:
            for key, members in shardio.iter_tar_samples(f, keep):
                if count == shard.num_samples:
                    raise damaged(root, shard.name, f"holds more than the {shard.num_samples} "
                                                    f"samples the manifest lists ({key!r} is "
                                                    "one too many)")
                _check_member(root, shard.name, key, members, expected[count])
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


def _check_member(root: Path, shard: str, key: str, members: dict[str, bytes] | None,
                  expected: tuple[str, int]) -> None:
    """Sample ``key`` is the one the membership lists at its place, with its label when
    its members were read."""
    want_key, want_label = expected
    if key != want_key:
        raise damaged(root, shard, f"holds sample {key!r} where the membership its fingerprint "
                                   f"covers lists {want_key!r}")
    label = (members or {}).get(spec.LABEL_MEMBER)
    if label is not None and label != shardio.encode_label(want_label):
        shown = label[:SHOWN_LABEL].decode("ascii", "replace")
        raise damaged(root, shard, f"labels sample {key!r} {shown}, where the membership its "
                                   f"fingerprint covers says {want_label}")


def decode_checked(root: Path, shard: str, key: str, members: dict[str, bytes],
                   modalities: dict[str, dict[str, Any]]) -> Sample:
    """:func:`decode_sample`, with a member that fails to decode a ShardError naming the
    shard and the key (its label was checked against the membership as it was read)."""
    try:
        return decode_sample(key, members, modalities)
    except DECODE_ERRORS as err:
        reason = " ".join(str(err).split()).removeprefix(f"sample {key!r}, ")
        reason = reason or type(err).__name__
        raise damaged(root, shard, f"has sample {key!r} that fails to decode ({reason})") \
            from None


def with_membership(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with every shard's ``membership``: as recorded, or (a manifest written
    before builds recorded it) read from the shards' headers and label members and checked
    against the fingerprint's membership hashes, so a reader always checks every key."""
    if all(s.get("membership") is not None
           for entry in manifest["splits"].values() for s in entry["shards"]):
        return manifest
    filled = copy.deepcopy(manifest)
    for split, entry in filled["splits"].items():
        verify_shards(root, spec.shards_of(filled, split), "size")  # no FIFO is opened
        for shard in entry["shards"]:
            shard["membership"] = spec.format_membership(
                scan_membership(root, spec.ShardInfo(**shard)))
    problem = spec.membership_problem(filled)
    if problem:
        raise ShardError(f"shards of {root}: {problem}; run `ccat-data verify {root}`, then "
                         "rebuild or re-download the dataset")
    return filled


def scan_membership(root: Path, shard: ShardInfo) -> list[tuple[str, int]]:
    """``(key, label)`` of each sample of ``shard`` in file order, from its tar headers and
    label members alone (every other member is seeked past unread)."""
    rows: list[list[Any]] = []
    try:
        with open(root / shard.name, "rb") as f:
            for name, data in shardio.iter_tar_members(f, _not_a_label):
                key = name.rpartition("/")[2].partition(".")[0]
                if not rows or rows[-1][0] != key:
                    rows.append([key, None])
                if data is not None:
                    rows[-1][1] = data
    except spec.SpecError as err:
        raise damaged(root, shard.name, f"is unreadable: {err}") from None
    except OSError as err:
        raise damaged(root, shard.name, f"cannot be read ({err.strerror or err})") from None
    if len(rows) != shard.num_samples:
        raise damaged(root, shard.name, f"holds {len(rows)} samples, but the manifest lists "
                                        f"{shard.num_samples}")
    return [_scanned_row(root, shard.name, key, label) for key, label in rows]


def _not_a_label(name: str) -> bool:
    return not name.endswith(f".{spec.LABEL_MEMBER}")


def _scanned_row(root: Path, shard: str, key: str, label: bytes | None) -> tuple[str, int]:
    """``(key, label)`` of one scanned sample, or the ShardError its key or label is."""
    if not spec.KEY_PATTERN.fullmatch(key):
        raise damaged(root, shard, f"holds a sample keyed {key[:SHOWN_KEY]!r}, which the shard "
                                   "format does not allow")
    if label is None or not label.isdigit() or len(label) > SHOWN_LABEL:
        shown = "no label" if label is None else f"label {label[:SHOWN_LABEL]!r}"
        raise damaged(root, shard, f"has sample {key!r} with {shown}, not a class index")
    return key, int(label)
