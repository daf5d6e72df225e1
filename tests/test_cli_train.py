"""The CLI end to end: synth -> ccat-data build -> ccat train (both stages) -> ccat eval."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ccat.cli import app, main
from conftest import assert_keys_unique
from train_helpers import write_tiny_dataset

runner = CliRunner()
TINY = ["--set", "device=cpu", "--set", "data.batch_size=8", "--set", "data.workers=0",
        "--set", "model.width=16", "--set", "model.encoder_width=4",
        "--set", "model.encoder_blocks=[1, 1, 1, 1]", "--set", "model.heads=2",
        "--set", "optim.lr=0.01"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """48 synthetic CREMA-D clips built into 32 px, 1 s shards by the real builder.

    The builder runs in its own process: it calls torch.set_num_threads(1), after which
    this torch build corrupted its heap in later training steps of the same process.
    """
    root = tmp_path_factory.mktemp("cremad")
    for args in (["synth", "cremad", "--out", str(root / "raw"), "--clips", "48", "--seed", "0"],
                 ["build", "cremad", "--raw", str(root / "raw"), "--out", str(root / "shards"),
                  "--frame-size", "32", "--seconds", "1.0", "--shard-size", "16",
                  "--workers", "1"]):
        proc = subprocess.run([sys.executable, "-m", "preprocess.cli", *args],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert_keys_unique(root / "shards")
    return root / "shards"


def test_train_both_stages_then_eval(shards, tmp_path, pytestconfig):
    out = tmp_path / "run"
    config = pytestconfig.rootpath / "configs" / "demo.yaml"
    result = runner.invoke(app, ["train", "--config", str(config), "--data", str(shards),
                                 "--out", str(out), *TINY, "--set", "optim.epochs=2",
                                 "--set", "method.params.pretrain_epochs=1"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["pretrain", "alternate"]
    assert {"selected/audio", "selected/video"} <= set(rows[1])
    assert (out / "config.yaml").is_file() and (out / "best.pt").is_file()

    result = runner.invoke(app, ["eval", "--ckpt", str(out / "best.pt"), "--json",
                                 str(out / "eval.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "eval.json").read_text())
    manifest = json.loads((shards / "manifest.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["num_samples"] == manifest["splits"]["test"]["num_samples"]
    assert set(metrics["accuracy"]) == {"fused", "audio", "video"}
    assert all(0.0 <= v <= 1.0 for v in metrics["accuracy"].values())
    assert 0.0 <= metrics["macro_f1"] <= 1.0
    assert set(metrics["contribution"]) == {"audio", "video"}
    assert sum(metrics["contribution"].values()) == pytest.approx(1.0, abs=1e-5)


def test_list_names_the_registries():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert "ccat" in result.output and "bicross" in result.output and "concat" in result.output


def run_main(args, monkeypatch, capsys):
    """``ccat ARGS`` through the console-script entry; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ccat", *args])
    with pytest.raises(SystemExit) as done:
        main()
    return done.value.code, capsys.readouterr().err


def test_user_errors_are_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {betta: 0.2}\n")
    for args, says in ((["train", "--config", str(bad)], "'method.betta'"),
                       (["eval", "--ckpt", str(tmp_path / "missing.pt")], "missing.pt")):
        code, err = run_main(args, monkeypatch, capsys)
        assert code != 0 and err.startswith("error:") and says in err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_under_torchrun_each_ranks_error_line_names_the_rank(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, err = run_main(["eval", "--ckpt", str(tmp_path / "missing.pt")], monkeypatch, capsys)
    assert code != 0 and err.startswith("error (rank 1 of 2):") and "missing.pt" in err


def test_eval_refuses_other_data_naming_the_parameter(tmp_path, monkeypatch, capsys):
    data = write_tiny_dataset(tmp_path / "a")
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: {name: sum}\noptim: {epochs: 1}\n")
    result = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(data),
                                 "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    other = write_tiny_dataset(tmp_path / "b", steps=16)
    code, err = run_main(["eval", "--ckpt", str(out / "last.pt"), "--data", str(other)],
                         monkeypatch, capsys)
    assert code != 0 and "modalities.audio.shape" in err
