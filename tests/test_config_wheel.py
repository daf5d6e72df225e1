"""An installed wheel holds each method's settings (ccat/configs/methods/*.yaml, package
data), so a run from it loads the same config as a run from the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ccat.config import METHOD_CONFIGS, read_yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "ccat", "preprocess"]
METHOD = "ogm_ge"  # its file holds the release's settings for CREMA-D


def build_wheel(tmp_path: Path) -> Path:
    """The wheel setuptools builds from a copy of the sources (the checkout stays clean)."""
    source, out = tmp_path / "source", tmp_path / "wheel"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(out)], cwd=source,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_an_installed_wheel_reads_each_methods_settings(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("ccat/configs/methods/"))
    assert shipped == [f"ccat/configs/methods/{p.name}" for p in sorted(METHOD_CONFIGS.glob("*.yaml"))]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs as its files
    script = ("import json; from ccat.config import METHOD_CONFIGS, read_yaml; "
              "print(json.dumps([str(METHOD_CONFIGS), "
              "{p.stem: read_yaml(p) for p in METHOD_CONFIGS.glob('*.yaml')}]))")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr[-2000:]
    where, installed = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(where).is_relative_to(site)  # read from the wheel, not from this checkout
    assert installed == {p.stem: read_yaml(p) for p in METHOD_CONFIGS.glob("*.yaml")}
    assert installed[METHOD]["released"]["cremad"]["optim"]["epochs"] == 100
