"""Plugins: another installed distribution adds a method and a recipe through entry points.

The plugin is docs/extending.md's worked example (its pyproject entry points and its
method module, read from the page) plus a recipe module, installed as a
``.dist-info`` folder on the path of a ``ccat`` process.
"""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ccat.registry import Registry, RegistryError
from train_helpers import write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
DIST, VERSION = "ccat-smooth", "0.1"
# A real recipe: CREMA-D with 2 s clips, registered under a name of its own.
RECIPE_MODULE = '''
from dataclasses import dataclass, field

from preprocess import media
from preprocess.datasets.cremad import Cremad


@dataclass
class CremadTwoSeconds(Cremad):
    audio: media.AudioParams = field(default_factory=lambda: media.AudioParams(2.0))
    name: str = "cremad_2s"
'''
TINY = ["--set", "device=cpu", "--set", "data.batch_size=8", "--set", "data.workers=0",
        "--set", "model.width=16", "--set", "model.encoder_width=4",
        "--set", "model.encoder_blocks=[1, 1, 1, 1]", "--set", "model.heads=2",
        "--set", "optim.epochs=1", "--set", "optim.lr=0.01"]


def documented_example() -> tuple[dict, str]:
    """docs/extending.md's pyproject (parsed) and its method module's source."""
    page = (REPO / "docs" / "extending.md").read_text(encoding="utf-8")
    toml_block = re.search(r"```toml\n(.*?)```", page, re.S).group(1)
    python_block = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    return tomllib.loads(toml_block), python_block


def install(root: Path, groups: dict[str, dict[str, str]], modules: dict[str, str],
            name: str = DIST, version: str = VERSION) -> Path:
    """Write ``modules`` and a ``.dist-info`` declaring ``groups`` of entry points under
    ``root``: what ``pip install`` leaves in site-packages."""
    root.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source, encoding="utf-8")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                                   encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
                for group, entries in groups.items()), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    pyproject, method_source = documented_example()
    assert (pyproject["project"]["name"], pyproject["project"]["version"]) == (DIST, VERSION)
    groups = dict(pyproject["project"]["entry-points"])
    groups["ccat.recipes"] = {"cremad_2s": "ccat_smooth_recipe:CremadTwoSeconds"}
    return install(tmp_path_factory.mktemp("site"), groups,
                   {"ccat_smooth": method_source, "ccat_smooth_recipe": RECIPE_MODULE})


def ccat(plugin: Path, *args: str) -> subprocess.CompletedProcess:
    """``ccat ARGS`` in a process whose path holds the plugin (as if pip-installed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "ccat", *map(str, args)], env=env,
                          capture_output=True, text=True, cwd=REPO)


def test_ccat_list_shows_plugin_entries_with_their_distribution(plugin):
    proc = ccat(plugin, "list")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["method", "concat_smooth", DIST, VERSION] in rows
    assert ["dataset", "recipe", "cremad_2s", DIST, VERSION] in rows
    assert ["method", "ccat", "builtin"] in rows and ["fusion", "concat", "builtin"] in rows


def test_a_plugin_method_trains_through_the_cli_with_its_params(plugin, tmp_path):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "val": 4, "test": 4})
    config = tmp_path / "c.yaml"
    config.write_text("method: {name: ccat, params: {beta: 0.3}}\n")  # CCAT's, left out
    out = tmp_path / "run"
    proc = ccat(plugin, "train", "--config", config, "--method", "concat_smooth",
                "--data", data, "--out", out, *TINY, "--set", "method.params.smoothing=0.2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["stage"] == "joint" and rows[0]["loss"] > 0
    saved = (out / "config.yaml").read_text()
    assert "name: concat_smooth" in saved and "smoothing: 0.2" in saved
    proc = ccat(plugin, "train", "--config", config, "--method", "concat_smooth",
                "--data", data, "--out", tmp_path / "bad", *TINY, "--set",
                "method.params.beta=0.2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "method 'concat_smooth' has no param 'beta'" in proc.stderr
    assert "its params are smoothing" in proc.stderr


def test_a_broken_or_clashing_plugin_is_one_error_naming_it(tmp_path, monkeypatch):
    install(tmp_path / "broken", {"ccat.test_things": {"bad": "no_such_module:Thing"}}, {},
            name="broken-plugin", version="2.0")
    install(tmp_path / "clash", {"ccat.test_things": {"a": "json:dumps"}}, {},
            name="clash-plugin", version="1.0")
    monkeypatch.syspath_prepend(str(tmp_path / "clash"))
    things: Registry = Registry("thing", "ccat.test_things")
    things.register("a")(object)
    with pytest.raises(RegistryError, match=r"^plugin clash-plugin 1.0, entry point a = "
                       r"json:dumps in ccat.test_things: thing 'a' is already registered by "
                       r"builtin; rename the entry point$"):
        things.names()
    monkeypatch.syspath_prepend(str(tmp_path / "broken"))
    with pytest.raises(RegistryError, match=r"^plugin broken-plugin 2.0, entry point bad = "
                       r"no_such_module:Thing in ccat.test_things failed to load "
                       r"\(ModuleNotFoundError: "):
        Registry("thing", "ccat.test_things").get("bad")
