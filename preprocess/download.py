"""Fetch raw datasets where they can be fetched; otherwise say exactly what to do by hand."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from ccat.errors import UserError

CREMAD_REPO = "https://github.com/CheyneyComputerScience/CREMA-D.git"
OGM_GE_DATA = "https://raw.githubusercontent.com/GeWu-Lab/OGM-GE_CVPR2022/main/data/"
QMF_DATA = "https://raw.githubusercontent.com/QingyangZhang/QMF/main/datasets/"
CREMAD_FOLDERS = ("AudioWAV", "VideoFlash")
TIMEOUT_S = 60
# Published lists per dataset: (base URL, file names). Media that cannot be fetched here
# are described in MEDIA_BY_HAND.
LISTS = {
    "cremad": (OGM_GE_DATA + "CREMAD/", ("train.csv", "test.csv")),
    "ks": (OGM_GE_DATA + "KineticSound/", ("train.txt", "test.txt")),
    "mvsa": (QMF_DATA + "MVSA_Single/", ("train.jsonl", "dev.jsonl", "test.jsonl")),
}
MEDIA_BY_HAND = {
    "ks": ("Kinetics-Sounds media are YouTube clips: fetch the listed ids with a YouTube "
           "downloader (e.g. yt-dlp, 10 s from each id's start second) into {target}; many "
           "source videos are gone, and the build counts the missing ones"),
    "mvsa": ("MVSA media are distributed by their authors (MCRLab, University of Ottawa): "
             "unpack MVSA_Single so that {target} holds data/<id>.jpg, data/<id>.txt and "
             "labelResultAll.txt"),
}


class DownloadError(UserError, RuntimeError):
    """A download cannot go on; the message says what to install or fetch by hand."""


def download(dataset: str, out: Path) -> Iterator[str]:
    """Fetch ``dataset`` into ``out/<dataset>``, yielding progress lines."""
    if dataset not in LISTS:
        raise DownloadError(f"no downloader for {dataset!r}; choose one of {', '.join(LISTS)}")
    target = out / dataset
    if dataset == "cremad":
        yield from _cremad_media(target)
    yield from _fetch_lists(dataset, target / "splits")
    if dataset in MEDIA_BY_HAND:
        yield MEDIA_BY_HAND[dataset].format(target=target)


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


def _fetch_lists(dataset: str, target: Path) -> Iterator[str]:
    base, names = LISTS[dataset]
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        url = base + name
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                (target / name).write_bytes(response.read())
        except (urllib.error.URLError, OSError) as err:
            raise DownloadError(f"could not fetch {url} ({err}); save the published lists "
                                f"{', '.join(names)} into {target} by hand") from None
        yield f"published list {target / name}"
