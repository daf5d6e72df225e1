"""How config files and ``--set`` values are read: YAML 1.2 within bounds, one short sentence
for each file or value refused, a range on every number, and saved configs that load back."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from ccat.cli import main
from ccat.config import (SHOWN_CHARS, ConfigError, DataConfig, ModelConfig, OptimConfig,
                         RunConfig, differences, save_config, to_dict)
from ccat.methods import METHODS
from ccat.run_config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHORT = 4 * SHOWN_CHARS  # no message, whatever it echoes, is longer


def as_yaml(dotted: str, text: str) -> str:
    """``dotted: text`` as a block-style file whose value sits on line 2 or later."""
    parts = dotted.split(".")
    lines = ["# a config"] + [f"{'  ' * i}{part}:" for i, part in enumerate(parts[:-1])]
    return "\n".join(lines + [f"{'  ' * (len(parts) - 1)}{parts[-1]}: {text}"]) + "\n"


def refused(call: typing.Callable[[], object]) -> str:
    """The sentence ``call`` is refused with, checked to be one short line."""
    with pytest.raises(ConfigError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and len(message) <= SHORT, message
    return message


def value_at(cfg: RunConfig, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# (key, spelling, value read), None = refused: numbers and booleans read as YAML 1.2 reads
# them, and any plain scalar that YAML 1.1 reads otherwise is refused, whatever the key.
SPELLINGS = [
    ("optim.epochs", "12", 12), ("optim.epochs", "+12", 12), ("optim.epochs", "0o17", 15),
    ("optim.epochs", "0x1F", 31), ("optim.lr", "1e-3", 0.001), ("optim.lr", "5E-1", 0.5),
    ("optim.lr", ".5", 0.5), ("optim.lr", "1.", 1.0), ("data.device_cache", "true", True),
    ("data.device_cache", "False", False), ("out", "'012'", "012"), ("out", '"yes"', "yes"),
    ("optim.epochs", "012", None), ("optim.epochs", "09", None), ("optim.epochs", "1_0", None),
    ("optim.epochs", "0b11", None), ("seed", "1:30", None), ("optim.lr", "0.1_5", None),
    ("optim.lr", "1:30.5", None), ("data.device_cache", "yes", None),
    ("data.device_cache", "no", None), ("data.device_cache", "on", None),
    ("data.pin_memory", "Off", None), ("out", "yes", None), ("out", "012", None),
    ("seed", "1" * 41, None)]


@pytest.mark.parametrize("key, spelling, read", SPELLINGS)
def test_numbers_read_as_yaml_1_2_or_are_refused_in_files_and_set(key, spelling, read,
                                                                  tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(as_yaml(key, spelling))
    loads = (lambda: load_config(path), lambda: load_config(None, [f"{key}={spelling}"]))
    if read is not None:
        for load in loads:
            value = value_at(load(), key)
            assert value == read and type(value) is type(read)
        return
    in_file, in_set = (refused(load) for load in loads)
    line = len(key.split(".")) + 1
    assert f"{key}={spelling[:SHOWN_CHARS - 1]}" in in_file and f"{path}, line {line}" in in_file
    assert f"{key}={spelling[:SHOWN_CHARS - 1]}" in in_set and f"--set {key}" in in_set


@pytest.mark.parametrize("text, key, line", [
    ("optim: {epochs: 5}\nseed: 1\noptim: {lr: 0.01}\n", "optim", 3),
    ("optim:\n  epochs: 5\n  lr: 0.1\n  epochs: 7\n", "optim.epochs", 4),
    ("method:\n  params: {beta: 0.2, rank: 4,\n           beta: 0.3}\n", "method.params.beta", 3),
    ("optim: {encoder_lr: {audio: 0.1, 'audio': 0.2}}\n", "optim.encoder_lr.audio", 1),
])
def test_a_key_given_twice_is_refused_naming_it_the_file_and_the_line(text, key, line,
                                                                      tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    says = refused(lambda: load_config(path))
    assert says.startswith(f"{key} is given twice") and f"{path}, line {line}" in says
    says = refused(lambda: load_config(None, ["optim.encoder_lr={text: 0.1, text: 0.2}"]))
    assert says.startswith("optim.encoder_lr.text is given twice")


def bomb(levels: int = 9) -> str:
    """A billion-laughs list: 9 ** levels strings from about 400 bytes of YAML."""
    anchors = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    anchors += [f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(anchors)}]"


# (value, what the refusal says): each is refused before a Python value is built.
HOSTILE = [(bomb(), "larger than 1 MiB with its aliases written out"),
           ("[" * 5000 + "]" * 5000, "nests deeper than"),
           ("&a {x: *a}", "an alias inside its own anchor"),
           ("9" * 5000, "is a number of 5000 characters"),
           ("!!python/object/apply:os.system [echo]", "has the tag"),
           ("!!int 1_0", "has the tag")]


@pytest.mark.parametrize("value, says", HOSTILE, ids=["bomb", "deep", "recursive", "digits",
                                                      "python-tag", "int-tag"])
def test_hostile_yaml_is_refused_in_one_short_sentence(value, says, tmp_path):
    path = tmp_path / "hostile.yaml"
    path.write_text(f"data:\n  path: {value}\n")
    assert says in refused(lambda: load_config(path))
    assert says in refused(lambda: load_config(None, [f"data.path={value}"]))


def test_an_alias_bomb_is_refused_within_bounded_memory(tmp_path):
    """In a child process whose address space may grow by only 256 MiB: the bomb written
    out would take gigabytes (and its echo in a message, hundreds of megabytes)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(f"data:\n  path: {bomb()}\n")
    script = (
        "import resource, sys\n"
        "from ccat.config import ConfigError, RunConfig, merge, parse_override, read_yaml\n"
        "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20),) * 2)\n"
        "for load in (lambda: read_yaml(sys.argv[1]), lambda: parse_override(sys.argv[2])):\n"
        "    try:\n"
        "        merge(RunConfig(), load())\n"
        "    except ConfigError as err:\n"
        "        print(err)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path), f"data.path={bomb()}"],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("with its aliases written out" in line for line in lines)


def test_ccat_train_refuses_a_bomb_config_in_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"data:\n  path: {bomb()}\n")
    monkeypatch.setattr(sys, "argv", ["ccat", "train", "--config", str(path)])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err.strip()
    assert done.value.code != 0 and "Traceback" not in err
    assert len(err) <= SHORT + 20 and "with its aliases written out" in err


@pytest.mark.parametrize("content, says", [
    (random.Random(0).randbytes(256), "is not UTF-8 text"),
    (b"optim:\x00 {epochs: 5}\n", "holds the control character #x0000"),
    ("optim: {epochs: 5}\n".encode("utf-16"), "is not UTF-8 text"),
    (b"- optim\n- data\n", "holds a list at its top; a config is a mapping"),
    (b"optim\n", "holds a str at its top; a config is a mapping"),
    (None, "is a folder; pass a YAML file"),
], ids=["random", "nul", "utf16", "list", "scalar", "folder"])
def test_a_file_that_is_not_a_config_is_one_sentence(content, says, tmp_path):
    path = tmp_path / "c.yaml"
    path.mkdir() if content is None else path.write_bytes(content)
    message = refused(lambda: load_config(path))
    assert says in message and str(path) in message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n"])
def test_an_empty_config_file_means_every_default(text, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config(path) == load_config()


def numeric_fields() -> list[tuple[list[str], str, type, float]]:
    """(overrides that choose the method, dotted key, its type hint, its range's upper end)
    for every numeric field of the config dataclasses and of each method's Params."""
    owners = [("", RunConfig, []), ("data.", DataConfig, []), ("model.", ModelConfig, []),
              ("optim.", OptimConfig, [])]
    owners += [("method.params.", METHODS.get(name).Params, [f"method.name={name}"])
               for name in METHODS.names() if METHODS.get(name).Params is not None]
    return [(chosen, prefix + name, typing.get_type_hints(cls)[name], limit.high)
            for prefix, cls, chosen in owners for name, limit in cls.RANGES.items()]


def spelled(hint: typing.Any, text: str) -> str:
    """``text`` as the value of a field of type ``hint``: an item of a list or a dict."""
    origin = typing.get_origin(hint)
    return f"[{text}]" if origin is list else f"{{audio: {text}}}" if origin is dict else text


FIELDS = numeric_fields()


@pytest.mark.parametrize("chosen, key, hint, high", FIELDS, ids=[
    f"{chosen[0].removeprefix('method.name=')}:{key}" if chosen else key
    for chosen, key, _, _ in FIELDS])
def test_every_numeric_field_refuses_too_large_and_non_finite(chosen, key, hint, high):
    too_large = str(int(high) + 1) if float(high).is_integer() else repr(high * 2)
    for text in (too_large, ".nan", ".inf", "-.inf"):
        says = refused(lambda: load_config(None, [*chosen, f"{key}={spelled(hint, text)}"]))
        assert key in says, says


@pytest.mark.parametrize("method", METHODS.names())
def test_a_saved_config_loads_back_identically(method, tmp_path):
    """Strings that YAML 1.1 or 1.2 would read as numbers or booleans included."""
    cfg = load_config(None, [f"method.name={method}", "out='012'", "compile='yes'",
                             "data.path='1e3'", "model.text_model='0o17'",
                             "select_split='1:30'", "optim.encoder_lr={audio: 1e-10}"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temporary left


# config.yaml as ccat wrote it before its checks moved to pydantic (written by commit
# 59a3e93's code for each case's --set values): `--resume` compares the saved config with
# the one the same inputs give now, so they must stay identical, byte for byte.
SAVED = json.loads((Path(__file__).with_name("saved_configs.json")).read_text())


@pytest.mark.parametrize("case", sorted(SAVED))
def test_the_same_inputs_save_the_config_earlier_runs_saved(case, tmp_path):
    cfg = load_config(None, SAVED[case]["set"])
    save_config(cfg, tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text() == SAVED[case]["saved"]
    (tmp_path / "old.yaml").write_text(SAVED[case]["saved"])
    assert differences(load_config(tmp_path / "old.yaml"), cfg, free=()) == []
