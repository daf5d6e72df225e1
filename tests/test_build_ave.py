"""`ccat-data build ave`: AVE's real lists against synthetic media; event windows, the
zero-length row, videos in two splits, unique keys, refusals."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from conftest import (SHARED_DATA, TINY_BUILD, assert_keys_unique, invoke, run_cli,
                      train_and_evaluate)
from preprocess.datasets.ave import CLASSES, SPLIT_FILES, Ave, read_rows
from preprocess.datasets.synth_clips import ClipStyle, synthesize_ave
from preprocess.splits import read_text_lines

AVE = SHARED_DATA / "ave"
REAL = pytest.mark.skipif(not (AVE / "Annotations.txt").is_file(),
                          reason=f"the real AVE lists are not at {AVE}")
STYLE = ClipStyle(fps=4, width=32, height=24)
SPLIT_ARGS = [f"--split={name}={AVE / file}" for name, file in SPLIT_FILES.items()]


def real_rows() -> dict[str, list[tuple[int, str, int, int]]]:
    return {name: [row for _, row in read_rows(AVE / file)] for name, file in SPLIT_FILES.items()}


def chosen_videos(rows: dict[str, list[tuple[int, str, int, int]]]) -> set[str]:
    """A few real videos that exercise every rule: one in train and val, one in train and
    test, the zero-length row's, and a train video of every class val or test then holds."""
    in_split = {name: {r[1] for r in members} for name, members in rows.items()}
    chosen = {min(in_split["train"] & in_split["val"]), min(in_split["train"] & in_split["test"]),
              "VWi2ENBuTbw"}
    held = {r[0] for name in ("val", "test") for r in rows[name] if r[1] in chosen}
    held |= {rows["val"][0][0], rows["test"][0][0]}
    chosen |= {rows["val"][0][1], rows["test"][0][1]}
    for label in sorted(held):
        chosen.add(next(r[1] for r in rows["train"] if r[0] == label and r[2] < r[3]))
    return chosen


@pytest.fixture(scope="module")
def real_raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    """Synthetic media for a few of the real AVE videos, the real lists left where they are."""
    if not (AVE / "Annotations.txt").is_file():
        pytest.skip(f"the real AVE lists are not at {AVE}")
    raw = tmp_path_factory.mktemp("ave") / "AVE_Dataset"
    videos = chosen_videos(real_rows())
    annotated = [(CLASSES[r[0]], r[1], r[2], r[3]) for _, r in read_rows(AVE / "Annotations.txt")
                 if r[1] in videos]
    synthesize_ave(raw, annotated, CLASSES, 0, STYLE)
    return raw, videos


@REAL
def test_real_lists_parse_28_classes_4143_events_and_keys_unique() -> None:
    assert CLASSES == read_text_lines(AVE / "categories.txt")
    rows = real_rows()
    assert [len(rows[s]) for s in ("train", "val", "test")] == [3339, 402, 402]
    recipe = Ave()
    keys = [row.key for file in SPLIT_FILES.values()
            for row in recipe.read_split_file(AVE / file)]
    assert len(keys) == len(set(keys)) == 4143
    assert len(read_rows(AVE / "Annotations.txt")) == 4143  # the header line is not a row


@REAL
def test_real_lists_against_synthetic_media(real_raw, tmp_path: Path, capsys) -> None:
    raw, videos = real_raw
    out = tmp_path / "ave"
    code, printed, err = run_cli(["build", "ave", "--raw", raw, "--out", out,
                                  "--annotations", AVE / "Annotations.txt", *SPLIT_ARGS,
                                  *TINY_BUILD], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    rows = real_rows()
    expected = {name: sum(r[1] in videos and r[2] < r[3] for r in members)
                for name, members in rows.items()}
    assert {n: e["num_samples"] for n, e in manifest["splits"].items()} == expected
    skipped = Counter((s["split"], s["reason"]) for s in manifest["skipped"])
    assert skipped[("train", "zero-length event window (StartTime = EndTime)")] == 1
    for name, members in rows.items():
        missing = sum(r[1] not in videos for r in members)
        assert skipped[(name, "no media for this id")] == missing
    assert sum(skipped.values()) == 4143 - sum(expected.values())
    recipe = manifest["sources"]["recipe"]
    assert recipe["window"] == "event" and len(recipe["videos_in_two_splits"]) == 18
    assert_keys_unique(out)
    assert "zero-length event window" in printed


@REAL
def test_held_out_skips_the_train_row_of_a_video_in_two_splits(real_raw, tmp_path, capsys):
    raw, videos = real_raw
    out = tmp_path / "held"
    code, _, err = run_cli(["build", "ave", "--raw", raw, "--out", out, "--annotations",
                            AVE / "Annotations.txt", "--shared-videos", "held-out",
                            *SPLIT_ARGS, *TINY_BUILD], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    held = [s for s in manifest["skipped"] if s["reason"].startswith("video also in val")]
    rows = real_rows()
    elsewhere = {r[1] for name in ("val", "test") for r in rows[name]}
    shared_train_rows = sum(r[1] in elsewhere for r in rows["train"])
    assert shared_train_rows == 19  # 18 videos; 0f_iTO5t3hU has two train rows
    assert len(held) == 19 and {s["split"] for s in held} == {"train"}
    in_train = {m.split("=")[0].rsplit("_", 1)[0] for shard in
                manifest["splits"]["train"]["shards"] for m in shard["membership"].split()}
    others = {m.split("=")[0].rsplit("_", 1)[0] for name in ("val", "test") for shard in
              manifest["splits"][name]["shards"] for m in shard["membership"].split()}
    assert not in_train & others


def meta_of(out: Path) -> list[dict]:
    metas = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.load(tar.extractfile(m)) for m in tar.getmembers()
                      if m.name.endswith(".meta.json")]
    return metas


@pytest.fixture(scope="module")
def synth_ave(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ccat-data synth ave`: made-up events, the lists beside Annotations.txt."""
    raw = tmp_path_factory.mktemp("synth_ave") / "AVE_Dataset"
    assert invoke(["synth", "ave", "--out", raw, "--events", "10", "--classes", "2",
                   "--fps", "4"]) == 0
    return raw


def test_event_window_frames_and_audio_come_from_the_event(synth_ave: Path, tmp_path: Path,
                                                           capsys) -> None:
    windows = {f"{r[1]}_{r[0]}": (r[2], r[3]) for _, r in read_rows(synth_ave / "Annotations.txt")}
    for window in ("event", "clip"):
        out = tmp_path / window
        code, _, err = run_cli(["build", "ave", "--raw", synth_ave, "--out", out, "--window",
                                window, *TINY_BUILD], capsys)
        assert code == 0, err
        for meta in meta_of(out):
            start, end = windows[meta["id"]]
            assert meta["event"] == [start, end]
            fps, indices = meta["video"]["fps"], meta["video"]["frame_indices"]
            if window == "event":
                assert all(start <= i / fps < end for i in indices)
                assert meta["audio"]["window"] == [start, end]
                assert meta["audio"]["duration"] == end - start
            else:
                # the whole clip: 10 s, plus the AAC encoder's priming samples
                assert "window" not in meta["audio"] and 10.0 <= meta["audio"]["duration"] < 10.1
        recorded = json.loads((out / "manifest.json").read_text())["sources"]["recipe"]
        assert recorded["window"] == window


def test_bad_lists_are_one_sentence(synth_ave: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "trainSet.txt"
    bad.write_text("Church bell&abc&good&3\n")
    code, _, err = run_cli(["build", "ave", "--raw", synth_ave, "--out", tmp_path / "o",
                            f"--split=train={bad}", *TINY_BUILD], capsys)
    assert code == 1 and f"{bad} line 1 is" in err and "Traceback" not in err
    code, _, err = run_cli(["build", "ave", "--raw", tmp_path, "--out", tmp_path / "o",
                            *TINY_BUILD], capsys)
    assert code == 1 and "Annotations.txt does not exist" in err
    code, _, err = run_cli(["build", "ave", "--raw", synth_ave, "--out", tmp_path / "o",
                            "--window", "segment", *TINY_BUILD], capsys)
    assert code == 2 and "--window 'segment': choose event or clip" in err


def test_download_says_how_to_get_the_media_even_offline(tmp_path: Path, monkeypatch, capsys):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, out, err = run_cli(["download", "ave", "--out", tmp_path], capsys)
    assert code == 1 and "save the published lists trainSet.txt" in err
    assert "AVE_Dataset.zip" in out and f"{tmp_path / 'ave'} holds AVE/<VideoID>.mp4" in out


def test_built_events_train_and_evaluate(synth_ave: Path, tmp_path: Path, capsys,
                                         pytestconfig) -> None:
    """The event-window build feeds AVE's config end to end: CCAT's two stages on audio and
    video, then a test-split evaluation with both modalities' accuracies."""
    data = tmp_path / "shards"
    code, _, err = run_cli(["build", "ave", "--raw", synth_ave, "--out", data, *TINY_BUILD],
                           capsys)
    assert code == 0, err
    metrics = train_and_evaluate(pytestconfig.rootpath / "configs" / "ave.yaml", data,
                                 tmp_path / "run", "data.batch_size=4")
    assert set(metrics["accuracy"]) == {"fused", "audio", "video"}
