"""`ccat-data build vggsound`: the real test list against synthetic media; both list forms,
padded and unpadded names, flat and per-class folders, missing media per split, class
order, the carved validation split, refusals."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import (SHARED_DATA, TINY_BUILD, assert_keys_unique, invoke, run_cli,
                      train_and_evaluate)
from preprocess.datasets.synth_clips import (ClipStyle, synthesize_vggsound, vggsound_csv,
                                             youtube_ids)
from preprocess.datasets.vggsound import class_order, clip_key, read_list

VGG = SHARED_DATA / "vggsound"
TEST_LIST = VGG / "test.csv"
REAL = pytest.mark.skipif(not TEST_LIST.is_file(), reason=f"the real VGGSound lists are not at {VGG}")
STYLE = ClipStyle(fps=4, width=32, height=24, seconds=1.0)
PER_LABEL = 2  # real test clips given media per chosen label


def test_both_name_forms_map_to_one_key() -> None:
    assert clip_key("--0PQM4-hqg_000030") == clip_key("--0PQM4-hqg_30") == "--0PQM4-hqg_30"
    assert clip_key("short_30") is None and clip_key("--0PQM4-hqg_3x") is None


@REAL
def test_real_test_list_reads_15446_rows_of_309_labels_quoted_commas_included() -> None:
    rows = read_list(TEST_LIST, "test")
    assert len(rows) == len({key for key, _, _ in rows}) == 15446
    labels = Counter(label for _, label, _ in rows)
    assert len(labels) == 309 and labels["bird chirping, tweeting"] == 50
    stat = [row[0] for row in csv.reader(VGG.joinpath("stat.csv").read_text().splitlines())]
    assert class_order({"test": rows}, {}, "sorted") == sorted(stat)


@pytest.fixture(scope="module")
def real_raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """Media for PER_LABEL real test rows of three labels (unpadded names, per-class
    folders) and for a made-up four-column train list of the same labels (padded, flat)."""
    if not TEST_LIST.is_file():
        pytest.skip(f"the real VGGSound lists are not at {VGG}")
    root = tmp_path_factory.mktemp("vgg")
    raw = root / "raw"
    rows = read_list(TEST_LIST, "test")
    labels = sorted({label for _, label, _ in rows})
    chosen = ["bird chirping, tweeting", labels[0], labels[-1]]
    tested = [r for label in chosen for r in [r for r in rows if r[1] == label][:PER_LABEL]]
    test_clips = [(key[:11], int(key[12:]), label) for key, label, _ in tested]
    for video, start, label in test_clips:
        synthesize_vggsound(raw, [(video, start, label)], labels, 0, STYLE, padded=False,
                            per_class=True)
    train = [(video, 10, chosen[i % 3], "train") for i, video in enumerate(youtube_ids(12, 5))]
    synthesize_vggsound(raw, [(v, s, label) for v, s, label, _ in train], labels, 1, STYLE)
    train_list = root / "train_part.csv"
    train_list.write_text(vggsound_csv(train + [(youtube_ids(1, 9)[0], 0, chosen[0], "train")]))
    return raw, train_list, test_clips


@REAL
def test_real_test_list_against_synthetic_media(real_raw, tmp_path: Path, capsys) -> None:
    raw, train_list, test_clips = real_raw
    out = tmp_path / "vgg"
    code, printed, err = run_cli(["build", "vggsound", "--raw", raw, "--out", out,
                                  f"--split=train={train_list}", f"--split=test={TEST_LIST}",
                                  *TINY_BUILD], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    counts = {name: entry["num_samples"] for name, entry in manifest["splits"].items()}
    assert counts["test"] == len(test_clips) and counts["train"] + counts["val"] == 12
    assert len(manifest["classes"]) == 309 and manifest["classes"] == sorted(manifest["classes"])
    missing = Counter(s["split"] for s in manifest["skipped"] if s["reason"] == "no media for this id")
    assert missing == {"test": 15446 - len(test_clips), "train": 1}
    recipe = manifest["sources"]["recipe"]
    assert recipe["class_order"] == "sorted" and recipe["missing_media"] == dict(missing)
    assert manifest["sources"]["split"]["val_fraction"] == 0.1
    assert "no media for this id" in printed and str(15446 - len(test_clips)) in printed
    assert_keys_unique(out)


@REAL
def test_first_appearance_order_follows_the_train_rows_on_disk() -> None:
    test_rows = read_list(TEST_LIST, "test")
    on_disk = {key: None for key, _, _ in test_rows[100:]}  # the first 100 rows are gone
    order = class_order({"train": test_rows}, on_disk, "first-appearance")
    seen = list(dict.fromkeys(label for _, label, _ in test_rows[100:]))
    assert order[:len(seen)] == seen and sorted(order) == sorted({r[1] for r in test_rows})
    assert order != sorted(order)


@pytest.fixture(scope="module")
def synth_vgg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ccat-data synth vggsound`: flat padded clips and vggsound.csv."""
    raw = tmp_path_factory.mktemp("synth_vgg") / "vggsound"
    assert invoke(["synth", "vggsound", "--out", raw, "--clips", "16", "--classes", "2",
                   "--seconds", "1", "--fps", "4", "--width", "32", "--height", "24"]) == 0
    return raw


def test_synth_tree_builds_from_its_own_csv_in_both_splits(synth_vgg, tmp_path, capsys):
    listed = synth_vgg / "vggsound.csv"
    code, _, err = run_cli(["build", "vggsound", "--raw", synth_vgg, "--out", tmp_path / "o",
                            f"--split=train={listed}", f"--split=test={listed}", *TINY_BUILD],
                           capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["splits"]["test"]["num_samples"] == 4 and not manifest["skipped"]
    assert manifest["classes"] == ["bird chirping, tweeting", "dog barking"]


def test_twice_stored_clips_and_folder_disagreements_are_skipped(synth_vgg, tmp_path, capsys):
    raw = Path(shutil.copytree(synth_vgg, tmp_path / "raw"))
    clips = sorted(raw.glob("*.mp4"))
    padded = clips[0]
    shutil.copy(padded, raw / f"{padded.stem[:12]}{int(padded.stem[12:])}.mp4")  # unpadded twin
    (raw / "dog barking").mkdir()
    rows = read_list(raw / "vggsound.csv", "train")
    bird = next(key for key, label, _ in rows if label.startswith("bird") and key != clip_key(padded.stem))
    moved = next(p for p in clips if clip_key(p.stem) == bird)
    moved.rename(raw / "dog barking" / moved.name)
    listed = raw / "vggsound.csv"
    code, printed, err = run_cli(["build", "vggsound", "--raw", raw, "--out", tmp_path / "o",
                                  f"--split=train={listed}", f"--split=test={listed}",
                                  *TINY_BUILD], capsys)
    assert code == 0, err
    skipped = json.loads((tmp_path / "o" / "manifest.json").read_text())["skipped"]
    reasons = {s["reason"]: s for s in skipped}
    assert reasons["the same clip is stored twice"]["id"] == clip_key(padded.stem)
    assert reasons["split file label disagrees with the media folder"]["id"] == bird


@pytest.mark.parametrize("splits, says", [
    ([], "VGGSound needs its list"),
    (["val"], "has no rows of split val"),
])
def test_list_problems_are_one_sentence(splits, says, synth_vgg, tmp_path, capsys) -> None:
    listed = synth_vgg / "vggsound.csv"
    code, _, err = run_cli(["build", "vggsound", "--raw", synth_vgg, "--out", tmp_path / "o",
                            *[f"--split={s}={listed}" for s in splits], *TINY_BUILD], capsys)
    assert code == 1 and says in err and "Traceback" not in err


def test_a_malformed_row_names_its_line(synth_vgg: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("abc,1,dog barking,train\nxyz\n")
    code, _, err = run_cli(["build", "vggsound", "--raw", synth_vgg, "--out", tmp_path / "o",
                            f"--split=train={bad}", *TINY_BUILD], capsys)
    assert code == 1 and f"{bad} line 1 is 'abc,1,dog barking,train'" in err


def test_built_clips_train_and_evaluate(synth_vgg: Path, tmp_path: Path, capsys,
                                        pytestconfig) -> None:
    """The synthetic tree's build (the validation split carved from train) feeds VGGSound's
    config end to end: CCAT's two stages, then a test-split evaluation."""
    listed, data = synth_vgg / "vggsound.csv", tmp_path / "shards"
    code, _, err = run_cli(["build", "vggsound", "--raw", synth_vgg, "--out", data,
                            f"--split=train={listed}", f"--split=test={listed}", *TINY_BUILD],
                           capsys)
    assert code == 0, err
    metrics = train_and_evaluate(pytestconfig.rootpath / "configs" / "vggsound.yaml", data,
                                 tmp_path / "run", "data.batch_size=4")
    assert set(metrics["accuracy"]) == {"fused", "audio", "video"}
