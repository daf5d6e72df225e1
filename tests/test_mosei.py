"""`ccat-data build mosei`: MulT's feature pickle read without running it, the SDK's folds
parsed without importing them, bad segments skipped with their reason, and the real folds
file (skipped without ../shared/data)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, run_cli
from preprocess import writer
from preprocess.datasets.mosei import Mosei, read_folds, segment_key, sentiment_class
from preprocess.datasets.synth_mosei import synthesize_mosei
from preprocess.safe_pickle import UnsafePickleError, load_arrays

PICKLE = "mosei_senti_data.pkl"
FOLDS = Path("splits") / "cmu_mosei_std_folds.py"
OPTIONS = writer.BuildOptions(workers=1, shard_size=16)


def synth(raw: Path, segments: int = 40, variant: str = "aligned") -> Path:
    synthesize_mosei(raw, segments, 0, variant, 1.0, lambda n: None)
    return raw


def split_files(raw: Path) -> dict[str, Path]:
    return {split: raw / FOLDS for split in ("train", "val", "test")}


def rewrite(raw: Path, change) -> None:
    """Load the synthetic pickle, let ``change(data)`` edit it, write it back."""
    data = load_arrays(raw / PICKLE)
    change(data)
    with (raw / PICKLE).open("wb") as file:
        pickle.dump(data, file, protocol=4)


class Payload:
    """A hostile pickle's object: unpickling it calls os.system, which creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------- the pickle is never run


def test_a_hostile_pickle_is_refused_in_one_sentence_and_runs_nothing(tmp_path, capsys):
    marker, raw = tmp_path / "pwned", tmp_path / "raw"
    synth(raw)
    data = load_arrays(raw / PICKLE)
    data["train"]["labels"] = Payload(marker)
    (raw / PICKLE).write_bytes(pickle.dumps(data))
    with pytest.raises(UnsafePickleError, match=r"asks to load (posix|os)\.system, which is "
                                                r"not a numpy array part"):
        load_arrays(raw / PICKLE)
    code, out, err = run_cli(["build", "mosei", "--raw", raw, "--out", tmp_path / "o"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "refusing to unpickle it" in lines[0], err
    assert not marker.exists() and not (tmp_path / "o").exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is real: plain pickle runs it
    assert marker.exists()


def test_the_unpickler_reads_arrays_of_every_protocol_and_plain_containers(tmp_path):
    value = {"a": [np.arange(6, dtype=np.float64).reshape(2, 3), (np.float32(1.5), "x")],
             "ids": np.array([["v", "1.0", "2.0"]], dtype=object), "u": np.array(["ab"])}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "p.pkl").write_bytes(pickle.dumps(value, protocol=protocol))
        loaded = load_arrays(tmp_path / "p.pkl")
        assert np.array_equal(loaded["a"][0], value["a"][0]) and loaded["a"][1] == (1.5, "x")
        assert loaded["ids"].tolist() == [["v", "1.0", "2.0"]] and loaded["u"][0] == "ab"


def test_a_damaged_pickle_is_one_sentence(tmp_path):
    (tmp_path / "p.pkl").write_bytes(pickle.dumps({"a": np.zeros(3)})[:-20])
    with pytest.raises(UnsafePickleError, match=r"is not a readable pickle .*download it again"):
        load_arrays(tmp_path / "p.pkl")


# ---------------------------------------------------------------- building


@pytest.mark.parametrize("labels", [2, 7])
def test_a_synthetic_pickle_builds_every_segment_into_its_fold(tmp_path, labels):
    raw = synth(tmp_path / "raw")
    recipe = Mosei(labels=labels)
    manifest = writer.build(recipe, raw, tmp_path / "out", split_files(raw), OPTIONS).manifest
    data = load_arrays(raw / PICKLE)
    counts = {ours: len(data[theirs]["labels"]) for theirs, ours in
              (("train", "train"), ("valid", "val"), ("test", "test"))}
    assert {s: e["num_samples"] for s, e in manifest["splits"].items()} == counts
    assert manifest["skipped"] == [] and len(manifest["classes"]) == labels
    assert manifest["sources"]["labels"]["classes"] == labels
    assert manifest["modalities"]["audio"] == {
        "kind": "features", "shape": [50, 74], "dtype": "float32", "neg_inf": "zero",
        "features": "COVAREP acoustic features", "source": PICKLE}
    scores = data["train"]["labels"].reshape(-1)
    want = [sentiment_class(float(s), labels) for s in scores]
    assert sum(manifest["splits"]["train"]["class_counts"][c] for c in set(want)) == len(want)


def test_labels_follow_balancebenchmark_and_mults_rules():
    assert [sentiment_class(s, 2) for s in (-0.01, 0.0, 2.5)] == [0, 1, 1]
    # clip to [-3, 3], numpy's round (half to even): 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    assert [Mosei(labels=7).classes[sentiment_class(s, 7)]
            for s in (-3.4, -2.5, 0.5, 1.5, 0.4, 3.0)] == ["-3", "-2", "0", "2", "0", "3"]


def test_stored_features_are_the_pickles_in_float32_with_audio_neg_inf_zeroed(tmp_path):
    from ccat.data import open_dataset

    raw = synth(tmp_path / "raw", segments=20)
    writer.build(Mosei(), raw, tmp_path / "out", split_files(raw), OPTIONS)
    data = load_arrays(raw / PICKLE)
    dataset = open_dataset(tmp_path / "out")
    sample = next(dataset.iter_samples("train"))
    meta = sample.meta["pickle"]
    assert meta["split"] == "train" and segment_key(meta["video"], meta["start"],
                                                    meta["end"]) == sample.key
    audio = data["train"]["audio"][meta["index"]].astype(np.float32)
    assert np.isneginf(audio).any() and sample.meta["audio"]["neg_inf_zeroed"] > 0
    audio[np.isneginf(audio)] = 0
    assert np.array_equal(sample.data["audio"], audio)
    assert np.array_equal(sample.data["text"], data["train"]["text"][meta["index"]]
                          .astype(np.float32))


def test_bad_segments_are_skipped_with_their_reason(tmp_path):
    raw = synth(tmp_path / "raw")

    def spoil(data):
        train = data["train"]
        train["vision"][1, 3, 2] = np.nan
        train["labels"][2] = np.nan
        train["id"][3, 1] = "not a time"
        train["id"][4] = train["id"][5]
        vision = np.empty(len(train["vision"]), dtype=object)
        vision[:] = list(train["vision"])
        vision[6] = vision[6][:, :30]
        train["vision"] = vision

    rewrite(raw, spoil)
    manifest = writer.build(Mosei(), raw, tmp_path / "out", split_files(raw), OPTIONS).manifest
    reasons = {s["reason"] for s in manifest["skipped"]}
    assert reasons == {"vision features hold NaN", "label is not one finite sentiment score",
                       "id row is not (video id, start s, end s)", "two segments share an id",
                       "vision features have the wrong shape"}, manifest["skipped"]
    data = load_arrays(raw / PICKLE)
    assert manifest["splits"]["train"]["num_samples"] == len(data["train"]["labels"]) - 5


def test_a_pickle_without_an_array_is_one_sentence(tmp_path, capsys):
    raw = synth(tmp_path / "raw")
    rewrite(raw, lambda data: data["valid"].pop("audio"))
    code, _, err = run_cli(["build", "mosei", "--raw", raw, "--out", tmp_path / "o"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "split 'valid' holds" in lines[0] and \
        "not numpy arrays text, audio, vision, labels, id" in lines[0], err


def test_fold_videos_without_segments_are_recorded_and_unlisted_segments_counted(tmp_path):
    raw = synth(tmp_path / "raw")
    folds = (raw / FOLDS).read_text()
    first_train_video = folds.split("'")[1]
    folds = folds.replace("standard_test_fold=[", "standard_test_fold=['gone_video', ")
    (raw / FOLDS).write_text(folds.replace(f"'{first_train_video}', ", "", 1))
    report = writer.build(Mosei(), raw, tmp_path / "out", split_files(raw), OPTIONS)
    assert {"id": "gone_video", "split": "test", "reason": "no media for this id"} in \
        report.manifest["skipped"]
    data = load_arrays(raw / PICKLE)
    dropped = sum(row[0] == first_train_video for row in data["train"]["id"])
    assert dropped and report.unlisted == dropped


def test_the_unaligned_variant_reads_500_step_audio_and_vision(tmp_path):
    raw = synth(tmp_path / "raw", segments=12, variant="unaligned")
    manifest = writer.build(Mosei(variant="unaligned"), raw, tmp_path / "out",
                            split_files(raw), OPTIONS).manifest
    assert manifest["modalities"]["vision"]["shape"] == [500, 35]
    assert manifest["modalities"]["text"]["shape"] == [50, 300]
    assert sum(e["num_samples"] for e in manifest["splits"].values()) == 12


def test_download_says_where_the_pickle_comes_from(tmp_path, capsys, monkeypatch):
    from preprocess import download

    monkeypatch.setattr(download, "_fetch_lists", lambda facts, target: iter(["lists"]))
    lines = list(download.download("mosei", tmp_path))
    assert any("Multimodal-Transformer" in line and str(tmp_path / "mosei") in line
               for line in lines)


# ---------------------------------------------------------------- the real folds


@pytest.mark.skipif(not (SHARED_DATA / "mosei").is_dir(),
                    reason="../shared/data/mosei (the SDK's real folds file) is absent")
def test_the_sdk_folds_parse_to_2249_300_678_videos_without_running_them():
    folds = read_folds(SHARED_DATA / "mosei" / "cmu_mosei_std_folds.py")
    sizes = {split: len(set(videos)) for split, (_, videos) in folds.items()}
    assert sizes == {"train": 2249, "val": 300, "test": 678}
    assert {split: line for split, (line, _) in folds.items()} == {"train": 1, "test": 3,
                                                                    "val": 5}
    every = [v for _, videos in folds.values() for v in videos]
    assert len(every) == len(set(every))
    assert sum(v.isdigit() for v in folds["train"][1]) == 328


# ---------------------------------------------------------------- the kind and the encoder


def test_verify_refuses_feature_arrays_that_are_not_finite_or_not_the_manifest_shape():
    from ccat.data import kinds

    params = {"kind": "features", "shape": [2, 3], "dtype": "float32"}
    good = np.zeros((2, 3), np.float32)
    assert kinds.check_array("audio", good, params) == ""
    assert "NaN or infinite" in kinds.check_array("audio", np.full((2, 3), np.nan, np.float32),
                                                  params)
    assert "the manifest says [2, 3] float32" in kinds.check_array("audio", good[:1], params)


def test_the_sequence_encoder_is_mults_unimodal_path_pooled_at_the_last_step():
    import torch

    from ccat.config import ModelConfig
    from ccat.models.encoders import FeatureSequenceEncoder, sinusoidal_positions

    table = sinusoidal_positions(4, 6)  # positions 1..4; sines then cosines, rate 10000^(-i/2)
    assert torch.allclose(table[0], torch.tensor([np.sin(1), np.sin(0.01), np.sin(1e-4),
                                                  np.cos(1), np.cos(0.01), np.cos(1e-4)],
                                                 dtype=torch.float32))
    encoder = FeatureSequenceEncoder({"shape": [5, 7]}, ModelConfig(width=8, heads=2, ffn_mult=2))
    encoder.eval()
    x = torch.randn(3, 5, 7)
    out = encoder(x)
    assert out.tokens.shape == (3, 5, 8) and torch.equal(out.pooled, out.tokens[:, -1])
    changed = x.clone()
    changed[:, -1] += 1.0  # the last step moves the pooled vector; self-attention sees it all
    assert not torch.allclose(encoder(changed).tokens[:, 0], out.tokens[:, 0])


# ---------------------------------------------------------------- training


def test_the_training_loop_trains_and_evaluates_a_three_modality_build(tmp_path):
    from ccat.run_config import load_config
    from ccat.train import train
    from train_helpers import tiny_config

    raw = synth(tmp_path / "raw", segments=30)
    writer.build(Mosei(), raw, tmp_path / "out", split_files(raw), OPTIONS)
    cfg = tiny_config(tmp_path / "out", tmp_path / "run", method="concat")
    history = train(cfg)
    assert len(history) == 1 and all(np.isfinite(v) for v in history[0].values()
                                      if isinstance(v, float))
    assert load_config(Path(__file__).resolve().parents[1] / "configs" / "mosei.yaml"
                       ).method.name == "concat"


def test_the_device_cache_serves_feature_sequences_as_the_streaming_path_does(tmp_path):
    import torch

    from ccat.config import DataConfig
    from ccat.data import open_dataset
    from ccat.data.device_cache import DeviceCache, cache_bytes
    from ccat.data.pipeline import make_loader

    raw = synth(tmp_path / "raw", segments=12)
    writer.build(Mosei(), raw, tmp_path / "out", split_files(raw), OPTIONS)
    dataset = open_dataset(tmp_path / "out")
    assert cache_bytes(dataset, "test", 0) == 4 * 50 * (300 + 74 + 35) * \
        dataset.num_samples("test")
    cfg = DataConfig(batch_size=2, workers=0)
    cache = DeviceCache(dataset, cfg, torch.device("cpu"))
    streamed = list(make_loader(dataset, "test", cfg, train=False, seed=0))
    cached = list(make_loader(dataset, "test", cfg, train=False, seed=0, cache=cache))
    assert [b.keys for b in cached] == [b.keys for b in streamed]
    for got, want in zip(cached, streamed):
        for m in ("text", "audio", "vision"):
            assert got.inputs[m].dtype == torch.float32 and torch.equal(got.inputs[m],
                                                                        want.inputs[m])
    trained = next(iter(make_loader(dataset, "train", cfg, train=True, seed=0, cache=cache)))
    assert trained.inputs["vision"].shape == (2, 50, 35)


def test_a_build_without_the_folds_and_a_label_count_other_than_2_or_7_are_refused(tmp_path,
                                                                                   capsys):
    from preprocess.datasets import OptionError
    from preprocess.splits import SplitError

    raw = synth(tmp_path / "raw", segments=12)
    (raw / FOLDS).unlink()
    with pytest.raises(SplitError, match=r"^mosei has no seeded split of its own .*--split"):
        writer.build(Mosei(), raw, tmp_path / "out", {}, OPTIONS)
    with pytest.raises(OptionError, match=r"^--labels 5: choose 2 or 7"):
        Mosei(labels=5)
    assert not (tmp_path / "out").exists()
