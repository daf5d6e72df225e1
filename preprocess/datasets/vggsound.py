"""VGGSound: 10 s YouTube clips of 309 sound classes, about 200k listed, many gone.

The official list ``vggsound.csv`` has ``<youtube id>,<start seconds>,<label>,<train|test>``
rows (no header, LF, labels holding a comma double-quoted); hche11's ``test.csv`` and the
like have ``<youtube id>_<start:06d>.mp4,<label>`` rows (CRLF). A split file of either form
is given per split (``--split train=vggsound.csv --split test=vggsound.csv``, or
``--split test=test.csv``); from a four-column file a split takes the rows marked with its
name. Clips are found recursively, flat or in per-class folders, named
``<youtube id>_<start:06d>.mp4`` (the released names) or unpadded ``<youtube id>_<start>``
(OGM-GE's); both map to one key, ``<youtube id>_<start seconds>``. A listed clip without
media is skipped and counted per split. There is no published validation split: it is
carved from train, seeded and stratified (``--seed``, ``--val-fraction``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from ccat.data import spec
from preprocess.datasets import (SEED, SYNTH_STRENGTH, LayoutError, OwnLists, Published, Range,
                                 check_choice, option, register)
from preprocess.datasets.audio_video import (VIDEO_SUFFIXES, AudioVideo, clip_files,
                                             frame_size_option, keyed_clips,
                                             num_frames_option, seconds_option)
from preprocess.splits import UNKNOWN_LABEL, Entry, SplitError, SplitRow, numbered_lines

DEFAULT_SECONDS = 10.0  # the clips' length
YOUTUBE_ID_LENGTH = 11
LIST_NAME = "vggsound.csv"
CLASS_ORDERS = ("sorted", "first-appearance")
PUBLISHED = Published(
    lists_url="https://raw.githubusercontent.com/hche11/VGGSound/master/data/",
    split_files={"train": LIST_NAME, "test": LIST_NAME},
    media_by_hand=("VGGSound media are YouTube clips: fetch each row of vggsound.csv with a "
                   "YouTube downloader (e.g. yt-dlp, 10 s from its start second) into "
                   "{target}, named <youtube id>_<start:06d>.mp4, flat or in per-class "
                   "folders; many source videos are gone, and the build counts the missing "
                   "ones per split"))
SYNTH_CLIPS = Range(2, 2000)
SYNTH_CLASSES = Range(2, 309)
SYNTH_FPS = Range(1, 30)
SYNTH_SIDE = Range(16, 1280)
SYNTH_LABELS = ("dog barking", "bird chirping, tweeting", "playing violin, fiddle",
                "car engine starting", "rain on surface", "church bell ringing")


def clip_key(stem: str) -> str | None:
    """``<youtube id>_<start seconds>`` of ``<id>_<start:06d>`` or ``<id>_<start>``, or None
    when ``stem`` is neither."""
    youtube_id, sep, start = stem[:YOUTUBE_ID_LENGTH], stem[YOUTUBE_ID_LENGTH:12], stem[12:]
    if sep != "_" or not start.isdigit() or not start.isascii():
        return None
    key = f"{youtube_id}_{int(start)}"
    return key if spec.KEY_PATTERN.match(key) else None


def read_list(path: Path, split: str) -> list[tuple[str, str, int]]:
    """``(key, label, line)`` of the rows of a VGGSound list that belong to ``split``: every
    row of a two-column file, the rows marked ``split`` of a four-column one."""
    rows = []
    lines = numbered_lines(path)  # a BOM, CRLF and empty lines are fine
    for (number, line), fields in zip(lines, csv.reader(line for _, line in lines)):
        if len(fields) == 4 and fields[1].strip().isdigit():
            key = clip_key(f"{fields[0].strip()}_{fields[1].strip()}")
            if key is not None and fields[3].strip() in ("train", "test", "val"):
                if fields[3].strip() == split:
                    rows.append((key, fields[2].strip(), number))
                continue
        elif len(fields) == 2:
            name = fields[0].strip()
            key = clip_key(Path(name).stem) if Path(name).suffix in VIDEO_SUFFIXES else None
            if key is not None and fields[1].strip():
                rows.append((key, fields[1].strip(), number))
                continue
        raise SplitError(f"{path} line {number} is {line!r}; VGGSound lists have "
                         "'<youtube id>,<start>,<label>,<train|test>' rows (vggsound.csv) or "
                         "'<youtube id>_<start:06d>.mp4,<label>' rows (test.csv)")
    if not rows:
        raise SplitError(f"{path} has no rows of split {split}; name it as the split its rows "
                         f"are marked with (--split train={path.name} --split test={path.name})")
    return rows


def class_order(rows: dict[str, list[tuple[str, str, int]]], found: dict[str, Entry],
                order: str) -> list[str]:
    """The labels, sorted, or in the peers' order: first appearance among the train rows
    whose clips are on disk (OGM-GE VGGSoundDataset.py, BalanceBenchmark VGG_dataset.py),
    then the labels only other rows name, in order of first appearance."""
    labels = {label for members in rows.values() for _, label, _ in members}
    if order == "sorted":
        return sorted(labels)
    ordered = [label for key, label, _ in rows.get("train", []) if key in found]
    ordered += [label for name in sorted(rows) for _, label, _ in rows[name]]
    return list(dict.fromkeys(ordered))


@dataclass
class VggsoundSynth:
    """A small VGGSound tree: <id>_<start:06d>.mp4 clips (H.264 + AAC) and vggsound.csv."""

    clips: int = option(24, "Number of clips, round robin over the classes; every fourth "
                            "of a class is test.", within=SYNTH_CLIPS)
    classes: int = option(4, "Number of classes (made-up labels, some with a comma).",
                          within=SYNTH_CLASSES)
    seed: int = option(0, "Seed: same seed, same files.", within=SEED)
    easy: str = option("audio", "The easy modality: audio or video.")
    hard_strength: float = option(1.0, "Scale of the hard cue (0 removes it).",
                                  within=SYNTH_STRENGTH)
    seconds: float = option(10.0, "Clip length, s.", within=Range(0.5, 10.0))
    fps: int = option(8, "Frame rate of the clips.", within=SYNTH_FPS)
    width: int = option(64, "Video width, px (even).", within=SYNTH_SIDE)
    height: int = option(48, "Video height, px (even).", within=SYNTH_SIDE)
    names: str = option("padded", "File names: padded (<id>_<start:06d>.mp4) or unpadded "
                                  "(<id>_<start>.mp4).")
    folders: str = option("flat", "flat, or per-class (a folder per label).")
    clips_of: Optional[Path] = option(None, "A real VGGSound list: write media for its first "
                                            "--clips rows instead (no list is written).")
    title: ClassVar[str] = "synthetic VGGSound"

    def __post_init__(self) -> None:
        check_choice("--easy", self.easy, ("audio", "video"))
        check_choice("--names", self.names, ("padded", "unpadded"))
        check_choice("--folders", self.folders, ("flat", "per-class"))

    @property
    def total(self) -> int:
        return self.clips

    def write(self, out: Path, progress: Callable[[int], None]) -> str:
        """Write the tree; a line saying what was written."""
        from preprocess.datasets.synth_clips import (ClipStyle, synthesize_vggsound,
                                                     vggsound_csv, youtube_ids)

        style = ClipStyle(self.easy, self.hard_strength, self.width, self.height, self.fps,
                          self.seconds)
        if self.clips_of is None:
            labels = [SYNTH_LABELS[i % len(SYNTH_LABELS)] + ("" if i < len(SYNTH_LABELS)
                                                             else f" {i}")
                      for i in range(self.classes)]
            rows = [(video, 10 * (i % 30), labels[i % self.classes],
                     "test" if (i // self.classes) % 4 == 3 else "train")
                    for i, video in enumerate(youtube_ids(self.clips, self.seed))]
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / LIST_NAME).write_text(vggsound_csv(rows))
            clips, said = [(v, s, label) for v, s, label, _ in rows], f" and {LIST_NAME}"
        else:
            listed = [row for split in ("train", "test") for row in
                      _rows_or_none(self.clips_of, split)][:self.clips]
            clips = [(k[:YOUTUBE_ID_LENGTH], int(k[12:]), label) for k, label, _ in listed]
            labels, said = sorted({c[2] for c in clips}), f" of {self.clips_of}"
        synthesize_vggsound(out, clips, labels, self.seed, style,
                            padded=self.names == "padded", per_class=self.folders == "per-class",
                            progress=progress)
        return f"wrote {len(clips)} VGGSound clips to {out}{said} ({self.easy} is the easy modality)"


def _rows_or_none(path: Path, split: str) -> list[tuple[str, str, int]]:
    """The rows of ``split`` in a list, none when it has none (a two-column file has all)."""
    try:
        return read_list(path, split)
    except SplitError:
        return []


@register("vggsound")
@dataclass
class Vggsound(AudioVideo):
    """VGGSound: clips (flat or per class) + vggsound.csv -> spectrograms + frames."""

    class_order: str = option("sorted", "Class indices: sorted (the labels sorted, as hche11's "
                                        "loader) or first-appearance (OGM-GE's and "
                                        "BalanceBenchmark's: among the train rows on disk).")
    seconds: float = seconds_option(DEFAULT_SECONDS, "Fixed audio duration: the clips' 10 s.")
    frame_size: int = frame_size_option()
    num_frames: int = num_frames_option()
    classes: list[str] = field(init=False, default_factory=list)
    folders: dict[str, str] = field(init=False, default_factory=dict)
    name: ClassVar[str] = "vggsound"
    published: ClassVar[Published] = PUBLISHED
    synth: ClassVar[type] = VggsoundSynth

    def __post_init__(self) -> None:
        check_choice("--class-order", self.class_order, CLASS_ORDERS)

    def find(self, raw: Path) -> tuple[dict[str, Entry], list[dict[str, Any]]]:
        if not raw.is_dir():
            raise LayoutError(f"{raw} does not exist; pass the folder that holds the VGGSound "
                              "clips (flat or in per-class folders)")
        found, unusable = keyed_clips(raw, clip_files(raw), clip_key)
        entries = {key: Entry(key, UNKNOWN_LABEL, {"clip": path.relative_to(raw).as_posix()})
                   for key, path in found.items()}
        self.folders = {key: path.parent.name for key, path in found.items()
                        if path.parent != raw}
        return entries, unusable

    def list_files(self, raw: Path) -> dict[str, Path]:
        return {}

    def read_split_file(self, path: Path) -> list[SplitRow]:
        """The rows of a two-column list (a four-column one needs its split: see own_lists)."""
        return [SplitRow(key, self.classes.index(label), number)
                for key, label, number in read_list(path, "")]

    def own_lists(self, raw: Path, found: dict[str, Entry],
                  split_files: dict[str, Path]) -> OwnLists:
        """Each split's rows of its file, the class order, and a clip whose class folder
        names another label than its row skipped; the choices go into the manifest."""
        if not split_files:
            raise SplitError(f"VGGSound needs its list: put {LIST_NAME} under {raw}/splits "
                             f"(`ccat-data download vggsound`) or pass --split "
                             f"train={LIST_NAME} --split test={LIST_NAME}")
        rows = {name: read_list(path, name) for name, path in sorted(split_files.items())}
        self.classes = class_order(rows, found, self.class_order)
        index = {label: i for i, label in enumerate(self.classes)}
        listed: dict[str, list[SplitRow]] = {}
        skipped = []
        for name, members in rows.items():
            listed[name] = []
            for key, label, number in members:
                folder = self.folders.get(key)
                if folder is not None and label not in (folder, folder.replace("_", " ")):
                    skipped.append({"id": key, "split": name, "reason": "split file label "
                                    "disagrees with the media folder",
                                    "detail": f"list says {label!r}, folder {folder!r}"})
                    continue
                listed[name].append(SplitRow(key, index[label], number))
        record = {"class_order": self.class_order,
                  "listed": {name: len(members) for name, members in rows.items()},
                  "missing_media": {name: sum(key not in found for key, _, _ in members)
                                    for name, members in rows.items()},
                  "val": "carved from train (seeded, stratified)" if "val" not in rows
                  else "listed"}
        return OwnLists(listed, skipped, record)
