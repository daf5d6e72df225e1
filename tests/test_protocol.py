"""protocol shared / released: the released layers of ccat/configs/methods/, how load_config
applies them, the report's caption and `make table PROTOCOL=released`."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ccat.cli import app
from ccat.config import METHOD_CONFIGS, ConfigError, check_ranges, merge, read_yaml
from ccat.run_config import RELEASED, load_config, released_layer
from train_helpers import write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
RELEASED_FILES = sorted(p for p in METHOD_CONFIGS.glob("*.yaml") if RELEASED in read_yaml(p))


def test_some_methods_have_released_settings():
    assert {p.stem for p in RELEASED_FILES} >= {"ogm_ge", "pmr", "inforeg", "relearning",
                                                "mmpareto", "mmcosine", "mla", "gblending",
                                                "umt", "aug", "remix", "dgl", "arl", "opm", "opg",
                                                "amco", "mbsd", "cml"}


@pytest.mark.parametrize("path", RELEASED_FILES, ids=lambda p: p.stem)
def test_every_released_layer_is_a_valid_cited_layer(path):
    """Each entry cites repository@commit and file:line, and loads over the shared CREMA-D
    config into a config whose every value is in range."""
    for dataset, entry in read_yaml(path)[RELEASED].items():
        assert re.search(r"\S+@[0-9a-f]{7} \S+:L\d+", entry["source"]) or \
            path.stem == "ccat", entry["source"]
        layer = released_layer(read_yaml(path)[RELEASED], path, dataset)
        cfg = load_config(REPO / "configs" / "cremad.yaml", [], {"method.name": path.stem})
        merge(cfg, layer)
        cfg.optim.resolve()
        check_ranges(cfg)
        assert {"name", "schedule", "epochs", "lr"} <= set(layer["optim"])
        assert "batch_size" in layer["data"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("protocol"),
                              counts={"train": 8, "val": 2, "test": 2}, size=16, steps=16)


def method_dir(tmp_path, released):
    methods = tmp_path / "methods"
    methods.mkdir(exist_ok=True)
    (methods / "sum.yaml").write_text(yaml.safe_dump({"method": {"name": "sum"},
                                                      RELEASED: released}))
    return methods


def test_released_layer_goes_over_the_config_and_under_set(tiny, tmp_path):
    methods = method_dir(tmp_path, {"tiny": {
        "source": "x/y@0123456 main.py:L1",
        "optim": {"name": "adam", "lr": 0.004, "epochs": 7, "schedule": "constant"},
        "data": {"batch_size": 4}}})
    config = tmp_path / "run.yaml"
    config.write_text("optim: {lr: 0.1, momentum: 0.8, epochs: 3}\ndata: {batch_size: 8}\n")
    cli = {"method.name": "sum", "data.path": str(tiny)}
    shared = load_config(config, [], cli, method_configs=methods)
    assert (shared.protocol, shared.optim.name, shared.optim.lr, shared.data.batch_size) == \
        ("shared", "sgd", 0.1, 8)
    released = load_config(config, ["protocol=released", "optim.epochs=2"], cli,
                           method_configs=methods)
    o = released.optim
    assert (released.protocol, o.name, o.lr, o.momentum, o.schedule, o.step_size, o.epochs,
            released.data.batch_size) == ("released", "adam", 0.004, None, "constant", None,
                                          2, 4)


@pytest.mark.parametrize("released, says", [
    ({"cremad": {"source": "a@0123456 b:L1", "optim": {"lr": 0.1}}},
     "has no released.tiny (the settings of the authors' code for dataset tiny; it has "
     "cremad); add them"),
    ({"tiny": {"optim": {"lr": 0.1}}}, "released.tiny must be a mapping with a source"),
    ({"tiny": {"source": "a@0123456 b:L1", "method": {"params": {}}}},
     "released.tiny sets method; a released layer sets only the optimizer"),
    ({"tiny": {"source": "a@0123456 b:L1", "data": {"workers": 3}}},
     "released.tiny sets data.workers"),
])
def test_a_missing_or_bad_released_layer_is_one_sentence(released, says, tiny, tmp_path):
    methods = method_dir(tmp_path, released)
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(None, ["protocol=released"], {"method.name": "sum", "data.path": str(tiny)},
                    method_configs=methods)


def test_released_without_data_or_method_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="pass --data PATH or set data.path"):
        load_config(None, ["protocol=released", "method.name=ogm_ge"])
    with pytest.raises(ConfigError, match="does not exist; add one, or train with protocol "
                                          "shared"):
        load_config(None, ["protocol=released", "method.name=sum"],
                    method_configs=tmp_path)


def fake_run(root: Path, method: str, protocol: str | None) -> None:
    run = root / method / "s0"
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps(
        {"split": "test", "accuracy": {"fused": 0.5},
         "run": {"method": method, "variant": "", "dataset": "tiny", "seed": 0}}))
    config = {"seed": 0} if protocol is None else {"seed": 0, "protocol": protocol}
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def caption(root: Path) -> str:
    out = runner.invoke(app, ["report", str(root), "--format", "markdown"])
    assert out.exit_code == 0, out.output
    return out.stdout.splitlines()[0]


def test_the_caption_says_which_protocol_made_the_table(tmp_path):
    fake_run(tmp_path / "a", "sum", None)  # saved before the key existed: shared
    fake_run(tmp_path / "a", "concat", "shared")
    assert caption(tmp_path / "a").startswith(
        "Protocol shared: the config's optimizer, schedule, batch and epochs for every method.")
    fake_run(tmp_path / "b", "sum", "released")
    assert caption(tmp_path / "b").startswith(
        "Protocol released: each method with the optimizer, schedule, batch and epochs of its "
        "authors' code for the dataset")
    fake_run(tmp_path / "b", "concat", "shared")
    mixed = caption(tmp_path / "b")
    assert mixed.startswith("Protocols: shared (concat): the config's optimizer")
    assert "; released (sum): each method with" in mixed


def test_make_table_protocol_released_dry_run(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    common = ["make", "-n", "-s", "-C", str(REPO), "-o", ".venv/.installed", "DATASET=tiny",
              f"SHARDS={shards}", "SEEDS=0", "METHODS=pmr", "CONFIG=configs/demo.yaml"]
    out = subprocess.run([*common, "PROTOCOL=released", "table"], capture_output=True,
                         text=True, check=True).stdout
    assert "--set protocol=released" in out and "--out runs/tiny/released/pmr/s0 " in out
    assert "report runs/tiny/released/pmr/s0 --out runs/tiny/released" in out
    out = subprocess.run([*common, "table"], capture_output=True, text=True, check=True).stdout
    assert "--set protocol=shared" in out and "--out runs/tiny/pmr/s0 " in out
