"""`ccat-data build cremad` end to end on generated CREMA-D trees: round trip, features,
determinism, resume, bad input and verify."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import soundfile
import soxr

from ccat.data import open_dataset
from preprocess.datasets.cremad import CLASSES
from conftest import TINY_BUILD, invoke, run_cli, synth_tree


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def build(raw: Path, out: Path, *extra: str, capsys=None) -> tuple[int, str, str]:
    args = ["build", "cremad", "--raw", raw, "--out", out, *TINY_BUILD, *extra]
    return run_cli(args, capsys) if capsys else (invoke(args), "", "")


# ---------------------------------------------------------------- round trip


def test_round_trip_labels_shapes_counts_and_splits(built: Path, synth_raw: Path) -> None:
    ds = open_dataset(built)
    assert ds.classes == CLASSES
    assert ds.splits == ["train", "val", "test"]
    all_ids = sorted(p.stem for p in (synth_raw / "AudioWAV").glob("*.wav"))
    seen: dict[str, str] = {}
    for split in ds.splits:
        samples = list(ds.iter_samples(split))
        assert len(samples) == ds.num_samples(split) > 0
        for sample in samples:
            assert sample.key not in seen, f"{sample.key} is in {seen.get(sample.key)} and {split}"
            seen[sample.key] = split
            assert CLASSES[sample.label] == sample.key.split("_")[2]
            assert sample.data["audio"].dtype == np.float16
            assert sample.data["audio"].shape == (257, 1 + 22050 // 353)
            assert sample.data["video"].shape == (3, 32, 32, 3)
            assert sample.data["video"].dtype == np.uint8
            assert sample.meta["id"] == sample.key
    assert sorted(seen) == all_ids
    # stratified: every class is in every split (24 clips = 4 per class)
    for split in ds.splits:
        assert all(c > 0 for c in ds.manifest["splits"][split]["class_counts"])


def test_manifest_has_the_fixed_keys_and_records_parameters(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    assert list(manifest) == ["spec_version", "dataset", "classes", "modalities", "splits",
                              "skipped", "sources", "fingerprint", "tool_version"]
    audio, video = manifest["modalities"]["audio"], manifest["modalities"]["video"]
    assert (audio["sample_rate"], audio["n_fft"], audio["hop_length"], audio["seconds"]) == (
        22050, 512, 353, 1.0)
    assert (video["num_frames"], video["size"], video["quality"]) == (3, 32, 95)
    assert manifest["sources"]["shard_size"] == 4
    assert manifest["sources"]["split"]["seed"] == 0
    assert all(s["num_samples"] <= 4 for e in manifest["splits"].values() for s in e["shards"])


def test_spectrogram_equals_an_independent_float64_reference(built: Path, synth_raw: Path) -> None:
    sample = next(open_dataset(built).iter_samples("train"))
    signal, rate = soundfile.read(synth_raw / "AudioWAV" / f"{sample.key}.wav", dtype="float64")
    signal = soxr.resample(signal, rate, 22050, quality="HQ")
    n = 22050  # --seconds 1.0
    signal = np.clip(np.tile(signal, -(-n // len(signal)))[:n], -1.0, 1.0)
    n_fft, hop = 512, 353
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    padded = np.concatenate([np.zeros(n_fft // 2), signal, np.zeros(n_fft // 2)])
    frames = [padded[t * hop: t * hop + n_fft] * window for t in range(1 + n // hop)]
    reference = np.log(np.abs(np.fft.rfft(np.array(frames), axis=1)).T + 1e-7)
    stored = sample.data["audio"].astype(np.float64)
    assert stored.shape == reference.shape
    tolerance = np.spacing(np.abs(reference).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(stored - reference) <= tolerance)


def test_frames_are_segment_centres(built: Path, synth_raw: Path) -> None:
    sample = next(open_dataset(built).iter_samples("test"))
    with av.open(str(synth_raw / "VideoFlash" / f"{sample.key}.flv")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    n = len(decoded)
    expected = [int((i + 0.5) * n / 3) for i in range(3)]
    assert sample.meta["video"]["num_frames"] == n
    assert sample.meta["video"]["frame_indices"] == expected
    # the stored frames are those frames (resized): closest among all frames of the clip
    from PIL import Image

    small = [np.asarray(Image.fromarray(f).resize((32, 32), Image.BICUBIC), dtype=np.float64)
             for f in decoded]
    for stored, index in zip(sample.data["video"], expected):
        errors = [np.abs(stored - f).mean() for f in small]
        assert errors[index] <= min(errors) + 1.0


def test_full_size_frames_decode_to_224(synth_raw: Path, tmp_path: Path) -> None:
    raw = tmp_path / "one"
    for folder, suffix in (("AudioWAV", ".wav"), ("VideoFlash", ".flv")):
        (raw / folder).mkdir(parents=True)
        first = sorted((synth_raw / folder).glob(f"*{suffix}"))[:6]
        for path in first:
            (raw / folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    assert invoke(["build", "cremad", "--raw", raw, "--out", out, "--seconds", "1.0",
                   "--workers", "1", "--test-fraction", "0", "--val-fraction", "0"]) == 0
    sample = next(open_dataset(out).iter_samples("train"))
    assert sample.data["video"].shape == (3, 224, 224, 3)


# ---------------------------------------------------------------- determinism and resume


def test_two_builds_are_byte_identical_whatever_the_worker_count(
        built: Path, synth_raw: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert build(synth_raw, again, "--workers", "2")[0] == 0
    assert shard_hashes(again) == shard_hashes(built)
    first = json.loads((built / "manifest.json").read_text())
    second = json.loads((again / "manifest.json").read_text())
    assert first["fingerprint"] == second["fingerprint"]
    assert first["splits"] == second["splits"]


def test_killed_build_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "killed"
    synth_tree(raw, clips=48)  # big enough that a loaded machine cannot finish before the kill
    command = [sys.executable, "-m", "preprocess.cli", "build", "cremad", "--raw", str(raw),
               "--out", str(out), *TINY_BUILD]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 600  # a bound for a hung build, not a speed check
    while not (out / ".build" / "train-000000.tar.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    first = out / "train-000000.tar"
    stat_before = first.stat()
    code, stdout, _ = build(raw, out, capsys=None)
    assert code == 0
    assert build(raw, tmp_path / "whole")[0] == 0
    assert shard_hashes(out) == shard_hashes(tmp_path / "whole")
    assert first.stat().st_mtime_ns == stat_before.st_mtime_ns, "a finished shard was rewritten"
    assert not (out / ".build").exists()


def test_building_a_finished_build_again_rewrites_nothing(built: Path, synth_raw: Path,
                                                          capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    code, out, _ = build(synth_raw, built, capsys=capsys)
    assert code == 0 and "processed 0 clips" in out
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before


def test_rebuild_into_a_folder_with_other_parameters_is_refused(
        built: Path, synth_raw: Path, capsys) -> None:
    code, _, err = build(synth_raw, built, "--seed", "1", capsys=capsys)
    assert code == 1
    assert "already holds a finished build of other data (sources.split.seed: 0 -> 1)" in err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- bad input


def damage(raw: Path) -> dict[str, str]:
    """Break five clips in five ways; return id -> expected skip reason."""
    ids = sorted(p.stem for p in (raw / "AudioWAV").glob("*.wav"))
    empty, truncated, garbage, no_video, no_audio = ids[:5]
    soundfile.write(raw / "AudioWAV" / f"{empty}.wav", np.zeros(0), 16000, subtype="PCM_16")
    flv = raw / "VideoFlash" / f"{truncated}.flv"
    flv.write_bytes(flv.read_bytes()[: flv.stat().st_size // 2])
    (raw / "VideoFlash" / f"{garbage}.flv").write_bytes(b"this is not a video")
    (raw / "VideoFlash" / f"{no_video}.flv").unlink()
    (raw / "AudioWAV" / f"{no_audio}.wav").unlink()
    return {empty: "audio has no samples", truncated: "video is truncated or corrupt",
            garbage: "video is unreadable", no_video: "video file is missing",
            no_audio: "audio file is missing"}


def test_bad_clips_are_skipped_and_recorded(raw_copy: Path, tmp_path: Path, capsys) -> None:
    expected = damage(raw_copy)
    code, out, _ = build(raw_copy, tmp_path / "out", capsys=capsys)
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert skipped == expected
    built_ids = {s.key for split in ("train", "val", "test")
                 for s in open_dataset(tmp_path / "out").iter_samples(split)}
    assert len(built_ids) == 24 - 5 and not built_ids & set(expected)
    for reason in set(expected.values()):
        assert reason in out  # the summary table names every reason


def test_strict_stops_at_the_first_bad_clip_naming_it(raw_copy: Path, tmp_path: Path,
                                                      capsys) -> None:
    expected = damage(raw_copy)
    code, _, err = build(raw_copy, tmp_path / "out", "--strict", capsys=capsys)
    assert code == 1
    assert any(key in err and reason in err for key, reason in expected.items())
    assert "AudioWAV/" in err and "VideoFlash/" in err  # names the files
    assert "Traceback" not in err


def test_listed_id_without_media_is_skipped_and_split_files_with_bom_crlf_are_read(
        synth_raw: Path, tmp_path: Path, capsys) -> None:
    ids = sorted(p.stem for p in (synth_raw / "AudioWAV").glob("*.wav"))
    train, test = ids[:18], ids[18:]
    rows = lambda keys: "".join(f"{k},{k.split('_')[2]}\r\n" for k in keys)  # noqa: E731
    (tmp_path / "train.csv").write_bytes(b"\xef\xbb\xbf" + rows(train + ["1091_XXX_ANG_XX"]).encode())
    (tmp_path / "test.csv").write_bytes(rows(test).encode())
    out = tmp_path / "out"
    code, _, _ = build(synth_raw, out, "--split", f"train={tmp_path / 'train.csv'}",
                       "--split", f"test={tmp_path / 'test.csv'}", capsys=capsys)
    assert code == 0
    ds = open_dataset(out)
    assert sorted(s.key for s in ds.iter_samples("test")) == test
    carved = [s.key for split in ("train", "val") for s in ds.iter_samples(split)]
    assert sorted(carved) == train and ds.num_samples("val") > 0
    assert ds.manifest["skipped"] == [{"id": "1091_XXX_ANG_XX", "split": "train",
                                       "reason": "no media for this id"}]
    assert set(ds.manifest["sources"]["split_files"]) == {"train", "test"}


def test_long_and_stereo_44k_audio_is_converted_not_skipped(raw_copy: Path, tmp_path: Path) -> None:
    ids = sorted(p.stem for p in (raw_copy / "AudioWAV").glob("*.wav"))
    long_clip, stereo = ids[0], ids[1]
    rng = np.random.default_rng(0)
    soundfile.write(raw_copy / "AudioWAV" / f"{long_clip}.wav", 0.1 * rng.standard_normal(60 * 16000),
                    16000, subtype="PCM_16")
    soundfile.write(raw_copy / "AudioWAV" / f"{stereo}.wav", 0.1 * rng.standard_normal((44100, 2)),
                    44100, subtype="PCM_16")
    out = tmp_path / "out"
    assert build(raw_copy, out)[0] == 0
    ds = open_dataset(out)
    assert ds.manifest["skipped"] == []
    metas = {s.key: s.meta["audio"] for split in ds.splits for s in ds.iter_samples(split)}
    assert metas[long_clip]["truncated"] and metas[long_clip]["duration"] == 60.0
    assert (metas[stereo]["channels"], metas[stereo]["sample_rate"]) == (2, 44100)


def test_a_folder_that_is_not_cremad_is_one_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "photos").mkdir()
    code, _, err = build(tmp_path / "photos", tmp_path / "out", capsys=capsys)
    assert code == 1
    assert "is not a CREMA-D folder" in err and "AudioWAV/" in err and "VideoFlash/" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- verify and info


def test_verify_passes_on_a_good_build(built: Path, capsys) -> None:
    code, out, _ = run_cli(["verify", built], capsys)
    assert code == 0 and "ok" in out


def test_verify_fails_on_one_changed_byte(built: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in built.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    shard = copy / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(["verify", copy], capsys)
    assert code == 1
    assert "val-000000.tar" in err and "sha256" in err


def test_info_prints_counts_classes_and_fingerprint(built: Path, capsys) -> None:
    code, out, _ = run_cli(["info", built], capsys)
    manifest = json.loads((built / "manifest.json").read_text())
    assert code == 0
    assert manifest["fingerprint"] in out
    assert all(name in out for name in CLASSES)
    assert "hop_length" in out and "353" in out


def test_synth_command_writes_the_layout(tmp_path: Path, capsys) -> None:
    code, out, _ = run_cli(["synth", "cremad", "--out", tmp_path / "raw", "--clips", "6",
                            "--width", "32", "--height", "24"], capsys)
    assert code == 0
    assert len(list((tmp_path / "raw" / "AudioWAV").glob("*.wav"))) == 6
    assert len(list((tmp_path / "raw" / "VideoFlash").glob("*.flv"))) == 6
    assert "wrote 6 clips" in out
