"""Every benchmark script still imports: `make bench` runs them outside the test suite, so a
renamed or moved name they use would otherwise surface only there."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_benchmark_script_imports(path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(path.parent))  # scripts import their _helpers as siblings
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top level only: each script runs under __main__
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
