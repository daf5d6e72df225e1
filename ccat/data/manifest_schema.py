"""The JSON Schema (Draft 2020-12) of ``manifest.json``, and one-sentence validation errors.

Strict where the format is fixed: the top-level keys, a split's entry, a shard entry, a
skipped record and the identity hashes allow no other keys, and every value has its type.
Per kind where the kinds differ: each modality kind requires the parameters a reader
needs (a spectrogram's shape, a frame's size, ...) and types the ones the builder
records; a recipe may record further parameters, which the fingerprint covers.
"""

from __future__ import annotations

from typing import Any

import jsonschema

# Counts and sizes stay below this (a 1 TiB shard, a trillion samples: past any build), so
# no number read from a manifest can size an allocation or overflow an int64.
MAX_COUNT = 1 << 40
SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
COUNT = {"type": "integer", "minimum": 0, "maximum": MAX_COUNT}
POSITIVE = {"type": "integer", "minimum": 1, "maximum": MAX_COUNT}
NAME = {"type": "string", "minLength": 1}
SPLIT_NAME = "^[a-z]+$"  # the split part of a shard name, spec.SHARD_PATTERN
MAX_DEPTH = 32  # a real manifest nests 6 levels; refuse far deeper input before walking it
IDENTITY_SINCE = 2  # the spec version whose manifests record membership and raw hashes
ERROR_CHARS = 240  # longest reason quoted from the validator (it may repr a huge value)
SHOWN_CHARS = 60  # characters of a string value quoted in a reason

SPECTROGRAM = {
    "required": ["shape", "dtype"],
    "properties": {
        "shape": {"type": "array", "prefixItems": [POSITIVE, POSITIVE], "items": False,
                  "minItems": 2},
        "dtype": {"const": "float16"},
        "seconds": {"type": "number", "exclusiveMinimum": 0},
        "sample_rate": POSITIVE, "n_fft": POSITIVE, "hop_length": POSITIVE,
        "log_eps": {"type": "number"}, "center": {"type": "boolean"},
        "clip": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
    },
}
FRAMES = {
    "required": ["num_frames", "size"],
    "properties": {"num_frames": POSITIVE, "size": POSITIVE, "encoding": {"const": "jpeg"},
                   "quality": {"type": "integer", "minimum": 1, "maximum": 100},
                   "color": {"const": "RGB"}},
}
IMAGE = {
    "required": ["shorter_side"],
    "properties": {"shorter_side": POSITIVE, "encoding": {"const": "jpeg"},
                   "quality": {"type": "integer", "minimum": 1, "maximum": 100},
                   "exif_transpose": {"type": "boolean"}, "color": {"const": "RGB"}},
}
TOKENS = {
    "required": ["max_length", "vocab_size"],
    "properties": {"max_length": {"type": "integer", "minimum": 2}, "vocab_size": POSITIVE,
                   "tokenizer": NAME, "vocab_sha256": SHA256, "lowercase": {"type": "boolean"}},
}
FEATURES = {  # precomputed feature sequences (T steps x D features), e.g. CMU-MOSEI's
    "required": ["shape", "dtype"],
    "properties": {
        "shape": {"type": "array", "prefixItems": [POSITIVE, POSITIVE], "items": False,
                  "minItems": 2},
        "dtype": {"const": "float32"},
        "features": NAME, "source": NAME, "neg_inf": {"const": "zero"},
    },
}
FLOW = {
    "required": ["num_snippets", "stack", "size"],
    "properties": {"num_snippets": POSITIVE, "stack": POSITIVE, "size": POSITIVE,
                   "encoding": {"const": "jpeg"},
                   "bound": {"type": "number", "exclusiveMinimum": 0},
                   "quality": {"type": "integer", "minimum": 1, "maximum": 100}},
}
KINDS = {"spectrogram": SPECTROGRAM, "frames": FRAMES, "image": IMAGE, "tokens": TOKENS,
         "flow": FLOW}
KINDS["features"] = FEATURES

MODALITY = {
    "type": "object",
    "required": ["kind"],
    "properties": {"kind": {"enum": list(KINDS)}},
    "allOf": [{"if": {"properties": {"kind": {"const": kind}}}, "then": rules}
              for kind, rules in KINDS.items()],
}
# spec.KEY_PATTERN, '=', the class index (at most 9 digits: int() of a longer one may fail)
LABELLED_KEY = "[A-Za-z0-9_-]+=(0|[1-9][0-9]{0,8})"
SHARD = {
    "type": "object",
    "required": ["name", "num_samples", "bytes", "sha256"],
    "additionalProperties": False,
    "properties": {"name": NAME, "num_samples": POSITIVE, "bytes": POSITIVE, "sha256": SHA256,
                   # its samples in file order (spec.format_membership); absent in manifests
                   # written before builds recorded it
                   "membership": {"type": "string",
                                  "pattern": f"^{LABELLED_KEY}( {LABELLED_KEY})*$"}},
}
SPLIT = {
    "type": "object",
    "required": ["num_samples", "shards"],
    "additionalProperties": False,
    "properties": {"num_samples": COUNT, "shards": {"type": "array", "items": SHARD},
                   "class_counts": {"type": "array", "items": COUNT},
                   "membership_sha256": SHA256},
}
SKIPPED = {
    "type": "object",
    "required": ["id", "split", "reason"],
    "additionalProperties": False,
    "properties": {"id": {"type": "string"}, "split": {"type": ["string", "null"]},
                   "reason": NAME, "detail": {"type": "string"}},
}
SOURCES = {
    "type": "object",
    "properties": {
        "split_files": {"type": "object", "additionalProperties": SHA256},
        # the raw files' digest, under the name of its algorithm (sha256 before blake3)
        "raw": {"type": "object", "required": ["num_files"], "additionalProperties": False,
                "properties": {"num_files": COUNT, "sha256": SHA256, "blake3": SHA256},
                "oneOf": [{"required": ["sha256"]}, {"required": ["blake3"]}]},
        "split": {"type": "object"},
        "shard_size": POSITIVE,
        "build": {"type": "object"},
        "recipe": {"type": "object"},  # what a recipe records of its choices (facts())
    },
}
MANIFEST = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["spec_version", "dataset", "classes", "modalities", "splits", "skipped",
                 "sources", "fingerprint", "tool_version"],
    "additionalProperties": False,
    "properties": {
        "spec_version": {"type": "integer"},
        "dataset": NAME,
        "classes": {"type": "array", "items": NAME, "minItems": 1, "uniqueItems": True},
        "modalities": {"type": "object", "minProperties": 1, "additionalProperties": MODALITY},
        "splits": {"type": "object", "propertyNames": {"pattern": SPLIT_NAME},
                   "additionalProperties": SPLIT},
        "skipped": {"type": "array", "items": SKIPPED},
        "sources": SOURCES,
        "fingerprint": SHA256,
        "tool_version": NAME,
    },
    # Spec v2 added the identity hashes: per split its membership, under sources the raw files.
    "if": {"properties": {"spec_version": {"minimum": IDENTITY_SINCE}}},
    "then": {"properties": {
        "splits": {"additionalProperties": {"required": ["membership_sha256"]}},
        "sources": {"required": ["raw"]},
    }},
}


def _is_integer(checker: Any, instance: Any) -> bool:
    """JSON's integers as a writer of this format writes them: ``16.0`` is a float, not a
    count (JSON Schema alone would accept it, and ``range(16.0)`` fails far from here)."""
    return isinstance(instance, int) and not isinstance(instance, bool)


_VALIDATOR = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)(MANIFEST)
JSON_TYPES = {"boolean": bool, "integer": int, "number": float, "string": str, "array": list,
              "object": dict, "null": type(None)}
ARTICLES = {"integer": "an integer", "array": "an array", "object": "an object", "null": "null"}


def json_path(parts: Any) -> str:
    """``splits.train.shards[0]`` from the keys and indices of a place in the manifest."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".")


def with_article(type_name: str) -> str:
    """'an array', 'a string': a JSON type name as a sentence says it."""
    return ARTICLES.get(type_name, f"a {type_name}")


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type: 'array', 'string', ..."""
    return next(name for name, kind in JSON_TYPES.items() if isinstance(value, kind))


def _type_reason(error: jsonschema.ValidationError) -> str:
    wanted = error.validator_value
    wanted = " or ".join(map(with_article, wanted)) if isinstance(wanted, list) \
        else with_article(wanted)
    value = error.instance
    shown = f"{value!r} " if isinstance(value, (str, int, float)) and len(repr(value)) < 40 \
        else ""
    return f"{shown}is {with_article(json_type(value))}, not {wanted}"


def too_deep(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """The path of the first place nested deeper than ``limit`` levels, or None.

    Walked with an explicit stack, so no input can exhaust Python's recursion limit.
    """
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > limit:
            return json_path(path[:limit])
        if isinstance(node, dict):
            stack.extend((child, (*path, key)) for key, child in node.items())
        elif isinstance(node, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(node))
    return None


def first_error(manifest: Any) -> str | None:
    """``'<json path>: <what is wrong>'`` for the most relevant departure from the schema,
    or None when ``manifest`` is valid."""
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(manifest))
    if error is None:
        return None
    if error.validator == "type":
        reason = _type_reason(error)
    elif error.validator == "pattern":  # quote the start of a long string, then the rule
        value = error.instance
        shown = repr(value) if len(value) <= SHOWN_CHARS else f"{value[:SHOWN_CHARS]!r}..."
        reason = f"{shown} does not match {error.validator_value!r}"
    else:
        reason = error.message
        if len(reason) > ERROR_CHARS:
            reason = reason[:ERROR_CHARS] + "..."
    return f"{json_path(error.absolute_path) or 'top level'}: {reason}"
