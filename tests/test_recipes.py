"""The recipe registry drives `ccat-data`: one `build NAME` / `synth NAME` per registered
recipe, options made from the recipe's dataclass fields, split files found where
`ccat-data download` puts them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_BUILD, run_cli
from preprocess import datasets, media
from preprocess.cli import app
from preprocess.datasets.audio_video import AudioVideo

COMMON_BUILD_FLAGS = ("--raw", "--out", "--split", "--workers", "--shard-size", "--seed",
                      "--val-fraction", "--test-fraction", "--strict", "--overwrite")
# The options and defaults `build cremad|ks|mvsa` had as hand-written commands: the
# documented commands, the Makefile and scripts rely on them.
DOCUMENTED_DEFAULTS = {
    "cremad": {"--seconds": 3.0, "--frame-size": 224, "--num-frames": 3, "--split-by": "random",
               "--folds": 5, "--fold": 0, "--fold-seed": 0},
    "ks": {"--classes": None, "--seconds": 10.0, "--frame-size": 224, "--num-frames": 3},
    "mvsa": {"--labels": "agree", "--multiple": False, "--tokenizer": "bert-base-uncased",
             "--max-length": 128, "--shorter-side": 256, "--max-image-pixels": 50_000_000,
             "--max-aspect": 20.0, "--max-text-bytes": 65536},
}
SYNTH_DEFAULTS = {
    # --design picks the knobs' values unless they are given (None: the design's)
    "cremad": {"--clips": 120, "--seed": 0, "--easy": "audio", "--design": "fused",
               "--easy-reliability": None, "--hard-strength": None, "--width": 96, "--height": 72},
    "ks": {"--clips": 60, "--classes": 5, "--seed": 0, "--easy": "audio", "--design": "fused",
           "--easy-reliability": None, "--hard-strength": None, "--seconds": 2.0},
    "mvsa": {"--pairs": 90, "--seed": 0, "--easy": "text"},
}
# Each audio-video recipe's options in the order its command lists them: the shared
# --seconds, --frame-size and --num-frames stand where each recipe had them.
AUDIO_VIDEO_FLAGS = {
    "cremad": ["--seconds", "--frame-size", "--num-frames", "--split-by", "--folds", "--fold",
               "--fold-seed"],
    "ks": ["--classes", "--seconds", "--frame-size", "--num-frames"],
    "vggsound": ["--class-order", "--seconds", "--frame-size", "--num-frames"],
    "ave": ["--window", "--shared-videos", "--annotations", "--seconds", "--frame-size",
            "--num-frames"],
}
WIDE = {"COLUMNS": "200"}  # help tables unwrapped, so every flag is on one line


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def test_build_help_lists_every_registered_recipe() -> None:
    text = help_text("build")
    for name in datasets.recipe_names():
        assert name in text and datasets.get_recipe(name).__doc__.split(":")[0] in text


@pytest.mark.parametrize("name", datasets.recipe_names())
def test_every_recipe_build_help_renders_and_lists_its_options(name: str) -> None:
    text = help_text("build", name)
    options = datasets.options_of(datasets.get_recipe(name))
    assert options, f"recipe {name} has no options"
    for flag in [o.flag for o in options] + list(COMMON_BUILD_FLAGS):
        assert flag in text, f"build {name} --help does not list {flag}"
    for option in options:
        assert option.help.split()[0] in text


@pytest.mark.parametrize("name", [n for n in datasets.recipe_names()
                                  if datasets.get_recipe(n).synth is not None])
def test_every_synth_help_renders_and_lists_its_options(name: str) -> None:
    text = help_text("synth", name)
    for option in datasets.options_of(datasets.get_recipe(name).synth):
        assert option.flag in text and option.help.split()[0] in text
    assert "--out" in text


@pytest.mark.parametrize("name", sorted(DOCUMENTED_DEFAULTS))
def test_the_builtin_recipes_keep_their_option_names_and_defaults(name: str) -> None:
    recipe = datasets.get_recipe(name)
    assert {o.flag: o.default for o in datasets.options_of(recipe)} == DOCUMENTED_DEFAULTS[name]
    assert {o.flag: o.default for o in datasets.options_of(recipe.synth)} == SYNTH_DEFAULTS[name]


@pytest.mark.parametrize("name", sorted(AUDIO_VIDEO_FLAGS))
def test_the_audio_video_recipes_share_one_base_and_keep_their_options(name: str) -> None:
    recipe = datasets.get_recipe(name)
    assert issubclass(recipe, AudioVideo)
    assert [o.flag for o in datasets.options_of(recipe)] == AUDIO_VIDEO_FLAGS[name]
    modalities = recipe(seconds=2.0, frame_size=48, num_frames=5).modalities()
    assert modalities == {"audio": media.AudioParams(seconds=2.0).manifest_entry(),
                          "video": media.VideoParams(num_frames=5, size=48).manifest_entry()}


@pytest.mark.parametrize("group", ["build", "synth"])
def test_an_unknown_recipe_is_one_sentence_naming_the_known_ones(group, tmp_path, capsys) -> None:
    code, _, err = run_cli([group, "imagenet", "--out", tmp_path], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "unknown dataset recipe 'imagenet'" in err
    assert f"known: {', '.join(datasets.recipe_names())}" in err


def test_a_recipe_field_without_help_text_is_refused() -> None:
    @dataclasses.dataclass
    class Toy:
        seconds: float = 1.0

    with pytest.raises(datasets.RecipeError, match=r"Toy\.seconds .* without help"):
        datasets.options_of(Toy)


def test_recipe_options_reach_the_recipe(tmp_path: Path, synth_raw: Path, capsys) -> None:
    code, out, err = run_cli(["build", "cremad", "--raw", synth_raw, "--out", tmp_path / "o",
                              *TINY_BUILD, "--num-frames", "2"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    video, audio = manifest["modalities"]["video"], manifest["modalities"]["audio"]
    assert (video["num_frames"], video["size"], audio["seconds"]) == (2, 32, 1.0)


def write_published_splits(raw: Path, names: list[str]) -> list[str]:
    """Split files under raw/splits as `ccat-data download cremad` lays them out; the ids
    of the test file."""
    ids = sorted(p.stem for p in (raw / "AudioWAV").glob("*.wav"))
    (raw / "splits").mkdir()
    halves = {"train.csv": ids[:16], "test.csv": ids[16:]}
    for name in names:
        rows = [f"{i},{i.split('_')[2]}" for i in halves[name]]
        (raw / "splits" / name).write_text("\r\n".join(rows) + "\r\n")
    return halves["test.csv"]


def test_published_split_files_under_raw_splits_are_used(raw_copy: Path, tmp_path: Path,
                                                         capsys) -> None:
    test_ids = write_published_splits(raw_copy, ["train.csv", "test.csv"])
    code, out, err = run_cli(["build", "cremad", "--raw", raw_copy, "--out", tmp_path / "o",
                              *TINY_BUILD], capsys)
    assert code == 0, err
    assert f"published split files: train={raw_copy / 'splits' / 'train.csv'}" in out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert sorted(manifest["sources"]["split_files"]) == ["test", "train"]
    assert manifest["splits"]["test"]["num_samples"] == len(test_ids)


def test_split_overrides_the_published_files(raw_copy: Path, tmp_path: Path, capsys) -> None:
    test_ids = write_published_splits(raw_copy, ["train.csv", "test.csv"])
    mine = tmp_path / "mine.csv"
    mine.write_text("".join(f"{i},{i.split('_')[2]}\n" for i in test_ids[:4]))
    code, out, err = run_cli(["build", "cremad", "--raw", raw_copy, "--out", tmp_path / "o",
                              *TINY_BUILD, "--split", f"train={raw_copy / 'splits' / 'train.csv'}",
                              "--split", f"test={mine}"], capsys)
    assert code == 0, err
    assert "published split files" not in out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["splits"]["test"]["num_samples"] == 4


def test_an_incomplete_set_of_published_split_files_is_refused(raw_copy: Path, tmp_path: Path,
                                                               capsys) -> None:
    write_published_splits(raw_copy, ["train.csv"])
    code, _, err = run_cli(["build", "cremad", "--raw", raw_copy, "--out", tmp_path / "o",
                            *TINY_BUILD], capsys)
    assert code == 1 and "Traceback" not in err
    assert "lacks test.csv of the published cremad split files" in err and "--split" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_download_knows_every_recipe_with_published_files(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["download", "imagenet", "--out", tmp_path], capsys)
    assert code == 1
    assert f"choose one of {', '.join(n for n, _ in datasets.iter_published())}" in err
