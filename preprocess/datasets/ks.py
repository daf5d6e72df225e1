"""Kinetics-Sounds: 10 s YouTube clips (usually H.264 + AAC ``.mp4``), 31 actions.

Clips are found recursively by file name, flat or under per-class folders. The published
lists are ``<clip id>,10,<label index>`` rows (CRLF) in two id styles: train ids are
``<youtube id>_<start:06d>_<end:06d>``, test ids ``<youtube id>_<start seconds>``. Both
(and files named either way) map to one key, ``<youtube id>_<start seconds>``, so a clip is
found whichever style its list or its file name uses. Real copies of Kinetics are always
incomplete: listed clips without a file are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from ccat.data import spec
from preprocess.datasets import (SEED, SYNTH_COUNT, SYNTH_RELIABILITY, SYNTH_STRENGTH,
                                 LayoutError, Published, Range, check_choice, designs, option,
                                 register)
from preprocess.datasets.audio_video import (VIDEO_SUFFIXES, AudioVideo, clip_files,
                                             frame_size_option, keyed_clips,
                                             num_frames_option, seconds_option)
from preprocess.splits import (UNKNOWN_LABEL, Entry, SplitError, SplitRow, numbered_lines,
                               read_text_lines)

DEFAULT_SECONDS = 10.0  # the clips' length; the paper's pipeline and OGM-GE's KS code use it
YOUTUBE_ID_LENGTH = 11
PUBLISHED = Published(
    lists_url="https://raw.githubusercontent.com/GeWu-Lab/OGM-GE_CVPR2022/main/data/KineticSound/",
    split_files={"train": "train.txt", "test": "test.txt"},
    media_by_hand=("Kinetics-Sounds media are YouTube clips: fetch the listed ids with a "
                   "YouTube downloader (e.g. yt-dlp, 10 s from each id's start second) into "
                   "{target}; many source videos are gone, and the build counts the missing "
                   "ones"))
SYNTH_CLASSES = Range(2, 5)  # the synthetic tree's class count
SYNTH_SECONDS = Range(0.5, 60.0)  # a synthetic clip's length


def clip_key(clip_id: str) -> str | None:
    """``<youtube id>_<start seconds>`` for either id style, or None when it does not parse."""
    youtube_id, sep, rest = clip_id[:YOUTUBE_ID_LENGTH], clip_id[YOUTUBE_ID_LENGTH:12], \
        clip_id[12:]
    times = rest.split("_")
    if sep != "_" or len(youtube_id) != YOUTUBE_ID_LENGTH or not 1 <= len(times) <= 2 \
            or not all(t.isdigit() for t in times):
        return None
    key = f"{youtube_id}_{int(times[0])}"
    return key if spec.KEY_PATTERN.match(key) else None


def read_classes(path: Path) -> list[str]:
    names = read_text_lines(path)
    if len(set(names)) != len(names):
        raise SplitError(f"{path} names a class twice; give one class name a line")
    return names


@dataclass
class KineticsSoundsSynth:
    """A small Kinetics-Sounds tree: <class>/<id>_<start>.mp4, H.264 + AAC."""

    clips: int = option(60, "Number of clips, round robin over the classes.",
                        within=SYNTH_COUNT)
    classes: int = option(5, "Number of classes, 2 to 5.",
                          within=SYNTH_CLASSES)
    seed: int = option(0, "Seed: same seed, same files.", within=SEED)
    easy: str = option("audio", "The easy modality: audio or video.")
    design: str = option(designs.DEFAULT_DESIGN, designs.DESIGN_HELP)
    easy_reliability: Optional[float] = option(None, designs.RELIABILITY_HELP,
                                               within=SYNTH_RELIABILITY)
    hard_strength: Optional[float] = option(None, designs.STRENGTH_HELP, within=SYNTH_STRENGTH)
    seconds: float = option(2.0, "Clip length, s.", within=SYNTH_SECONDS)
    title: ClassVar[str] = "synthetic Kinetics-Sounds"

    def __post_init__(self) -> None:
        check_choice("--easy", self.easy, ("audio", "video"))
        check_choice("--design", self.design, tuple(designs.DESIGNS))

    @property
    def total(self) -> int:
        return self.clips

    def write(self, out: Path, progress: Callable[[int], None]) -> str:
        """Write the tree; a line saying what was written."""
        from preprocess.datasets.synth import synthesize_ks

        design = designs.resolve(self.design, self.easy_reliability, self.hard_strength)
        ids = synthesize_ks(out, self.clips, self.seed, easy=self.easy,
                            hard_strength=design.hard_strength,
                            easy_reliability=design.easy_reliability, num_classes=self.classes,
                            duration=self.seconds, progress=progress)
        return (f"wrote {len(ids)} clips in {self.classes} class folders to {out} "
                f"({designs.summary(self.easy, design)})")


@register("ks")
@dataclass
class KineticsSounds(AudioVideo):
    """Kinetics-Sounds: clips (.mp4/.mkv/.webm/.avi, flat or per class) -> spectrograms + frames.

    Audio from the clip's own audio track, frames from its video track."""

    classes_file: Optional[Path] = option(None, "Class names, one a line, in label order (the "
                                                "lists' label indices).", flag="--classes")
    seconds: float = seconds_option(DEFAULT_SECONDS, "Fixed audio duration: the clips' 10 s.")
    frame_size: int = frame_size_option()
    num_frames: int = num_frames_option()
    classes: list[str] = field(init=False, default_factory=list)
    name: ClassVar[str] = "ks"
    published: ClassVar[Published] = PUBLISHED
    synth: ClassVar[type] = KineticsSoundsSynth

    def __post_init__(self) -> None:
        if self.classes_file is not None:
            self.classes = read_classes(self.classes_file)

    def find(self, raw: Path) -> tuple[dict[str, Entry], list[dict[str, Any]]]:
        if not raw.is_dir():
            raise LayoutError(f"{raw} does not exist; pass the folder that holds the "
                              "Kinetics-Sounds clips (flat or in per-class folders)")
        clips = clip_files(raw)
        if not clips:
            raise LayoutError(f"{raw} holds no {'/'.join(VIDEO_SUFFIXES)} clips; expected "
                              "Kinetics-Sounds clips named by clip id, flat or per class")
        if not self.classes:
            self.classes = sorted({p.parent.name for p in clips if p.parent != raw})
        found, unusable = keyed_clips(raw, clips, clip_key)
        entries = {key: Entry(key, self._label(path.parent.name),
                              {"clip": path.relative_to(raw).as_posix()})
                   for key, path in found.items()}
        return entries, unusable

    def _label(self, folder: str) -> int:
        """The class of a clip in ``folder``; unknown for a flat clip or another folder."""
        return self.classes.index(folder) if folder in self.classes else UNKNOWN_LABEL

    def list_files(self, raw: Path) -> dict[str, Path]:
        return {"classes": self.classes_file} if self.classes_file is not None else {}

    def read_split_file(self, path: Path) -> list[SplitRow]:
        if not self.classes:
            raise SplitError(f"{path} gives label indices only; pass --classes FILE with the "
                             "class names (one a line, in label order)")
        rows = []
        for number, line in numbered_lines(path):
            fields = [f.strip() for f in line.split(",")]
            key = clip_key(fields[0]) if fields else None
            if len(fields) != 3 or key is None or not fields[2].isdigit() \
                    or int(fields[2]) >= len(self.classes):
                raise SplitError(f"{path} line {number} is {line!r}; Kinetics-Sounds lists have "
                                 f"'<clip id>,<n>,<label 0..{len(self.classes) - 1}>' rows")
            rows.append(SplitRow(key, int(fields[2]), number))
        return rows
