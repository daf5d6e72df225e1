"""The package's layering (docs/internals.md): no module of ccat/ imports upward."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS_BLOCK = re.compile(r"```layers\n(?P<body>.*?)```", re.S)
BUILDER_BLOCK = re.compile(r"```builder-layers\n(?P<body>.*?)```", re.S)


def read_layers(doc: Path = ROOT / "docs" / "internals.md",
                block: re.Pattern = LAYERS_BLOCK) -> dict[str, tuple[int, str]]:
    """Module or package name -> (layer index, layer name), from the doc's block."""
    body = block.search(doc.read_text(encoding="utf-8")).group("body")
    layers = {}
    for index, line in enumerate(body.strip().splitlines()):
        name, _, modules = line.partition(":")
        layers.update({module: (index, name.strip()) for module in modules.split()})
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str, layers: dict[str, tuple[int, str]]) -> tuple[int, str] | None:
    """The layer of ``module``: its own entry or its nearest package's (``ccat`` itself
    names only the package's ``__init__``)."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        if ".".join(parts[:end]) in layers:
            return layers[".".join(parts[:end])]
    return layers.get(module)


def imported(tree: ast.AST, importer: str, is_package: bool,
             package: str = "ccat") -> list[tuple[int, str]]:
    """(line, module) of every import of a ``package`` module, at any depth of ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = importer.split(".")[:len(importer.split(".")) - node.level
                                                 + is_package]
                base = ".".join(package + ([base] if base else []))
            # `from ccat import run_dir` imports the module ccat.run_dir
            found += [(node.lineno, f"{base}.{a.name}" if is_module(f"{base}.{a.name}")
                       else base) for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == package]


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(path: Path, source: str, layers: dict[str, tuple[int, str]]) -> list[str]:
    """Why each ccat import of ``source`` (the text of ``path``) breaks the layering."""
    importer = module_name(path)
    own = layer_of(importer, layers)
    if own is None:
        return [f"{path.relative_to(ROOT)}: module {importer} is in no layer of "
                f"docs/internals.md; add it there"]
    problems = []
    for line, target in imported(ast.parse(source), importer, path.name == "__init__.py"):
        theirs = layer_of(target, layers)
        if theirs is None:
            problems.append(f"{path.relative_to(ROOT)}:{line} imports {target}, which is in "
                            f"no layer of docs/internals.md")
        elif theirs[0] > own[0]:
            problems.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({theirs[1]}) "
                            f"upward from {importer} ({own[1]})")
    return problems


def test_no_module_imports_upward():
    layers = read_layers()
    problems = [problem for path in sorted((ROOT / "ccat").rglob("*.py"))
                for problem in violations(path, path.read_text(encoding="utf-8"), layers)]
    assert not problems, "\n".join(problems)


def test_an_upward_import_is_named_with_its_line_and_layers():
    layers = read_layers()
    source = "import torch\n\ndef f():\n    from ccat.cli import app\n    from ccat import run_dir\n"
    problems = violations(ROOT / "ccat" / "data" / "pipeline.py", source, layers)
    assert problems == ["ccat/data/pipeline.py:4 imports ccat.cli (cli) upward from "
                        "ccat.data.pipeline (loader)"]
    assert violations(ROOT / "ccat" / "new_module.py", "", layers) == [
        "ccat/new_module.py: module ccat.new_module is in no layer of docs/internals.md; "
        "add it there"]


def test_models_read_the_kinds_never_the_loader():
    """Encoders take PAD_ID and pixel normalization from ccat.data.kinds: the loader
    (pipeline, device cache) sits above the models, so importing it from a model is named."""
    layers = read_layers()
    assert layer_of("ccat.data.pipeline", layers)[0] > layer_of("ccat.models.encoders", layers)[0]
    assert layer_of("ccat.data.kinds", layers)[0] < layer_of("ccat.models.encoders", layers)[0]
    source = "from ccat.data import kinds\nfrom ccat.data.pipeline import PAD_ID\n"
    assert violations(ROOT / "ccat" / "models" / "encoders.py", source, layers) == [
        "ccat/models/encoders.py:2 imports ccat.data.pipeline (loader) upward from "
        "ccat.models.encoders (models)"]
    for path in sorted((ROOT / "ccat" / "models").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        loader = [name for _, name in imported(tree, module_name(path), path.name == "__init__.py")
                  if layer_of(name, layers)[1] == "loader"]
        assert not loader, f"{path.relative_to(ROOT)} imports {loader}"


def builder_violations(path: Path, source: str, layers: dict[str, tuple[int, str]]) -> list[str]:
    """Why each import of a builder module by ``source`` (a builder module) goes upward."""
    importer = module_name(path)
    own = layers[importer]
    problems = []
    for line, target in imported(ast.parse(source), importer, False, "preprocess"):
        theirs = layers.get(target)
        if theirs is not None and theirs[0] > own[0]:
            problems.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({theirs[1]}) "
                            f"upward from {importer} ({own[1]})")
    return problems


def test_no_builder_module_imports_upward():
    layers = read_layers(block=BUILDER_BLOCK)
    paths = [ROOT.joinpath(*name.split(".")).with_suffix(".py") for name in layers]
    assert all(path.is_file() for path in paths), "a module of the builder-layers block is gone"
    problems = [problem for path in paths
                for problem in builder_violations(path, path.read_text(encoding="utf-8"), layers)]
    assert not problems, "\n".join(problems)


def test_a_builder_module_importing_upward_is_named():
    layers = read_layers(block=BUILDER_BLOCK)
    source = "from preprocess import writer\nfrom preprocess.plan import ShardTask\n"
    assert builder_violations(ROOT / "preprocess" / "encode.py", source, layers) == [
        "preprocess/encode.py:1 imports preprocess.writer (build) upward from "
        "preprocess.encode (encode)"]
