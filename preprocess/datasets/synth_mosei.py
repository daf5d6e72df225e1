"""A synthetic CMU-MOSEI raw folder in MulT's exact layout: the feature pickle and the SDK's
folds file, for tests and the demo.

Each segment has a sentiment score in [-3, 3] (a multiple of 1/3, as the mean of three
annotators' integer scores is); every modality's features carry the score along one fixed
direction, text at full strength, audio at half, vision at a quarter, plus noise, so the
modalities differ in how easy they are. Audio holds a few ``-inf`` values, as COVAREP's
features in the real pickle do (MulT's loader zeroes them).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from preprocess.datasets.mosei import (FEATURE_DIMS, FOLD_NAMES, FOLDS_FILE, MODALITIES,
                                       PICKLE_SPLITS, SENTIMENT_RANGE, VARIANTS)
from preprocess.datasets import SPLITS_DIR

SEGMENTS_PER_VIDEO = 4
FOLD_SHARES = {"train": 0.7, "valid": 0.1, "test": 0.2}  # of the videos, as the real folds
CUE_SCALE = {"text": 1.0, "audio": 0.5, "vision": 0.25}
NEG_INF_SHARE = 0.01  # audio values set to -inf


def _video_ids(count: int, rng: np.random.Generator) -> list[str]:
    """YouTube-like ids (11 characters, some starting with '-' or '_') and all-digit ids,
    as the real folds hold both."""
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
    ids = []
    for i in range(count):
        ids.append(str(rng.integers(10000, 300000)) if i % 7 == 3 else
                   "".join(rng.choice(alphabet, 11)))
    return list(dict.fromkeys(ids))  # distinct, in order


def _split(videos: list[str], segments: int, steps: dict[str, int], strength: float,
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One pickle split of ``segments`` segments over ``videos``."""
    scores = rng.integers(-9, 10, segments) / 3.0
    rows, cursor = [], {}
    for i in range(segments):
        video = videos[i % len(videos)]
        start = cursor.get(video, round(float(rng.uniform(0, 30)), 3))
        end = round(start + float(rng.uniform(2, 20)), 3)
        cursor[video] = round(end + 0.5, 3)
        rows.append([video, f"{start:.3f}".rstrip("0").rstrip("."), f"{end:.3f}"])
    split = {"id": np.array(rows, dtype=object),
             "labels": scores.reshape(-1, 1, 1).astype(np.float32)}
    for modality in MODALITIES:
        dim, time = FEATURE_DIMS[modality], steps[modality]
        direction = np.random.default_rng([7, dim]).standard_normal(dim)
        cue = strength * CUE_SCALE[modality] * scores / SENTIMENT_RANGE
        x = rng.standard_normal((segments, time, dim)) + cue[:, None, None] * direction
        if modality == "audio":
            x[rng.random(x.shape) < NEG_INF_SHARE] = -np.inf
        split[modality] = x.astype(np.float64 if modality == "text" else np.float32)
    return split


def _shares(total: int) -> dict[str, int]:
    """``total`` (at least 3) dealt to the pickle's splits by FOLD_SHARES, one at least each."""
    valid, test = (max(1, round(FOLD_SHARES[s] * total)) for s in ("valid", "test"))
    return {"train": total - valid - test, "valid": valid, "test": test}


def synthesize_mosei(out: Path, segments: int, seed: int, variant: str, strength: float,
                     progress: Callable[[int], None]) -> dict[str, int]:
    """Write ``out/<the variant's pickle>`` and ``out/splits/cmu_mosei_std_folds.py``;
    returns the segments per pickle split."""
    rng = np.random.default_rng(seed)
    name, steps = VARIANTS[variant]
    videos = _video_ids(max(len(PICKLE_SPLITS), -(-segments // SEGMENTS_PER_VIDEO)), rng)
    video_counts, counts = _shares(len(videos)), _shares(segments)
    folds, data, first, done = {}, {}, 0, 0
    for split in PICKLE_SPLITS:
        folds[split] = videos[first:first + video_counts[split]]
        first += video_counts[split]
        data[split] = _split(folds[split], counts[split], steps, strength, rng)
        done += counts[split]
        progress(done)
    out.mkdir(parents=True, exist_ok=True)
    with (out / name).open("wb") as file:
        pickle.dump(data, file, protocol=4)
    (out / SPLITS_DIR).mkdir(exist_ok=True)
    ours = dict(zip(PICKLE_SPLITS, PICKLE_SPLITS.values()))
    # the SDK's layout: three list literals, train, test, valid, each followed by a blank line
    lines = [f"{FOLD_NAMES[ours[split]]}={folds[split]!r}\n\n"
             for split in ("train", "test", "valid")]
    (out / SPLITS_DIR / FOLDS_FILE).write_text("".join(lines), encoding="utf-8")
    return counts
