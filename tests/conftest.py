"""Shared fixtures: a tiny synthetic CREMA-D raw tree and its build, made once per session;
and a check, run after every build made in the test process, that no key is in two places."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from ccat.data import shardio, spec
from preprocess import cli, writer
from preprocess.datasets.synth import synthesize_cremad

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Small on purpose: 64x48 video, 1 s spectrograms (257 x 63), 32 px frames.
TINY_BUILD = ["--frame-size", "32", "--seconds", "1.0", "--shard-size", "4", "--workers", "1"]


# `ccat train --set` items that shrink any recipe's config to a few seconds on a CPU: two
# epochs, so CCAT (the configs' method) runs one per stage.
TINY_TRAIN = ["device=cpu", "data.workers=0", "data.frame_size=32", "model.width=16",
              "model.heads=2", "model.encoder_width=4", "model.encoder_blocks=[1, 1, 1, 1]",
              "model.ffn_mult=2", "optim.epochs=2", "method.params.pretrain_epochs=1"]


def train_and_evaluate(config: Path, data: Path, out: Path, *settings: str) -> dict:
    """Train ``config``'s method on the build ``data`` into ``out`` with TINY_TRAIN (plus
    ``settings``), evaluate its best.pt with `ccat eval`, and return eval.json; the training
    must have run both of CCAT's stages and the evaluation the whole test split."""
    from typer.testing import CliRunner

    from ccat.cli import app as ccat_app

    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out)]
    for item in (*TINY_TRAIN, *settings):
        args += ["--set", item]
    result = CliRunner().invoke(ccat_app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["pretrain", "alternate"]
    result = CliRunner().invoke(ccat_app, ["eval", "--ckpt", str(out / "best.pt"), "--json",
                                           str(out / "eval.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "eval.json").read_text())
    manifest = json.loads((data / spec.MANIFEST_NAME).read_text())
    assert metrics["num_samples"] == manifest["splits"]["test"]["num_samples"] > 0
    return metrics


def invoke(args: list) -> int:
    """Run ``ccat-data ARGS`` in this process through its console entry point."""
    argv = sys.argv
    sys.argv = ["ccat-data", *map(str, args)]
    try:
        cli.main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return 0


def run_cli(args: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``invoke`` with the exit code, stdout and stderr it printed."""
    capsys.readouterr()
    code = invoke(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def synth_tree(out: Path, clips: int = 24, seed: int = 0) -> list[str]:
    return synthesize_cremad(out, clips, seed, width=64, height=48, duration=(0.8, 1.4))


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic raw CREMA-D tree; copy it before changing it."""
    root = tmp_path_factory.mktemp("raw") / "cremad"
    synth_tree(root)
    return root


@pytest.fixture()
def raw_copy(synth_raw: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic raw tree, free to damage."""
    return Path(shutil.copytree(synth_raw, tmp_path / "cremad"))


@pytest.fixture(scope="session")
def built(synth_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic tree built once with TINY_BUILD."""
    out = tmp_path_factory.mktemp("shards") / "cremad"
    assert invoke(["build", "cremad", "--raw", synth_raw, "--out", out, *TINY_BUILD]) == 0
    return out


def assert_keys_unique(out: Path) -> None:
    """Every key of the build in ``out`` is in one split, once, and each split's shards hold
    exactly the membership its manifest's ``membership_sha256`` names."""
    manifest = json.loads((out / spec.MANIFEST_NAME).read_text())
    where: dict[str, str] = {}
    for split, entry in manifest["splits"].items():
        rows = []
        for shard in entry["shards"]:
            with open(out / shard["name"], "rb") as f:
                for key, members in shardio.iter_tar_samples(f):
                    assert key not in where, f"{key} is in {where[key]} and in {split}"
                    where[key] = split
                    rows.append((key, int(members[spec.LABEL_MEMBER])))
        assert len(rows) == entry["num_samples"]
        assert spec.membership_sha256(rows) == entry["membership_sha256"], split
    assert spec.compute_fingerprint(manifest) == manifest["fingerprint"]


@pytest.fixture(scope="session", autouse=True)
def every_build_has_unique_keys() -> object:
    """Wrap the builder for the whole session: each finished in-process build is checked
    with :func:`assert_keys_unique` (subprocess builds call it themselves)."""
    real = writer.build

    def checked(recipe, raw, out, *args, **kwargs):
        report = real(recipe, raw, out, *args, **kwargs)
        assert_keys_unique(Path(out))
        return report

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer, "build", checked)
        yield
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve folder ``root`` over HTTP on 127.0.0.1; yields its URL, stops on exit."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real single-node Slurm cluster (tests/slurm_cluster.py), started once; the tests
    that use it skip, with the reason, where it cannot start."""
    import slurm_cluster

    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.Unavailable as err:
        pytest.skip(f"no Slurm cluster: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()
