"""CMU-MOSEI sentiment: MulT's feature pickle, the SDK's standard folds, 2 or 7 classes.

The raw folder holds MulT's release (yaohungt/Multimodal-Transformer, src/dataset.py L21-33):
``mosei_senti_data.pkl`` (word-aligned, 50 steps per modality) or
``mosei_senti_data_noalign.pkl`` (audio and vision 500 steps), a dict of splits ``train``,
``valid``, ``test``, each a dict of arrays ``text`` (N, 50, 300) GloVe, ``audio`` (N, T, 74)
COVAREP, ``vision`` (N, T, 35) FACET, ``labels`` (N, 1, 1) sentiment in [-3, 3] and ``id``
(N, 3) ``(video id, start s, end s)``. The pickle is read by
:func:`preprocess.safe_pickle.load_arrays`, never by ``pickle.load``.

Splits are the SDK's standard folds, video ids parsed from ``cmu_mosei_std_folds.py``
(A2Zadeh/CMU-MultimodalSDK, mmsdk/mmdatasdk/dataset/standard_datasets/CMU_MOSEI/) with
:mod:`ast`, never imported; every segment of a fold's video goes to that fold's split.
The SDK's ``.csd`` computational sequences are not read: no balanced-multimodal code
trains on them, and MulT's pickle is the aligned, cleaned form of the same features.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from ccat.data import kinds, spec
from preprocess.datasets import (SEED, SYNTH_COUNT, SYNTH_STRENGTH, LayoutError, OptionError,
                                 Published, Range, check_choice, check_options, option, register)
from preprocess.media import MediaError
from preprocess.safe_pickle import load_arrays
from preprocess.splits import Entry, SplitError, SplitRow

MODALITIES = ("text", "audio", "vision")  # MulT's order: X = (index, text, audio, vision)
FEATURE_DIMS = {"text": 300, "audio": 74, "vision": 35}  # GloVe, COVAREP, FACET 4.2
FEATURE_NAMES = {"text": "GloVe word vectors", "audio": "COVAREP acoustic features",
                 "vision": "FACET 4.2 facial action units"}
VARIANTS = {"aligned": ("mosei_senti_data.pkl", {"text": 50, "audio": 50, "vision": 50}),
            "unaligned": ("mosei_senti_data_noalign.pkl",
                          {"text": 50, "audio": 500, "vision": 500})}
PICKLE_SPLITS = {"train": "train", "valid": "val", "test": "test"}  # pickle key -> ours
FOLDS_FILE = "cmu_mosei_std_folds.py"
FOLD_NAMES = {"train": "standard_train_fold", "val": "standard_valid_fold",
              "test": "standard_test_fold"}
LABELS = (2, 7)
CLASSES = {2: ["negative", "non-negative"],  # BalanceBenchmark Mosei_dataset: 0 if y < 0 else 1
           7: [str(k) for k in range(-3, 4)]}  # MulT eval_metrics.py L38, L17: round(clip(y))
SENTIMENT_RANGE = 3.0
MS_PER_S = 1000
SYNTH_SEGMENTS = Range(3, SYNTH_COUNT.high)  # one segment per split at least
SDK_COMMIT = "fd18d71d"  # the folds file of ../shared/data/mosei (2019: one train video removed)
PUBLISHED = Published(
    lists_url=("https://raw.githubusercontent.com/A2Zadeh/CMU-MultimodalSDK/master/mmsdk/"
               "mmdatasdk/dataset/standard_datasets/CMU_MOSEI/"),
    split_files={"train": FOLDS_FILE, "val": FOLDS_FILE, "test": FOLDS_FILE},
    media_by_hand=("the features are MulT's release (yaohungt/Multimodal-Transformer README, "
                   "\"Datasets\"): download its Dropbox archive (https://www.dropbox.com/sh/"
                   "hyzpgx1hp9nj37s/AAB7FhBqJOFDw2hEyvv2ZXHxa), unzip it and put "
                   "mosei_senti_data.pkl (aligned) and/or mosei_senti_data_noalign.pkl "
                   "(unaligned) into {target}"))


def sentiment_class(score: float, labels: int) -> int:
    """The class index of a sentiment score under ``labels`` classes (2 or 7)."""
    if labels == 2:
        return 0 if score < 0 else 1
    return int(np.round(np.clip(score, -SENTIMENT_RANGE, SENTIMENT_RANGE))) + 3


def read_folds(path: Path) -> dict[str, tuple[int, list[str]]]:
    """``split -> (line, video ids)`` of the SDK's folds file, parsed with :mod:`ast` (the
    file is Python source; it is never imported or run)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except FileNotFoundError:
        raise SplitError(f"folds file {path} does not exist; `ccat-data download mosei` "
                         "fetches it, or pass it with --split") from None
    except (SyntaxError, ValueError) as err:
        raise SplitError(f"{path} is not the SDK's folds file ({err}); fetch it again") from None
    assigned = {node.targets[0].id: node for node in tree.body if isinstance(node, ast.Assign)
                and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)}
    folds = {}
    for split, name in FOLD_NAMES.items():
        node = assigned.get(name)
        try:
            videos = ast.literal_eval(node.value) if node is not None else None
        except ValueError:
            videos = None
        if not isinstance(videos, list) or not all(isinstance(v, str) for v in videos):
            raise SplitError(f"{path} has no list of video id strings named {name}; pass "
                             f"the SDK's {FOLDS_FILE} unchanged")
        folds[split] = (node.lineno, videos)
    return folds


@dataclass(frozen=True)
class Segment:
    """Where one segment's arrays are in the pickle, and what its id row says."""

    split: str  # the pickle's split key: train, valid, test
    index: int
    video: str
    start: str
    end: str
    score: float


@dataclass
class Loaded:
    """A checked pickle: its arrays per pickle split, and the segments by sample key."""

    arrays: dict[str, dict[str, np.ndarray]]
    segments: dict[str, Segment]


_LOADED: dict[tuple[str, int, int], Loaded] = {}  # per process: (path, size, mtime) -> pickle


def _text(value: Any) -> str:
    """An id field as text: MulT's MOSEI ids are str, its MOSI ids bytes."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def segment_key(video: str, start: str, end: str) -> str | None:
    """``<video>_<start ms>_<end ms>``, or None when the fields do not make a key."""
    try:
        start_ms, end_ms = (round(float(t) * MS_PER_S) for t in (start, end))
    except (ValueError, OverflowError):
        return None
    key = f"{video}_{start_ms}_{end_ms}"
    return key if spec.KEY_PATTERN.match(key) else None


def _check_split(path: Path, name: str, split: Any) -> None:
    """Refuse, in one sentence, a pickle split without the arrays every loader reads."""
    needed = (*MODALITIES, "labels", "id")
    if not isinstance(split, dict) or any(not isinstance(split.get(k), np.ndarray)
                                          for k in needed):
        have = sorted(split) if isinstance(split, dict) else type(split).__name__
        raise LayoutError(f"{path} split {name!r} holds {have}, not numpy arrays "
                          f"{', '.join(needed)}; use MulT's mosei_senti_data pickles")
    sizes = {k: len(split[k]) for k in needed}
    if len(set(sizes.values())) != 1:
        raise LayoutError(f"{path} split {name!r} has arrays of different lengths {sizes}; "
                          "one row per segment in every array is the layout")


def load(path: Path) -> Loaded:
    """The pickle at ``path``, checked and indexed; loaded once per process."""
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _LOADED:
        _LOADED.clear()  # one pickle at a time: the unaligned one is several GB
        data = load_arrays(path)
        if not isinstance(data, dict) or set(data) != set(PICKLE_SPLITS):
            have = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise LayoutError(f"{path} holds {have}, not a dict of splits "
                              f"{', '.join(PICKLE_SPLITS)}; use MulT's mosei_senti_data pickles")
        for name, split in data.items():
            _check_split(path, name, split)
        _LOADED[cache_key] = Loaded(data, {})
    return _LOADED[cache_key]


@dataclass
class MoseiSynth:
    """A small MulT-layout pickle and the SDK's folds file, text the easiest modality."""

    segments: int = option(120, "Number of segments (over train, valid, test).",
                           within=SYNTH_SEGMENTS)
    seed: int = option(0, "Seed: same seed, same files.", within=SEED)
    variant: str = option("aligned", "aligned (mosei_senti_data.pkl) or unaligned "
                                     "(mosei_senti_data_noalign.pkl).")
    strength: float = option(1.0, "Scale of the sentiment cue in the features (text full, "
                                  "audio half, vision a quarter).", within=SYNTH_STRENGTH)
    title: ClassVar[str] = "synthetic CMU-MOSEI"

    def __post_init__(self) -> None:
        check_choice("--variant", self.variant, tuple(VARIANTS))
        check_options(self)

    @property
    def total(self) -> int:
        return self.segments

    def write(self, out: Path, progress: Callable[[int], None]) -> str:
        """Write the pickle and splits/cmu_mosei_std_folds.py; a line saying what."""
        from preprocess.datasets.synth_mosei import synthesize_mosei

        counts = synthesize_mosei(out, self.segments, self.seed, self.variant, self.strength,
                                  progress)
        return (f"wrote {VARIANTS[self.variant][0]} with " + ", ".join(
            f"{n} {split}" for split, n in counts.items()) + f" segments, and the folds, to {out}")


@register("mosei")
@dataclass
class Mosei:
    """CMU-MOSEI: MulT's mosei_senti_data pickle -> text, audio, vision feature sequences."""

    variant: str = option("aligned", "aligned: mosei_senti_data.pkl, 50 steps each; "
                                     "unaligned: mosei_senti_data_noalign.pkl, audio and vision "
                                     "500 steps (BalanceBenchmark's).")
    labels: int = option(2, "2: negative (< 0) / non-negative (BalanceBenchmark's); 7: the "
                            "score clipped to [-3, 3] and rounded, half to even (MulT's).",
                         within=Range(min(LABELS), max(LABELS)))
    classes: list[str] = field(init=False, default_factory=list)
    videos: dict[str, list[tuple[str, int]]] = field(init=False, default_factory=dict,
                                                     repr=False, compare=False)
    unit: ClassVar[str] = "segments"
    name: ClassVar[str] = "mosei"
    published: ClassVar[Published] = PUBLISHED
    synth: ClassVar[type] = MoseiSynth
    # Each worker would unpickle the whole file (the unaligned one is over 6 GB) for samples
    # that cost a few milliseconds each: one process builds it.
    max_workers: ClassVar[int] = 1
    # A seeded segment-level split would put segments of one video (one speaker) into
    # train and test: the standard folds, or another file, are required.
    needs_split_files: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_options(self)  # the range first: the choice is asked of a value in range
        check_choice("--variant", self.variant, tuple(VARIANTS))
        if self.labels not in LABELS:
            raise OptionError(f"--labels {self.labels}: choose 2 or 7 (the two rules peers use)")
        self.classes = list(CLASSES[self.labels])

    def label_rule(self) -> dict[str, Any]:
        """How the classes come from the sentiment score (``sources.labels`` in the manifest)."""
        rule = ("score < 0: negative, else non-negative (BalanceBenchmark)" if self.labels == 2
                else "round(clip(score, -3, 3)), half to even (MulT): classes -3..3")
        return {"classes": self.labels, "rule": rule, "score": "float32 of the pickle's labels"}

    @property
    def file_name(self) -> str:
        return VARIANTS[self.variant][0]

    def modalities(self) -> dict[str, dict[str, Any]]:
        steps = VARIANTS[self.variant][1]
        entries = {m: {"kind": "features", "shape": [steps[m], FEATURE_DIMS[m]],
                       "dtype": "float32", "features": FEATURE_NAMES[m],
                       "source": self.file_name} for m in MODALITIES}
        entries["audio"]["neg_inf"] = "zero"  # MulT dataset.py L29: audio[audio == -inf] = 0
        return entries

    def list_files(self, raw: Path) -> dict[str, Path]:
        return {"features": raw / self.file_name}

    def find(self, raw: Path) -> tuple[dict[str, Entry], list[dict[str, Any]]]:
        path = raw / self.file_name
        if not path.is_file():
            raise LayoutError(f"{raw} lacks {self.file_name}, MulT's {self.variant} MOSEI "
                              "pickle; `ccat-data download mosei` says where to get it")
        loaded = load(path)
        entries, unusable = {}, []
        loaded.segments.clear()
        self.videos = {}
        for split, arrays in loaded.arrays.items():
            for index, (row, score) in enumerate(zip(arrays["id"], arrays["labels"])):
                entry, problem = self._entry(split, index, row, score, loaded.segments)
                if problem:
                    unusable.append({"id": f"{PICKLE_SPLITS[split]}_{index}", "split": None,
                                     "reason": problem[0], "detail": problem[1]})
                    continue
                entries[entry.key] = entry
                self.videos.setdefault(loaded.segments[entry.key].video, []).append(
                    (entry.key, entry.label))
        return entries, unusable

    def _entry(self, split: str, index: int, row: Any, score: Any,
               segments: dict[str, Segment]) -> tuple[Entry | None, tuple[str, str] | None]:
        """One segment's entry, or (reason, detail) when its id row or label is unusable."""
        fields = [_text(f) for f in np.asarray(row, dtype=object).reshape(-1)]
        key = segment_key(*fields) if len(fields) == 3 else None
        if key is None:
            return None, ("id row is not (video id, start s, end s)", repr(fields)[:120])
        # float32, as every loader casts the labels (MulT dataset.py L31) before using them
        value = np.asarray(score).astype(np.float32).reshape(-1)
        if value.size != 1 or not math.isfinite(value[0]):
            return None, ("label is not one finite sentiment score", repr(value[:3].tolist()))
        if key in segments:
            first = segments[key]
            return None, ("two segments share an id", f"{key}: {PICKLE_SPLITS[first.split]} "
                                                       f"row {first.index}")
        segments[key] = Segment(split, index, *fields, float(value[0]))
        return Entry(key, sentiment_class(float(value[0]), self.labels), {}), None

    def read_split_file(self, path: Path) -> list[SplitRow]:
        raise SplitError(f"{path}: the MOSEI folds file lists every split; the build reads "
                         "it per split (give it as --split train=F --split val=F --split "
                         "test=F)")

    def read_split(self, path: Path, split: str) -> list[SplitRow]:
        """The segments of the fold ``split`` names in the folds file at ``path``: every
        segment found of each fold video, and a fold video with none under its own id
        (recorded as having no media). Needs :meth:`find` first."""
        if split not in FOLD_NAMES:
            raise SplitError(f"--split {split}={path}: the MOSEI folds are train, val and test")
        line, videos = read_folds(path)[split]
        rows = []
        for video in videos:
            found = self.videos.get(video)
            rows += [SplitRow(key, label, line) for key, label in found] if found else \
                [SplitRow(video, 0, line)]
        return rows

    def process(self, raw: Path, entry: Entry) -> tuple[dict[str, bytes], dict[str, Any]]:
        loaded = load(raw / self.file_name)
        segment = loaded.segments.get(entry.key)
        if segment is None:  # a worker: index the pickle as the planning process did
            self.find(raw)
            segment = loaded.segments[entry.key]
        arrays = loaded.arrays[segment.split]
        members, meta = {}, {"pickle": {"file": self.file_name, "split": segment.split,
                                        "index": segment.index, "video": segment.video,
                                        "start": segment.start, "end": segment.end,
                                        "sentiment": segment.score}}
        for modality, params in self.modalities().items():
            features, note = _features(arrays[modality][segment.index], modality, params)
            members.update(kinds.encode(modality, "features", features))
            meta[modality] = note
        return members, meta


def _features(raw: np.ndarray, modality: str, params: dict[str, Any]
              ) -> tuple[np.ndarray, dict[str, Any]]:
    """One modality's (T, D) float32 features and what was done to them; a wrong shape,
    NaN or infinity is a :class:`MediaError` (the segment is skipped and recorded)."""
    shape = tuple(params["shape"])
    if raw.shape != shape or raw.dtype.kind not in "fiu":
        raise MediaError(f"{modality} features have the wrong shape",
                         f"{list(raw.shape)} {raw.dtype}, the {params['source']} layout is "
                         f"{list(shape)} float")
    features = raw.astype(np.float32)
    note: dict[str, Any] = {"dtype": str(raw.dtype)}
    if params.get("neg_inf") == "zero":
        negative = np.isneginf(features)
        note["neg_inf_zeroed"] = int(negative.sum())
        features[negative] = 0.0
    if not np.isfinite(features).all():
        nan = int(np.isnan(features).sum())
        what = "NaN" if nan else "infinite values"
        raise MediaError(f"{modality} features hold {what}",
                         f"{nan} NaN, {int((~np.isfinite(features)).sum()) - nan} infinite "
                         f"of {features.size} (after float32)")
    return features, note
