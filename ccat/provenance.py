"""Which code made a thing: the git commit of a checkout and whether it had changes.

``ccat train`` records the code that trained each run in its checkpoints (every version
that trained part of it, when a resume ran newer code), ``ccat eval`` copies that into
the eval JSON, and ``ccat results`` says which code made the page and which trained its
runs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

UNKNOWN = "an unknown commit (not a git checkout)"
UNRECORDED = "unrecorded (trained before checkpoints recorded their code)"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True).stdout


def git_stamp(root: Path, written: tuple[Path, ...] = ()) -> str:
    """'commit `1a2b…` (clean)' or '(uncommitted changes to 3 tracked files)' for the
    checkout holding ``root``; the files in ``written`` (what the caller is writing) are
    left out of the check, so a rerun does not call its own output a change. Outside a
    git checkout: :data:`UNKNOWN`."""
    try:
        commit = _git(root, "rev-parse", "HEAD").strip()
        top = Path(_git(root, "rev-parse", "--show-toplevel").strip())
        excluded = [f":(exclude){os.path.relpath(p.resolve(), top.resolve())}" for p in written]
        changed = _git(top, "status", "--porcelain", "--untracked-files=no", "--", ".",
                       *excluded).splitlines()
    except (OSError, subprocess.CalledProcessError):
        return UNKNOWN
    state = (f"uncommitted changes to {len(changed)} tracked file{'s' * (len(changed) != 1)}"
             if changed else "clean")
    return f"commit `{commit}` ({state})"


def training_code() -> str:
    """The stamp of the ccat package that is running (its checkout, or the installed
    version when it is not one)."""
    from ccat import __version__

    stamp = git_stamp(Path(__file__).resolve().parent)
    return f"ccat {__version__}" if stamp == UNKNOWN else stamp
