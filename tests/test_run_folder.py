"""Run folders you can trust (issue 12, items 3-7): one run per folder, resumes that refuse
changed settings, every kill point recoverable, portable data paths, selection that never
touches test unasked, interruptions that say where they stopped."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from ccat import run_dir
from ccat.cli import main
from ccat.config import ConfigError
from ccat.run_config import load_config
from ccat.errors import CcatError
from ccat.evaluate import evaluate_checkpoint
from ccat.methods import METHODS
from ccat.train import TIMING_KEYS, train
from train_helpers import (cli_train, interrupt, interrupt_then_resume, tiny_config,
                           write_tiny_dataset)

# One thread: runs in this process and in subprocesses sum floats in the same order.
TINY_YAML = """\
device: cpu
threads: 1
data: {batch_size: 8, workers: 0}
model: {width: 16, encoder_width: 4, encoder_blocks: [1, 1, 1, 1], heads: 2, ffn_mult: 2}
optim: {epochs: 3, lr: 0.01}  # CCAT: 1 + 2 of the total budget
method: {name: ccat, params: {pretrain_epochs: 1}}
"""
runner = CliRunner()
SUBPROCESS_WAIT_S = 600  # a bound for a hung process, not a speed check


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


def run_main(args, monkeypatch, capsys):
    """``ccat ARGS`` through the console entry; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ccat", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


def rows_without_timing(folder):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS}
            for row in run_dir.read_metrics(folder)]


def checkpoint_of(path):
    return torch.load(path, weights_only=True)


def same_weights(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ------------------------------------------------------------------ item 3: --resume

def test_resume_refuses_changed_settings_naming_each_key(tiny, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tiny, tmp_path / "run", method="sum", epochs=2)
    interrupt(cfg, monkeypatch, at_epoch=2)
    changed = tiny_config(tiny, tmp_path / "run", method="sum", epochs=3)
    changed.optim.lr, changed.seed, changed.data.batch_size = 0.5, 1, 4
    with pytest.raises(CcatError) as err:
        train(changed, resume=True)
    message = str(err.value)
    for part in ("optim.lr: 0.01 -> 0.5", "seed: 0 -> 1", "data.batch_size: 8 -> 4",
                 "optim.epochs: 2 -> 3", "--overwrite"):
        assert part in message
    # another method, or a param sum lacks: one line, not a state_dict traceback
    cfg_path = tmp_path / "sum.yaml"
    cfg_path.write_text(TINY_YAML.replace("name: ccat, params: {pretrain_epochs: 1}",
                                          "name: sum"))
    base = ["train", "--config", cfg_path, "--data", tiny, "--out", tmp_path / "run",
            "--set", "data.workers=0", "--set", "seed=0", "--resume"]
    for extra, says in ((["--method", "concat"], "method.name: 'sum' -> 'concat'"),
                        (["--set", "method.params.rank=8"], "method 'sum' has no param 'rank'")):
        code, stderr = run_main(base + extra, monkeypatch, capsys)
        assert code == 2 and stderr.startswith("error:") and says in stderr
        assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    # keys that change speed or places, not results, may change
    free = tiny_config(tiny, tmp_path / "run", method="sum", epochs=2)
    free.data.prefetch, free.data.pin_memory, free.data.cache_dir = 4, False, str(tmp_path)
    assert [r["epoch"] for r in train(free, resume=True)] == [1, 2]


# ------------------------------------------------------------------ item 4: one run a folder

def test_used_out_needs_resume_or_overwrite(tiny, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny, out, method="ccat", epochs=2))
    (out / run_dir.EVAL).write_text("{}")
    with pytest.raises(CcatError, match="holds a run already; pass --resume .* --overwrite"):
        train(tiny_config(tiny, out, method="ccat", epochs=2))
    with pytest.raises(CcatError, match="pass one of them"):
        train(tiny_config(tiny, out, method="sum"), resume=True, overwrite=True)
    train(tiny_config(tiny, out, method="sum"), overwrite=True)
    assert [r["stage"] for r in run_dir.read_metrics(out)] == ["joint"]  # not appended
    assert not (out / run_dir.EVAL).exists()
    assert checkpoint_of(out / run_dir.BEST)["config"]["method"]["name"] == "sum"
    with pytest.raises(CcatError, match="found no run"):
        train(tiny_config(tiny, tmp_path / "empty", method="sum"), resume=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(CcatError, match="is a file, not a folder"):
        train(tiny_config(tiny, tmp_path / "file", method="sum"))


def test_resume_cuts_metrics_back_to_the_checkpoint(tiny, tmp_path, monkeypatch):
    cfg = tiny_config(tiny, tmp_path / "run", method="sum", epochs=3)
    interrupt(cfg, monkeypatch, at_epoch=2)
    with open(tmp_path / "run" / run_dir.METRICS, "a") as f:  # rows ahead of last.pt
        f.write(json.dumps({"stage": "joint", "epoch": 2}) + "\n" + '{"stage": "jo')
    history = train(cfg, resume=True)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["epoch"] for r in run_dir.read_metrics(tmp_path / "run")] == [1, 2, 3]


# ------------------------------------------------------------------ item 5: kill points

@pytest.fixture(scope="module")
def uninterrupted(tiny, config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train(load_config(config_file, (), {"data.path": str(tiny), "out": str(out)}))
    return out


@pytest.mark.parametrize("write", [run_dir.METRICS, run_dir.LAST, run_dir.BEST])
def test_a_kill_after_any_write_resumes_to_the_uninterrupted_run(
        write, tiny, config_file, uninterrupted, tmp_path, capsys):
    """SIGKILL right after the second write of ``write`` (stage 2, epoch 1: the epoch whose
    best.pt a kill between last.pt and best.pt used to lose), then --resume."""
    out = tmp_path / "run"
    proc = cli_train(config_file, tiny, out, env={run_dir.KILL_ENV: f"{write}:2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    train(load_config(config_file, (), {"data.path": str(tiny), "out": str(out)}), resume=True)
    assert "resuming " in capsys.readouterr().out
    for name in (run_dir.BEST, run_dir.LAST):
        full, cut = checkpoint_of(uninterrupted / name), checkpoint_of(out / name)
        assert (cut["stage"], cut["epoch"]) == (full["stage"], full["epoch"])
        assert same_weights(full, cut) and cut["metrics"] == full["metrics"]
    assert rows_without_timing(out) == rows_without_timing(uninterrupted)


@pytest.mark.parametrize("method", METHODS.names())
def test_resume_equals_uninterrupted_for_every_method(method, tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "val": 4, "test": 4})
    cfg = tiny_config(data, tmp_path / "full", method=method, epochs=2)
    if method == "ccat":
        cfg.method.params["pretrain_epochs"] = 1
    train(cfg)
    cfg.out = str(tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=2)
    for name in (run_dir.LAST, run_dir.BEST):
        assert same_weights(checkpoint_of(tmp_path / "full" / name),
                            checkpoint_of(tmp_path / "cut" / name))
    assert rows_without_timing(tmp_path / "cut") == rows_without_timing(tmp_path / "full")


def test_resume_says_where_it_continues(tiny, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tiny, tmp_path / "run", method="ccat", epochs=3)  # 1 + 2
    cfg.method.params["pretrain_epochs"] = 1
    interrupt_then_resume(cfg, monkeypatch, at_epoch=3)
    said = capsys.readouterr().out
    assert "stage 'alternate' (2 of 2), epoch 2 of 2, step 7" in said.replace("\n", " ")


# ------------------------------------------------------------------ item 7: interruptions

def test_ctrl_c_names_stage_epoch_checkpoint_and_resume_command(tiny, config_file, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ccat", "train", "--config",
                             str(config_file), "--data", str(tiny), "--out", str(out),
                             "--method", "sum", "--set", "optim.epochs=500"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Ctrl-C once training has written its first checkpoint. No wall-clock budget short
    # enough for a loaded machine to break: the run itself has 500 epochs to go.
    deadline = time.monotonic() + SUBPROCESS_WAIT_S
    while not (out / run_dir.LAST).is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=SUBPROCESS_WAIT_S)
    assert proc.returncode == 130
    line = stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert line.startswith("interrupted:") and "stage 'joint' (1 of 1), epoch " in line
    assert f"last checkpoint: {out / run_dir.LAST} (stage 'joint', epoch " in line
    command = line.split("continue with: ")[1]
    assert command.startswith("ccat train ") and command.endswith(" --resume")
    assert f"--out {out}" in command


# ------------------------------------------------------------------ item 6: selection

def test_without_validation_best_is_the_last_epoch_unless_test_is_named(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "test": 6})
    cfg = tiny_config(data, tmp_path / "last", method="sum", epochs=3)
    train(cfg)
    best = checkpoint_of(tmp_path / "last" / run_dir.BEST)
    assert best["epoch"] == 3 and best["selection"] == {"select": "best", "split": None,
                                                        "rule": "last epoch"}
    metrics = evaluate_checkpoint(tmp_path / "last" / run_dir.BEST)
    assert metrics["selection"] == {"select": "best", "split": None, "rule": "last epoch",
                                    "stage": "joint", "epoch": 3}
    cfg = tiny_config(data, tmp_path / "test", method="sum", epochs=3)
    cfg.select_split = "test"
    train(cfg)
    metrics = evaluate_checkpoint(tmp_path / "test" / run_dir.BEST)
    assert metrics["selection"]["split"] == "test"
    assert metrics["selection"]["rule"] == "best fused accuracy"
    assert metrics["selection"]["ties"] == "later epoch"
    cfg = tiny_config(data, tmp_path / "val", method="sum")
    cfg.select_split = "val"
    with pytest.raises(CcatError, match="select_split 'val' is not a split"):
        train(cfg)


def test_select_last_keeps_the_last_epoch_and_still_evaluates_validation(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "val": 3, "test": 3})
    cfg = tiny_config(data, tmp_path / "run", method="sum", epochs=3)
    cfg.select = "last"
    train(cfg)
    best = checkpoint_of(tmp_path / "run" / run_dir.BEST)
    assert best["epoch"] == 3 and best["selection"] == {"select": "last", "split": None,
                                                        "rule": "last epoch"}
    assert all("val/acc/fused" in row for row in run_dir.read_metrics(tmp_path / "run"))
    assert evaluate_checkpoint(tmp_path / "run" / run_dir.BEST)["selection"]["select"] == "last"
    with pytest.raises(ConfigError, match="select"):
        load_config(None, ["select=first"])


def test_a_tie_in_validation_accuracy_selects_the_later_epoch(tmp_path):
    """One validation sample: its accuracy is 0 or 1, so 4 epochs tie at their best."""
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "val": 1, "test": 3})
    cfg = tiny_config(data, tmp_path / "run", method="sum", epochs=4)
    train(cfg)
    scores = [row["val/acc/fused"] for row in run_dir.read_metrics(tmp_path / "run")]
    top = [epoch for epoch, score in enumerate(scores, 1) if score == max(scores)]
    assert len(top) > 1, f"no tie at the best score to test: {scores}"
    best = checkpoint_of(tmp_path / "run" / run_dir.BEST)
    assert best["epoch"] == top[-1] and best["best_epoch"] == top[-1]


def test_resume_refuses_a_change_of_the_selection_rule(tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "val": 3, "test": 3})
    cfg = tiny_config(data, tmp_path / "run", method="sum", epochs=3)
    interrupt(cfg, monkeypatch, at_epoch=2)
    cfg.select = "last"
    with pytest.raises(CcatError, match="select: 'best' -> 'last'"):
        train(cfg, resume=True)


def test_a_resumed_run_reports_the_training_time_of_all_its_epochs(tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "val": 3, "test": 3})
    cfg = tiny_config(data, tmp_path / "run", method="sum", epochs=3)
    interrupt(cfg, monkeypatch, at_epoch=3)
    before = run_dir.read_metrics(tmp_path / "run")
    train(cfg, resume=True)
    rows = run_dir.read_metrics(tmp_path / "run")
    assert len(rows) == 3 and rows[:2] == before  # the interrupted process's rows are kept
    assert all(row["train_s"] > 0 for row in rows)
    cost = run_dir.training_cost(tmp_path / "run")
    assert cost["train_s"] == pytest.approx(sum(row["train_s"] for row in rows))
    samples = sum(row["train_s"] * row["samples_per_s"] for row in rows)
    assert cost["samples_per_s"] == pytest.approx(samples / cost["train_s"])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / run_dir.METRICS).write_text('{"epoch": 1, "samples_per_s": 9.0}\n')
    assert run_dir.training_cost(tmp_path / "old") == {}  # written before train_s existed


def test_a_batch_larger_than_the_train_split_is_refused(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 6, "val": 3, "test": 3})
    cfg = tiny_config(data, tmp_path / "run", method="sum")
    with pytest.raises(CcatError, match=r"data.batch_size 8 is larger than the train split "
                                        r".* \(6 samples\)"):
        train(cfg)


# ------------------------------------------------------------------ item 7: portable folders

def test_eval_finds_the_data_from_another_directory(tmp_path, monkeypatch, capsys):
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_tiny_dataset(first / "shards", counts={"train": 8, "val": 3, "test": 3})
    second.mkdir()
    monkeypatch.chdir(first)
    cfg = tiny_config("shards", tmp_path / "run", method="sum")  # relative, as typed
    train(cfg)
    ckpt = checkpoint_of(tmp_path / "run" / run_dir.BEST)
    assert ckpt["data"] == {"given": "shards", "absolute": str(first / "shards")}
    monkeypatch.chdir(second)  # found by its absolute path
    assert evaluate_checkpoint(tmp_path / "run" / run_dir.BEST)["num_samples"] == 3
    shutil.move(first, third)  # the project moved: found relative to the new directory
    monkeypatch.chdir(third)
    assert evaluate_checkpoint(tmp_path / "run" / run_dir.BEST)["num_samples"] == 3
    monkeypatch.chdir(second)  # neither: say to pass --data
    code, err = run_main(["eval", "--ckpt", tmp_path / "run" / run_dir.BEST], monkeypatch,
                         capsys)
    assert code == 2 and "pass --data" in err and str(first / "shards") in err


def test_make_train_and_table_share_one_layout(tmp_path, pytestconfig):
    common = ["make", "-n", "-s", "-C", str(pytestconfig.rootpath), "-o", ".venv/.installed",
              "DATASET=tiny", f"SHARDS={tmp_path}", "METHOD=sum", "SEED=1"]
    (tmp_path / "manifest.json").write_text("{}")
    train_line = subprocess.run([*common, "train"], capture_output=True, text=True,
                                check=True).stdout
    eval_line = subprocess.run([*common, "eval"], capture_output=True, text=True,
                               check=True).stdout
    table = subprocess.run([*common, "METHODS=sum", "SEEDS=1", "table"], capture_output=True,
                           text=True, check=True).stdout
    assert "--out runs/tiny/sum/s1 " in train_line and "--set seed=1" in train_line
    assert "--ckpt runs/tiny/sum/s1/best.pt" in eval_line
    assert "--out runs/tiny/sum/s1 " in table


def test_make_table_refuses_changed_args_on_a_rerun(tiny, config_file, tmp_path, pytestconfig):
    """`make table` resumes every run folder: a rerun with other ARGS is refused, naming the
    key, instead of mixing settings; the same ARGS again reuse the finished run."""
    config = tmp_path / "one_epoch.yaml"
    config.write_text(TINY_YAML.replace("epochs: 3", "epochs: 1"))
    make = ["make", "-s", "-C", str(pytestconfig.rootpath), "-o", ".venv/.installed", "table",
            "DATASET=tiny", f"SHARDS={tiny}", "SEEDS=0", "METHODS=sum",
            f"RUNS={tmp_path}/runs", f"CONFIG={config}"]
    run = tmp_path / "runs" / "sum" / "s0"  # trained here as make would train it
    train(load_config(config, ["seed=0"], {"method.name": "sum", "data.path": str(tiny),
                                           "out": str(run)}))
    evaluate_checkpoint(run / run_dir.BEST, json_path=run / run_dir.EVAL)
    stamps = [(run / name).stat().st_mtime_ns for name in (run_dir.BEST, run_dir.EVAL)]
    changed = subprocess.run([*make, "ARGS=--set optim.lr=0.5"], capture_output=True, text=True)
    assert changed.returncode != 0
    assert "optim.lr: 0.01 -> 0.5" in changed.stderr and "ARGS" in changed.stderr
    again = subprocess.run(make, capture_output=True, text=True)
    assert again.returncode == 0 and "finished already" in again.stdout
    assert (tmp_path / "runs" / "table.md").is_file()
    # the finished run's best.pt is left as it was, so its eval.json is not redone
    assert [(run / name).stat().st_mtime_ns for name in (run_dir.BEST, run_dir.EVAL)] == stamps
