"""Plugins: another installed distribution adds a method and a recipe through entry points.

The plugin is docs/extending.md's worked example (its pyproject entry points and its
method module, read from the page) plus a recipe module, installed as a
``.dist-info`` folder on the path of a ``ccat`` process.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ccat.registry import BUILTIN, Registry
from train_helpers import write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
DIST, VERSION = "ccat-smooth", "0.1"
# A real recipe: CREMA-D with 2 s clips, registered under a name of its own.
RECIPE_MODULE = '''
from dataclasses import dataclass
from typing import ClassVar

from preprocess.datasets import option
from preprocess.datasets.cremad import Cremad


@dataclass
class CremadTwoSeconds(Cremad):
    seconds: float = option(2.0, "Fixed audio duration, s.")
    name: ClassVar[str] = "cremad_2s"
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


GROUPS = {"ccat.methods": "ccat.methods:METHODS", "ccat.encoders": "ccat.models:ENCODERS",
          "ccat.fusions": "ccat.models:FUSIONS", "ccat.recipes": "preprocess.datasets:RECIPES"}
TAKEN = {"ccat.methods": "ccat", "ccat.encoders": "resnet18_audio", "ccat.fusions": "concat",
         "ccat.recipes": "cremad"}  # a builtin name in each group
# One good entry per group, installed beside the broken one: it must still be registered.
GOOD_MODULE = RECIPE_MODULE + """
from torch import nn

from ccat.methods.base import Method


class GoodMethod(Method):
    pass


class GoodModule(nn.Module):
    pass
"""
GOOD_ENTRY = {"ccat.methods": "GoodMethod", "ccat.encoders": "GoodModule",
              "ccat.fusions": "GoodModule", "ccat.recipes": "CremadTwoSeconds"}
# fault -> (the broken module's source, the entry point's attribute, the warning's problem)
FAULTS = {
    "raises": ("raise RuntimeError('plugin bug')\n", "Thing",
               r"it failed to import \(RuntimeError: plugin bug\)"),
    "exits": ("import sys\nsys.exit(0)\n", "Thing", r"it failed to import \(SystemExit: 0\)"),
    "missing": (None, "Thing", r"it failed to import \(ModuleNotFoundError: No module named "),
    "no attribute": ("", "Thing", r"it failed to import \(AttributeError: "),
    "function": ("def thing():\n    return 1\n", "thing",
                 r"it names <function thing at 0x[0-9a-f]+>, not a class"),
    "int": ("NUMBER = 3\n", "NUMBER", r"it names 3, not a class"),
    "huge value": ("HUGE = 'x' * 10**6\n", "HUGE", r"it names 'x{{199}}\.\.\., not a class"),
    "wrong class": ("class Thing:\n    pass\n", "Thing", r"it names {module}\.Thing, not "),
    "duplicate": ("class Thing:\n    pass\n", "Thing", r"{kind} '{taken}' is already registered "
                  r"by builtin, so the entry point needs another name"),
}


def registry_of(group: str) -> tuple[Registry, set[str]]:
    """A fresh registry like the real one of ``group`` (its kind, entries and builtins),
    its plugins not loaded yet; and the builtin names."""
    module, _, name = GROUPS[group].partition(":")
    real = getattr(importlib.import_module(module), name)
    fresh: Registry = Registry(real.kind, real.group, real.entries)
    builtins = {entry for entry, source in real.sources().items() if source == BUILTIN}
    for entry in builtins:
        fresh.register(entry)(real.get(entry))
    return fresh, builtins


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("group", GROUPS)
def test_a_broken_plugin_is_skipped_with_one_warning_and_the_rest_works(
        tmp_path, monkeypatch, capsys, group: str, fault: str) -> None:
    """Every kind of broken entry point, in every group: one warning naming the plugin and
    its distribution; the builtins and a good plugin of the same group are all there."""
    source, attribute, problem = FAULTS[fault]
    registry, builtins = registry_of(group)  # the real registry loads without these plugins
    module = f"broken_{group.replace('.', '_')}_{fault.replace(' ', '_')}"
    name = TAKEN[group] if fault == "duplicate" else "bad"
    install(tmp_path / "broken", {group: {name: f"{module}:{attribute}"}},
            {} if source is None else {module: source}, name="ccat-broken", version="1.0")
    install(tmp_path / "good", {group: {"good": f"good_{module}:{GOOD_ENTRY[group]}"}},
            {f"good_{module}": GOOD_MODULE}, name="ccat-good", version="2.0")
    monkeypatch.syspath_prepend(str(tmp_path / "broken"))
    monkeypatch.syspath_prepend(str(tmp_path / "good"))
    capsys.readouterr()
    sources = registry.sources()
    assert set(sources) == builtins | {"good"} and sources["good"] == "ccat-good 2.0"
    warnings_ = capsys.readouterr().err.splitlines()
    expected = problem.format(module=module, kind=re.escape(registry.kind), taken=TAKEN[group])
    assert len(warnings_) == 1, warnings_
    assert re.fullmatch(rf"warning: plugin ccat-broken 1\.0 skipped \({re.escape(group)} entry "
                        rf"point {name} = {module}:{attribute}\): {expected}.*; fix or "
                        r"uninstall ccat-broken", warnings_[0]), warnings_[0]
    assert len(warnings_[0]) < 1000
    registry.names()
    assert capsys.readouterr().err == "", "the warning comes once"


def test_ctrl_c_while_a_plugin_imports_still_stops(tmp_path, monkeypatch) -> None:
    """KeyboardInterrupt is the user's, not the plugin's: it is not swallowed."""
    registry, _ = registry_of("ccat.methods")
    install(tmp_path / "site", {"ccat.methods": {"slow": "slow_plugin:Thing"}},
            {"slow_plugin": "raise KeyboardInterrupt\n"}, name="ccat-slow", version="1.0")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(KeyboardInterrupt):
        registry.names()


# A recipe class that fits, but whose option --workers is one every build already has.
CLASHING_RECIPE = """
from dataclasses import dataclass

from preprocess.datasets import option
from preprocess.datasets.cremad import Cremad


@dataclass
class Clash(Cremad):
    workers: int = option(1, "Clashes with the build's own --workers.")
"""


@pytest.fixture()
def broken_everywhere(plugin: Path, tmp_path: Path) -> Path:
    """The documented plugin, and a distribution whose entry points are broken in every
    group, each import leaving a file behind so a test can tell what was imported."""
    marker = tmp_path / "imported"
    modules = {"broken_exit": f"open({str(marker)!r}, 'a').write('exit')\nimport sys\nsys.exit(0)\n",
               "broken_raise": f"open({str(marker)!r}, 'a').write('raise')\nraise ImportError('x')\n",
               "broken_int": f"open({str(marker)!r}, 'a').write('int')\nNUMBER = 3\n",
               "broken_clash": f"open({str(marker)!r}, 'a').write('clash')\n" + CLASHING_RECIPE}
    install(tmp_path / "site", {"ccat.methods": {"bad_method": "broken_exit:Thing"},
                                "ccat.recipes": {"bad_recipe": "broken_raise:Thing",
                                                 "clash": "broken_clash:Clash"},
                                "ccat.fusions": {"bad_fusion": "broken_int:NUMBER"},
                                "ccat.encoders": {"concat_smooth": "broken_int:NUMBER",
                                                  "resnet18_audio": "broken_int:NUMBER"}},
            modules, name="ccat-broken", version="1.0")
    return tmp_path / "site"


def with_broken(plugin: Path, broken: Path, *args: str,
                module: str = "ccat") -> subprocess.CompletedProcess:
    """``ccat ARGS`` (or ``ccat-data``) with the documented plugin and the broken one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken), str(plugin), str(REPO)])}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env,
                          capture_output=True, text=True, cwd=REPO)


def test_ccat_list_with_broken_plugins_lists_everything_else(plugin, broken_everywhere):
    proc = with_broken(plugin, broken_everywhere, "list")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["method", "concat_smooth", DIST, VERSION] in rows
    assert ["method", "ccat", "builtin"] in rows and ["encoder", "resnet18_audio", "builtin"] in rows
    assert ["dataset", "recipe", "cremad", "builtin"] in rows
    assert not any("bad_" in " ".join(row) for row in rows)
    warned = proc.stderr.splitlines()
    assert len(warned) == 5 and all(w.startswith("warning: plugin ccat-broken 1.0 skipped (")
                                    for w in warned), warned


def test_training_goes_on_beside_a_plugin_that_exits_at_import(plugin, broken_everywhere,
                                                                tmp_path):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "val": 4, "test": 4})
    config = tmp_path / "c.yaml"
    config.write_text("method: {name: concat}\n")
    proc = with_broken(plugin, broken_everywhere, "train", "--config", config, "--data", data,
                       "--out", tmp_path / "run", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert "ccat.methods entry point bad_method = broken_exit:Thing): it failed to import " \
           "(SystemExit: 0)" in proc.stderr


def test_verify_imports_no_recipe_plugin(plugin, broken_everywhere, built, tmp_path):
    proc = with_broken(plugin, broken_everywhere, "verify", built, module="preprocess.cli")
    assert proc.returncode == 0 and "ok: " in proc.stdout, proc.stderr
    assert proc.stderr == "" and not (tmp_path / "imported").exists()
    proc = with_broken(plugin, broken_everywhere, "build", "--help", module="preprocess.cli")
    assert proc.returncode == 0 and "cremad_2s" in proc.stdout and "cremad" in proc.stdout
    assert "ccat.recipes entry point bad_recipe = broken_raise:Thing): it failed to import " \
           "(ImportError: x)" in proc.stderr
    assert "warning: recipe 'clash' (ccat-broken 1.0) skipped: option workers is declared " \
           "twice" in proc.stderr
