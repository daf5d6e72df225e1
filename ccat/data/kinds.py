"""Modality kinds: the one table of what differs between a spectrogram, frames, an image
and tokens.

A manifest modality names its kind (``"kind": "frames"``); every step that depends on it
looks the kind up here instead of branching: the member names a sample stores
(``<key>.<modality>.<suffix>``), how a recipe encodes a value into them and how a reader
decodes them back into one array, the largest header a reader accepts, what ``ccat-data
verify`` checks, the view training and evaluation take of the array, the device cache's
layout and augmentation, and the encoder that reads the kind by default.

The table is part of the shard format, like :mod:`ccat.data.spec`, so the builder imports
it too: it needs numpy and :mod:`ccat.data.spec` only. The transform and cache entries
call the primitive operations of the object they are given (a :class:`Transform`, a
:class:`DeviceCache`), which own the torch code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ccat.data import shardio, spec

IMAGE_SIZE = 224  # crop side of image modalities when data.frame_size is 0 (the paper's)
EVAL_CROP_FRACTION = 224 / 256  # eval: resize the shorter side to size / this, center crop
FLOAT16_BYTES, UINT8_BYTES, INT64_BYTES = 2, 1, 8
FLOAT32_BYTES = 4
RGB = 3

Params = dict[str, Any]
# (transform, array, params, rng) -> tensor; (cache, tensor batch, params, rng) -> tensor
View = Callable[[Any, np.ndarray, Params, np.random.Generator], Any]
Augment = Callable[[Any, Any, Params, np.random.Generator], Any]


@dataclass(frozen=True)
class Kind:
    """Everything that depends on one modality kind."""

    name: str
    suffixes: Callable[[Params], list[str]]  # member suffixes after "<modality>."
    encode: Callable[[Any], dict[str, bytes]]  # a recipe's value -> bytes by member suffix
    bounds: Callable[[Params], list[Optional[shardio.Bound]]]  # per suffix: largest header
    assemble: Callable[[list[Any]], tuple[np.ndarray, Optional[str]]]  # decoded -> array, text
    check: Callable[[np.ndarray, Params], str]  # verify: what is wrong with the array, or ''
    view: View  # per-sample tensor for training (augmented) or evaluation
    cache_bytes: Callable[[Params, int], int]  # device-cache bytes per sample at frame_size
    cache_augment: Optional[Augment]  # batched device-side augmentation, if any
    cache_padded: bool  # variable length: the cache pads it and keeps each sample's length
    encoder: str  # the encoder that reads this kind unless model.encoders names another


# ---------------------------------------------------------------- spectrogram


def _spectrogram_check(array: np.ndarray, params: Params) -> str:
    return _shape_problem(array, tuple(params["shape"]), np.dtype(params["dtype"]))


def _shape_problem(array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> str:
    if array.shape != shape or array.dtype != dtype:
        return (f"has shape {list(array.shape)} {array.dtype}, the manifest says "
                f"{list(shape)} {dtype}")
    return ""


SPECTROGRAM = Kind(
    name="spectrogram",
    suffixes=lambda params: ["npy"],
    encode=lambda spectrogram: {"npy": shardio.encode_npy(spectrogram)},
    bounds=lambda params: [shardio.ArrayBound(params["dtype"], tuple(params["shape"]))],
    assemble=lambda decoded: (decoded[0], None),
    check=_spectrogram_check,
    view=lambda t, array, params, rng: t.tensor(array, np.float16),
    cache_bytes=lambda params, frame_size: FLOAT16_BYTES * math.prod(params["shape"]),
    cache_augment=None,
    cache_padded=False,
    encoder="resnet18_audio",
)

# ---------------------------------------------------------------- frames


def _frames_check(array: np.ndarray, params: Params) -> str:
    shape = (params["num_frames"], params["size"], params["size"], RGB)
    return _shape_problem(array, shape, np.dtype(np.uint8))


def _frames_cache_bytes(params: Params, frame_size: int) -> int:
    side = max(params["size"], frame_size)
    return params["num_frames"] * RGB * side * side * UINT8_BYTES


FRAMES = Kind(
    name="frames",
    suffixes=lambda params: [f"{i}.jpg" for i in range(params["num_frames"])],
    encode=lambda jpegs: {f"{i}.jpg": jpeg for i, jpeg in enumerate(jpegs)},  # in frame order
    bounds=lambda params: [shardio.ImageBound(params["size"], params["size"])] * params["num_frames"],
    assemble=lambda decoded: (np.stack(decoded), None),
    check=_frames_check,
    view=lambda t, array, params, rng: t.frames(array, t.cfg.frame_size or params["size"], rng),
    cache_bytes=_frames_cache_bytes,
    cache_augment=lambda c, x, params, rng: c.crop(x, c.cfg.frame_size or params["size"], rng),
    cache_padded=False,
    encoder="resnet18_video",
)

# ---------------------------------------------------------------- image


def _image_bound(params: Params) -> shardio.ImageBound:
    # the builder's aspect cap, plus a pixel for rounding the longer side when resizing
    longer = math.ceil(params["shorter_side"] * params.get("max_aspect", shardio.MAX_ASPECT)) + 1
    return shardio.ImageBound(params["shorter_side"], longer)


def _image_check(array: np.ndarray, params: Params) -> str:
    return "" if array.ndim == 3 and array.shape[2] == RGB else (
        f"has shape {list(array.shape)}, expected [H, W, 3]")


def _image_cache_bytes(params: Params, frame_size: int) -> int:
    return RGB * round((frame_size or IMAGE_SIZE) / EVAL_CROP_FRACTION) ** 2 * UINT8_BYTES


IMAGE = Kind(
    name="image",
    suffixes=lambda params: ["jpg"],
    encode=lambda jpeg: {"jpg": jpeg},
    bounds=lambda params: [_image_bound(params)],
    assemble=lambda decoded: (decoded[0], None),
    check=_image_check,
    view=lambda t, array, params, rng: t.image(array, t.cfg.frame_size or IMAGE_SIZE, rng),
    cache_bytes=_image_cache_bytes,
    # the cache holds one center square per image; crop it as a one-frame clip
    cache_augment=lambda c, x, params, rng: c.crop(x[:, None], c.cfg.frame_size or IMAGE_SIZE,
                                                    rng)[:, 0],
    cache_padded=False,
    encoder="resnet50_image",
)

# ---------------------------------------------------------------- tokens


def _tokens_check(array: np.ndarray, params: Params) -> str:
    return "" if array.dtype == np.int32 and array.ndim == 1 else (
        f"has dtype {array.dtype} and {array.ndim} dims, expected int32 [L]")


TOKENS = Kind(
    name="tokens",
    suffixes=lambda params: ["ids.npy", "txt"],
    encode=lambda ids_and_text: {"ids.npy": shardio.encode_npy(ids_and_text[0]),
                                 "txt": ids_and_text[1].encode("utf-8")},
    bounds=lambda params: [shardio.ArrayBound("int32", None, params["max_length"]), None],
    assemble=lambda decoded: (decoded[0], decoded[1]),
    check=_tokens_check,
    view=lambda t, array, params, rng: t.tensor(array, np.int64),
    cache_bytes=lambda params, frame_size: INT64_BYTES * params["max_length"],
    cache_augment=None,
    cache_padded=True,
    encoder="bert_text",
)

# ---------------------------------------------------------------- features


def _features_check(array: np.ndarray, params: Params) -> str:
    problem = _shape_problem(array, tuple(params["shape"]), np.dtype(params["dtype"]))
    if not problem and not np.isfinite(array).all():
        return "holds NaN or infinite values; the builder stores finite features only"
    return problem


FEATURES = Kind(
    name="features",  # precomputed feature sequences, float32 [T, D] (CMU-MOSEI's)
    suffixes=lambda params: ["npy"],
    encode=lambda features: {"npy": shardio.encode_npy(features)},
    bounds=lambda params: [shardio.ArrayBound(params["dtype"], tuple(params["shape"]))],
    assemble=lambda decoded: (decoded[0], None),
    check=_features_check,
    view=lambda t, array, params, rng: t.tensor(array, np.float32),
    cache_bytes=lambda params, frame_size: FLOAT32_BYTES * math.prod(params["shape"]),
    cache_augment=None,
    cache_padded=False,
    encoder="transformer_features",
)



# ---------------------------------------------------------------- flow


def _flow_channels(params: Params) -> int:
    """Planes per snippet: u and v of each of ``stack`` consecutive flow fields."""
    return 2 * params["stack"]


def _flow_suffixes(params: Params) -> list[str]:
    return [f"{i}.{c}.jpg" for i in range(params["num_snippets"])
            for c in range(_flow_channels(params))]


def _flow_encode(snippets: list[list[bytes]]) -> dict[str, bytes]:
    """Grayscale JPEGs, snippet by snippet, planes u0 v0 u1 v1 ... within one."""
    return {f"{i}.{c}.jpg": jpeg for i, planes in enumerate(snippets)
            for c, jpeg in enumerate(planes)}


def _flow_check(array: np.ndarray, params: Params) -> str:
    shape = (params["num_snippets"] * _flow_channels(params), params["size"], params["size"])
    return _shape_problem(array, shape, np.dtype(np.uint8))


def _flow_cache_bytes(params: Params, frame_size: int) -> int:
    side = max(params["size"], frame_size)
    return params["num_snippets"] * _flow_channels(params) * side * side * UINT8_BYTES


def _flow_snippets(array: Any, params: Params) -> Any:
    """[N * 2 * stack, H, W] as stored -> [N, 2 * stack, H, W] (array or tensor)."""
    return array.reshape(params["num_snippets"], _flow_channels(params), *array.shape[-2:])


FLOW = Kind(
    name="flow",
    suffixes=_flow_suffixes,
    encode=_flow_encode,
    bounds=lambda params: [shardio.ImageBound(params["size"], params["size"])] * len(
        _flow_suffixes(params)),
    # a grayscale JPEG decodes to three equal channels: keep one
    assemble=lambda decoded: (np.stack([plane[..., 0] for plane in decoded]), None),
    check=_flow_check,
    view=lambda t, array, params, rng: t.flow(_flow_snippets(array, params),
                                              t.cfg.frame_size or params["size"], rng),
    cache_bytes=_flow_cache_bytes,
    cache_augment=lambda c, x, params, rng: c.crop_flow(x, c.cfg.frame_size or params["size"],
                                                        rng),
    cache_padded=False,
    encoder="resnet18_flow",
)

KINDS: dict[str, Kind] = {kind.name: kind for kind in (SPECTROGRAM, FRAMES, IMAGE, TOKENS, FLOW)}
KINDS[FEATURES.name] = FEATURES


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
