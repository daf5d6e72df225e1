"""Analysis on a tiny CCAT run: TensorBoard scalars, curves, t-SNE and cluster scores,
HDF5 export against `ccat eval`, and the resumable rank/beta sweep."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score
from typer.testing import CliRunner

from ccat import tblog
from ccat.analysis.collect import collect
from ccat.analysis.curves import plot_run
from ccat.analysis.geometry import cluster_scores
from ccat.cli import app, main
from ccat.config import save_config
from ccat.data.reader import open_dataset
from ccat.errors import CcatError
from ccat.evaluate import evaluate_checkpoint
from ccat.sweep import Trial, parse_grid, score
from train_helpers import tiny_config, write_tiny_dataset

runner = CliRunner()
BASE_BETA = 0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny shards, a base config (1 + 1 epochs, beta 0.1) and one CCAT run trained with
    rank 1 straight into the sweep folder, where the sweep test expects it to be reused."""
    root = tmp_path_factory.mktemp("analysis")
    data = write_tiny_dataset(root / "data")
    cfg = tiny_config(data, root / "runs" / "ccat", epochs=2)
    cfg.method.params.update(pretrain_epochs=1, beta=BASE_BETA)
    cfg.threads = 1  # torch and t-SNE on one core each
    config = root / "base.yaml"
    save_config(cfg, config)
    run = root / "sweep" / f"r1_b{BASE_BETA:g}"
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(run),
                                 "--set", "method.params.rank=1"])
    assert result.exit_code == 0, result.output
    return SimpleNamespace(root=root, data=data, config=config, run=run)


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_image(path: Path, min_size: tuple[int, int] = (300, 200)) -> None:
    """A readable PNG of at least ``min_size`` pixels that is not one flat colour."""
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        pixels = np.asarray(img.convert("RGB"))
    assert (pixels != pixels[0, 0]).any()


def run_main(args, monkeypatch, capsys):
    """``ccat ARGS`` through the console-script entry; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ccat", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


def test_tensorboard_reader_finds_the_logged_scalars(tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny.run / tblog.TB_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"val/acc/fused", "val/acc/audio", "val/acc/video", "val/contrib/audio",
                "val/contrib/video", "train/loss", "train/ce", "train/loss/audio",
                "train/loss/video", "train/contrib/audio", "train/selected/audio",
                "train/selected/video", "train/lr"}
    assert expected <= tags
    rows = rows_of(tiny.run)
    fused = events.Scalars("val/acc/fused")
    assert [e.step for e in fused] == [1, 2]
    assert [e.value for e in fused] == pytest.approx([r["val/acc/fused"] for r in rows])
    selected = events.Scalars("train/selected/video")
    assert [e.step for e in selected] == [2]  # secondary updates happen in stage 2 only
    assert selected[0].value == pytest.approx(rows[1]["selected/video"])


def test_training_logs_nothing_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with tblog.open_writer(tmp_path) as writer:
        assert writer is None
        tblog.log_epoch(writer, {"stage": "joint", "epoch": 1, "loss": 1.0}, 1, "val")
    assert not (tmp_path / tblog.TB_DIR).exists()


def png_title(path: Path) -> str:
    """The Title text a figure was saved with (the same string is drawn at its top)."""
    with Image.open(path) as img:
        return img.text["Title"]


def test_analyze_run_writes_the_curves(tiny):
    result = runner.invoke(app, ["analyze", str(tiny.run)])
    assert result.exit_code == 0, result.output
    for name in ("contributions.png", "accuracy.png"):
        assert_image(tiny.run / "plots" / name)
        assert name in result.output
        assert png_title(tiny.run / "plots" / name) == f"{tiny.run}: ccat"


def test_curves_of_a_one_stage_method_with_three_modalities(tmp_path):
    rows = [{"stage": "joint", "epoch": e, "loss": 1.0 / e, "test/acc/fused": 0.3 + 0.1 * e,
             **{f"test/acc/{m}": 0.2 + 0.05 * e * k for k, m in enumerate("abc")},
             **{f"test/contrib/{m}": [0.5, 0.3, 0.2][k] for k, m in enumerate("abc")}}
            for e in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = plot_run(tmp_path)
    assert set(files) == {"contributions", "accuracy"}
    for path in files.values():
        assert_image(path)


def test_cluster_scores_match_hand_values_and_scikit_learn():
    # Two classes on a line, {0, 1} and {10, 11}: CH = (100 / 1) / (1 / 2), DBI = 1 / 10.
    points = np.array([[0.0], [1.0], [10.0], [11.0]])
    labels = np.array([0, 0, 1, 1])
    scores = cluster_scores(points, labels)
    assert scores["calinski_harabasz"] == pytest.approx(200.0)
    assert scores["davies_bouldin"] == pytest.approx(0.1)
    assert scores["silhouette"] == pytest.approx((9.5 / 10.5 + 8.5 / 9.5) / 2)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    feats = rng.normal(0, 1, (60, 8)) + labels[:, None] * 1.5
    assert cluster_scores(feats, labels) == {
        "calinski_harabasz": pytest.approx(calinski_harabasz_score(feats, labels)),
        "silhouette": pytest.approx(silhouette_score(feats, labels)),
        "davies_bouldin": pytest.approx(davies_bouldin_score(feats, labels))}
    with pytest.raises(CcatError, match="classes"):
        cluster_scores(feats, np.zeros(60, dtype=int))


def test_tsne_geometry_of_the_test_features(tiny):
    out = tiny.root / "geometry"
    result = runner.invoke(app, ["analyze", "--ckpt", str(tiny.run / "best.pt"), "--tsne",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "cluster scores by class" in result.output and "t-SNE map (2-D)" in result.output
    assert "{" not in result.output  # a table, not a raw dict
    assert_image(out / "tsne_test.png")
    assert png_title(out / "tsne_test.png") == f"{tiny.run}: ccat"
    scores = json.loads((out / "clusters_test.json").read_text())
    got = collect(tiny.run / "best.pt", split="test")
    feats, labels = got.representation, got.labels
    assert scores["num_samples"] == len(feats) == 12
    assert scores["representation_dim"] == feats.shape[1]
    assert scores["representation"] == {
        "calinski_harabasz": pytest.approx(calinski_harabasz_score(feats, labels)),
        "silhouette": pytest.approx(silhouette_score(feats, labels), abs=1e-6),
        "davies_bouldin": pytest.approx(davies_bouldin_score(feats, labels))}
    assert set(scores["tsne"]) == {"calinski_harabasz", "silhouette", "davies_bouldin"}


def test_export_round_trips_and_agrees_with_eval(tiny):
    path = tiny.root / "feats.h5"
    ckpt = tiny.run / "best.pt"
    result = runner.invoke(app, ["export", "--ckpt", str(ckpt), "--split", "test",
                                 "--out", str(path)])
    assert result.exit_code == 0, result.output
    samples = {s.key: s.label for s in open_dataset(tiny.data).iter_samples("test")}
    with h5py.File(path, "r") as f:
        keys = list(f["keys"].asstr()[:])
        labels = f["labels"][:]
        fused = f["logits/fused"][:]
        assert dict(f.attrs)["modalities"].tolist() == ["audio", "video"]
        assert f.attrs["classes"].tolist() == ["A", "B", "C"]
        assert (f.attrs["method"], f.attrs["split"]) == ("ccat", "test")
        assert f.attrs["checkpoint"] == str(ckpt)
        assert f.attrs["fingerprint"] == open_dataset(tiny.data).fingerprint
        n = len(samples)
        for m in ("audio", "video"):
            assert f[f"logits/{m}"].shape == (n, 3)
            assert f[f"embeddings/{m}"].shape == (n, 16)  # model.width of tiny_config
            assert f[f"contributions/{m}"].shape == (n,)
        assert f["representation"].shape == (n, 32)  # stage 2: both z^m concatenated
        shares = f["contributions/audio"][:] + f["contributions/video"][:]
        contrib_audio = float(f["contributions/audio"][:].mean())
    assert sorted(keys) == sorted(samples) and len(keys) == len(set(keys))
    assert labels.tolist() == [samples[k] for k in keys]
    assert fused.shape == (len(samples), 3) and fused.dtype == np.float32
    assert np.allclose(shares, 1.0, atol=1e-5)
    metrics = evaluate_checkpoint(ckpt, split="test")
    assert float((fused.argmax(1) == labels).mean()) == pytest.approx(metrics["accuracy"]["fused"])
    assert contrib_audio == pytest.approx(metrics["contribution"]["audio"], abs=1e-5)


def best_of(run: Path) -> float:
    """Best fused val accuracy of the run's last stage, read from its metrics.jsonl."""
    rows = rows_of(run)
    return max(r["val/acc/fused"] for r in rows if r["stage"] == rows[-1]["stage"])


def test_sweep_chooses_on_validation_and_reuses_finished_runs(tiny):
    out = tiny.root / "sweep"
    args = ["sweep", "--config", str(tiny.config), "--rank", "1,2", "--beta", "0.1:0.2:0.1",
            "--out", str(out)]
    first = runner.invoke(app, [*args, "--jobs", "2"])  # a phase's runs two at a time
    assert first.exit_code == 0, first.output
    assert "r1_b0.1 (reused)" in first.output  # the fixture's run, same config: no process
    rank_acc = {r: best_of(out / f"r{r}_b0.1") for r in (1, 2)}
    best_rank = 1 if rank_acc[1] >= rank_acc[2] else 2  # ties go to the earlier grid value
    beta_acc = {b: best_of(out / f"r{best_rank}_b{b}") for b in ("0.1", "0.2")}
    best_beta = "0.1" if beta_acc["0.1"] >= beta_acc["0.2"] else "0.2"
    chosen = json.loads((out / "sweep.json").read_text())
    assert (chosen["rank"], f"{chosen['beta']:g}") == (best_rank, best_beta)
    assert chosen["val_acc"] == pytest.approx(max(beta_acc.values()))
    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["phase"], r["rank"], r["beta"]) for r in table] == [
        ("rank", "1", "0.1"), ("rank", "2", "0.1"),
        ("beta", str(best_rank), "0.1"), ("beta", str(best_rank), "0.2")]
    for row in table:  # the trial's epoch is the one its best.pt holds (a tie: the later)
        best = torch.load(out / row["run"] / "best.pt", weights_only=True)
        assert int(row["best_epoch"]) == best["epoch"]
    assert "| phase | rank | beta | val_acc |" in (out / "sweep.md").read_text()
    assert_image(out / "beta.png")
    assert_image(out / "rank.png")
    assert png_title(out / "rank.png") == f"{out}: ccat sweep"

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("r*_b*/last.pt")}
    assert len(stamps) == 3
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("(reused)") == 4 and "(training)" not in again.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("r*_b*/last.pt")} == stamps
    assert json.loads((out / "sweep.json").read_text())["rank"] == chosen["rank"]


def interrupt_sweep(command: list[str], ready) -> str:
    """Start ``command`` in a process group of its own, send the group SIGINT (as a terminal
    does) once ``ready()``, return what it printed; it must exit 130."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env={**os.environ, "COLUMNS": "500"})  # one line, unwrapped
    deadline = time.monotonic() + 600  # a bound for a hang, not a speed check
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    said, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, said
    return said


def test_ctrl_c_stops_a_sweep_in_one_line_and_running_it_again_resumes(tiny, tmp_path):
    """Ctrl-C reaches the sweep and its trial's `ccat train`: the trial says where it
    stopped, the sweep's last line how to continue (exit 130); the same command again
    resumes the trial from its checkpoint."""
    out = tmp_path / "sweep"
    last = out / "r2_b0.1" / "last.pt"
    command = [sys.executable, "-m", "ccat", "sweep", "--config", str(tiny.config), "--rank",
               "2", "--beta", "0.1", "--out", str(out), "--set", "optim.epochs=500"]
    said = interrupt_sweep(command, last.is_file)
    assert "interrupted: training of" in said and "Traceback" not in said
    assert said.rstrip().splitlines()[-1].startswith(
        "interrupted: the sweep stopped; run the same command again to continue it")
    saved = torch.load(last, weights_only=True)["epoch"]
    said = interrupt_sweep(command, lambda: torch.load(last, weights_only=True)["epoch"] > saved)
    assert "r2_b0.1 (resuming)" in said and f"resuming {last.parent}: " in said, said


def test_sweep_score_takes_the_later_of_tied_epochs_as_best_pt_does():
    rows = [{"stage": "pretrain", "epoch": 1, "val/acc/fused": 0.9},
            *({"stage": "alternate", "epoch": e, "val/acc/fused": acc, "val/acc/audio": e / 10}
              for e, acc in ((1, 0.5), (2, 0.7), (3, 0.6), (4, 0.7)))]
    trial = Trial(phase="rank", rank=1, beta=0.1, folder=Path("unused"))
    score(trial, rows, "val")
    assert (trial.val_acc, trial.best_epoch, trial.unimodal) == (0.7, 4, {"audio": 0.4})
    score(trial, rows[:-1], "val", select="last")  # best.pt is the last epoch: so is the score
    assert (trial.val_acc, trial.best_epoch, trial.unimodal) == (0.6, 3, {"audio": 0.3})


def test_grid_syntax():
    assert parse_grid("0.05:0.40:0.05", "--beta") == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]
    assert parse_grid("1,2,4,8,16", "--rank", integer=True) == [1, 2, 4, 8, 16]
    assert parse_grid("1:3:1, 2, 8", "--rank", integer=True) == [1, 2, 3, 8]
    assert parse_grid("0.3", "--beta") == [0.3]
    for text, says in (("1,,2", "empty item"), ("0.1,x", "'x'"), ("0.4:0.05:0.05", "start <= stop"),
                       ("0:1:0", "step > 0"), ("1:2", "start:stop:step"), ("nan", "finite"),
                       ("0:1:0.0000001", "more than")):
        with pytest.raises(CcatError, match=says):
            parse_grid(text, "--beta")
    with pytest.raises(CcatError, match="whole numbers"):
        parse_grid("1.5,2", "--rank", integer=True)


def test_user_errors_are_one_sentence(tiny, tmp_path, monkeypatch, capsys):
    no_val = write_tiny_dataset(tmp_path / "noval", counts={"train": 8, "test": 4})
    for args, says in ((["sweep", "--config", tiny.config, "--rank", "1,x"], "'x'"),
                       (["sweep", "--config", tiny.config, "--rank", "0"], "rank"),
                       (["sweep", "--config", tiny.config, "--data", no_val], "validation"),
                       (["analyze", tmp_path], "metrics.jsonl"),
                       (["analyze"], "nothing to analyze"),
                       (["analyze", "--ckpt", tiny.run / "best.pt"], "--tsne"),
                       (["export", "--ckpt", tiny.run / "best.pt", "--split", "dev",
                         "--out", tmp_path / "x.h5"], "'dev'")):
        code, err = run_main(args, monkeypatch, capsys)
        assert code == 2 and err.startswith("error:") and says in err, err
        assert "Traceback" not in err
