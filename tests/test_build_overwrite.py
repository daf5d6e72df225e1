"""Issue 22, the builder's side: nothing lost. Every option is checked against its range
before anything is read or removed, a plan without usable splits is refused before any
decoding, --overwrite keeps the build it replaces until the new one has shards (and puts
it back when the new one fails or is killed before), and a rebuild reuses only shards
whose bytes are the ones recorded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_BUILD, run_cli
from preprocess import datasets, outdir, writer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "building.md"


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path: the folder as a user has it."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_sentence(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def build(raw: Path, out: Path, capsys, *extra, recipe: str = "cremad") -> tuple[int, str, str]:
    return run_cli(["build", recipe, "--raw", raw, "--out", out, *TINY_BUILD, *extra], capsys)


@pytest.fixture()
def finished(built: Path, tmp_path: Path) -> Path:
    """A private copy of the finished tiny build, free to damage or overwrite."""
    return Path(shutil.copytree(built, tmp_path / "finished"))


# ---------------------------------------------------------------- 1. option ranges


def bad_values(option: datasets.Option) -> list[str]:
    """Values just outside ``option``'s range, far outside it and, for a float, not finite."""
    low, high = option.range.low, option.range.high
    if option.type is int:
        return [str(int(low) - 1), str(int(high) + 1), str(10**30)]
    return [str(low - 1), str(high * 10 + 1), "1e30", "nan", "inf", "-inf"]


def ranged(commands: dict[str, type]) -> list[tuple[str, str, str, str]]:
    """``(command, recipe, flag, bad value)`` for every ranged option of ``commands``."""
    return [(command, name, option.flag, value)
            for name in datasets.recipe_names()
            for command, extra in commands.items()
            for cls in ([datasets.get_recipe(name), extra] if command == "build"
                        else [datasets.get_recipe(name).synth])
            if cls is not None
            for option in datasets.options_of(cls) if option.range is not None
            for value in bad_values(option)]


BUILD_CASES = ranged({"build": writer.BuildOptions})
SYNTH_CASES = ranged({"synth": type(None)})


def test_every_numeric_build_option_declares_a_range() -> None:
    for name in datasets.recipe_names():
        for cls in (datasets.get_recipe(name), writer.BuildOptions):
            for option in datasets.options_of(cls):
                assert option.range is not None or option.type not in (int, float), \
                    f"{name} {option.flag} has no range"


@pytest.mark.parametrize("command,name,flag,value", BUILD_CASES)
def test_a_build_option_out_of_range_is_one_sentence_and_the_build_stays(
        command: str, name: str, flag: str, value: str, finished: Path, synth_raw: Path,
        capsys) -> None:
    before = tree(finished)
    code, _, err = run_cli(["build", name, "--raw", synth_raw, "--out", finished, "--overwrite",
                            flag, value], capsys)
    line = one_sentence(err)
    option = next(o for cls in (datasets.get_recipe(name), writer.BuildOptions)
                  for o in datasets.options_of(cls) if o.flag == flag)
    assert code == 2 and f"error: {flag} " in line and "out of range" in line
    assert f"from {option.range}" in line
    assert tree(finished) == before


@pytest.mark.parametrize("command,name,flag,value", SYNTH_CASES)
def test_a_synth_option_out_of_range_is_one_sentence_and_writes_nothing(
        command: str, name: str, flag: str, value: str, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["synth", name, "--out", tmp_path / "raw", flag, value], capsys)
    assert code == 2 and f"error: {flag} " in one_sentence(err) and "out of range" in err
    assert not (tmp_path / "raw").exists()


def test_docs_state_every_range() -> None:
    """docs/building.md's table of ranges holds each ranged option with its range."""
    lines = DOCS.read_text().splitlines()
    for name in datasets.recipe_names():
        recipe = datasets.get_recipe(name)
        for cls in (recipe, recipe.synth, writer.BuildOptions):
            for option in datasets.options_of(cls) if cls else []:
                if option.range is not None:
                    assert any(f"`{option.flag}`" in line and f"| {option.range} |" in line
                               for line in lines), f"{option.flag} {option.range} undocumented"


# ---------------------------------------------------------------- 2. splits


def split_files(raw: Path, tmp_path: Path, train_classes: set[str],
                test_missing: bool = False) -> list[str]:
    """--split arguments: train lists the clips of ``train_classes``, test the others (or
    ids without media)."""
    ids = sorted(p.stem for p in (raw / "AudioWAV").glob("*.wav"))
    rows = {"train": [i for i in ids if i.split("_")[2] in train_classes],
            "test": [i for i in ids if i.split("_")[2] not in train_classes]}
    if test_missing:
        rows["test"] = [f"9{i[1:]}" for i in rows["test"]]
    args = []
    for split, keys in rows.items():
        path = tmp_path / f"{split}.csv"
        path.write_text("".join(f"{k},{k.split('_')[2]}\n" for k in keys))
        args += ["--split", f"{split}={path}"]
    return args


@pytest.mark.parametrize("extra,says", [
    (["--test-fraction", "0.99", "--val-fraction", "0.99"], "--val-fraction 0.99 is out of range"),
    (["--test-fraction", "0.5", "--val-fraction", "0.5"], "add up to 1 or more"),
    (["--test-fraction", "0.85", "--val-fraction", "0.1"], "split val would hold no samples"),
    (["--test-fraction", "0.9", "--val-fraction", "0"], "split train would hold no samples"),
])
def test_fractions_that_leave_a_split_empty_are_refused_before_anything(
        extra: list[str], says: str, finished: Path, synth_raw: Path, capsys) -> None:
    before = tree(finished)
    code, out, err = build(synth_raw, finished, capsys, "--overwrite", *extra)
    assert code in (1, 2) and says in one_sentence(err) and "building" not in out
    assert tree(finished) == before


@pytest.mark.parametrize("case,says", [
    ("train lacks a class", "train would hold no sample of class ANG, which the other splits "
                            "hold"),
    ("test has no media", "split test would hold no samples with the split files given"),
])
def test_split_files_that_leave_a_split_unusable_are_refused_before_anything(
        case: str, says: str, finished: Path, synth_raw: Path, tmp_path: Path,
        capsys) -> None:
    classes = {"DIS", "FEA", "HAP", "NEU", "SAD"} if case == "train lacks a class" else \
        {"ANG", "DIS", "FEA"}
    extra = split_files(synth_raw, tmp_path, classes, test_missing=case == "test has no media")
    before = tree(finished)
    code, out, err = build(synth_raw, finished, capsys, "--overwrite", *extra)
    assert code == 1 and says in one_sentence(err) and "building" not in out
    assert tree(finished) == before


def test_a_fraction_of_zero_asks_for_no_split(synth_raw: Path, tmp_path: Path, capsys) -> None:
    code, _, err = build(synth_raw, tmp_path / "out", capsys, "--test-fraction", "0",
                         "--val-fraction", "0")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [manifest["splits"][s]["num_samples"] for s in ("train", "val", "test")] == [24, 0, 0]


# ---------------------------------------------------------------- 3. --overwrite


@pytest.mark.parametrize("fault,says", [
    ("no raw folder", "does not exist"),
    ("not a CREMA-D folder", "is not a CREMA-D folder"),
    ("missing split file", "split file"),
    ("bad split row", "CREMA-D split files have '<id>,<EMO>' rows"),
    ("foreign file in --out", "holds files that are not a build"),
])
def test_an_overwrite_with_bad_input_is_refused_before_anything_is_removed(
        fault: str, says: str, finished: Path, synth_raw: Path, tmp_path: Path,
        capsys) -> None:
    raw, extra = synth_raw, []
    if fault == "no raw folder":
        raw = tmp_path / "nowhere"
    elif fault == "not a CREMA-D folder":
        raw = tmp_path
    elif fault == "missing split file":
        extra = ["--split", f"train={tmp_path / 'gone.csv'}"]
    elif fault == "bad split row":
        (tmp_path / "train.csv").write_text("1001_DFA_ANG_XX;ANG\n")
        extra = ["--split", f"train={tmp_path / 'train.csv'}"]
    else:
        (finished / "notes.txt").write_text("mine")
    before = tree(finished)
    code, out, err = build(raw, finished, capsys, "--overwrite", *extra)
    assert code == 1 and says in one_sentence(err) and "building" not in out
    assert tree(finished) == before


def test_an_overwrite_whose_every_sample_is_bad_fails_and_puts_the_build_back(
        finished: Path, raw_copy: Path, capsys) -> None:
    for wav in (raw_copy / "AudioWAV").glob("*.wav"):
        wav.write_bytes(b"not a wav")
    before = tree(finished)
    code, _, err = build(raw_copy, finished, capsys, "--overwrite")
    line = one_sentence(err)
    assert code == 1 and "split train, val and test would hold no samples once the bad " \
                         "samples are skipped (24 skipped, 24 for 'audio is unreadable')" in line
    assert tree(finished) == before


def test_an_overwrite_that_fails_at_its_first_shard_puts_the_build_back(
        finished: Path, synth_raw: Path, capsys, monkeypatch) -> None:
    real = os.replace

    def full(src, dst, *args, **kwargs):
        if str(dst).endswith(".tar"):
            raise OSError(28, os.strerror(28))  # ENOSPC, as a full disk at the shard's rename
        return real(src, dst, *args, **kwargs)

    before = tree(finished)
    monkeypatch.setattr(os, "replace", full)
    code, _, err = build(synth_raw, finished, capsys, "--overwrite", "--num-frames", "2")
    monkeypatch.undo()
    assert code == 1 and "is full" in one_sentence(err)
    assert tree(finished) == before


KILLED_OVERWRITE = """
import os, signal, sys
from preprocess import cli, outdir

def killed(out):  # SIGKILL at the moment the new build could drop the old one
    os.kill(os.getpid(), signal.SIGKILL)

outdir.drop_aside = killed
sys.argv = ["ccat-data", *sys.argv[1:]]
cli.main()
"""


def test_an_overwrite_killed_before_it_drops_the_old_build_is_undone_at_the_next_start(
        finished: Path, synth_raw: Path, capsys) -> None:
    before = tree(finished)
    args = ["build", "cremad", "--raw", str(synth_raw), "--out", str(finished), *TINY_BUILD]
    killed = subprocess.run([sys.executable, "-c", KILLED_OVERWRITE, *args, "--overwrite",
                             "--num-frames", "2"], capture_output=True)
    assert killed.returncode == -9
    assert (finished / outdir.STATE_DIR / outdir.ASIDE).is_dir()
    assert not (finished / "manifest.json").exists()  # the new build's shards, no manifest
    code, out, err = build(synth_raw, finished, capsys)  # the command that made the old build
    assert code == 0 and "reused 7 finished shards" in out, err
    assert tree(finished) == before


def test_an_overwrite_replaces_the_build_and_leaves_no_trace_of_the_old_one(
        finished: Path, synth_raw: Path, capsys) -> None:
    code, _, err = build(synth_raw, finished, capsys, "--overwrite", "--num-frames", "2")
    assert code == 0, err
    manifest = json.loads((finished / "manifest.json").read_text())
    assert manifest["modalities"]["video"]["num_frames"] == 2
    assert not (finished / outdir.STATE_DIR).exists()


# ---------------------------------------------------------------- 4. reuse only whole shards


def damage(shard: Path, how: str) -> str:
    """Damage ``shard`` as ``how`` says; the reason the rebuild should give."""
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
        return "size differs"
    if how == "missing":
        shard.unlink()
        return "missing"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # one byte changed, same size
    shard.write_bytes(bytes(data))
    return "sha256 differs"


@pytest.mark.parametrize("how", ["truncated", "missing", "changed"])
def test_a_finished_build_with_a_damaged_shard_rebuilds_it_and_says_so(
        how: str, finished: Path, built: Path, synth_raw: Path, capsys) -> None:
    why = damage(finished / "train-000001.tar", how)
    code, out, err = build(synth_raw, finished, capsys)
    assert code == 0, err
    assert "reused 6 finished shards" in out
    assert f"rebuilt 1 shards whose bytes did not match their record: train-000001.tar ({why})" \
        in out
    assert tree(finished) == tree(built)


def interrupted(raw: Path, out: Path, capsys, monkeypatch) -> None:
    """A build of ``raw`` into ``out`` stopped (Ctrl-C) after its last shard, before its
    manifest: every shard recorded in .build."""
    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_finish", ctrl_c)
    assert build(raw, out, capsys)[0] != 0
    monkeypatch.undo()
    assert len(list((out / outdir.STATE_DIR).glob("*.tar.json"))) == 7


UNREADABLE = "its record is unreadable"


@pytest.mark.parametrize("fault,why", [
    ("truncated", "size differs"), ("missing", "missing"), ("changed", "sha256 differs"),
    ({"sha256": "0" * 64}, "sha256 differs"), ({"num_samples": "4"}, UNREADABLE),
    ({"num_samples": 4.0}, UNREADABLE), ({"num_samples": 1e30}, UNREADABLE),
    ({"num_samples": 10**30}, UNREADABLE), ({"bytes": -1}, UNREADABLE),
    ({"members": []}, UNREADABLE), ({"class_counts": None}, UNREADABLE),
    ({"skipped": [{"id": "1001_DFA_ANG_XX"}]}, UNREADABLE)], ids=str)
def test_an_interrupted_build_rebuilds_shards_that_do_not_match_their_record(
        fault, why: str, synth_raw: Path, built: Path, tmp_path: Path, capsys,
        monkeypatch) -> None:
    out = tmp_path / "out"
    interrupted(synth_raw, out, capsys, monkeypatch)
    if isinstance(fault, dict):
        path = out / outdir.STATE_DIR / "train-000001.tar.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fault}))
    else:
        assert damage(out / "train-000001.tar", fault) == why
    code, stdout, err = build(synth_raw, out, capsys)
    assert code == 0, err
    assert "reused 6 finished shards" in stdout
    assert f"rebuilt 1 shards whose bytes did not match their record: train-000001.tar ({why})" \
        in stdout
    assert tree(out) == tree(built)


@pytest.mark.parametrize("value", ["16.0", 1e30, 10**30, 16.0, -16, None])
def test_a_finished_manifest_with_a_bad_count_is_one_sentence_and_left_alone(
        value, finished: Path, synth_raw: Path, capsys) -> None:
    path = finished / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["splits"]["train"]["shards"][0]["num_samples"] = value
    path.write_text(json.dumps(manifest))
    before = tree(finished)
    code, _, err = build(synth_raw, finished, capsys)
    assert code == 1 and "manifest.json cannot be reused" in one_sentence(err)
    assert "--overwrite" in err and tree(finished) == before
