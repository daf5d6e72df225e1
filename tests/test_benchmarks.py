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


def test_imbalance_runs_as_make_bench_runs_it() -> None:
    """As a script, with benchmarks/ first on the import path (where preprocess.py would
    shadow the package), it starts and parses its options."""
    import subprocess
    import sys

    script = BENCHMARKS[0].parent / "imbalance.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--design" in done.stdout and "--easy-reliability" in done.stdout


def test_imbalance_fused_gap_and_targets_follow_the_numbers(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS[0].parent))
    spec = importlib.util.spec_from_file_location("bench_imbalance",
                                                  BENCHMARKS[0].parent / "imbalance.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def seed(ensemble: float, concat: float) -> dict:
        return {"unimodal": {"test_acc": {"fused": ensemble, "audio": 0.75, "video": 0.95},
                             "probe": {"audio": 0.75, "video": 0.95}},
                "concat": {"test_acc": {"fused": concat, "audio": 0.7, "video": 0.5},
                           "probe": {"audio": 0.75, "video": 0.7}}}

    summary = bench.summarize([seed(0.95, 0.80), seed(0.93, 0.86)])
    assert summary["fused"]["gap"]["mean"] == pytest.approx(0.11)
    assert bench.targets(summary, "audio", "video") == {
        "easy_alone_55_80": True, "hard_alone_ge_85": True, "ensemble_ge_88": True,
        "concat_10_below_ensemble": True, "hard_probe_gap_ge_15": True}
    close = bench.summarize([seed(0.95, 0.90), seed(0.93, 0.86)])
    assert not bench.targets(close, "audio", "video")["concat_10_below_ensemble"]
