"""How a shard's bytes are written and read: the member codecs (``.npy``, ``.jpg``,
``.json``, ``.cls``), the bounds a reader checks before decoding, and the tar stream of
samples. The format they implement is :mod:`ccat.data.spec`; which members a modality
stores is :mod:`ccat.data.kinds`.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import struct
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

try:
    import simplejpeg
except ImportError:  # a dependency; without it torchvision or Pillow decode, slower
    simplejpeg = None

from ccat.data.spec import KEY_PATTERN, SPEC_VERSION, SpecError


# ---------------------------------------------------------------- member encoding


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of ``array`` (no pickle, deterministic header)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


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
    try:
        shape, fortran_order, dtype, offset = _npy_header(bytes(data[:_npy_header_end(data)]))
    except (ValueError, SyntaxError, TypeError) as err:
        raise SpecError(f"is not a .npy array ({err})") from None
    problem = bound.problem(shape, dtype) if bound else None
    if problem:
        raise SpecError(f"{problem}; refused before reading its data")
    if dtype.hasobject:
        raise SpecError("declares Python objects, which the shard format never stores")
    need = math.prod(shape) * dtype.itemsize
    if need != len(data) - offset:
        raise SpecError(f"declares {need} bytes of data but holds {len(data) - offset}")
    flat = np.frombuffer(data, dtype, math.prod(shape), offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C").copy()  # writable, own memory


def _npy_header_end(data: bytes) -> int:
    """Where a .npy header ends (magic, version, length, dict), from its length field; the
    whole of ``data`` when it is too short to say (the parse then words the error)."""
    if len(data) < 12 or data[6] not in (1, 2, 3):
        return len(data)
    return 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else \
        12 + int.from_bytes(data[8:12], "little")


@functools.lru_cache(maxsize=64)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of a .npy header. Cached: every
    spectrogram of a build has the same header, and numpy parses it with ast (0.2 ms)."""
    stream = io.BytesIO(head)
    version = np.lib.format.read_magic(stream)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(stream)
    return shape, fortran_order, dtype, stream.tell()


def jpeg_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a JPEG's header, without decoding it (and without Pillow's
    decompression-bomb check, so a huge declared size is reported, not raised).

    simplejpeg reads it in C (3 us; Pillow's parser took 0.14 ms, 10 % of a sample)."""
    if simplejpeg is not None:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as err:
            raise SpecError(f"is not a JPEG ({err})") from None
        return width, height
    from PIL import JpegImagePlugin

    try:
        with JpegImagePlugin.JpegImageFile(io.BytesIO(data)) as img:
            return img.size
    except (SyntaxError, OSError, ValueError, struct.error) as err:
        raise SpecError(f"is not a JPEG ({err})") from None


def decode_jpeg(data: bytes, bound: ImageBound | None = None) -> np.ndarray:
    """JPEG bytes -> uint8 [H, W, 3] RGB, its header's size checked against ``bound``
    (default: at most :data:`UNBOUNDED_SIDE` px a side) before decoding.

    simplejpeg's libjpeg-turbo gives the same pixels as torchvision's and Pillow's (tested,
    tests/test_jpeg_decode.py) in 75 % of torchvision's time and 45 % of Pillow's, straight
    into an HWC array; torchvision (whose image codecs are deprecated since 0.29), then
    Pillow, take over where it is not installed.
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
    if simplejpeg is not None:
        return _decode_simplejpeg
    return _torchvision_decoder()


def _decode_simplejpeg(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] RGB; libjpeg-turbo's accurate DCT and fancy upsampling, as Pillow's
    and torchvision's defaults."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False)


@functools.cache
def _torchvision_decoder() -> Callable[[bytes], np.ndarray] | None:
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
