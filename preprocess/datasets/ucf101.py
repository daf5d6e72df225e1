"""UCF-101: ``UCF-101/<Class>/v_<Class>_gGG_cCC.avi`` clips, 101 actions, as RGB frames and
optical flow (the two modalities BalanceBenchmark and OPM use).

The official lists (CRCV's ``ucfTrainTestlist``, CRLF) are ``classInd.txt`` (``<1..101>
<Class>``), ``trainlist0F.txt`` (``<Class>/v_<Class>_gGG_cCC.avi <label 1..101>``) and
``testlist0F.txt`` (no label) for the three folds F; ``--fold`` picks one. The class index
is the line of ``classInd.txt`` less one (``--class-order sorted`` gives BalanceBenchmark's
``sorted()`` order, which differs for HammerThrow/Hammering and JumpRope/JumpingJack).

The lists and the clip files spell ``v_HandStandPushups_...`` where the class folder, and
the released flow tree, spell ``HandstandPushups``: keys use the folder's spelling,
``v_HandstandPushups_gGG_cCC``, whichever spelling a file or a list row uses.

Flow is TV-L1 (:mod:`preprocess.flow`), computed from the clip (``--flow tvl1``) or read
from a released tree ``tvl1_flow/{u,v}/<key>/frame%06d.jpg`` (``--flow precomputed``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import av
import numpy as np
from PIL import Image

from ccat.data import kinds
from preprocess import flow as flows, media
from preprocess.datasets import (FRAME_SIZE, NUM_FRAMES, SEED, SYNTH_COUNT, LayoutError,
                                 Published, Range, check_choice, option, register)
from preprocess.splits import Entry, SplitError, SplitRow, numbered_lines

VIDEO_DIR, LISTS_DIR, FLOW_DIR = "UCF-101", "ucfTrainTestlist", "tvl1_flow"
CLASS_FILE = "classInd.txt"
FOLDS = Range(1, 3)
FLOW_SOURCES = ("tvl1", "precomputed")
CLASS_ORDERS = ("classind", "sorted")
LIST_SPELLING, FOLDER_SPELLING = "HandStandPushups", "HandstandPushups"
VIDEO_NAME = re.compile(r"^v_([A-Za-z]+)_g(\d\d)_c(\d\d)$")
FLOW_FRAME = "frame{:06d}.jpg"  # 1-based, flow field k between frames k and k + 1
STACK = Range(1, 10)  # Simonyan & Zisserman stack L = 10 flow fields at most
PUBLISHED = Published(
    lists_url="",  # the lists come in CRCV's zip, beside the videos' rar
    split_files={"train": "trainlist01.txt", "test": "testlist01.txt"},
    splits_dir=LISTS_DIR,
    media_by_hand=("UCF-101 comes from CRCV (https://www.crcv.ucf.edu/data/UCF101.php): "
                   "unpack UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip into "
                   "{target}, so that it holds UCF-101/<Class>/v_<Class>_gGG_cCC.avi and "
                   "ucfTrainTestlist/classInd.txt, trainlist0F.txt, testlist0F.txt; for "
                   "--flow precomputed, also the twostreamfusion release's "
                   "tvl1_flow/{{u,v}}/<video>/frame%06d.jpg"))
SYNTH_CLASSES = Range(2, 5)


def video_key(name: str) -> str | None:
    """``v_<Class>_gGG_cCC`` in the folder's spelling from a file or list name, or None."""
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]  # str ops: 13320 names, twice
    stem = stem.replace(f"v_{LIST_SPELLING}_", f"v_{FOLDER_SPELLING}_", 1)
    return stem if VIDEO_NAME.match(stem) else None


def read_class_index(path: Path) -> list[str]:
    """The classes of ``classInd.txt`` in its order; its numbers must count 1, 2, 3 ..."""
    classes = []
    for number, line in numbered_lines(path):
        index, _, name = line.partition(" ")
        if index != str(len(classes) + 1) or not name.strip().isalnum():
            raise SplitError(f"{path} line {number} is {line!r}; classInd.txt has "
                             f"'<n> <Class>' rows numbered from 1 (expected {len(classes) + 1})")
        classes.append(name.strip())
    return classes


@dataclass
class Ucf101Synth:
    """A small UCF-101 tree: UCF-101/<Class>/v_<Class>_gGG_cCC.avi and ucfTrainTestlist/."""

    clips: int = option(24, "Number of clips, round robin over the classes.",
                        within=SYNTH_COUNT)
    classes: int = option(3, "Number of classes, 2 to 5.", within=SYNTH_CLASSES)
    seed: int = option(0, "Seed: same seed, same files.", within=SEED)
    easy: str = option("video", "The easy modality: video (a class tint) or flow (the class "
                                "motion's direction, on a tint of no class).")
    title: ClassVar[str] = "synthetic UCF-101"

    def __post_init__(self) -> None:
        check_choice("--easy", self.easy, ("video", "flow"))

    @property
    def total(self) -> int:
        return self.clips

    def write(self, out: Path, progress: Callable[[int], None]) -> str:
        """Write the tree; a line saying what was written."""
        from preprocess.datasets.synth import synthesize_ucf101

        counts = synthesize_ucf101(out, self.clips, self.seed, num_classes=self.classes,
                                   easy=self.easy, progress=progress)
        return (f"wrote {sum(counts.values())} clips in {self.classes} classes to {out} "
                f"(fold 1: {counts['train']} train, {counts['test']} test; {self.easy} is "
                "the easy modality)")


@register("ucf101")
@dataclass
class Ucf101:
    """UCF-101: UCF-101/<Class>/*.avi + ucfTrainTestlist/ -> RGB frames + TV-L1 flow."""

    fold: int = option(1, "Official train/test split 1, 2 or 3.", within=FOLDS)
    class_order: str = option("classind", "classind: classInd.txt's order, 0-based (the "
                                          "lists' labels less one); sorted: Python's sorted() "
                                          "names, as BalanceBenchmark.")
    flow: str = option("tvl1", "tvl1: compute TV-L1 flow from the clip; precomputed: read "
                               "tvl1_flow/{u,v}/<video>/frame%06d.jpg under --raw.")
    frame_size: int = option(media.VideoParams.size, "Side of the square stored frames and "
                                                     "flow planes, px.", within=FRAME_SIZE)
    num_frames: int = option(media.VideoParams.num_frames,
                             "RGB frames per clip (segment centres).", within=NUM_FRAMES)
    num_snippets: int = option(3, "Flow snippets per clip (segment centres); 3 as "
                                  "BalanceBenchmark.", within=NUM_FRAMES)
    stack: int = option(1, "Consecutive flow fields per snippet (u, v each): 1 as "
                           "BalanceBenchmark, 10 as Simonyan & Zisserman.", within=STACK)
    classes: list[str] = field(init=False, default_factory=list)
    class_index: list[str] = field(init=False, default_factory=list, repr=False)  # classInd's
    unit: ClassVar[str] = "clips"
    name: ClassVar[str] = "ucf101"
    published: ClassVar[Published] = PUBLISHED
    synth: ClassVar[type] = Ucf101Synth

    def __post_init__(self) -> None:
        check_choice("--class-order", self.class_order, CLASS_ORDERS)
        check_choice("--flow", self.flow, FLOW_SOURCES)
        # this instance's published lists are its fold's (the class's are fold 1's)
        self.published = Published(  # type: ignore[misc]
            lists_url="", split_files={"train": f"trainlist0{self.fold}.txt",
                                       "test": f"testlist0{self.fold}.txt"},
            splits_dir=LISTS_DIR, media_by_hand=PUBLISHED.media_by_hand)

    @property
    def video(self) -> media.VideoParams:
        return media.VideoParams(num_frames=self.num_frames, size=self.frame_size)

    def modalities(self) -> dict[str, dict[str, Any]]:
        source = flows.TVL1Params().manifest_entry() if self.flow == "tvl1" else {
            "algorithm": "tvl1", "read_from": f"{FLOW_DIR}/{{u,v}}/<video>/frame%06d.jpg"}
        return {"video": self.video.manifest_entry(),
                "flow": {"kind": "flow", "num_snippets": self.num_snippets, "stack": self.stack,
                         "size": self.frame_size, "encoding": "jpeg", "quality": flows.JPEG_QUALITY,
                         "bound": flows.FLOW_BOUND, "sampling": "segment-centres",
                         "resize": "pil-bilinear", "source": self.flow, **source}}

    def facts(self) -> dict[str, Any]:
        """The fold and the class order, recorded under ``sources.recipe``."""
        order = ("classInd.txt order, 0-based" if self.class_order == "classind"
                 else "sorted class names")
        return {"fold": self.fold, "class_order": order,
                "spelling": f"v_{LIST_SPELLING}_* keyed as v_{FOLDER_SPELLING}_*"}

    def _class_file(self, raw: Path) -> Path:
        return raw / LISTS_DIR / CLASS_FILE

    def list_files(self, raw: Path) -> dict[str, Path]:
        return {"classes": self._class_file(raw)}

    def find(self, raw: Path) -> tuple[dict[str, Entry], list[dict[str, Any]]]:
        videos = raw / VIDEO_DIR
        if not videos.is_dir() or not self._class_file(raw).is_file():
            raise LayoutError(f"{raw} is not a UCF-101 folder: expected {VIDEO_DIR}/<Class>/"
                              f"v_<Class>_gGG_cCC.avi and {LISTS_DIR}/{CLASS_FILE} inside it")
        self.class_index = read_class_index(self._class_file(raw))
        self.classes = sorted(self.class_index) if self.class_order == "sorted" \
            else list(self.class_index)
        entries: dict[str, Entry] = {}
        unusable: list[dict[str, Any]] = []
        for folder, name in self._clips(videos):
            key, relative = video_key(name), f"{VIDEO_DIR}/{folder}/{name}"
            reason = self._unusable(key, folder, entries)
            if reason:
                unusable.append({"id": key or name.rsplit(".", 1)[0], "split": None,
                                 "reason": reason, "detail": relative})
                continue
            sources = {"video": relative}
            if self.flow == "precomputed":
                sources.update(self._flow_files(raw, key))
            entries[key] = Entry(key, self.classes.index(folder), sources)
        return entries, unusable

    @staticmethod
    def _clips(videos: Path) -> list[tuple[str, str]]:
        """(class folder, file name) of every ``.avi`` one folder down, sorted."""
        clips = []
        for folder in os.scandir(videos):
            if folder.is_dir():
                clips += [(folder.name, f.name) for f in os.scandir(folder.path)
                          if f.name.lower().endswith(".avi") and f.is_file()]
        return sorted(clips)

    def _unusable(self, key: str | None, folder: str, entries: dict[str, Entry]) -> str:
        if key is None:
            return "file name is not v_<Class>_gGG_cCC.avi"
        if key in entries:
            return "the same clip is stored twice"
        if folder not in self.classes:
            return f"folder is not a class of {CLASS_FILE}"
        if VIDEO_NAME.match(key).group(1) != folder:
            return "file name names another class than its folder"
        return ""

    def _flow_files(self, raw: Path, key: str) -> dict[str, str]:
        """The released flow frames this clip's snippets read, by plane (``flow.<i>.<c>``);
        none when its folders are missing (process says so)."""
        folders = [raw / FLOW_DIR / axis / key for axis in ("u", "v")]
        if not all(f.is_dir() for f in folders):
            return {}
        count = min(len(list(f.glob("frame*.jpg"))) for f in folders)
        starts = self._starts(count)
        if starts is None:
            return {}
        files = {}
        for i, start in enumerate(starts):
            for j in range(self.stack):
                for c, axis in enumerate(("u", "v")):
                    files[f"flow.{i}.{2 * j + c}"] = \
                        f"{FLOW_DIR}/{axis}/{key}/{FLOW_FRAME.format(start + j + 1)}"
        return files

    def _starts(self, num_fields: int) -> list[int] | None:
        """First flow field of each snippet: segment centres over the positions a stack
        fits in; None when not one stack fits."""
        positions = num_fields - self.stack + 1
        return media.segment_centres(positions, self.num_snippets) if positions >= 1 else None

    def read_split_file(self, path: Path) -> list[SplitRow]:
        if not self.classes:
            raise SplitError(f"{path} needs {CLASS_FILE}; it is read from {LISTS_DIR}/")
        rows = []
        for number, line in numbered_lines(path):
            name, _, label = line.partition(" ")
            folder, _, file = name.partition("/")
            key = video_key(file)
            if key is None or folder not in self.classes or (label and not label.isdigit()):
                raise SplitError(f"{path} line {number} is {line!r}; UCF-101 lists have "
                                 "'<Class>/v_<Class>_gGG_cCC.avi' rows (train lists add "
                                 "'<label 1..101>')")
            index = self.classes.index(folder)
            if label and self._listed_label(int(label)) != folder:
                raise SplitError(f"{path} line {number} labels {folder} {label}, which "
                                 f"{CLASS_FILE} gives to {self._listed_label(int(label))}; "
                                 "pass the lists and classInd.txt of one release")
            rows.append(SplitRow(key, index, number))
        return rows

    def _listed_label(self, label: int) -> str | None:
        """The class a list's 1-based label names, in classInd.txt's order."""
        official = self.class_index
        return official[label - 1] if 1 <= label <= len(official) else None

    def process(self, raw: Path, entry: Entry) -> tuple[dict[str, bytes], dict[str, Any]]:
        path = raw / entry.sources["video"]
        frames, video_meta = media.sample_frames(path, self.video)
        if self.flow == "precomputed":
            planes, flow_meta = self._read_flow(raw, entry)
        else:
            planes, flow_meta = self._compute_flow(path)
        members = {**kinds.encode("video", "frames", frames),
                   **kinds.encode("flow", "flow", planes)}
        return members, {"video": video_meta, "flow": flow_meta}

    def _read_flow(self, raw: Path, entry: Entry) -> tuple[list[list[bytes]], dict[str, Any]]:
        names = sorted((k for k in entry.sources if k.startswith("flow.")),
                       key=lambda k: tuple(map(int, k.split(".")[1:])))
        if not names:
            raise media.MediaError("no precomputed flow for this clip",
                                   f"{FLOW_DIR}/{{u,v}}/{entry.key}")
        planes: list[list[bytes]] = [[] for _ in range(self.num_snippets)]
        for name in names:
            snippet = int(name.split(".")[1])
            try:
                with Image.open(raw / entry.sources[name]) as img:
                    plane = np.asarray(img.convert("L"))
            except (OSError, ValueError) as err:
                raise media.MediaError("flow frame is unreadable",
                                       f"{entry.sources[name]}: {err}") from None
            planes[snippet].append(flows.encode_plane(plane, self.frame_size))
        first = [entry.sources[f"flow.{i}.0"] for i in range(self.num_snippets)]
        return planes, {"source": "precomputed", "first_planes": first}

    def _compute_flow(self, path: Path) -> tuple[list[list[bytes]], dict[str, Any]]:
        grey = decode_grey(path)
        starts = self._starts(len(grey) - 1)
        if starts is None:
            raise media.MediaError("too few frames for the flow stack",
                                   f"{len(grey)} frames, a stack of {self.stack} needs "
                                   f"{self.stack + 1}")
        planes = []
        for start in starts:
            snippet = []
            for j in range(self.stack):
                field_ = flows.quantise(flows.tvl1(grey[start + j], grey[start + j + 1]))
                snippet += [flows.encode_plane(field_[0], self.frame_size),
                            flows.encode_plane(field_[1], self.frame_size)]
            planes.append(snippet)
        return planes, {"source": "tvl1", "num_frames": len(grey), "field_indices": starts,
                        "width": grey.shape[2], "height": grey.shape[1]}


def decode_grey(path: Path) -> np.ndarray:
    """Every frame of a clip as float32 grey levels 0..255, [T, H, W] (swscale's ``gray``
    conversion, as OpenCV's flow tools convert BGR to grey first)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise media.MediaError("the clip has no video track")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            frames = [f.to_ndarray(format="gray") for f in container.decode(stream)]
    except av.FFmpegError as err:
        raise media.MediaError("video is unreadable", str(err)) from None
    if len(frames) < 2:
        raise media.MediaError("too few frames for the flow stack", f"{len(frames)} frames")
    return np.stack(frames).astype(np.float32)
