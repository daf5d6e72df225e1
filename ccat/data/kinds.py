"""Modality kinds: one small class per way of storing a modality (a spectrogram, frames,
an image, tokens, feature sequences, optical flow), holding everything that differs
between them.

A manifest modality names its kind (``"kind": "frames"``); every step that depends on it
asks the kind instead of branching: the member names a sample stores
(``<key>.<modality>.<suffix>``), how a recipe encodes a value into them and how a reader
decodes them back into one array, the largest header a reader accepts, what ``ccat-data
verify`` checks, the view training and evaluation take of the array, the device cache's
layout and augmentation, the encoder that reads the kind by default, and the input
conventions that encoder reads: the padding token id (:data:`PAD_ID`) and how uint8
pixels or flow become its float input (:meth:`Kind.normalize`).

The kinds are part of the shard format, like :mod:`ccat.data.spec`, so the builder imports
them too: the module needs numpy and :mod:`ccat.data.spec` only, and torch is imported by
the one method that makes tensors (:meth:`Kind.normalize`). A view or a device-cache
augmentation is made of the operations of the object it is given, declared here
(:class:`Views`, :class:`CacheOps`) and implemented by the loader's ``Transform`` and the
``DeviceCache``, which own the torch code; the kinds name the operation and its size.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional, Protocol

import numpy as np

from ccat.data import shardio, spec

IMAGE_SIZE = 224  # crop side of image modalities when data.frame_size is 0 (the paper's)
EVAL_CROP_FRACTION = 224 / 256  # eval: resize the shorter side to size / this, center crop
UINT8_BYTES, INT64_BYTES = 1, 8
RGB = 3
PAD_ID = 0  # token id of padding: [PAD] in BERT WordPiece vocabularies, never real text
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOW_CENTRE = 127.5  # uint8 flow: 0..255 is -bound..+bound px, 127.5 no motion

Params = dict[str, Any]


class Views(Protocol):
    """The per-sample operations a kind's view is made of: ``ccat.data.pipeline.Transform``
    (train: augmented; eval: resized) and the device cache's ``CacheTransform`` (stored
    size, unaugmented) implement them on torch tensors."""

    cfg: Any  # the run's DataConfig: frame_size

    def tensor(self, array: np.ndarray, dtype: type) -> Any: ...

    def frames(self, frames: np.ndarray, size: int, rng: np.random.Generator) -> Any: ...

    def image(self, image: np.ndarray, size: int, rng: np.random.Generator) -> Any: ...

    def flow(self, snippets: np.ndarray, size: int, rng: np.random.Generator) -> Any: ...


class CacheOps(Protocol):
    """The batched device-side augmentations of ``ccat.data.device_cache.DeviceCache``."""

    cfg: Any

    def crop(self, frames: Any, size: int, rng: np.random.Generator) -> Any: ...

    def crop_flow(self, snippets: Any, size: int, rng: np.random.Generator) -> Any: ...


class Kind(ABC):
    """Everything that depends on one modality kind; a subclass gives the abstract methods
    and overrides the defaults where its kind differs."""

    name: ClassVar[str]
    encoder: ClassVar[str]  # the encoder that reads this kind unless model.encoders names another
    cache_padded: ClassVar[bool] = False  # variable length: the cache pads it, keeps lengths

    @abstractmethod
    def suffixes(self, params: Params) -> list[str]:
        """Member suffixes after ``"<modality>."``, in the order decoding reads them."""

    @abstractmethod
    def encode(self, value: Any) -> dict[str, bytes]:
        """A recipe's value -> bytes by member suffix."""

    @abstractmethod
    def bounds(self, params: Params) -> list[Optional[shardio.Bound]]:
        """Per suffix, the largest header a reader accepts (None: not bounded)."""

    def assemble(self, decoded: list[Any]) -> tuple[np.ndarray, Optional[str]]:
        """The decoded members -> the modality's array, and its text if it has one."""
        return decoded[0], None

    @abstractmethod
    def check(self, array: np.ndarray, params: Params) -> str:
        """``ccat-data verify``: what is wrong with the decoded array, or ''."""

    @abstractmethod
    def view(self, ops: Views, array: np.ndarray, params: Params,
             rng: np.random.Generator) -> Any:
        """The per-sample tensor training (augmented) or evaluation takes of the array."""

    @abstractmethod
    def cache_bytes(self, params: Params, frame_size: int) -> int:
        """Device-cache bytes of one sample at ``data.frame_size``."""

    def cache_augment(self, ops: CacheOps, x: Any, params: Params,
                      rng: np.random.Generator) -> Any:
        """The batched device-side augmentation of a cached batch; none by default."""
        return x

    def normalize(self, x: Any) -> Any:
        """The batch tensor as its encoder's float input; as it is by default."""
        return x


def _shape_problem(array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> str:
    if array.shape != shape or array.dtype != dtype:
        return (f"has shape {list(array.shape)} {array.dtype}, the manifest says "
                f"{list(shape)} {dtype}")
    return ""


# ---------------------------------------------------------------- one stored array


class StoredArray(Kind):
    """One ``.npy`` member of the manifest's shape and dtype, handed to training as a
    tensor of ``view_dtype`` (so the cache holds that many bytes an element)."""

    view_dtype: ClassVar[type]

    def suffixes(self, params: Params) -> list[str]:
        return ["npy"]

    def encode(self, array: np.ndarray) -> dict[str, bytes]:
        return {"npy": shardio.encode_npy(array)}

    def bounds(self, params: Params) -> list[Optional[shardio.Bound]]:
        return [shardio.ArrayBound(params["dtype"], tuple(params["shape"]))]

    def check(self, array: np.ndarray, params: Params) -> str:
        return _shape_problem(array, tuple(params["shape"]), np.dtype(params["dtype"]))

    def view(self, ops: Views, array: np.ndarray, params: Params,
             rng: np.random.Generator) -> Any:
        return ops.tensor(array, self.view_dtype)

    def cache_bytes(self, params: Params, frame_size: int) -> int:
        return np.dtype(self.view_dtype).itemsize * math.prod(params["shape"])


class Spectrogram(StoredArray):
    """float16 [F, T]; the encoder widens it on the device."""

    name = "spectrogram"
    encoder = "resnet18_audio"
    view_dtype = np.float16


class Features(StoredArray):
    """Precomputed feature sequences, float32 [T, D] (CMU-MOSEI's), finite only."""

    name = "features"
    encoder = "transformer_features"
    view_dtype = np.float32

    def check(self, array: np.ndarray, params: Params) -> str:
        problem = super().check(array, params)
        if not problem and not np.isfinite(array).all():
            return "holds NaN or infinite values; the builder stores finite features only"
        return problem


# ---------------------------------------------------------------- pixels


def stored_side(params: Params, frame_size: int) -> int:
    """The crop side of frames or flow: ``data.frame_size``, or the stored ``size`` when
    it is 0."""
    return frame_size or params["size"]


class Pixels(Kind):
    """uint8 RGB pixels, carried as uint8 to the accelerator (a quarter of the bytes, and
    no float work on the CPU) and normalized there by the encoder."""

    def normalize(self, x: Any) -> Any:
        """uint8 pixels [..., 3, H, W] -> ImageNet-normalized float, on ``x``'s device;
        float input is taken as already normalized."""
        import torch

        if x.dtype != torch.uint8:
            return x
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
        return (x.float() / 255 - mean) / std


class Frames(Pixels):
    """``num_frames`` JPEGs of ``size`` x ``size`` -> uint8 [N, H, W, 3]."""

    name = "frames"
    encoder = "resnet18_video"

    def suffixes(self, params: Params) -> list[str]:
        return [f"{i}.jpg" for i in range(params["num_frames"])]

    def encode(self, jpegs: list[bytes]) -> dict[str, bytes]:
        return {f"{i}.jpg": jpeg for i, jpeg in enumerate(jpegs)}  # in frame order

    def bounds(self, params: Params) -> list[Optional[shardio.Bound]]:
        return [shardio.ImageBound(params["size"], params["size"])] * params["num_frames"]

    def assemble(self, decoded: list[Any]) -> tuple[np.ndarray, Optional[str]]:
        return np.stack(decoded), None

    def check(self, array: np.ndarray, params: Params) -> str:
        shape = (params["num_frames"], params["size"], params["size"], RGB)
        return _shape_problem(array, shape, np.dtype(np.uint8))

    def view(self, ops: Views, array: np.ndarray, params: Params,
             rng: np.random.Generator) -> Any:
        return ops.frames(array, stored_side(params, ops.cfg.frame_size), rng)

    def cache_bytes(self, params: Params, frame_size: int) -> int:
        side = max(params["size"], frame_size)
        return params["num_frames"] * RGB * side * side * UINT8_BYTES

    def cache_augment(self, ops: CacheOps, x: Any, params: Params,
                      rng: np.random.Generator) -> Any:
        return ops.crop(x, stored_side(params, ops.cfg.frame_size), rng)


class Image(Pixels):
    """One JPEG of any size (shorter side ``shorter_side``) -> uint8 [H, W, 3]."""

    name = "image"
    encoder = "resnet50_image"

    @staticmethod
    def side(frame_size: int) -> int:
        """The crop side: ``data.frame_size``, or the paper's 224 when it is 0."""
        return frame_size or IMAGE_SIZE

    def suffixes(self, params: Params) -> list[str]:
        return ["jpg"]

    def encode(self, jpeg: bytes) -> dict[str, bytes]:
        return {"jpg": jpeg}

    def bounds(self, params: Params) -> list[Optional[shardio.Bound]]:
        # the builder's aspect cap, plus a pixel for rounding the longer side when resizing
        longer = math.ceil(params["shorter_side"] * params.get("max_aspect", shardio.MAX_ASPECT)
                           ) + 1
        return [shardio.ImageBound(params["shorter_side"], longer)]

    def check(self, array: np.ndarray, params: Params) -> str:
        return "" if array.ndim == 3 and array.shape[2] == RGB else (
            f"has shape {list(array.shape)}, expected [H, W, 3]")

    def view(self, ops: Views, array: np.ndarray, params: Params,
             rng: np.random.Generator) -> Any:
        return ops.image(array, self.side(ops.cfg.frame_size), rng)

    def cache_bytes(self, params: Params, frame_size: int) -> int:
        return RGB * round(self.side(frame_size) / EVAL_CROP_FRACTION) ** 2 * UINT8_BYTES

    def cache_augment(self, ops: CacheOps, x: Any, params: Params,
                      rng: np.random.Generator) -> Any:
        # the cache holds one center square per image; crop it as a one-frame clip
        return ops.crop(x[:, None], self.side(ops.cfg.frame_size), rng)[:, 0]


# ---------------------------------------------------------------- tokens


class Tokens(Kind):
    """Token ids, int32 [L] up to ``max_length``, and the text they encode; batches pad
    them with :data:`PAD_ID`, which the encoder reads back as its attention mask."""

    name = "tokens"
    encoder = "bert_text"
    cache_padded = True

    def suffixes(self, params: Params) -> list[str]:
        return ["ids.npy", "txt"]

    def encode(self, ids_and_text: tuple[np.ndarray, str]) -> dict[str, bytes]:
        return {"ids.npy": shardio.encode_npy(ids_and_text[0]),
                "txt": ids_and_text[1].encode("utf-8")}

    def bounds(self, params: Params) -> list[Optional[shardio.Bound]]:
        return [shardio.ArrayBound("int32", None, params["max_length"]), None]

    def assemble(self, decoded: list[Any]) -> tuple[np.ndarray, Optional[str]]:
        return decoded[0], decoded[1]

    def check(self, array: np.ndarray, params: Params) -> str:
        return "" if array.dtype == np.int32 and array.ndim == 1 else (
            f"has dtype {array.dtype} and {array.ndim} dims, expected int32 [L]")

    def view(self, ops: Views, array: np.ndarray, params: Params,
             rng: np.random.Generator) -> Any:
        return ops.tensor(array, np.int64)

    def cache_bytes(self, params: Params, frame_size: int) -> int:
        return INT64_BYTES * params["max_length"]


# ---------------------------------------------------------------- flow


class Flow(Kind):
    """Optical flow: per snippet, ``stack`` consecutive fields as grayscale JPEG planes
    u0 v0 u1 v1 ... -> uint8 [N * 2 * stack, H, W], snippet by snippet."""

    name = "flow"
    encoder = "resnet18_flow"

    @staticmethod
    def channels(params: Params) -> int:
        """Planes per snippet: u and v of each of ``stack`` consecutive flow fields."""
        return 2 * params["stack"]

    def suffixes(self, params: Params) -> list[str]:
        return [f"{i}.{c}.jpg" for i in range(params["num_snippets"])
                for c in range(self.channels(params))]

    def encode(self, snippets: list[list[bytes]]) -> dict[str, bytes]:
        """Grayscale JPEGs, snippet by snippet, planes u0 v0 u1 v1 ... within one."""
        return {f"{i}.{c}.jpg": jpeg for i, planes in enumerate(snippets)
                for c, jpeg in enumerate(planes)}

    def bounds(self, params: Params) -> list[Optional[shardio.Bound]]:
        return [shardio.ImageBound(params["size"], params["size"])] * len(self.suffixes(params))

    def assemble(self, decoded: list[Any]) -> tuple[np.ndarray, Optional[str]]:
        # a grayscale JPEG decodes to three equal channels: keep one
        return np.stack([plane[..., 0] for plane in decoded]), None

    def check(self, array: np.ndarray, params: Params) -> str:
        shape = (params["num_snippets"] * self.channels(params), params["size"], params["size"])
        return _shape_problem(array, shape, np.dtype(np.uint8))

    def view(self, ops: Views, array: np.ndarray, params: Params,
             rng: np.random.Generator) -> Any:
        # [N * 2 * stack, H, W] as stored -> [N, 2 * stack, H, W]
        snippets = array.reshape(params["num_snippets"], self.channels(params), *array.shape[-2:])
        return ops.flow(snippets, stored_side(params, ops.cfg.frame_size), rng)

    def cache_bytes(self, params: Params, frame_size: int) -> int:
        side = max(params["size"], frame_size)
        return params["num_snippets"] * self.channels(params) * side * side * UINT8_BYTES

    def cache_augment(self, ops: CacheOps, x: Any, params: Params,
                      rng: np.random.Generator) -> Any:
        return ops.crop_flow(x, stored_side(params, ops.cfg.frame_size), rng)

    def normalize(self, x: Any) -> Any:
        """uint8 quantised flow -> float in [-1, 1], proportional to the displacement;
        float input is taken as already normalized."""
        import torch

        return (x.float() - FLOW_CENTRE) / FLOW_CENTRE if x.dtype == torch.uint8 else x


SPECTROGRAM, FRAMES, IMAGE, TOKENS, FLOW, FEATURES = (Spectrogram(), Frames(), Image(), Tokens(),
                                                      Flow(), Features())
KINDS: dict[str, Kind] = {kind.name: kind
                          for kind in (SPECTROGRAM, FRAMES, IMAGE, TOKENS, FLOW, FEATURES)}


# ---------------------------------------------------------------- lookups


def of(modality: str, params: Params) -> Kind:
    """The kind of manifest modality ``modality``; an unknown kind is a :class:`SpecError`."""
    kind = KINDS.get(params.get("kind", ""))
    if kind is None:
        raise spec.SpecError(f"modality {modality!r} has unknown kind {params.get('kind')!r}; "
                             f"spec v{spec.SPEC_VERSION} knows {', '.join(KINDS)}")
    return kind


def modality_members(modality: str, params: Params) -> list[str]:
    """Member suffixes (after ``<key>.``) that carry ``modality`` of a sample."""
    return [f"{modality}.{suffix}" for suffix in of(modality, params).suffixes(params)]


def sample_members(modalities: dict[str, Params]) -> list[str]:
    """Every member suffix one sample must have, sorted as they are written."""
    members = [spec.LABEL_MEMBER, spec.META_MEMBER]
    for name, params in modalities.items():
        members.extend(modality_members(name, params))
    return sorted(members)


def encode(modality: str, kind: str, value: Any) -> dict[str, bytes]:
    """The members that store ``value`` as ``modality`` of ``kind`` (how a recipe encodes):
    a spectrogram array; the JPEG bytes of each frame; an image's JPEG bytes; (token ids,
    text); per flow snippet, the grayscale JPEG bytes of its planes. The writer checks the
    names against the manifest (:func:`check_written`)."""
    encoded = of(modality, {"kind": kind}).encode(value)
    return {f"{modality}.{suffix}": data for suffix, data in encoded.items()}


def check_written(key: str, members: dict[str, bytes], modalities: dict[str, Params]) -> None:
    """Refuse a sample whose member names are not its modalities' kinds' (a recipe bug)."""
    expected = sample_members(modalities)
    if sorted(members) != expected:
        stray = sorted(set(members) - set(expected))
        missing = sorted(set(expected) - set(members))
        raise spec.SpecError(f"the recipe wrote sample {key!r} with members "
                             f"{', '.join(stray) or 'none'} that are not its modalities' "
                             f"kinds', and without {', '.join(missing) or 'none'}; a recipe "
                             "encodes each modality with ccat.data.kinds.encode")


def decode_sample(key: str, members: dict[str, bytes],
                  modalities: dict[str, Params]) -> shardio.Sample:
    """Turn a sample's raw members into arrays, one per modality.

    spectrogram -> float16 [F, T]; frames -> uint8 [N, H, W, 3]; image -> uint8 [H, W, 3];
    tokens -> int32 [L] (the text itself goes into ``Sample.text``); features -> float32
    [T, D]; flow -> uint8 [N * 2 * stack, H, W], snippet by snippet, planes u0 v0 u1 v1 ...
    within one. Every array is checked against its header bound before it is read.
    """
    expected = sample_members(modalities)
    if sorted(members) != expected:
        raise spec.SpecError(f"sample {key!r} has members {sorted(members)}, expected {expected}")
    meta = _decode_checked(key, spec.META_MEMBER, members, None)
    data: dict[str, np.ndarray] = {}
    texts: dict[str, str] = {}
    for name, params in modalities.items():
        kind = of(name, params)
        decoded = [_decode_checked(key, suffix, members, bound) for suffix, bound in
                   zip(modality_members(name, params), kind.bounds(params))]
        data[name], text = kind.assemble(decoded)
        if text is not None:
            texts[name] = text
    label = _decode_checked(key, spec.LABEL_MEMBER, members, None)
    return shardio.Sample(key=key, label=label, data=data, meta=meta, text=texts)


def _decode_checked(key: str, suffix: str, members: dict[str, bytes],
                    bound: shardio.Bound | None) -> Any:
    """:func:`shardio.decode_member`, a failure named by sample key and member."""
    try:
        return shardio.decode_member(suffix, members[suffix], bound)
    except spec.SpecError as err:
        raise spec.SpecError(f"sample {key!r}, member {suffix}: {err}") from None
    except (ValueError, UnicodeDecodeError, RuntimeError) as err:
        raise spec.SpecError(f"sample {key!r}, member {suffix}: does not decode ({err})") from None


def check_array(modality: str, array: np.ndarray, params: Params) -> str:
    """What is wrong with a decoded modality array, or '' when it matches the manifest."""
    return of(modality, params).check(array, params)
