"""CREMA-D: ``AudioWAV/<id>.wav`` and ``VideoFlash/<id>.flv`` per clip, 6 emotions.

Ids are ``<actor>_<sentence>_<emotion>_<level>``; the label is the third field.
Published split files are ``<id>,<EMO>`` rows (CRLF, sometimes with a UTF-8 BOM).

``--split-by actor`` makes the one published actor-disjoint split instead, TFDS
``crema_d``'s (tensorflow/datasets @1aceae88 tensorflow_datasets/audio/crema_d.py,
Apache-2.0): ``_get_inter_splits_by_group`` (lines 118-120) sorts the actor ids as strings
and shuffles them with ``np.random.RandomState(0)``; ``_compute_split_boundaries`` (lines
84-96) cuts them at ``int(cumulative share * 91)`` for the shares 0.7 / 0.1 / 0.2
(``split_probs``, line 182), so 63 / 9 / 19 actors; ``bad_files`` (lines 163-169) leaves
four clips out, giving
5144 / 738 / 1556 clips. ``--split-by actor-folds`` is a seeded k-fold over actors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import numpy as np

from ccat.data import spec
from preprocess import media
from preprocess.datasets import (SEED, SYNTH_COUNT, SYNTH_RELIABILITY, SYNTH_STRENGTH,
                                 LayoutError, OptionError, OwnLists, Published, Range,
                                 check_choice, check_options, designs, option, register)
from preprocess.datasets.audio_video import (AudioVideo, frame_size_option, num_frames_option,
                                             seconds_option)
from preprocess.splits import Entry, SplitError, SplitRow, numbered_lines

CLASSES = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
AUDIO_DIR, AUDIO_SUFFIX = "AudioWAV", ".wav"
VIDEO_DIR, VIDEO_SUFFIX = "VideoFlash", ".flv"
DEFAULT_SECONDS = 3.0  # published CREMA-D code (OGM-GE); the CCAT paper states 20 s
SYNTH_SIDE = Range(16, 640)  # synthetic video width or height, px
PUBLISHED = Published(
    lists_url="https://raw.githubusercontent.com/GeWu-Lab/OGM-GE_CVPR2022/main/data/CREMAD/",
    split_files={"train": "train.csv", "test": "test.csv"},
    media_repo="https://github.com/CheyneyComputerScience/CREMA-D.git",
    media_folders=(AUDIO_DIR, VIDEO_DIR))
ACTORS = tuple(str(actor) for actor in range(1001, 1092))  # CREMA-D's 91 actor ids
SPLIT_BY = ("random", "actor", "actor-folds")
TFDS_SHARES = (("train", 0.7), ("val", 0.1), ("test", 0.2))  # crema_d.py line 182
TFDS_SEED = 0  # crema_d.py line 183: _get_inter_splits_by_group(..., split_probs, 0)
# crema_d.py lines 163-169: clips TFDS leaves out ("file names which do not exist")
TFDS_DROPPED = ("1040_ITH_SAD_XX", "1006_TIE_NEU_XX", "1013_WSI_DIS_XX", "1017_IWW_FEA_XX")
FOLDS = Range(3, len(ACTORS))  # test, validation and at least one training fold


def label_of(clip_id: str) -> int | None:
    """Class index from the id's third ``_`` field, or None when the id does not parse."""
    fields = clip_id.split("_")
    if len(fields) != 4 or fields[2] not in CLASSES:
        return None
    return CLASSES.index(fields[2])


def tfds_actor_split() -> dict[str, list[str]]:
    """TFDS ``crema_d``'s actors per split: the sorted ids shuffled by RandomState(0), cut
    at ``int(cumulative share * 91)`` with the shares summed in float as TFDS sums them
    (crema_d.py lines 84-96), the last split running to the end."""
    actors = sorted(ACTORS)
    np.random.RandomState(TFDS_SEED).shuffle(actors)
    splits, total = {}, 0.0
    for name, share in TFDS_SHARES:
        start, total = total, total + share
        splits[name] = actors[int(start * len(actors)):int(total * len(actors))]
    splits[name] = actors[int(start * len(actors)):]
    return {name: sorted(members) for name, members in splits.items()}


def actor_folds(folds: int, fold: int, seed: int) -> dict[str, list[str]]:
    """A seeded k-fold over the 91 actors: fold ``fold`` is test, the next one validation,
    the others train (folds of ``np.array_split`` over a ``default_rng(seed)`` permutation)."""
    order = np.random.default_rng(seed).permutation(len(ACTORS))
    parts = [[ACTORS[i] for i in part] for part in np.array_split(order, folds)]
    val = (fold + 1) % folds
    train = [a for i, part in enumerate(parts) if i not in (fold, val) for a in part]
    return {"train": sorted(train), "val": sorted(parts[val]), "test": sorted(parts[fold])}


@dataclass
class CremadSynth:
    """A small raw tree in the exact CREMA-D layout, one modality much easier than the other."""

    clips: int = option(120, "Number of clips (balanced over 6 classes).", within=SYNTH_COUNT)
    seed: int = option(0, "Seed: same seed, same files.", within=SEED)
    easy: str = option("audio", "The easy modality: audio or video.")
    design: str = option(designs.DEFAULT_DESIGN, designs.DESIGN_HELP)
    easy_reliability: Optional[float] = option(None, designs.RELIABILITY_HELP,
                                               within=SYNTH_RELIABILITY)
    hard_strength: Optional[float] = option(None, designs.STRENGTH_HELP, within=SYNTH_STRENGTH)
    width: int = option(96, "Video width, px (even).", within=SYNTH_SIDE)
    height: int = option(72, "Video height, px (even).", within=SYNTH_SIDE)
    title: ClassVar[str] = "synthetic CREMA-D"

    def __post_init__(self) -> None:
        check_choice("--easy", self.easy, ("audio", "video"))
        check_choice("--design", self.design, tuple(designs.DESIGNS))
        check_options(self)  # the ranges first: parity is asked of a width in range
        for flag, side in (("--width", self.width), ("--height", self.height)):
            if side % 2:
                raise OptionError(f"{flag} {side} is odd: give an even number of pixels "
                                  "(the video is stored as yuv420p)")

    @property
    def total(self) -> int:
        return self.clips

    def write(self, out: Path, progress: Callable[[int], None]) -> str:
        """Write the tree; a line saying what was written."""
        from preprocess.datasets.synth import synthesize_cremad

        design = designs.resolve(self.design, self.easy_reliability, self.hard_strength)
        ids = synthesize_cremad(out, self.clips, self.seed, easy=self.easy,
                                hard_strength=design.hard_strength,
                                easy_reliability=design.easy_reliability, width=self.width,
                                height=self.height, progress=progress)
        counts = Counter(CLASSES[label_of(i)] for i in ids)
        return (f"wrote {len(ids)} clips to {out} ({designs.summary(self.easy, design)}); per "
                "class: " + ", ".join(f"{c} {counts[c]}" for c in CLASSES))


@register("cremad")
@dataclass
class Cremad(AudioVideo):
    """CREMA-D: AudioWAV/<id>.wav + VideoFlash/<id>.flv -> audio spectrograms + frames."""

    seconds: float = seconds_option(DEFAULT_SECONDS, "Fixed audio duration: 3.0 as in the "
                                                     "published CREMA-D code; the paper "
                                                     "states 20.")
    frame_size: int = frame_size_option()
    num_frames: int = num_frames_option()
    split_by: str = option("random", "random: the OGM-GE lists (or a seeded stratified split); "
                                     "actor: TFDS crema_d's actor-disjoint 63/9/19 split; "
                                     "actor-folds: a seeded k-fold over actors.")
    folds: int = option(5, "With --split-by actor-folds: the number of actor folds.",
                        within=FOLDS)
    fold: int = option(0, "With --split-by actor-folds: the test fold (0-based); the next "
                          "fold is validation, the others train.",
                       within=Range(0, FOLDS.high - 1))
    fold_seed: int = option(0, "With --split-by actor-folds: seed of the actor shuffle.",
                            within=SEED)
    classes: list[str] = field(init=False, default_factory=lambda: list(CLASSES))
    name: ClassVar[str] = "cremad"
    published: ClassVar[Published] = PUBLISHED
    synth: ClassVar[type] = CremadSynth

    def __post_init__(self) -> None:
        check_choice("--split-by", self.split_by, SPLIT_BY)
        check_options(self)  # a value out of range is named as such before any combination
        fold_options = (self.folds, self.fold, self.fold_seed)
        if self.split_by != "actor-folds" and fold_options != (5, 0, 0):
            raise OptionError(f"--folds, --fold and --fold-seed choose an actor fold; give "
                              f"them with --split-by actor-folds, not {self.split_by}")
        if self.fold >= self.folds:
            raise OptionError(f"--fold {self.fold} is not a fold of --folds {self.folds}: give "
                              f"0 to {self.folds - 1}")

    @property
    def uses_published_splits(self) -> bool:
        """Only the random split reads the OGM-GE lists under raw/splits."""
        return self.split_by == "random"

    def find(self, raw: Path) -> tuple[dict[str, Entry], list[dict[str, Any]]]:
        audio_dir, video_dir = raw / AUDIO_DIR, raw / VIDEO_DIR
        if not raw.is_dir():
            raise LayoutError(f"{raw} does not exist; pass the CREMA-D folder that holds "
                              f"{AUDIO_DIR}/ and {VIDEO_DIR}/ (`make download DATASET=cremad`)")
        missing = [d.name + "/" for d in (audio_dir, video_dir) if not d.is_dir()]
        if missing:
            raise LayoutError(f"{raw} is not a CREMA-D folder: it lacks {' and '.join(missing)}; "
                              f"expected {AUDIO_DIR}/<id>{AUDIO_SUFFIX} and "
                              f"{VIDEO_DIR}/<id>{VIDEO_SUFFIX} inside it")
        ids = {p.stem for p in audio_dir.glob(f"*{AUDIO_SUFFIX}")}
        ids |= {p.stem for p in video_dir.glob(f"*{VIDEO_SUFFIX}")}
        if not ids:
            raise LayoutError(f"{raw} holds no {AUDIO_DIR}/*{AUDIO_SUFFIX} or "
                              f"{VIDEO_DIR}/*{VIDEO_SUFFIX} files; is it the CREMA-D folder?")
        entries, unusable = {}, []
        for clip_id in sorted(ids):
            label = label_of(clip_id)
            if label is None or not spec.KEY_PATTERN.match(clip_id):
                unusable.append({"id": clip_id, "split": None,
                                 "reason": "file name is not a CREMA-D clip id"})
                continue
            entries[clip_id] = Entry(clip_id, label, {
                "audio": f"{AUDIO_DIR}/{clip_id}{AUDIO_SUFFIX}",
                "video": f"{VIDEO_DIR}/{clip_id}{VIDEO_SUFFIX}"})
        return entries, unusable

    def list_files(self, raw: Path) -> dict[str, Path]:
        return {}

    def own_lists(self, raw: Path, found: dict[str, Entry],
                  split_files: dict[str, Path]) -> OwnLists | None:
        """The actor-disjoint splits of ``--split-by actor`` or ``actor-folds``; None for
        the random split. Actors are the 91 CREMA-D ids whether or not their clips are here,
        so a partial copy gets the published actor lists."""
        if self.split_by == "random":
            return None
        if split_files:
            raise OptionError(f"--split-by {self.split_by} makes its own actor-disjoint "
                              f"splits; drop --split {' '.join(sorted(split_files))}")
        tfds = self.split_by == "actor"
        actors = tfds_actor_split() if tfds else actor_folds(self.folds, self.fold,
                                                              self.fold_seed)
        split_of = {actor: name for name, members in actors.items() for actor in members}
        rows: dict[str, list[SplitRow]] = {name: [] for name in actors}
        skipped = []
        for key in sorted(found):
            name = split_of.get(key.split("_")[0])
            if name is None:
                skipped.append({"id": key, "split": None, "reason": "actor is not one of "
                                "CREMA-D's 91 (1001 to 1091)"})
            elif tfds and key in TFDS_DROPPED:
                skipped.append({"id": key, "split": name,
                                "reason": "left out of the TFDS crema_d split"})
            else:
                rows[name].append(SplitRow(key, found[key].label, 0))
        rule = ({"rule": "tfds-crema_d", "dropped": list(TFDS_DROPPED)} if tfds else
                {"rule": "actor-folds", "folds": self.folds, "fold": self.fold,
                 "seed": self.fold_seed})
        return OwnLists(rows, skipped, {"split_by": self.split_by, **rule, "actors": actors})

    def read_split_file(self, path: Path) -> list[SplitRow]:
        rows = []
        for number, line in numbered_lines(path):
            clip_id, sep, emotion = line.partition(",")
            if not sep or emotion.strip() not in CLASSES:
                raise SplitError(f"{path} line {number} is {line!r}; CREMA-D split files have "
                                 f"'<id>,<EMO>' rows with EMO in {' '.join(CLASSES)}")
            rows.append(SplitRow(clip_id.strip(), CLASSES.index(emotion.strip()), number))
        return rows

    def process(self, raw: Path, entry: Entry) -> tuple[dict[str, bytes], dict[str, Any]]:
        audio_path, video_path = raw / entry.sources["audio"], raw / entry.sources["video"]
        for modality, path in (("audio", audio_path), ("video", video_path)):
            if not path.is_file():
                raise media.MediaError(f"{modality} file is missing", entry.sources[modality])
        return self.encode_clip(audio_path, video_path)
