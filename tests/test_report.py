"""``ccat report`` on real tiny runs: grouping, mean ± std over seeds, marks, files, errors;
and the ``make table`` / ``make ablation`` commands."""

import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ccat.cli import app, main
from ccat import run_dir
from ccat.report import COST_COLUMNS, find_runs, read_result
from ccat.train import train
from train_helpers import tiny_config, write_tiny_dataset

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def train_and_eval(data: Path, out: Path, method: str, seed: int, **switches: bool) -> None:
    """One epoch (CCAT: one per stage) in this process, then ``ccat eval`` through the CLI
    into OUT/eval.json."""
    cfg = tiny_config(data, out, method, epochs=2 if method == "ccat" else 1)
    cfg.seed, cfg.threads = seed, 1
    for name, value in switches.items():
        cfg.method.params[name] = value
    train(cfg)
    result = runner.invoke(app, ["eval", "--ckpt", str(out / "best.pt"),
                                 "--json", str(out / "eval.json")])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """sum and concat x seeds 0 and 1, and CCAT without secondary updates (seed 0)."""
    root = tmp_path_factory.mktemp("report")
    data = write_tiny_dataset(root / "shards")
    for method in ("sum", "concat"):
        for seed in (0, 1):
            train_and_eval(data, root / "runs" / method / f"s{seed}", method, seed)
    train_and_eval(data, root / "runs" / "ablation" / "no_secondary" / "s0", "ccat", 0,
                   secondary=False)
    return root / "runs"


def evals(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("eval.json"))]


def test_eval_json_names_the_run(runs):
    metrics = json.loads((runs / "ablation" / "no_secondary" / "s0" / "eval.json").read_text())
    assert metrics["run"] == {"method": "ccat", "variant": "no secondary", "dataset": "tiny",
                              "seed": 0}


def test_report_means_stds_and_marks(runs, tmp_path):
    result = runner.invoke(app, ["report", str(runs / "sum"), str(runs / "concat"),
                                 "--format", "csv", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text())))
    assert {r["row"] for r in rows} == {"sum", "concat"}
    assert {r["accuracy"] for r in rows} == {"fused", "audio", "video", "train s", "samples/s"}
    for r in rows:
        if r["accuracy"] in COST_COLUMNS:  # from each run's metrics.jsonl, never ranked
            key = "train_s" if r["accuracy"] == "train s" else "samples_per_s"
            values = [run_dir.training_cost(p.parent)[key]
                      for p in sorted((runs / r["method"]).rglob("eval.json"))]
            assert r["rank"] == ""
        else:
            values = [m["accuracy"][r["accuracy"]] for m in evals(runs / r["method"])]
        assert float(r["mean"]) == pytest.approx(statistics.mean(values))
        assert float(r["std"]) == pytest.approx(statistics.stdev(values))
        assert r["n"] == "2" and r["seeds"] == "0 1" and r["dataset"] == "tiny"
    printed = list(csv.DictReader(io.StringIO(result.stdout.split("wrote")[0])))
    assert printed == rows
    markdown = (tmp_path / "table.md").read_text()
    assert "| method | tiny fused | tiny audio | tiny video |" in markdown
    for name in ("fused", "audio", "video"):
        cells = sorted((r for r in rows if r["accuracy"] == name), key=lambda r: -float(r["mean"]))
        best = cells[0]
        assert best["rank"] == "1"
        shown = f"{100 * float(best['mean']):.2f} ± {100 * float(best['std']):.2f}"
        assert f"**{shown}**" in markdown
        if round(float(cells[1]["mean"]), 4) < round(float(best["mean"]), 4):
            assert cells[1]["rank"] == "2"
            assert f"<u>{100 * float(cells[1]['mean']):.2f}" in markdown


def test_ablation_variant_is_its_own_row_and_table_prints(runs):
    result = runner.invoke(app, ["report", str(runs)])
    assert result.exit_code == 0, result.output
    assert "ccat (no secondary)" in result.stdout and "concat" in result.stdout
    markdown = runner.invoke(app, ["report", str(runs), "--format", "markdown"]).stdout
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    # Rows in the order the runs are found (folders are searched in sorted order).
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| ccat (no secondary)",
                                                             "| concat", "| sum"]
    assert "(n=1)" in lines[2] and "±" not in lines[2]  # one seed: no std


def test_probe_columns_beside_the_unimodal_ones_and_empty_without_a_probe(runs, tmp_path):
    for seed in (0, 1):
        run = shutil.copytree(runs / "sum" / f"s{seed}", tmp_path / "sum" / f"s{seed}")
        result = runner.invoke(app, ["eval", "--ckpt", str(run / "best.pt"), "--probe",
                                     "--json", str(run / "eval.json")])
        assert result.exit_code == 0, result.output
    shutil.copytree(runs / "concat", tmp_path / "concat")  # evaluated without --probe
    markdown = runner.invoke(app, ["report", str(tmp_path), "--format", "markdown"]).stdout
    header = next(line for line in markdown.splitlines() if line.startswith("| method"))
    assert header == ("| method | tiny fused | tiny audio | tiny video | tiny probe audio | "
                      "tiny probe video | tiny train s | tiny samples/s |")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith(("| method", "| ---"))}
    probes = [json.loads((tmp_path / "sum" / f"s{seed}" / "eval.json").read_text())["probe"]
              for seed in (0, 1)]
    mean = statistics.mean(p["audio"] for p in probes)
    assert rows["sum"][4].strip("*<u>/ ").startswith(f"{100 * mean:.2f}")
    assert rows["concat"][4] == "—" and rows["concat"][5] == "—"
    caption = markdown.splitlines()[0]
    assert "not comparable across methods" in caption and "comparable across them" in caption
    assert "best.pt: best fused accuracy on 'val', ties to the later epoch." in caption
    printed = runner.invoke(app, ["report", str(tmp_path)])
    assert printed.exit_code == 0 and "probe audio" in printed.stdout
    csv_rows = list(csv.DictReader(io.StringIO(
        runner.invoke(app, ["report", str(tmp_path), "--format", "csv"]).stdout)))
    assert {r["row"] for r in csv_rows if r["accuracy"] == "probe audio"} == {"sum"}


def test_unevaluated_run_is_a_note_and_old_json_falls_back_to_config(runs, tmp_path):
    old = shutil.copytree(runs / "sum" / "s1", tmp_path / "sum_old")
    metrics = json.loads((old / "eval.json").read_text())
    identity = metrics.pop("run")
    (old / "eval.json").write_text(json.dumps(metrics))
    result = read_result(old / "eval.json", "test")
    assert (result.method, result.variant, result.dataset, result.seed) == (
        identity["method"], identity["variant"], identity["dataset"], identity["seed"])
    pending = tmp_path / "pending"
    pending.mkdir()
    shutil.copy(runs / "concat" / "s0" / "config.yaml", pending / "config.yaml")
    found = find_runs([runs / "concat", pending])
    assert found.unevaluated == [pending] and len(found.results) == 2
    out = runner.invoke(app, ["report", str(runs / "concat"), str(pending),
                              "--format", "markdown"]).stdout
    assert f"not evaluated (no eval.json): {pending}" in out


def test_datasets_with_other_modalities_get_their_own_columns(tmp_path):
    for dataset, accuracy in (("cremad", {"fused": 0.6, "audio": 0.5, "video": 0.3}),
                              ("mvsa", {"fused": 0.7, "image": 0.4, "text": 0.65})):
        run = tmp_path / dataset / "s0"
        run.mkdir(parents=True)
        (run / "eval.json").write_text(json.dumps(
            {"split": "test", "accuracy": accuracy,
             "run": {"method": "sum", "variant": "", "dataset": dataset, "seed": 0}}))
    out = runner.invoke(app, ["report", str(tmp_path), "--format", "csv"]).stdout
    columns = [(r["dataset"], r["accuracy"]) for r in csv.DictReader(io.StringIO(out))]
    assert columns == [("cremad", "fused"), ("cremad", "audio"), ("cremad", "video"),
                       ("mvsa", "fused"), ("mvsa", "image"), ("mvsa", "text")]


def test_caption_names_each_selection_rule_and_its_rows(tmp_path):
    selections = {"sum": {"select": "best", "split": "val", "rule": "best fused accuracy",
                          "ties": "later epoch", "stage": "joint", "epoch": 2},
                  "concat": {"select": "last", "split": None, "rule": "last epoch",
                             "stage": "joint", "epoch": 3}}
    for method, selection in selections.items():
        run = tmp_path / method / "s0"
        run.mkdir(parents=True)
        (run / "eval.json").write_text(json.dumps(
            {"split": "test", "accuracy": {"fused": 0.5}, "selection": selection,
             "run": {"method": method, "variant": "", "dataset": "tiny", "seed": 0}}))
    markdown = runner.invoke(app, ["report", str(tmp_path), "--format", "markdown"]).stdout
    assert ("best.pt: last epoch (concat); best fused accuracy on 'val', ties to the later "
            "epoch (sum).") in markdown.splitlines()[0]


def run_main(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ccat", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


def test_folder_without_runs_and_duplicate_seeds_are_one_line_errors(runs, tmp_path,
                                                                     monkeypatch, capsys):
    code, err = run_main(["report", tmp_path], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: no runs under")
    assert len(err.strip().splitlines()) <= 3 and "Traceback" not in err
    shutil.copytree(runs / "sum" / "s0", tmp_path / "copy" / "s0")
    code, err = run_main(["report", runs / "sum", tmp_path / "copy"], monkeypatch, capsys)
    assert code == 2 and "both sum on tiny with seed 0" in err


def test_make_table_and_ablation_dry_run(tmp_path):
    """`make -n` runs `ccat grid --dry-run`: each run's commands as they would run now."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")  # present, so `make shards` is not called
    common = ["make", "-n", "-s", "-C", str(REPO), "-o", ".venv/.installed", "DATASET=tiny",
              f"SHARDS={shards}", "SEEDS=0 1", f"RUNS={tmp_path}/runs",
              "CONFIG=configs/demo.yaml"]
    finished = tmp_path / "runs" / "sum" / "s1"
    finished.mkdir(parents=True)
    for name in ("config.yaml", "best.pt", "eval.json"):  # a finished, evaluated run
        (finished / name).write_text("{}")
    os.utime(finished / "eval.json", ns=(2 * 10**18, 2 * 10**18))  # newer than best.pt
    out = subprocess.run([*common, "METHODS=sum concat", "table"], capture_output=True,
                         text=True, check=True).stdout
    train_lines = [line for line in out.splitlines() if " train " in line]
    eval_lines = [line for line in out.splitlines() if " eval " in line]
    # finished runs too go through `ccat train --resume`, which refuses changed settings;
    # eval.json is written when missing or older than best.pt
    assert len(train_lines) == 4 and len(eval_lines) == 3
    for method, seed in (("sum", 0), ("sum", 1), ("concat", 0), ("concat", 1)):
        run = f"{tmp_path}/runs/{method}/s{seed}"
        line = next(line for line in train_lines if f"--out {run} " in line)
        assert f"--method {method} " in line
        assert line.endswith(f"--set seed={seed} --set protocol=shared" +
                             (" --resume" if (method, seed) == ("sum", 1) else ""))
        assert any(f"--probe --json {run}/eval.json" in line
                   for line in eval_lines) == ((method, seed) != ("sum", 1))
    out = subprocess.run([*common, "METHODS=sum", "ARGS=--overwrite", "table"],
                         capture_output=True, text=True, check=True).stdout
    assert "--overwrite" in out and "--resume" not in out
    assert any(" report " in line and f"{finished}" in line for line in out.splitlines())
    out = subprocess.run([*common, "ablation", "ARGS=--set optim.lr=0.5"], capture_output=True,
                         text=True, check=True).stdout
    train_lines = [line for line in out.splitlines() if " train " in line]
    assert len(train_lines) == 12  # 2 full-CCAT runs + 5 switches x 2 seeds
    for switch in ("fixed_classifier", "alternating", "secondary", "lora", "fresh_encoders"):
        assert sum(line.endswith(f"--set protocol=shared --set method.params.{switch}=false "
                                 "--set optim.lr=0.5") and f"ablation/no_{switch}/" in line
                   for line in train_lines) == 2
    assert f"--out {tmp_path}/runs/ablation" in out.splitlines()[-1]  # the report


def test_make_table_stops_at_a_failed_run(tmp_path):
    """A failed run stops the grid before the table; make -k trains the others first and
    names every failed run."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")  # present, so no build; unreadable to train
    make = ["make", "-s", "-C", str(REPO), "-o", ".venv/.installed", "table", "DATASET=tiny",
            f"SHARDS={shards}", "SEEDS=0", "METHODS=sum concat", f"RUNS={tmp_path}/runs",
            "CONFIG=configs/demo.yaml"]
    proc = subprocess.run(make, capture_output=True, text=True)
    assert proc.returncode != 0 and "error:" in proc.stderr
    assert f"runs/sum/s0 failed in `ccat train`" in proc.stderr
    assert "concat" not in proc.stderr and "no further run was started" in proc.stderr
    assert not (tmp_path / "runs" / "table.md").exists()
    proc = subprocess.run([*make, "-k"], capture_output=True, text=True)
    assert proc.returncode != 0 and f"{tmp_path}/runs/concat/s0" in proc.stderr
    assert "1 more failed" in proc.stderr
    assert not (tmp_path / "runs" / "table.md").exists()


def test_a_run_set_aside_by_overwrite_is_not_reported(runs, tmp_path):
    """Until the new run's first checkpoint, ``--overwrite`` keeps the old run in
    ``OUT/.overwritten/``; its eval.json and config.yaml are no result of the folder."""
    run = shutil.copytree(runs / "sum" / "s0", tmp_path / "sum" / "s0")
    other = shutil.copytree(runs / "concat" / "s0", tmp_path / "concat" / "s0")
    aside = run / run_dir.OVERWRITTEN
    aside.mkdir()
    for name in ("eval.json", "config.yaml"):
        shutil.move(run / name, aside / name)
    found = find_runs([tmp_path])
    assert found.inputs == [other / "eval.json"] and found.unevaluated == []
    shutil.copy(aside / "config.yaml", run / "config.yaml")  # the new run has begun
    assert find_runs([tmp_path]).unevaluated == [run]


def test_a_run_config_is_read_within_the_config_bounds(runs, tmp_path):
    """report reads a run's config.yaml (for an eval.json without its run block) with the
    bounded YAML reader: a hand-made alias bomb there is one skipped run, not 7 GB."""
    run = shutil.copytree(runs / "sum" / "s1", tmp_path / "bomb")
    metrics = json.loads((run / "eval.json").read_text())
    metrics.pop("run")
    (run / "eval.json").write_text(json.dumps(metrics))
    lines = ['a: &a ["xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"]']
    lines += [f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]"
              for p, c in zip("abcdefgh", "bcdefghi")]
    (run / "config.yaml").write_text("\n".join(lines) + "\n")
    found = find_runs([run])
    assert found.results == [] and len(found.skipped) == 1
    assert "aliases" in found.skipped[0] and len(found.skipped[0]) < 600
