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


def load(name: str, monkeypatch):
    path = BENCHMARKS[0].parent / f"{name}.py"
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_projects_each_dataset_from_its_own_runs(monkeypatch) -> None:
    """The GPU check's projections (issue 28): CREMA-D from the runs at its geometry,
    Kinetics-Sounds from the ks_* runs, hours = sum over stages of epochs x (train / rate +
    val / validation rate) + the cache fill scaled to the train split."""
    check = load("_gpu_check", monkeypatch)
    rates = {"stage1": {"samples_per_s": 1000.0}, "stage2": {"samples_per_s": 500.0},
             "validation": {"samples_per_s": 2000.0}}
    runs = [{"run": "device_cache", "train_samples": 768,
             "device_cache": {**rates, "device_cache_fill_s": 7.68}},
            {"run": "ks_stream_w16", "train_samples": 768, "stream": rates}]
    cremad, ks = check.projection(runs, "cremad"), check.projection(runs, "ks")
    assert (cremad["train_samples"], cremad["val_samples"]) == (6028, 670)
    assert (ks["train_samples"], ks["val_samples"]) == (13319, 1480)
    expected = 6028 / 768 * 7.68 + 150 * (6028 / 1000 + 670 / 2000) + 150 * (6028 / 500 + 670 / 2000)
    assert cremad["hours_by_run"] == {"device_cache": round(expected / 3600, 2)}
    expected = 150 * (13319 / 1000 + 1480 / 2000) + 150 * (13319 / 500 + 1480 / 2000)
    assert ks["hours_by_run"] == {"ks_stream_w16": round(expected / 3600, 2)}


def test_gpu_check_runs_name_only_options_train_step_has(monkeypatch) -> None:
    check, step = load("_gpu_check", monkeypatch), load("train_step", monkeypatch)
    for name, extra in check.RUNS:
        monkeypatch.setattr("sys.argv", ["train_step.py", "--label", name, *extra])
        args = step.parse_args()
        assert args.label == name
