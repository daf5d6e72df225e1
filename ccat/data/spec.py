"""The shard format, spec version 2: the one place that defines it.

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

Which members a modality stores, and how they decode into one array, depends on its
kind: :mod:`ccat.data.kinds` holds that table, built on this module's codecs. Both the
builder (``preprocess``) and the trainer (``ccat``) import these two modules, and nothing
else crosses that boundary.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import math
import os
import re
import struct
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from ccat.data import manifest_schema
from ccat.errors import UserError

SPEC_VERSION = 2  # 2: the fingerprint covers split membership and raw content
MANIFEST_NAME = "manifest.json"
MANIFEST_KEYS = tuple(manifest_schema.MANIFEST["required"])
MANIFEST_MAX_BYTES = 64 << 20  # a manifest larger than this is refused unread
SPLIT_NAMES = ("train", "val", "test")
SHARD_PATTERN = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{6})\.tar$")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")

LABEL_MEMBER = "label.cls"
META_MEMBER = "meta.json"
# Parameters recorded under sources that do not change a sample's bytes, so they stay
# out of the fingerprint: a build on 2 workers trains the same as one on 16.
UNFINGERPRINTED_SOURCES = ("build",)
# Identity fields of the fingerprint, in words, for messages that say what differs.
IDENTITY_WORDS = {"membership_sha256": "which samples the split holds",
                  "sources.raw.sha256": "the content of the raw files",
                  "sources.raw.num_files": "the number of raw files",
                  "sources.split_files": "a split or label file"}
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
SHORT_HASH = 12  # hex digits of a hash shown in messages
# A folder without a manifest holding files with these suffixes (at the top or one level down)
# is a raw tree, not an unfinished build; the markers name its dataset.
RAW_MEDIA_SUFFIXES = {".wav", ".flv", ".mp4", ".mkv", ".webm", ".avi", ".jpg", ".jpeg", ".png"}
RAW_MARKERS = (("AudioWAV", "cremad"), ("VideoFlash", "cremad"), ("labelResultAll.txt", "mvsa"))
RAW_LOOK = 2000  # entries looked at per level to tell the two apart


class SpecError(UserError, ValueError):
    """A shard, sample or manifest does not follow the shard format."""


def shard_name(split: str, index: int) -> str:
    """The file name of shard ``index`` of ``split``: ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


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


def decode_member(suffix: str, data: bytes, bound: Bound | None = None) -> Any:
    """Decode one member's bytes by its suffix: arrays, images (uint8 HWC), text, label.

    Arrays and images are checked against ``bound`` (their kind's, see
    :mod:`ccat.data.kinds`) from their headers before any pixel or element is read;
    without one, only against what their bytes can hold.
    """
    if suffix.endswith(".npy"):
        return decode_npy(data, bound if isinstance(bound, ArrayBound) else None)
    if suffix.endswith(".jpg"):
        return decode_jpeg(data, bound if isinstance(bound, ImageBound) else None)
    if suffix.endswith(".cls"):
        return int(data.decode("ascii"))
    if suffix.endswith(".json"):
        return json.loads(data.decode("utf-8"))
    if suffix.endswith(".txt"):
        return data.decode("utf-8")
    raise SpecError(f"member suffix {suffix!r} has no decoder in spec v{SPEC_VERSION}")


@dataclass(frozen=True)
class ArrayBound:
    """What a ``.npy`` header may declare: its dtype, and its exact shape or, for a 1-d
    array of varying length, at most ``max_length`` elements."""

    dtype: str
    shape: tuple[int, ...] | None = None
    max_length: int = 0

    def problem(self, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
        """Why a header declaring ``shape`` and ``dtype`` is refused, or None."""
        if dtype != np.dtype(self.dtype):
            return f"declares dtype {dtype}, the manifest says {np.dtype(self.dtype)}"
        if self.shape is not None and tuple(shape) != self.shape:
            return f"declares shape {list(shape)}, the manifest says {list(self.shape)}"
        if self.shape is None and (len(shape) != 1 or shape[0] > self.max_length):
            return f"declares shape {list(shape)}, the manifest allows [at most {self.max_length}]"
        return None


@dataclass(frozen=True)
class ImageBound:
    """What a JPEG header may declare: a shorter side of exactly ``shorter`` px (0: any)
    and a longer side of at most ``longer`` px."""

    shorter: int
    longer: int

    def problem(self, width: int, height: int) -> str | None:
        """Why a header declaring ``width`` x ``height`` is refused, or None."""
        shorter, longer = min(width, height), max(width, height)
        if shorter >= 1 and longer <= self.longer and shorter == (self.shorter or shorter):
            return None
        return f"declares a {width}x{height} image, the manifest allows {self.allowed()}"

    def allowed(self) -> str:
        """The sizes this bound lets through, as a sentence says them."""
        if not self.shorter:
            return f"at most {self.longer} px a side"
        if self.shorter == self.longer:
            return f"{self.shorter}x{self.shorter}"
        return f"a shorter side of {self.shorter} and a longer side of at most {self.longer}"


Bound = ArrayBound | ImageBound
# longest/shortest side of a stored image a reader accepts when the manifest records no
# max_aspect of its own (MVSA: 256 x 5120)
MAX_ASPECT = 20
UNBOUNDED_SIDE = 16384  # an image decoded with no manifest at hand: at most 16384 px a side


def decode_npy(data: bytes, bound: ArrayBound | None = None) -> np.ndarray:
    """``.npy`` bytes -> array, its header checked against ``bound`` and against the bytes
    that follow it before the data is read."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, SyntaxError, TypeError) as err:
        raise SpecError(f"is not a .npy array ({err})") from None
    problem = bound.problem(shape, dtype) if bound else None
    if problem:
        raise SpecError(f"{problem}; refused before reading its data")
    if dtype.hasobject:
        raise SpecError("declares Python objects, which the shard format never stores")
    need = math.prod(shape) * dtype.itemsize
    if need != len(data) - stream.tell():
        raise SpecError(f"declares {need} bytes of data but holds {len(data) - stream.tell()}")
    flat = np.frombuffer(data, dtype, math.prod(shape), offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C").copy()  # writable, own memory


def jpeg_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a JPEG's header, without decoding it (and without Pillow's
    decompression-bomb check, so a huge declared size is reported, not raised)."""
    from PIL import JpegImagePlugin

    try:
        with JpegImagePlugin.JpegImageFile(io.BytesIO(data)) as img:
            return img.size
    except (SyntaxError, OSError, ValueError, struct.error) as err:
        raise SpecError(f"is not a JPEG ({err})") from None


def decode_jpeg(data: bytes, bound: ImageBound | None = None) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] RGB, its header's size checked against ``bound``
    (default: at most :data:`UNBOUNDED_SIDE` px a side) before decoding.

    torchvision's libjpeg-turbo gives the same pixels as Pillow's here in about 60% of the
    time (no image object, no copy out): a third of the loader's time per sample. Its image
    codecs are deprecated since torchvision 0.29 in favour of TorchCodec, so Pillow takes
    over where they are gone.
    """
    problem = (bound or ImageBound(0, UNBOUNDED_SIDE)).problem(*jpeg_size(data))
    if problem:
        raise SpecError(f"{problem}; refused before decoding")
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
TAR_READ_BLOCK = 4 << 20  # members larger than this are read in blocks of it


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
        data = _read_upto(fileobj, size)
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


def _read_upto(fileobj: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes of ``fileobj``, read in blocks: memory grows with the bytes that
    are there, never with what a header claims (one read of n bytes reserves n first)."""
    if size <= TAR_READ_BLOCK:
        return fileobj.read(size)
    parts, left = [], size
    while left:
        part = fileobj.read(min(left, TAR_READ_BLOCK))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


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


def check_manifest(manifest: Any, where: str = "manifest.json") -> None:
    """Raise SpecError, one sentence naming ``where`` and the JSON path, at the first way
    ``manifest`` departs from this spec version: its schema
    (:mod:`ccat.data.manifest_schema`), its shard names and counts, or its fingerprint."""
    version = manifest.get("spec_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version != SPEC_VERSION:
        fix = ("rebuild the shards with this version of ccat-data" if version < SPEC_VERSION
               else "upgrade ccat to read it")
        raise SpecError(f"{where} is spec version {version}, this toolkit reads version "
                        f"{SPEC_VERSION}; {fix}")
    deep = manifest_schema.too_deep(manifest)
    problem = (f"{deep}: nests deeper than {manifest_schema.MAX_DEPTH} levels" if deep
               else manifest_schema.first_error(manifest))
    if problem:
        raise SpecError(f"{where}: {problem}; rebuild the dataset or restore its manifest.json")
    for split, entry in manifest["splits"].items():
        _check_split(split, entry, len(manifest["classes"]), where)
    if compute_fingerprint(manifest) != manifest["fingerprint"]:
        raise SpecError(f"{where}: manifest edited after build: its fingerprint does not match "
                        "its contents; rebuild or restore it")


def _check_split(split: str, entry: dict[str, Any], num_classes: int, where: str) -> None:
    """Shard names and counts of one split agree with each other."""
    for i, shard in enumerate(entry["shards"]):
        check_shard_name(shard["name"], where)
        if not shard["name"].startswith(f"{split}-"):
            raise SpecError(f"{where}: splits.{split}.shards[{i}] is named {shard['name']!r}, "
                            f"a shard of another split")
    counted = sum(s["num_samples"] for s in entry["shards"])
    if counted != entry["num_samples"]:
        raise SpecError(f"{where}: split {split!r} says {entry['num_samples']} samples but "
                        f"its shards hold {counted}")
    counts = entry.get("class_counts")
    if counts is not None and (len(counts) != num_classes or sum(counts) != counted):
        raise SpecError(f"{where}: splits.{split}.class_counts {counts} does not count "
                        f"{counted} samples over {num_classes} classes")


def check_shard_name(name: str, where: str = "manifest.json") -> None:
    """Shard names are plain file names; refuse anything that could leave the dataset."""
    if not SHARD_PATTERN.match(name):
        raise SpecError(f"{where} names shard {name!r}; shard names must look like "
                        "'train-000000.tar' (no scheme, no folders, no '..')")


def manifest_too_large(where: str) -> SpecError:
    """The refusal of a manifest over :data:`MANIFEST_MAX_BYTES`, read no further."""
    return SpecError(f"{where} is over {MANIFEST_MAX_BYTES >> 20} MB, far larger than any "
                     "manifest; it is not one, check the URL or rebuild the dataset")


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """The checked manifest held in ``data`` (read from ``where``), or one SpecError."""
    if len(data) > MANIFEST_MAX_BYTES:
        raise manifest_too_large(where)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{where} is not JSON ({err}); rebuild the dataset or restore its "
                        "manifest.json") from None
    except RecursionError:
        raise SpecError(f"{where} nests too deeply to be read as JSON; it is not a manifest, "
                        "rebuild the dataset or restore its manifest.json") from None
    check_manifest(manifest, where)
    return manifest


def _no_manifest_hint(root: Path) -> str:
    """What a folder without a manifest is, and the command that fixes it: a raw tree (media,
    no shards) is built, an interrupted build is resumed."""
    if not root.is_dir():
        return "build it with `ccat-data build` first"
    names = [p.name for p in itertools.islice(root.iterdir(), RAW_LOOK)]
    nested = [p.name for p in itertools.islice(root.glob("*/*"), RAW_LOOK)]
    has_shards = any(SHARD_PATTERN.match(n) for n in names)
    if has_shards or not any(Path(n).suffix.lower() in RAW_MEDIA_SUFFIXES for n in names + nested):
        return "its build never finished; run the same `ccat-data build` command again to resume it"
    dataset = next((d for marker, d in RAW_MARKERS if marker in names), "DATASET")
    return (f"it looks like a raw tree (media, no shards); build shards from it with "
            f"`ccat-data build {dataset} --raw {root} --out shards/{dataset}`")


def load_manifest(root: Path) -> dict[str, Any]:
    """Read and check ``root/manifest.json``; SpecError names the problem and the fix."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise SpecError(f"{root} has no {MANIFEST_NAME}: {_no_manifest_hint(root)}")
    if path.stat().st_size > MANIFEST_MAX_BYTES:
        raise manifest_too_large(str(path))
    return parse_manifest(path.read_bytes(), str(path))


def shards_of(manifest: dict[str, Any], split: str) -> list[ShardInfo]:
    if split not in manifest["splits"]:
        raise SpecError(f"split {split!r} is not in this dataset; it has "
                        f"{sorted(manifest['splits'])}")
    return [ShardInfo(**s) for s in manifest["splits"][split]["shards"]]


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in blocks (shards and raw media can be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def membership_sha256(rows: list[tuple[str, int]] | list[list[Any]]) -> str:
    """sha256 over the canonical JSON of the sorted ``[[key, label], ...]`` of a split."""
    return hashlib.sha256(encode_json(sorted([str(k), int(v)] for k, v in rows))).hexdigest()


def fingerprint_params(manifest: dict[str, Any]) -> dict[str, Any]:
    """Flat ``{dotted.key: value}`` of everything that makes a build's data what it is:
    every parameter that changes the bytes of a sample, the membership of every split and
    the content of the raw and list files (``sources``, less build-only settings)."""
    sources = {k: v for k, v in manifest["sources"].items() if k not in UNFINGERPRINTED_SOURCES}
    tree = {
        "spec_version": manifest["spec_version"],
        "dataset": manifest["dataset"],
        "classes": manifest["classes"],
        "modalities": manifest["modalities"],
        "splits": {name: {"membership_sha256": entry.get("membership_sha256")}
                   for name, entry in manifest["splits"].items()},
        "sources": sources,
    }
    return _flatten(tree)


def compute_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of :func:`fingerprint_params`: a pure function of the
    manifest's fields, so a reader can recompute it."""
    return hashlib.sha256(encode_json(fingerprint_params(manifest))).hexdigest()


def diff_fingerprint_params(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable lines ``key: expected -> actual`` for every differing parameter;
    identity hashes are named in words and shortened."""
    lines = []
    for key in sorted(set(expected) | set(actual)):
        if expected.get(key) != actual.get(key):
            words = next((w for k, w in IDENTITY_WORDS.items() if k in key), "")
            name = f"{key} ({words})" if words else key
            lines.append(f"{name}: {_shown(expected, key)} -> {_shown(actual, key)}")
    return lines


def _shown(params: dict[str, Any], key: str) -> str:
    if key not in params:
        return "<absent>"
    value = params[key]
    if isinstance(value, str) and SHA256_PATTERN.match(value):
        return value[:SHORT_HASH]
    return repr(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}
