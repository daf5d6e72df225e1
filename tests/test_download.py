"""`ccat-data download` fails with one sentence when a tool is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli


def test_missing_git_is_one_sentence_saying_what_to_do(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code, _, err = run_cli(["download", "cremad", "--out", tmp_path / "raw"], capsys)
    assert code == 1
    assert "git is not installed" in err and "by hand" in err and "AudioWAV" in err
    assert "Traceback" not in err


def test_unknown_dataset_is_refused(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["download", "imagenet", "--out", tmp_path], capsys)
    assert code == 1 and "no downloader for 'imagenet'" in err


@pytest.mark.parametrize("given", ["train", "train=", "dev=x.csv"])
def test_malformed_split_argument_is_refused(given: str, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["build", "cremad", "--raw", tmp_path, "--out", tmp_path / "o",
                            "--split", given], capsys)
    assert code == 1 and "--split" in err
