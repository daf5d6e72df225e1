"""The shard format, spec version 1: the one place that defines it.

A built dataset is a folder (or URL prefix) holding WebDataset tar shards named
``<split>-NNNNNN.tar`` and a ``manifest.json`` written last. One sample is the set of
tar members that share a key (the clip id, which never contains a dot):

    <key>.audio.npy        float16 log-magnitude spectrogram [n_fft // 2 + 1, T]
    <key>.video.<i>.jpg    frame i of the sampled frames, RGB JPEG
    <key>.image.jpg        RGB JPEG image
    <key>.text.ids.npy     int32 token ids with [CLS]/[SEP], no padding
    <key>.text.txt         the decoded text (UTF-8)
    <key>.label.cls        the class index, ASCII digits
    <key>.meta.json        provenance of the sample

Both the builder (``preprocess``) and the trainer (``ccat``) import this module, and
nothing else crosses that boundary.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

SPEC_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_KEYS = (
    "spec_version",
    "dataset",
    "classes",
    "modalities",
    "splits",
    "skipped",
    "sources",
    "fingerprint",
    "tool_version",
)
SPLIT_NAMES = ("train", "val", "test")
SHARD_PATTERN = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{6})\.tar$")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")

LABEL_MEMBER = "label.cls"
META_MEMBER = "meta.json"
# Parameters recorded under sources that do not change a sample's bytes, so they stay
# out of the fingerprint: a build on 2 workers trains the same as one on 16.
UNFINGERPRINTED_SOURCES = ("build",)


class SpecError(ValueError):
    """A shard, sample or manifest does not follow the shard format."""


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split``: ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def modality_members(name: str, params: dict[str, Any]) -> list[str]:
    """Member suffixes (after ``<key>.``) that carry modality ``name`` of a sample."""
    kind = params["kind"]
    if kind == "spectrogram":
        return [f"{name}.npy"]
    if kind == "frames":
        return [f"{name}.{i}.jpg" for i in range(params["num_frames"])]
    if kind == "image":
        return [f"{name}.jpg"]
    if kind == "tokens":
        return [f"{name}.ids.npy", f"{name}.txt"]
    raise SpecError(f"modality {name!r} has unknown kind {kind!r}; spec v{SPEC_VERSION} "
                    "knows spectrogram, frames, image and tokens")


def sample_members(modalities: dict[str, dict[str, Any]]) -> list[str]:
    """Every member suffix one sample must have, sorted as they are written."""
    members = [LABEL_MEMBER, META_MEMBER]
    for name, params in modalities.items():
        members.extend(modality_members(name, params))
    return sorted(members)


# ---------------------------------------------------------------- member encoding


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of ``array`` (no pickle, deterministic header)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace variation."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode_label(index: int) -> bytes:
    return str(int(index)).encode("ascii")


def decode_member(suffix: str, data: bytes) -> Any:
    """Decode one member's bytes by its suffix: arrays, images (uint8 HWC), text, label."""
    if suffix.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if suffix.endswith(".jpg"):
        return decode_jpeg(data)
    if suffix.endswith(".cls"):
        return int(data.decode("ascii"))
    if suffix.endswith(".json"):
        return json.loads(data.decode("utf-8"))
    if suffix.endswith(".txt"):
        return data.decode("utf-8")
    raise SpecError(f"member suffix {suffix!r} has no decoder in spec v{SPEC_VERSION}")


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] RGB.

    torchvision's libjpeg-turbo gives the same pixels as Pillow's here in about 60% of the
    time (no image object, no copy out): a third of the loader's time per sample. Its image
    codecs are deprecated since torchvision 0.29 in favour of TorchCodec, so Pillow takes
    over where they are gone.
    """
    decode = _jpeg_decoder()
    if decode is None:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    return decode(data)


@functools.cache
def _jpeg_decoder() -> Callable[[bytes], np.ndarray] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import torch
            from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(data: bytes) -> np.ndarray:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with warnings.catch_warnings():  # the deprecation notice comes with every call
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_jpeg(buffer, mode=ImageReadMode.RGB)
        return image.permute(1, 2, 0).numpy()

    return decode


@dataclass
class Sample:
    """One decoded sample: per-modality arrays, the label, the key, its provenance, and
    the stored text of token modalities (by modality name)."""

    key: str
    label: int
    data: dict[str, np.ndarray]
    meta: dict[str, Any]
    text: dict[str, str] = field(default_factory=dict)


def decode_sample(key: str, members: dict[str, bytes],
                  modalities: dict[str, dict[str, Any]]) -> Sample:
    """Turn a sample's raw members into arrays, one per modality.

    spectrogram -> float16 [F, T]; frames -> uint8 [N, H, W, 3]; image -> uint8 [H, W, 3];
    tokens -> int32 [L] (the text itself goes into ``Sample.text``).
    """
    expected = sample_members(modalities)
    if sorted(members) != expected:
        raise SpecError(f"sample {key!r} has members {sorted(members)}, expected {expected}")
    meta = decode_member(META_MEMBER, members[META_MEMBER])
    data: dict[str, np.ndarray] = {}
    texts: dict[str, str] = {}
    for name, params in modalities.items():
        decoded = [decode_member(s, members[s]) for s in modality_members(name, params)]
        if params["kind"] == "frames":
            data[name] = np.stack(decoded)
        elif params["kind"] == "tokens":
            data[name] = decoded[0]
            texts[name] = decoded[1]
        else:
            data[name] = decoded[0]
    label = decode_member(LABEL_MEMBER, members[LABEL_MEMBER])
    return Sample(key=key, label=label, data=data, meta=meta, text=texts)


# ---------------------------------------------------------------- tar reading/writing


def tar_member_info(name: str, size: int) -> tarfile.TarInfo:
    """TarInfo with fixed metadata, so equal content gives byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    """Append one sample's members (suffix -> bytes) in sorted order."""
    if not KEY_PATTERN.match(key):
        raise SpecError(f"sample key {key!r} must be letters, digits, '_' or '-' (no dots)")
    for suffix in sorted(members):
        data = members[suffix]
        tar.addfile(tar_member_info(f"{key}.{suffix}", len(data)), io.BytesIO(data))


TAR_BLOCK = 512
TAR_REGULAR = (b"0", b"\0")  # typeflags of regular files (old tars write NUL)


def iter_tar_members(fileobj: BinaryIO, skip: Callable[[str], bool] | None = None
                     ) -> Iterator[tuple[str, bytes | None]]:
    """Yield ``(name, bytes)`` of each regular file of a tar stream, in file order.

    Headers are parsed here rather than by :mod:`tarfile`, whose per-member objects cost
    about 0.2 ms each (over 1 ms a sample, most of the loader's time). ustar, pax and GNU
    long names are understood; a bad checksum or a stream cut short is a SpecError. With
    ``skip`` (a local file only), a member whose name it accepts is seeked past unread and
    yielded as ``(name, None)``.
    """
    end = os.fstat(fileobj.fileno()).st_size if skip is not None else 0
    long_name = None
    while True:
        header = fileobj.read(TAR_BLOCK)
        if len(header) < TAR_BLOCK or not header.strip(b"\0"):
            if header.strip(b"\0"):
                raise SpecError("the tar stream ends inside a header: the shard is truncated")
            return  # the end-of-archive zero block (or a clean end of file)
        try:
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            stored_sum = int(header[148:156].strip(b"\0 "), 8)
        except ValueError:
            raise SpecError("a tar header is corrupt (its size or checksum is not a number)") \
                from None
        if sum(header) - sum(header[148:156]) + 8 * ord(" ") != stored_sum:
            raise SpecError("a tar header fails its checksum: the shard is corrupt")
        kind = header[156:157]
        padding = -size % TAR_BLOCK  # to the next block
        name = (long_name or _ustar_name(header)) if kind in TAR_REGULAR else ""
        if skip is not None and name and skip(name):
            if fileobj.seek(size + padding, io.SEEK_CUR) > end:
                raise SpecError(f"the tar stream ends inside a {size}-byte member: the shard "
                                "is truncated")
            yield name, None
            long_name = None
            continue
        data = fileobj.read(size)
        if len(data) < size or len(fileobj.read(padding)) < padding:
            raise SpecError(f"the tar stream ends inside a {size}-byte member: the shard is "
                            f"truncated")
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind == b"x":  # pax extended header: its path, if any, names the next member
            long_name = _pax_path(data) or long_name
        elif kind in TAR_REGULAR:
            yield name, data
            long_name = None
        elif kind != b"g":
            long_name = None  # directories, links: not members of a sample


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8")
    if header[257:263] == b"ustar\0":  # POSIX ustar: a prefix may hold the leading folders
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
        return f"{prefix}/{name}" if prefix else name
    return name


def _pax_path(records: bytes) -> str | None:
    """The ``path`` of pax records ``b"<len> key=value\n"...``."""
    for line in records.decode("utf-8").splitlines():
        key, _, value = line.partition(" ")[2].partition("=")
        if key == "path":
            return value
    return None


def iter_tar_samples(fileobj: BinaryIO, keep: Callable[[int], bool] | None = None
                     ) -> Iterator[tuple[str, dict[str, bytes] | None]]:
    """Yield ``(key, {suffix: bytes})`` for each sample of a shard, in file order.

    With ``keep`` (a local file only), the members of the i-th sample (from 0) for which
    ``keep(i)`` is false are seeked past unread, and the sample comes as ``(key, None)``:
    counting and skipping samples costs a header read per member.
    """
    key, members, index = None, {}, -1

    def skip(path: str) -> bool:  # asked before a member's bytes are read
        return not keep(index + (_member_key(path) != key))

    for path, data in iter_tar_members(fileobj, skip if keep is not None else None):
        this_key, _, suffix = path.rpartition("/")[2].partition(".")
        if not suffix:
            raise SpecError(f"tar member {path!r} has no '<key>.<member>' form")
        if this_key != key:
            if key is not None:
                yield key, members if keep is None or keep(index) else None
            key, members, index = this_key, {}, index + 1
        if suffix in members:
            raise SpecError(f"sample {key!r} has member {suffix!r} twice")
        members[suffix] = data
    if key is not None:
        yield key, members if keep is None or keep(index) else None


def _member_key(path: str) -> str:
    return path.rpartition("/")[2].partition(".")[0]


# ---------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str


def check_manifest(manifest: dict[str, Any], where: str = "manifest.json") -> None:
    """Raise SpecError naming the first way ``manifest`` departs from spec v1."""
    keys = tuple(manifest)
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    extra = [k for k in keys if k not in MANIFEST_KEYS]
    if missing or extra:
        raise SpecError(f"{where} has top-level keys {sorted(keys)}; spec v{SPEC_VERSION} needs "
                        f"exactly {list(MANIFEST_KEYS)} (missing {missing}, unexpected {extra})")
    if manifest["spec_version"] != SPEC_VERSION:
        raise SpecError(f"{where} is spec version {manifest['spec_version']}, this toolkit reads "
                        f"version {SPEC_VERSION}; rebuild the shards with this version of ccat-data")
    for name, params in manifest["modalities"].items():
        modality_members(name, params)
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            check_shard_name(shard["name"], where)
        counted = sum(s["num_samples"] for s in entry["shards"])
        if counted != entry["num_samples"]:
            raise SpecError(f"{where}: split {split!r} says {entry['num_samples']} samples but "
                            f"its shards hold {counted}")


def check_shard_name(name: str, where: str = "manifest.json") -> None:
    """Shard names are plain file names; refuse anything that could leave the dataset."""
    if not SHARD_PATTERN.match(name):
        raise SpecError(f"{where} names shard {name!r}; shard names must look like "
                        "'train-000000.tar' (no scheme, no folders, no '..')")


def load_manifest(root: Path) -> dict[str, Any]:
    """Read and check ``root/manifest.json``; SpecError names the problem and the fix."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        hint = ("its build never finished; run the same `ccat-data build` command again to "
                "resume it") if root.is_dir() else "build it with `ccat-data build` first"
        raise SpecError(f"{root} has no {MANIFEST_NAME}: {hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        check_manifest(manifest, str(path))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SpecError(f"{path} is not a valid spec v{SPEC_VERSION} manifest ({err}); "
                        "rebuild the dataset") from None
    return manifest


def shards_of(manifest: dict[str, Any], split: str) -> list[ShardInfo]:
    if split not in manifest["splits"]:
        raise SpecError(f"split {split!r} is not in this dataset; it has "
                        f"{sorted(manifest['splits'])}")
    return [ShardInfo(**s) for s in manifest["splits"][split]["shards"]]


def fingerprint_params(manifest: dict[str, Any]) -> dict[str, Any]:
    """Flat ``{dotted.key: value}`` of everything that changes the bytes of a sample
    or which samples a split holds."""
    sources = {k: v for k, v in manifest["sources"].items() if k not in UNFINGERPRINTED_SOURCES}
    tree = {
        "spec_version": manifest["spec_version"],
        "dataset": manifest["dataset"],
        "classes": manifest["classes"],
        "modalities": manifest["modalities"],
        "sources": sources,
    }
    return _flatten(tree)


def compute_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of :func:`fingerprint_params`."""
    return hashlib.sha256(encode_json(fingerprint_params(manifest))).hexdigest()


def diff_fingerprint_params(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable lines ``key: expected -> actual`` for every differing parameter."""
    lines = []
    for key in sorted(set(expected) | set(actual)):
        if expected.get(key) != actual.get(key):
            lines.append(f"{key}: {expected.get(key, '<absent>')!r} -> {actual.get(key, '<absent>')!r}")
    return lines


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}
