"""Fetch raw datasets where they can be fetched; otherwise say exactly what to do by hand."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

CREMAD_REPO = "https://github.com/CheyneyComputerScience/CREMA-D.git"
CREMAD_SPLITS = "https://raw.githubusercontent.com/GeWu-Lab/OGM-GE_CVPR2022/main/data/CREMAD/"
CREMAD_FOLDERS = ("AudioWAV", "VideoFlash")
TIMEOUT_S = 60


class DownloadError(RuntimeError):
    """A download cannot go on; the message says what to install or fetch by hand."""


def download(dataset: str, out: Path) -> Iterator[str]:
    """Fetch ``dataset`` into ``out/<dataset>``, yielding progress lines."""
    if dataset != "cremad":
        raise DownloadError(f"no downloader for {dataset!r} yet; get its raw files by hand as "
                            "the README's dataset section says")
    target = out / "cremad"
    yield from _cremad_media(target)
    yield from _cremad_splits(target / "splits")


def _cremad_media(target: Path) -> Iterator[str]:
    if all((target / f).is_dir() and any((target / f).iterdir()) for f in CREMAD_FOLDERS):
        yield f"{target} already holds {' and '.join(CREMAD_FOLDERS)}; nothing to fetch"
        return
    by_hand = (f"or download {' and '.join(CREMAD_FOLDERS)} from {CREMAD_REPO.removesuffix('.git')} "
               f"by hand into {target}")
    if shutil.which("git") is None:
        raise DownloadError(f"git is not installed: install git and git-lfs, {by_hand}")
    if subprocess.run(["git", "lfs", "version"], capture_output=True).returncode != 0:
        raise DownloadError(f"git-lfs is not installed (CREMA-D keeps its media in Git LFS): "
                            f"install it (e.g. `apt-get install git-lfs`) and run again, {by_hand}")
    yield f"cloning {CREMAD_REPO} (about 8 GB of media) into {target}"
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"}
    steps = [["git", "clone", "--depth", "1", "--filter=blob:none", "--sparse", CREMAD_REPO,
              str(target)],
             ["git", "-C", str(target), "sparse-checkout", "set", *CREMAD_FOLDERS],
             ["git", "-C", str(target), "lfs", "pull", "--include",
              ",".join(f"{f}/*" for f in CREMAD_FOLDERS)]]
    for step in steps:
        try:
            done = subprocess.run(step, env=env, capture_output=True, text=True,
                                  timeout=None if "pull" in step else TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise DownloadError(f"`{' '.join(step)}` timed out; check the network, {by_hand}") from None
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise DownloadError(f"`{' '.join(step[:3])}` failed ({said}); check the network, "
                                f"{by_hand}")
    yield f"CREMA-D media are in {target}"


def _cremad_splits(target: Path) -> Iterator[str]:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("train.csv", "test.csv"):
        url = CREMAD_SPLITS + name
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                (target / name).write_bytes(response.read())
        except (urllib.error.URLError, OSError) as err:
            raise DownloadError(f"could not fetch {url} ({err}); save the published split "
                                f"lists train.csv and test.csv into {target} by hand") from None
        yield f"split list {target / name}"
