"""A shard cache that is not a folder, is read-only or fills up is one sentence naming it
(issue 11, item 8, the cache part). Tests run as root, which chmod does not stop, so the
read-only and full caches are real tmpfs mounts (skipped where mounting is not allowed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from ccat.data import open_dataset
from ccat.data.reader import DatasetError
from conftest import run_cli, serve
from train_helpers import tmpfs


@pytest.fixture()
def url(built: Path, tmp_path: Path) -> Iterator[str]:
    """The tiny build served over HTTP on 127.0.0.1."""
    shutil.copytree(built, tmp_path / "www" / "ds")
    with serve(tmp_path / "www") as base:
        yield f"{base}/ds"


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


@pytest.mark.parametrize("make", ["a file", "a folder inside a file"])
def test_a_cache_dir_that_is_not_a_folder(url: str, tmp_path: Path, capsys, make: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    cache = tmp_path / "file" if make == "a file" else tmp_path / "file" / "cache"
    with pytest.raises(DatasetError, match=f"^the shard cache {cache} is not a folder .*; point "
                       r"\$CCAT_CACHE_DIR, `--set data.cache_dir=DIR` \(ccat\) or `--cache-dir "
                       r"DIR` \(ccat-data verify\) at a writable folder$"):
        open_dataset(url, cache)
    code, _, err = run_cli(["verify", url, "--cache-dir", cache], capsys)
    assert code == 1 and f"the shard cache {cache} is not a folder" in err
    assert len(err.strip().splitlines()) == 1


def test_a_read_only_cache(url: str, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as cache:
        with pytest.raises(DatasetError, match=f"^the shard cache {cache} is on a read-only "
                           "file system"):
            open_dataset(url, cache)


def test_a_read_only_cache_filled_before_is_used_as_it_is(url: str, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "shared", "size=8m") as cache:
        first = open_dataset(url, cache)
        remount(cache, "ro")
        again = open_dataset(url, cache)
        assert again.root == first.root and again.num_samples("train") > 0
        assert len(list(again.iter_samples("train"))) == again.num_samples("train")


def test_a_cache_that_fills_up_leaves_no_partial_file(url: str, tmp_path: Path,
                                                     capsys) -> None:
    with tmpfs(tmp_path / "small", "size=64k") as cache:  # a shard is about 170 KB
        with pytest.raises(DatasetError, match=f"^the shard cache {cache}/[0-9a-f]{{64}} is "
                           "full \\(No space left on device\\)"):
            open_dataset(url, cache)
        assert [p.name for p in cache.rglob("*") if p.is_file()] == []
        code, _, err = run_cli(["verify", url, "--cache-dir", cache], capsys)
        assert code == 1 and "is full (No space left on device)" in err
        assert [p.name for p in cache.rglob("*") if p.is_file()] == []
