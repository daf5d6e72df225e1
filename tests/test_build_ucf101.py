"""`ccat-data build ucf101` on the synthetic tree in UCF-101's layout (RGB + flow, both flow
sources), TV-L1 against known motion, the flow kind's flip, bad input recorded, the real
official lists (skipped without ../shared/data), and one short training run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ccat.config import DataConfig, ModelConfig
from ccat.data import open_dataset
from ccat.data.pipeline import Transform
from ccat.data.reader import Sample
from ccat.models.encoders import FlowEncoder
from conftest import SHARED_DATA, assert_keys_unique, run_cli, train_and_evaluate
from preprocess import writer
from preprocess.datasets.synth import UCF_SPEED, synthesize_ucf101
from preprocess.datasets.ucf101 import Ucf101, read_class_index, video_key
from preprocess.flow import quantise, tvl1


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """12 clips in 3 classes with a released-layout flow tree; copy it before changing it."""
    root = tmp_path_factory.mktemp("ucf") / "raw"
    assert synthesize_ucf101(root, 12, 0, num_classes=3) == {"train": 9, "test": 3}
    return root


def build(raw: Path, out: Path, capsys, *extra) -> tuple[int, str, str]:
    return run_cli(["build", "ucf101", "--raw", raw, "--out", out, "--frame-size", "32",
                    "--workers", "1", "--shard-size", "8", *extra], capsys)


def true_drift(raw: Path, key: str) -> np.ndarray:
    """The synthetic clip's (u, v) in px, from its flow tree's first frame (quantised)."""
    from PIL import Image

    return np.array([np.asarray(Image.open(raw / "tvl1_flow" / axis / key / "frame000001.jpg"),
                                np.float64).mean() * 40 / 255 - 20 for axis in ("u", "v")])


def test_precomputed_flow_folds_and_the_handstand_spelling(raw: Path, tmp_path: Path,
                                                           capsys) -> None:
    code, out, _ = build(raw, tmp_path / "f1", capsys, "--flow", "precomputed")
    assert code == 0 and "published split files: train=" in out and "trainlist01.txt" in out
    ds = open_dataset(tmp_path / "f1")
    assert ds.classes == ["Hammering", "HammerThrow", "HandstandPushups"]  # classInd order
    assert ds.manifest["sources"]["recipe"]["fold"] == 1
    assert ds.modalities["flow"]["stack"] == 1 and ds.modalities["flow"]["num_snippets"] == 3
    test = {s.key: s for s in ds.iter_samples("test")}
    assert sorted(test) == ["v_HammerThrow_g01_c01", "v_Hammering_g01_c01",
                            "v_HandstandPushups_g01_c01"]  # the files spell HandStand
    for sample in test.values():
        assert sample.data["flow"].shape == (6, 32, 32) and sample.data["video"].shape == (
            3, 32, 32, 3)
        u, v = (sample.data["flow"][c::2].astype(float).mean() * 40 / 255 - 20 for c in (0, 1))
        assert np.allclose([u, v], true_drift(raw, sample.key), atol=0.1)
        assert abs(np.hypot(u, v) - UCF_SPEED) < 0.2
    assert sum(ds.manifest["splits"][s]["num_samples"] for s in ("train", "val")) == 9
    code, _, _ = build(raw, tmp_path / "f3", capsys, "--flow", "precomputed", "--fold", "3",
                       "--class-order", "sorted")
    ds3 = open_dataset(tmp_path / "f3")
    assert ds3.classes == ["HammerThrow", "Hammering", "HandstandPushups"]
    assert sorted(s.key for s in ds3.iter_samples("test")) == [
        "v_HammerThrow_g15_c01", "v_Hammering_g15_c01", "v_HandstandPushups_g15_c01"]
    assert ds3.manifest["sources"]["recipe"]["class_order"] == "sorted class names"
    code, _, err = build(raw, tmp_path / "f4", capsys, "--fold", "4")
    assert code == 2 and "--fold 4 is out of range: give a value from 1 to 3" in err


def test_tvl1_recovers_a_known_shift() -> None:
    from scipy.ndimage import gaussian_filter, shift

    rng = np.random.default_rng(0)
    texture = gaussian_filter(rng.uniform(0, 255, (48, 64)), 2.0)
    texture = (texture - texture.min()) / np.ptp(texture) * 255
    moved = shift(texture, (0.5, -1.25), order=3, mode="nearest")  # down 0.5, left 1.25
    flow = tvl1(texture, moved)
    assert flow.shape == (2, 48, 64) and flow.dtype == np.float32
    inner = flow[:, 8:-8, 8:-8].reshape(2, -1).mean(1)
    assert np.allclose(inner, [-1.25, 0.5], atol=0.1)
    assert quantise(np.array([-25.0, -20.0, 0.0, 19.999, 20.0, 30.0])).tolist() == [
        0, 0, 128, 255, 255, 255]


def test_tvl1_flow_built_from_the_clips_follows_their_motion(raw: Path, tmp_path: Path,
                                                             capsys) -> None:
    lists = raw / "ucfTrainTestlist"
    (tmp_path / "train.txt").write_bytes(b"Hammering/v_Hammering_g08_c01.avi 1\r\n"
                                         b"HammerThrow/v_HammerThrow_g08_c01.avi 2\r\n")
    (tmp_path / "test.txt").write_bytes(b"HammerThrow/v_HammerThrow_g01_c01.avi\r\n")
    code, _, _ = build(raw, tmp_path / "out", capsys, "--num-snippets", "1", "--val-fraction",
                       "0", "--split", f"train={tmp_path / 'train.txt'}",
                       "--split", f"test={tmp_path / 'test.txt'}")
    assert code == 0 and (lists / "classInd.txt").is_file()
    ds = open_dataset(tmp_path / "out")
    assert ds.modalities["flow"]["algorithm"] == "tvl1" and ds.modalities["flow"]["lam"] == 0.15
    for split in ("train", "test"):
        for sample in ds.iter_samples(split):
            u, v = (sample.data["flow"][c].astype(float).mean() * 40 / 255 - 20 for c in (0, 1))
            assert np.allclose([u, v], true_drift(raw, sample.key), atol=0.3), sample.key
            assert sample.meta["flow"]["field_indices"] == [9]  # the centre of 19 fields


def test_a_flip_negates_the_horizontal_flow_in_both_loaders() -> None:
    from ccat.data.device_cache import DeviceCache

    params = {"kind": "flow", "num_snippets": 1, "stack": 1, "size": 16}
    snippets = np.stack([np.full((16, 16), 200, np.uint8), np.full((16, 16), 90, np.uint8)])
    transform = Transform({"flow": params}, DataConfig(frame_size=16), train=True)
    seen = set()
    for seed in range(12):
        x = transform(Sample("k", 0, {"flow": snippets}, {}), np.random.default_rng(seed))
        u, v = x["flow"][0, 0].float().mean().item(), x["flow"][0, 1].float().mean().item()
        assert v == pytest.approx(90, abs=1) and u in (pytest.approx(200, abs=1),
                                                       pytest.approx(55, abs=1))
        seen.add(round(u))
    assert len(seen) == 2  # both a flip (u -> 255 - u) and none happened
    cache = DeviceCache.__new__(DeviceCache)
    cache.cfg = DataConfig(frame_size=16)
    batch = torch.from_numpy(np.stack([snippets[None]] * 8))  # [B, N, 2, H, W]
    out = cache.crop_flow(batch, 16, np.random.default_rng(0))
    us = out[:, 0, 0].float().mean((1, 2))
    assert set(us.round().tolist()) == {200.0, 55.0} and torch.all(out[:, 0, 1] == 90)


def test_flow_encoder_takes_two_planes_per_stacked_field() -> None:
    cfg = ModelConfig(width=16, encoder_width=4, encoder_blocks=[1, 1, 1, 1])
    encoder = FlowEncoder({"stack": 5}, cfg)
    assert encoder.trunk.stem[0].in_channels == 10
    tokens, pooled, mask = encoder(torch.randint(0, 256, (2, 3, 10, 32, 32), dtype=torch.uint8))
    assert tokens.shape == (2, 3, 16) and pooled.shape == (2, 16) and mask is None


def test_bad_clips_are_skipped_with_their_reasons(raw: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    videos = bad / "UCF-101"
    (videos / "Hammering" / "v_Hammering_g08_c01.avi").write_bytes(b"RIFF not an avi")
    shutil.move(videos / "HammerThrow" / "v_HammerThrow_g15_c01.avi",
                videos / "Hammering" / "v_HammerThrow_g15_c01.avi")
    (videos / "Hammering" / "notes.avi").write_bytes(b"")
    shutil.rmtree(bad / "tvl1_flow" / "u" / "v_HandstandPushups_g22_c01")
    (videos / "Hammering" / "v_Hammering_g22_c01.avi").unlink()
    code, _, _ = build(bad, tmp_path / "out", capsys, "--flow", "precomputed")
    assert code == 0
    skipped = {s["id"]: s["reason"] for s in open_dataset(tmp_path / "out").manifest["skipped"]}
    assert skipped == {"v_Hammering_g08_c01": "video is unreadable",
                       "v_HammerThrow_g15_c01": "file name names another class than its folder",
                       "notes": "file name is not v_<Class>_gGG_cCC.avi",
                       "v_HandstandPushups_g22_c01": "no precomputed flow for this clip",
                       "v_Hammering_g22_c01": "no media for this id"}
    train = bad / "ucfTrainTestlist" / "trainlist01.txt"
    train.write_bytes(train.read_bytes().replace(b".avi 1\r\n", b".avi 2\r\n", 1))
    code, _, err = build(bad, tmp_path / "out2", capsys, "--flow", "precomputed")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "trainlist01.txt line 4 labels Hammering 2, which classInd.txt gives to " \
           "HammerThrow" in err


def test_download_says_where_the_media_come_from(tmp_path: Path, capsys) -> None:
    code, out, _ = run_cli(["download", "ucf101", "--out", tmp_path], capsys)
    assert code == 0 and "crcv.ucf.edu" in out and "ucfTrainTestlist/classInd.txt" in out


# ---------------------------------------------------------------- the real lists

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "ucf101").is_dir(),
                                  reason=f"the official lists are not at {SHARED_DATA}/ucf101")
REAL_COUNTS = {1: (9537, 3783), 2: (9586, 3734), 3: (9624, 3696)}


@needs_shared
def test_real_class_index_and_its_sorted_order() -> None:
    classes = read_class_index(SHARED_DATA / "ucf101" / "classInd.txt")
    assert len(classes) == 101 and classes[36] == "HandstandPushups"
    differ = [(i, c, s) for i, (c, s) in enumerate(zip(classes, sorted(classes))) if c != s]
    assert differ == [(34, "Hammering", "HammerThrow"), (35, "HammerThrow", "Hammering"),
                      (46, "JumpingJack", "JumpRope"), (47, "JumpRope", "JumpingJack")]


@needs_shared
def test_real_lists_against_synthetic_media(tmp_path: Path) -> None:
    """Every clip of the official lists as an empty file under its class folder: the plan
    (which decodes nothing) puts each fold's lists into its splits, every clip once."""
    lists = tmp_path / "ucfTrainTestlist"
    shutil.copytree(SHARED_DATA / "ucf101", lists)
    names = {line.split()[0] for f in lists.glob("*list0*.txt")
             for line in f.read_text().splitlines() if line.strip()}
    assert len(names) == 13320
    for name in names:
        path = tmp_path / "UCF-101" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    assert sum("HandStand" in n for n in names) == sum("HandstandPushups/" in n for n in names)
    recipe = Ucf101(fold=1)
    files = {s: lists / n for s, n in recipe.published.split_files.items()}
    _, splits, skipped, unlisted = writer.plan(recipe, tmp_path, files,
                                               writer.BuildOptions(seed=0))
    counts = {s: len(v) for s, v in splits.items()}
    assert counts == {"train": 8578, "val": 959, "test": 3783}  # val: 10% of each class
    assert skipped == [] and unlisted == 0
    keys = {e.key for v in splits.values() for e in v}
    assert len(keys) == 13320 and all(video_key(k) == k for k in keys)
    assert not any("HandStand" in k for k in keys)
    for fold, (train, test) in REAL_COUNTS.items():  # the other folds: the same clips
        other = Ucf101(fold=fold)
        other.classes = other.class_index = recipe.classes
        rows = {s: other.read_split_file(lists / n) for s, n in other.published.split_files.items()}
        assert (len(rows["train"]), len(rows["test"])) == (train, test)
        assert {r.key for v in rows.values() for r in v} == keys
        labels = [int(line.split()[1]) for line in
                  (lists / f"trainlist0{fold}.txt").read_text().splitlines() if line.strip()]
        assert [r.label for r in rows["train"]] == [v - 1 for v in labels]  # classInd, 0-based


# ---------------------------------------------------------------- one short training run

BUILD = """
import sys
from preprocess.cli import app
root = sys.argv[1]
app(["synth", "ucf101", "--out", f"{root}/raw", "--clips", "16", "--classes", "2"],
    standalone_mode=False)
app(["build", "ucf101", "--raw", f"{root}/raw", "--out", f"{root}/shards", "--flow",
     "precomputed", "--frame-size", "32", "--shard-size", "8", "--workers", "1"],
    standalone_mode=False)
"""


def test_built_shards_train_and_evaluate(tmp_path: Path, pytestconfig) -> None:
    proc = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = tmp_path / "shards"
    assert_keys_unique(data)
    config = pytestconfig.rootpath / "configs" / "ucf101.yaml"
    metrics = train_and_evaluate(config, data, tmp_path / "run", "data.batch_size=4")
    assert set(metrics["accuracy"]) == {"fused", "video", "flow"}
