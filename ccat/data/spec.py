"""The shard format, spec version 2: the one place that defines it.

A built dataset is a folder (or URL prefix) holding WebDataset tar shards named
``<split>-NNNNNN.tar`` and a ``manifest.json`` written last. One sample is the set of
tar members that share a key (the clip id, which never contains a dot):

    <key>.audio.npy        float16 log-magnitude spectrogram [n_fft // 2 + 1, T]
    <key>.video.<i>.jpg    frame i of the sampled frames, RGB JPEG
    <key>.image.jpg        RGB JPEG image
    <key>.text.ids.npy     int32 token ids with [CLS]/[SEP], no padding
    <key>.text.txt         the decoded text (UTF-8)
    <key>.<modality>.npy   float32 feature sequence [T, D] (kind ``features``)
    <key>.label.cls        the class index, ASCII digits
    <key>.meta.json        provenance of the sample

This module is the contract: names, the manifest and its checks, and the fingerprint.
How the members are encoded and the tar stream read is :mod:`ccat.data.shardio`; which
members a modality stores, and how they decode into one array, depends on its kind:
:mod:`ccat.data.kinds` holds that table, built on shardio's codecs. Both the builder
(``preprocess``) and the trainer (``ccat``) import these three modules, and nothing else
crosses that boundary.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
                  "sources.raw.blake3": "the content of the raw files",
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



def encode_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace variation."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ---------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardInfo:
    """A shard entry of the manifest; ``membership`` as :func:`format_membership` writes it
    (None in a manifest written before builds recorded it)."""

    name: str
    num_samples: int
    bytes: int
    sha256: str
    membership: str | None = None


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
    _check_listed_once(manifest, where)
    if compute_fingerprint(manifest) != manifest["fingerprint"]:
        raise SpecError(f"{where}: manifest edited after build: its fingerprint does not match "
                        "its contents; rebuild or restore it")
    _check_recorded_membership(manifest, where)


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


def _check_listed_once(manifest: dict[str, Any], where: str) -> None:
    """Every shard is listed once: a shard listed twice would be read twice per epoch."""
    first: dict[str, str] = {}
    for split, entry in manifest["splits"].items():
        for i, shard in enumerate(entry["shards"]):
            place = f"splits.{split}.shards[{i}]"
            if shard["name"] in first:
                raise SpecError(f"{where}: {place} lists {shard['name']}, which "
                                f"{first[shard['name']]} lists too; a shard is listed once, "
                                "restore manifest.json or rebuild the dataset")
            first[shard["name"]] = place


def _check_recorded_membership(manifest: dict[str, Any], where: str) -> None:
    """The per-shard membership a manifest records is the one its fingerprint covers (a
    manifest written before builds recorded it has none; readers learn it from the shards)."""
    shards = [s for entry in manifest["splits"].values() for s in entry["shards"]]
    recorded = sum(s.get("membership") is not None for s in shards)
    if recorded == 0:
        return
    problem = (membership_problem(manifest) if recorded == len(shards)
               else "some shards record their membership and others do not")
    if problem:
        raise SpecError(f"{where}: manifest edited after build: {problem}; rebuild or "
                        "restore it")


def membership_problem(manifest: dict[str, Any]) -> str | None:
    """What departs, or None, when the per-shard membership of ``manifest`` (every shard's
    ``membership`` set) is checked against what the fingerprint covers: each shard lists
    its ``num_samples`` samples, every label is a class, no key is listed twice in the
    whole build, each split's lists hash to its ``membership_sha256`` and count its
    ``class_counts``."""
    seen: dict[str, str] = {}
    num_classes = len(manifest["classes"])
    for split, entry in manifest["splits"].items():
        rows: list[tuple[str, int]] = []
        for shard in entry["shards"]:
            here = parse_membership(shard["membership"])
            problem = _shard_membership_problem(shard, here, num_classes, seen)
            if problem:
                return problem
            rows += here
        if membership_sha256(rows) != entry["membership_sha256"]:
            return (f"the keys and labels of split {split!r} are not the membership its "
                    f"fingerprint covers (splits.{split}.membership_sha256)")
        counts = entry.get("class_counts")
        if counts is not None and counts != _histogram(rows, num_classes):
            return (f"split {split!r} holds {_histogram(rows, num_classes)} samples per class, "
                    f"its class_counts say {counts}")
    return None


def _shard_membership_problem(shard: dict[str, Any], rows: list[tuple[str, int]],
                              num_classes: int, seen: dict[str, str]) -> str | None:
    """One shard's part of :func:`membership_problem`; adds its keys to ``seen``."""
    if len(rows) != shard["num_samples"]:
        return (f"{shard['name']} has {len(rows)} samples in its membership but "
                f"num_samples {shard['num_samples']}")
    for key, label in rows:
        if key in seen:
            return f"sample {key!r} is in {seen[key]} and in {shard['name']}"
        if not 0 <= label < num_classes:
            return (f"{shard['name']} labels sample {key!r} {label}, not a class index "
                    f"(0..{num_classes - 1})")
        seen[key] = shard["name"]
    return None


def _histogram(rows: list[tuple[str, int]], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for _, label in rows:
        counts[label] += 1
    return counts


def format_membership(rows: list[tuple[str, int]] | list[list[Any]]) -> str:
    """A shard's ``membership`` field: its samples in file order as ``key=label`` words
    joined by single spaces (keys hold neither), so manifest.json keeps one line per shard."""
    return " ".join(f"{key}={int(label)}" for key, label in rows)


def parse_membership(text: str) -> list[tuple[str, int]]:
    """``[(key, label), ...]`` of a ``membership`` field the schema has checked."""
    return [(key, int(label)) for key, _, label in
            (word.partition("=") for word in text.split())]


def check_shard_name(name: str, where: str = "manifest.json") -> None:
    """Shard names are plain file names; refuse anything that could leave the dataset."""
    if not SHARD_PATTERN.fullmatch(name):  # match() would let a trailing newline through
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
    # tuples sort about twice as fast as lists and encode to the same JSON arrays
    return hashlib.sha256(encode_json(sorted((str(k), int(v)) for k, v in rows))).hexdigest()


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
