"""AVE (Audio-Visual Event): ``AVE/<VideoID>.mp4`` 10 s clips, 4143 events of 28 categories.

``Annotations.txt`` (beside ``AVE/``) and the split files ``trainSet.txt``, ``valSet.txt``,
``testSet.txt`` have ``Category&VideoID&Quality&StartTime&EndTime`` rows (LF; the
annotations with that header line, the split files without, as in the AVE zip). A sample
is one event row, keyed ``<VideoID>_<class index>``: 45 videos carry two events, always
over the same window with two categories (most: male and female speech), so the video id
alone is not a key, and the pair (video, category) is unique.

Rules (docs/datasets.md, "AVE"):
- frames and audio come from the event window [StartTime, EndTime) (``--window event``),
  or the whole clip (``--window clip``);
- the one zero-length row (``Church bell&VWi2ENBuTbw&good&0&0``, in train) has no event to
  read in either mode: it is skipped and recorded with its split;
- a video listed in two splits (10 train and val, 8 train and test; the same window, two
  categories) is kept in both, as published (``--shared-videos keep``), or its train row
  is skipped and recorded (``--shared-videos held-out``); the manifest records which.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from ccat.data import spec
from preprocess.datasets import (SEED, SYNTH_STRENGTH, LayoutError, OwnLists, Published, Range,
                                 check_choice, option, register)
from preprocess.datasets.audio_video import (AudioVideo, frame_size_option, num_frames_option,
                                             seconds_option)
from preprocess.splits import Entry, SplitError, SplitRow, numbered_lines

# The 28 categories in order of first appearance in Annotations.txt: DG-SCT's
# data/AVE/categories.txt and the order of testSet.txt, which DI-MML's labels follow.
CLASSES = ["Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane",
           "Race car, auto racing", "Female speech, woman speaking", "Helicopter",
           "Violin, fiddle", "Flute", "Ukulele", "Frying (food)", "Truck", "Shofar",
           "Motorcycle", "Acoustic guitar", "Train horn", "Clock", "Banjo", "Goat",
           "Baby cry, infant cry", "Bus", "Chainsaw", "Cat", "Horse", "Toilet flush",
           "Rodents, rats, mice", "Accordion", "Mandolin"]
HEADER = "Category&VideoID&Quality&StartTime&EndTime"
MEDIA_DIR, MEDIA_SUFFIX = "AVE", ".mp4"
ANNOTATIONS = "Annotations.txt"
SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
CLIP_SECONDS = 10  # every AVE clip; StartTime and EndTime are whole seconds in 0..10
DEFAULT_SECONDS = 10.0  # the clip's length: an event shorter than it is tiled (media rule)
WINDOWS = ("event", "clip")
SHARED_VIDEOS = ("keep", "held-out")
PUBLISHED = Published(
    lists_url="https://raw.githubusercontent.com/haoyi-duan/DG-SCT/main/data/AVE/",
    split_files=dict(SPLIT_FILES),
    media_by_hand=("AVE media are in the authors' AVE_Dataset.zip (Google Drive, linked from "
                   "https://github.com/YapengTian/AVE-ECCV18: https://drive.google.com/open?id="
                   "1FjKwe79e0u96vdjIVwfRQ1V6SoDHe7kK); unzip it so that {target} holds "
                   "AVE/<VideoID>.mp4 and Annotations.txt"))
SYNTH_EVENTS = Range(2, 500)
SYNTH_CLASSES = Range(2, len(CLASSES))
SYNTH_FPS = Range(1, 30)


def parse_row(path: Path, number: int, line: str) -> tuple[int, str, int, int]:
    """``(class index, video id, start, end)`` of one ``&`` row; a malformed row is a
    SplitError naming the file, the line and the expected form."""
    fields = line.split("&")
    if len(fields) != 5 or fields[0] not in CLASSES or not all(
            f.isdigit() for f in fields[3:]) or not fields[1]:
        raise SplitError(f"{path} line {number} is {line!r}; AVE lists have "
                         f"'{HEADER}' rows with one of the 28 AVE categories and whole "
                         "seconds")
    return CLASSES.index(fields[0]), fields[1], int(fields[3]), int(fields[4])


def read_rows(path: Path) -> list[tuple[int, tuple[int, str, int, int]]]:
    """``(line number, row)`` of an AVE list, its header line (if any) left out."""
    return [(number, parse_row(path, number, line)) for number, line in numbered_lines(path)
            if line != HEADER]


def key_of(label: int, video: str) -> str:
    """A sample's key: the video id and the class index (unique over the dataset)."""
    return f"{video}_{label}"


def window_problem(start: int, end: int) -> str:
    """Why ``[start, end)`` is no event window to read, or ""."""
    if start == end:
        return "zero-length event window (StartTime = EndTime)"
    if not 0 <= start < end <= CLIP_SECONDS:
        return f"event window is not within the {CLIP_SECONDS} s clip"
    return ""


@dataclass
class AveSynth:
    """A small AVE tree: AVE/<id>.mp4 10 s clips, Annotations.txt and the split files."""

    events: int = option(56, "Number of events (one video each), round robin over the "
                             "classes; every fifth is val, the next fifth test.",
                         within=SYNTH_EVENTS)
    classes: int = option(4, "Number of categories (the first of AVE's 28).",
                          within=SYNTH_CLASSES)
    seed: int = option(0, "Seed: same seed, same files.", within=SEED)
    easy: str = option("audio", "The easy modality: audio or video.")
    hard_strength: float = option(1.0, "Scale of the hard cue (0 removes it).",
                                  within=SYNTH_STRENGTH)
    fps: int = option(8, "Frame rate of the clips.", within=SYNTH_FPS)
    videos_of: Optional[Path] = option(None, "A real Annotations.txt: write media for the "
                                             "first --events of its videos instead of "
                                             "made-up events (no list files are written).")
    title: ClassVar[str] = "synthetic AVE"

    def __post_init__(self) -> None:
        check_choice("--easy", self.easy, ("audio", "video"))

    @property
    def total(self) -> int:
        return self.events

    def write(self, out: Path, progress: Callable[[int], None]) -> str:
        """Write the tree; a line saying what was written."""
        from preprocess.datasets.synth_clips import (ClipStyle, ave_rows, synthesize_ave,
                                                     write_ave_lists)

        style = ClipStyle(self.easy, self.hard_strength, fps=self.fps)
        if self.videos_of is None:
            rows = ave_rows(self.events, CLASSES[:self.classes], self.seed)
            counts = write_ave_lists(out, rows)
            said = "; lists: " + ", ".join(f"{s} {n}" for s, n in counts.items())
        else:
            real = [(CLASSES[r[0]], r[1], r[2], r[3]) for _, r in read_rows(self.videos_of)]
            videos = list(dict.fromkeys(r[1] for r in real))[:self.events]
            rows, said = [r for r in real if r[1] in set(videos)], f" of {self.videos_of}"
        written = synthesize_ave(out, rows, CLASSES, self.seed, style, progress)
        return f"wrote {len(written)} AVE clips to {out}{said} ({self.easy} is the easy modality)"


@register("ave")
@dataclass
class Ave(AudioVideo):
    """AVE: AVE/<VideoID>.mp4 + Annotations.txt -> spectrograms + frames of each event."""

    window: str = option("event", "event: frames and audio from [StartTime, EndTime); "
                                  "clip: from the whole 10 s clip.")
    shared_videos: str = option("keep", "A video in two splits: keep (both rows, as "
                                        "published) or held-out (its train row skipped).")
    annotations: Optional[Path] = option(None, "The Annotations.txt to read (default: "
                                               "RAW/Annotations.txt).")
    seconds: float = seconds_option(DEFAULT_SECONDS,
                                    "Fixed audio duration: an event is tiled to it.")
    frame_size: int = frame_size_option()
    num_frames: int = num_frames_option("Frames sampled per event (segment centres of its "
                                        "window).")
    classes: list[str] = field(init=False, default_factory=lambda: list(CLASSES))
    windows: dict[str, tuple[int, int]] = field(init=False, default_factory=dict)
    unit: ClassVar[str] = "events"
    name: ClassVar[str] = "ave"
    published: ClassVar[Published] = PUBLISHED
    synth: ClassVar[type] = AveSynth

    def __post_init__(self) -> None:
        check_choice("--window", self.window, WINDOWS)
        check_choice("--shared-videos", self.shared_videos, SHARED_VIDEOS)

    def _annotations(self, raw: Path) -> Path:
        return self.annotations or raw / ANNOTATIONS

    def find(self, raw: Path) -> tuple[dict[str, Entry], list[dict[str, Any]]]:
        if not raw.is_dir():
            raise LayoutError(f"{raw} does not exist; pass the unzipped AVE_Dataset folder "
                              f"that holds {MEDIA_DIR}/ and {ANNOTATIONS}")
        path = self._annotations(raw)
        if not path.is_file():
            raise LayoutError(f"{path} does not exist; AVE's {ANNOTATIONS} lists the events "
                              f"(it is in AVE_Dataset.zip beside {MEDIA_DIR}/), or pass "
                              "--annotations FILE")
        entries, unusable, self.windows = {}, [], {}
        for number, (label, video, start, end) in read_rows(path):
            key = key_of(label, video)
            clip = f"{MEDIA_DIR}/{video}{MEDIA_SUFFIX}"
            problem = window_problem(start, end)
            if key in self.windows:
                problem = f"the same event is annotated twice ({ANNOTATIONS} line {number})"
            elif not spec.KEY_PATTERN.match(key):
                problem = "video id is not a YouTube id"
            elif not problem and not (raw / clip).is_file():
                problem = "no media for this id"
            self.windows.setdefault(key, (start, end))
            if problem:
                unusable.append({"id": key, "split": None, "reason": problem})
            else:
                entries[key] = Entry(key, label, {"clip": clip})
        return entries, unusable

    def list_files(self, raw: Path) -> dict[str, Path]:
        """Annotations.txt, and the split files beside it (a ``--split`` of the same
        split name replaces one in the manifest's hashes)."""
        return {"annotations": self._annotations(raw), **self._zip_split_files(raw)}

    def read_split_file(self, path: Path) -> list[SplitRow]:
        return [SplitRow(key_of(label, video), label, number)
                for number, (label, video, _, _) in read_rows(path)]

    def own_lists(self, raw: Path, found: dict[str, Entry],
                  split_files: dict[str, Path]) -> OwnLists:
        """The split files (``--split``, RAW/splits/ or, as the zip has them, beside
        Annotations.txt) read as they are, less the train rows of videos held out by
        ``--shared-videos held-out``; the rules go into the manifest."""
        files = split_files or self._zip_split_files(raw)
        rows = {name: self.read_split_file(path) for name, path in sorted(files.items())}
        splits_of: dict[str, set[str]] = defaultdict(set)
        for name, members in rows.items():
            for row in members:
                splits_of[row.key.rsplit("_", 1)[0]].add(name)
        shared = sorted(v for v, names in splits_of.items() if len(names) > 1)
        skipped = []
        if self.shared_videos == "held-out" and "train" in rows:
            held = {v for v in shared if "train" in splits_of[v]}
            skipped = [{"id": r.key, "split": "train", "reason": "video also in val or test "
                        "(--shared-videos held-out)"} for r in rows["train"]
                       if r.key.rsplit("_", 1)[0] in held]
            rows["train"] = [r for r in rows["train"] if r.key.rsplit("_", 1)[0] not in held]
        record = {"window": self.window, "shared_videos": self.shared_videos,
                  "videos_in_two_splits": shared, "class_order": "annotations-first-appearance",
                  "split_files": {name: path.name for name, path in sorted(files.items())}}
        return OwnLists(rows, skipped, record)

    def _zip_split_files(self, raw: Path) -> dict[str, Path]:
        """trainSet.txt, valSet.txt and testSet.txt beside Annotations.txt, where the AVE
        zip has them; none when none is there (then splits are carved, seeded)."""
        files = {name: self._annotations(raw).parent / file for name, file in SPLIT_FILES.items()}
        present = [path for path in files.values() if path.is_file()]
        if present and len(present) < len(files):
            raise SplitError(f"{self._annotations(raw).parent} holds "
                             f"{', '.join(p.name for p in present)} but not all of "
                             f"{', '.join(SPLIT_FILES.values())}; restore them or name each "
                             "split file with --split")
        return files if present else {}

    def process(self, raw: Path, entry: Entry) -> tuple[dict[str, bytes], dict[str, Any]]:
        path = raw / entry.sources["clip"]
        event = self.windows[entry.key]
        window = (float(event[0]), float(event[1])) if self.window == "event" else None
        members, meta = self.encode_clip(path, path, window)
        return members, {**meta, "event": list(event)}
