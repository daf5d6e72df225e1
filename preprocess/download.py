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
from preprocess.datasets import SPLITS_DIR, Published, iter_published

TIMEOUT_S = 60


class DownloadError(UserError, RuntimeError):
    """A download cannot go on; the message says what to install or fetch by hand."""


def download(dataset: str, out: Path) -> Iterator[str]:
    """Fetch ``dataset`` into ``out/<dataset>`` as its recipe's :class:`Published` facts
    say, yielding progress lines: what to fetch by hand (first, so that it is said even
    when the lists cannot be fetched), the media when a Git LFS repository holds them,
    then the published split files into ``splits/``."""
    published = dict(iter_published())
    if dataset not in published:
        raise DownloadError(f"no downloader for {dataset!r}; choose one of "
                            f"{', '.join(published)}")
    facts, target = published[dataset], out / dataset
    if facts.media_by_hand:
        yield facts.media_by_hand.format(target=target)
    if facts.media_repo:
        yield from _git_lfs_media(target, facts.media_repo, facts.media_folders)
    if facts.lists_url:  # else the lists come with the media
        yield from _fetch_lists(facts, target / SPLITS_DIR)


def _git_lfs_media(target: Path, repo: str, folders: tuple[str, ...]) -> Iterator[str]:
    """A sparse, shallow clone of ``repo``'s ``folders`` with their Git LFS content."""
    if all((target / f).is_dir() and any((target / f).iterdir()) for f in folders):
        yield f"{target} already holds {' and '.join(folders)}; nothing to fetch"
        return
    by_hand = (f"or download {' and '.join(folders)} from {repo.removesuffix('.git')} "
               f"by hand into {target}")
    if shutil.which("git") is None:
        raise DownloadError(f"git is not installed: install git and git-lfs, {by_hand}")
    if subprocess.run(["git", "lfs", "version"], capture_output=True).returncode != 0:
        raise DownloadError(f"git-lfs is not installed ({repo} keeps its media in Git LFS): "
                            f"install it (e.g. `apt-get install git-lfs`) and run again, {by_hand}")
    yield f"cloning {' and '.join(folders)} of {repo} into {target}"
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"}
    steps = [["git", "clone", "--depth", "1", "--filter=blob:none", "--sparse", repo,
              str(target)],
             ["git", "-C", str(target), "sparse-checkout", "set", *folders],
             ["git", "-C", str(target), "lfs", "pull", "--include",
              ",".join(f"{f}/*" for f in folders)]]
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
    yield f"{' and '.join(folders)} are in {target}"


def _fetch_lists(facts: Published, target: Path) -> Iterator[str]:
    names = list(dict.fromkeys(facts.split_files.values()))  # one file may list every split
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        url = facts.lists_url + name
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                (target / name).write_bytes(response.read())
        except (urllib.error.URLError, OSError) as err:
            raise DownloadError(f"could not fetch {url} ({err}); save the published lists "
                                f"{', '.join(names)} into {target} by hand") from None
        yield f"published list {target / name}"
