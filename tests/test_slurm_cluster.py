"""The tests' Slurm cluster itself (tests/slurm_cluster.py): clusters up at once, as when two
test sessions or a benchmark beside the tests start one, stop only what each started."""

from __future__ import annotations

from pathlib import Path

import pytest

import slurm_cluster


def test_the_first_cluster_stopped_leaves_a_later_one_working(tmp_path: Path) -> None:
    try:
        first = slurm_cluster.start(tmp_path / "first")
    except slurm_cluster.Unavailable as err:
        pytest.skip(f"no Slurm cluster: {err}")
    try:
        later = slurm_cluster.start(tmp_path / "later")
    except BaseException:
        first.stop()
        raise
    try:
        assert first.munge != later.munge  # each its own munged
        first.stop()
        assert not first.munge.exists()
        later.run("srun", "--time=1", "true")  # munge authenticates the step; check=True
    finally:
        later.stop()
