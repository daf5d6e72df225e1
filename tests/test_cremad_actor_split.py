"""`ccat-data build cremad --split-by actor|actor-folds`: actor-disjoint splits, TFDS
crema_d's exactly, recorded in the manifest; the random split stays the default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import SHARED_DATA, TINY_BUILD, run_cli
from preprocess.datasets.cremad import (ACTORS, TFDS_DROPPED, Cremad, actor_folds,
                                        label_of, tfds_actor_split)
from preprocess.splits import Entry, read_text_lines

CREMAD = SHARED_DATA / "cremad"
# ../shared/data/README.md, recomputed there from tensorflow_datasets/audio/crema_d.py
TFDS_VAL = "1015 1020 1021 1030 1050 1070 1079 1089 1090".split()
TFDS_TEST = ("1010 1013 1022 1026 1037 1038 1040 1045 1047 1048 1059 1065 1066 1068 1071 "
             "1073 1084 1086 1088").split()


def found_from(ids: list[str]) -> dict[str, Entry]:
    return {i: Entry(i, label_of(i), {}) for i in ids}


def test_tfds_actor_lists_are_the_published_ones() -> None:
    split = tfds_actor_split()
    assert split["val"] == TFDS_VAL and split["test"] == TFDS_TEST
    assert split["train"] == sorted(set(ACTORS) - set(TFDS_VAL) - set(TFDS_TEST))
    assert [len(split[s]) for s in ("train", "val", "test")] == [63, 9, 19]


@pytest.mark.skipif(not (CREMAD / "train.csv").is_file(),
                    reason=f"the real CREMA-D lists are not at {CREMAD}")
def test_the_real_7442_clips_split_5144_738_1556_with_four_recorded_drops() -> None:
    ids = [line.split(",")[0] for name in ("train.csv", "test.csv")
           for line in read_text_lines(CREMAD / name)]
    assert len(set(ids)) == 7442
    lists = Cremad(split_by="actor").own_lists(Path("raw"), found_from(ids), {})
    assert {s: len(rows) for s, rows in lists.rows.items()} == {"train": 5144, "val": 738,
                                                                 "test": 1556}
    assert sorted(r["id"] for r in lists.skipped) == sorted(TFDS_DROPPED)
    assert {r["reason"] for r in lists.skipped} == {"left out of the TFDS crema_d split"}
    actors = {s: {row.key.split("_")[0] for row in rows} for s, rows in lists.rows.items()}
    assert not (actors["train"] & actors["val"] or actors["train"] & actors["test"]
                or actors["val"] & actors["test"])
    assert lists.record["actors"]["test"] == TFDS_TEST


def test_actor_folds_partition_the_actors_and_follow_the_seed() -> None:
    folds = [actor_folds(5, k, seed=3) for k in range(5)]
    tests = [a for fold in folds for a in fold["test"]]
    assert sorted(tests) == sorted(ACTORS)  # every actor is tested exactly once
    for fold in folds:
        assert not set(fold["train"]) & (set(fold["val"]) | set(fold["test"]))
        assert sorted(fold["train"] + fold["val"] + fold["test"]) == sorted(ACTORS)
    assert actor_folds(5, 0, seed=3) == folds[0] and actor_folds(5, 0, seed=4) != folds[0]


def test_actor_build_keeps_actors_disjoint_records_the_rule_and_skips_tfds_drops(
        raw_copy: Path, tmp_path: Path, capsys) -> None:
    donor = sorted((raw_copy / "AudioWAV").glob("*.wav"))[0].stem
    for folder, suffix in (("AudioWAV", ".wav"), ("VideoFlash", ".flv")):
        shutil.copy(raw_copy / folder / f"{donor}{suffix}",
                    raw_copy / folder / f"1040_ITH_SAD_XX{suffix}")
    out = tmp_path / "actor"
    code, printed, err = run_cli(["build", "cremad", "--raw", raw_copy, "--out", out,
                                  "--split-by", "actor", *TINY_BUILD], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    recipe = manifest["sources"]["recipe"]
    assert recipe["split_by"] == "actor" and recipe["rule"] == "tfds-crema_d"
    assert recipe["actors"]["val"] == TFDS_VAL
    split_of = {a: s for s, members in tfds_actor_split().items() for a in members}
    for split, entry in manifest["splits"].items():
        keys = [m.split("=")[0] for shard in entry["shards"]
                for m in shard["membership"].split()]
        assert keys and all(split_of[k.split("_")[0]] == split for k in keys)
    assert {"id": "1040_ITH_SAD_XX", "split": "test",
            "reason": "left out of the TFDS crema_d split"} in manifest["skipped"]
    assert "left out of the TFDS crema_d split" in printed


def test_default_build_records_no_actor_rule(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    assert "recipe" not in manifest["sources"]


@pytest.mark.parametrize("args, says", [
    (["--fold", "2"], "give them with --split-by actor-folds"),
    (["--split-by", "actor-folds", "--folds", "4", "--fold", "4"], "--fold 4 is not a fold"),
    (["--split-by", "speaker"], "--split-by 'speaker': choose random or actor or actor-folds"),
    (["--split-by", "actor", "--split", "train=x.csv"], "drop --split train"),
])
def test_actor_options_are_refused_in_one_sentence(args, says, synth_raw, tmp_path, capsys):
    code, _, err = run_cli(["build", "cremad", "--raw", synth_raw, "--out", tmp_path / "o",
                            *args, *TINY_BUILD], capsys)
    assert code in (1, 2) and says in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
