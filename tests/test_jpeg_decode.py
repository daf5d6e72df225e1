"""Issue 28, the loader: shards' JPEGs decode through simplejpeg to exactly the pixels
torchvision's decode_jpeg (the decoder before it) and Pillow give; headers read in C say
the sizes Pillow's parser says; .npy headers parsed once decode the same arrays."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ccat.data import shardio
from ccat.data.spec import SpecError


def jpegs() -> dict[str, bytes]:
    """JPEGs as builds write them (Pillow, quality 95, 4:2:0) at odd and even sizes, smooth
    and noisy, plus 4:4:4 and greyscale ones."""
    rng = np.random.default_rng(0)
    out = {}
    for h, w in ((224, 224), (33, 17), (48, 64), (256, 341)):
        smooth = (np.cumsum(rng.integers(-4, 5, (h, w, 3)), axis=1) % 256).astype(np.uint8)
        noisy = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for name, pixels in (("smooth", smooth), ("noisy", noisy)):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
            out[f"{name}{h}x{w}"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=90, subsampling=0)
    out["444"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(noisy[..., 0]).save(buf, format="JPEG", quality=95)
    out["grey"] = buf.getvalue()
    return out


def pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.skipif(shardio.simplejpeg is None, reason="simplejpeg is not installed")
def test_simplejpeg_decodes_the_bytes_torchvision_and_pillow_decode() -> None:
    torchvision = shardio._torchvision_decoder()
    assert shardio._jpeg_decoder() is shardio._decode_simplejpeg
    for name, data in jpegs().items():
        decoded = shardio.decode_jpeg(data)
        assert decoded.dtype == np.uint8 and decoded.shape[2] == 3, name
        assert decoded.tobytes() == pillow(data).tobytes(), name
        if torchvision is not None:
            assert decoded.tobytes() == np.ascontiguousarray(torchvision(data)).tobytes(), name


def test_header_sizes_are_pillows_and_garbage_is_not_a_jpeg() -> None:
    for name, data in jpegs().items():
        with Image.open(io.BytesIO(data)) as img:
            assert shardio.jpeg_size(data) == img.size, name
    with pytest.raises(SpecError, match="^is not a JPEG"):
        shardio.jpeg_size(b"not a jpeg at all")


def test_npy_headers_parsed_once_decode_the_same_arrays() -> None:
    rng = np.random.default_rng(1)
    for array in (rng.standard_normal((257, 63)).astype(np.float16),
                  rng.standard_normal((257, 63)).astype(np.float16),  # same header, cached
                  np.arange(7, dtype=np.int64), np.asfortranarray(np.ones((3, 5)))):
        decoded = shardio.decode_npy(shardio.encode_npy(array))
        assert decoded.dtype == array.dtype and np.array_equal(decoded, array)
        assert decoded.flags.writeable
    with pytest.raises(SpecError, match="declares 8 bytes of data but holds 9"):
        shardio.decode_npy(shardio.encode_npy(np.zeros(1)) + b"x")
