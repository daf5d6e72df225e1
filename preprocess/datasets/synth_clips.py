"""Synthetic YouTube-clip datasets in their exact raw layouts: AVE and VGGSound.

Each clip is an H.264 + AAC ``.mp4`` carrying the class cues of :mod:`synth` (the easy
modality's linear cue, the hard one's nonlinear cue), so a build of the tree trains like
the Kinetics-Sounds one. The list files are written as the published ones are (AVE:
``&``-separated, LF; VGGSound: ``vggsound.csv`` rows, LF, labels holding a comma quoted),
or the clips are drawn from a real list so that a build reads that list unchanged.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from preprocess.datasets.synth import (AUDIO_CUES, KS_MODALITIES, MP4_MUXING, VIDEO_CUES,
                                       YOUTUBE_ID_CHARS, YOUTUBE_ID_LENGTH, _mux)

CLIP_SECONDS = 10  # AVE and VGGSound clips are 10 s
SAMPLE_RATE = 16000
MAX_CUED_CLASSES = 6  # synth's cues tell 6 classes apart; more classes reuse them


@dataclass(frozen=True)
class ClipStyle:
    """How the synthetic clips look: which modality is easy, the hard cue's scale, the
    frame size and rate."""

    easy: str = "audio"
    hard_strength: float = 1.0
    width: int = 64
    height: int = 48
    fps: int = 8
    seconds: float = CLIP_SECONDS


def write_clip(path: Path, label: int, seed: list[int], style: ClipStyle) -> None:
    """One ``.mp4`` whose audio and video carry class ``label``'s cues."""
    if style.easy not in KS_MODALITIES:
        raise ValueError(f"easy must be one of {KS_MODALITIES}, got {style.easy!r}")
    cue = label % MAX_CUED_CLASSES
    rng = np.random.default_rng(seed)
    roles = {m: "easy" if m == style.easy else "hard" for m in KS_MODALITIES}
    strength = {m: 1.0 if m == style.easy else style.hard_strength for m in KS_MODALITIES}
    sound = AUDIO_CUES[roles["audio"]](cue, round(style.seconds * SAMPLE_RATE), SAMPLE_RATE,
                                       rng, strength["audio"])
    frames = VIDEO_CUES[roles["video"]](cue, max(1, round(style.seconds * style.fps)),
                                        style.width, style.height, style.fps, rng,
                                        strength["video"])
    path.parent.mkdir(parents=True, exist_ok=True)
    _mux(path, MP4_MUXING, frames, sound, SAMPLE_RATE, style.fps, (style.width, style.height))


def youtube_ids(count: int, seed: int) -> list[str]:
    """``count`` distinct made-up 11-character YouTube-like ids."""
    rng, ids = np.random.default_rng([seed, count, 7]), []
    while len(ids) < count:
        new = "".join(rng.choice(list(YOUTUBE_ID_CHARS), YOUTUBE_ID_LENGTH))
        if new not in ids:
            ids.append(new)
    return ids


# ---------------------------------------------------------------- AVE

AVE_HEADER = "Category&VideoID&Quality&StartTime&EndTime"
AVE_SPLITS = (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt"))


def ave_rows(count: int, classes: list[str], seed: int) -> list[tuple[str, str, int, int]]:
    """``count`` made-up events ``(category, video id, start, end)``, round robin over
    ``classes``, each window whole seconds in [0, 10], at least 1 s long."""
    rng = np.random.default_rng([seed, count, 11])
    rows = []
    for index, video in enumerate(youtube_ids(count, seed)):
        start = int(rng.integers(0, CLIP_SECONDS - 1))
        end = int(rng.integers(start + 1, CLIP_SECONDS + 1))
        rows.append((classes[index % len(classes)], video, start, end))
    return rows


def write_ave_lists(out: Path, rows: list[tuple[str, str, int, int]]) -> dict[str, int]:
    """``Annotations.txt`` (with its header) and the three split files (without), LF, as
    the AVE zip has them; every fifth event is val, every fifth after it test. Returns
    the rows per split."""
    def line(row: tuple[str, str, int, int]) -> str:
        return f"{row[0]}&{row[1]}&good&{row[2]}&{row[3]}\n"

    out.mkdir(parents=True, exist_ok=True)
    (out / "Annotations.txt").write_text(AVE_HEADER + "\n" + "".join(map(line, rows)))
    chosen = {"train": [], "val": [], "test": []}
    for index, row in enumerate(rows):
        chosen[("train", "train", "train", "val", "test")[index % 5]].append(row)
    for split, name in AVE_SPLITS:
        (out / name).write_text("".join(map(line, chosen[split])))
    return {split: len(members) for split, members in chosen.items()}


def synthesize_ave(out: Path, rows: list[tuple[str, str, int, int]], classes: list[str],
                   seed: int, style: ClipStyle,
                   progress: Callable[[int], None] | None = None) -> list[str]:
    """``AVE/<video id>.mp4`` for every distinct video of ``rows`` (labelled by its first
    row's category); returns the video ids written."""
    first: dict[str, str] = {}
    for category, video, _, _ in rows:
        first.setdefault(video, category)
    for index, (video, category) in enumerate(sorted(first.items())):
        write_clip(Path(out) / "AVE" / f"{video}.mp4", classes.index(category), [seed, index],
                   style)
        if progress is not None:
            progress(index + 1)
    return sorted(first)


# ---------------------------------------------------------------- VGGSound


def vggsound_csv(rows: list[tuple[str, int, str, str]]) -> str:
    """``vggsound.csv`` text: ``ytid,start,label,train|test`` rows, LF, no header, a label
    holding a comma double-quoted (as the official file)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerows(rows)
    return text.getvalue()


def synthesize_vggsound(out: Path, clips: list[tuple[str, int, str]], classes: list[str],
                        seed: int, style: ClipStyle, *, padded: bool = True,
                        per_class: bool = False,
                        progress: Callable[[int], None] | None = None) -> list[str]:
    """An ``.mp4`` per ``(youtube id, start, label)`` named ``<id>_<start:06d>.mp4`` (or
    unpadded ``<id>_<start>.mp4``), flat or under a folder per label; returns the names."""
    names = []
    for index, (video, start, label) in enumerate(clips):
        name = f"{video}_{start:06d}.mp4" if padded else f"{video}_{start}.mp4"
        folder = Path(out) / label if per_class else Path(out)
        write_clip(folder / name, classes.index(label), [seed, index], style)
        names.append(name)
        if progress is not None:
            progress(index + 1)
    return names
