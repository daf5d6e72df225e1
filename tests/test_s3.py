"""``s3://`` for real: a local S3 API (moto's server on 127.0.0.1) holding the tiny build;
verify, info and a short training read it through s3fs, the endpoint given as
$AWS_ENDPOINT_URL as a user of an S3-compatible store gives it (issue 11, object storage)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Iterator

import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] (the test extra) is "
                                  "not installed: pip install -e '.[test]'")
s3fs = pytest.importorskip("s3fs", reason="s3fs (the s3 extra) is not installed: "
                           "pip install -e '.[s3]'")

from ccat.data import open_dataset  # noqa: E402 - after the skips
from ccat.data.reader import DatasetError  # noqa: E402
from conftest import run_cli  # noqa: E402
from test_remote import train_and_eval  # noqa: E402

BUCKET = "ccat-shards"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def store() -> Iterator[s3fs.S3FileSystem]:
    """A local S3 API with an empty bucket, and the credentials and endpoint to reach it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            server.stop()


def upload(fs: s3fs.S3FileSystem, folder: Path, prefix: str) -> str:
    """Every file of the build at ``folder`` under ``s3://BUCKET/prefix``; returns that URL."""
    for path in sorted(folder.iterdir()):
        fs.pipe(f"{BUCKET}/{prefix}/{path.name}", path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def test_verify_info_and_training_from_s3(store, built: Path, tmp_path: Path, capsys,
                                          pytestconfig) -> None:
    url = upload(store, built, "cremad")
    code, out, _ = run_cli(["verify", url], capsys)
    assert code == 0 and f"match the manifest of {url}" in out
    code, out, _ = run_cli(["info", url], capsys)
    assert code == 0 and open_dataset(built).fingerprint in out
    config = pytestconfig.rootpath / "configs" / "demo.yaml"
    metrics = train_and_eval(url, tmp_path / "run", tmp_path / "cache", config)
    assert metrics["num_samples"] == open_dataset(built).num_samples("test")


def test_a_missing_object_is_an_error_naming_its_url(store, built: Path, tmp_path: Path,
                                                     capsys) -> None:
    url = upload(store, built, "missing")
    store.rm(f"{BUCKET}/missing/test-000001.tar")
    with pytest.raises(DatasetError, match=f"^{url}/test-000001.tar does not exist; check the "
                       "URL and that the whole build was uploaded$"):
        open_dataset(url, tmp_path / "cache")
    code, _, err = run_cli(["verify", url], capsys)
    assert code == 1 and f"{url}/test-000001.tar does not exist" in err


def test_a_changed_object_is_an_error_naming_its_url(store, built: Path, tmp_path: Path,
                                                     capsys) -> None:
    url = upload(store, built, "changed")
    shard = sorted(built.glob("val-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    store.pipe(f"{BUCKET}/changed/{shard.name}", bytes(data))
    code, _, err = run_cli(["verify", url], capsys)
    assert code == 1 and f"{url}/{shard.name}: sha256 differs from the manifest" in err
    with pytest.raises(DatasetError, match=f"^{url}/{shard.name} is truncated or corrupted "
                       r"\(its sha256 differs"):
        open_dataset(url, tmp_path / "cache")


def test_a_silent_endpoint_is_given_up_on_after_the_timeouts(tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    """An S3 endpoint that accepts the connection and never answers: the stall timeout
    (CCAT_HTTP_STALL_TIMEOUT) holds botocore's reads too, so the error comes instead of a
    hang of minutes."""
    import threading

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        held: list[socket.socket] = []
        stop = threading.Event()

        def accept() -> None:  # take every connection and say nothing
            silent.settimeout(0.2)
            while not stop.is_set():
                try:
                    held.append(silent.accept()[0])
                except OSError:
                    pass

        threading.Thread(target=accept, daemon=True).start()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        monkeypatch.setenv("CCAT_HTTP_STALL_TIMEOUT", "0.5")
        import fsspec

        opened, real_open = [], fsspec.open

        def recording_open(url, *args, **kwargs):  # what reaches the backend
            opened.append(kwargs)
            return real_open(url, *args, **kwargs)

        monkeypatch.setattr(fsspec, "open", recording_open)
        try:
            code, _, err = run_cli(["info", f"s3://{BUCKET}/silent"], capsys)
        finally:
            stop.set()
            for conn in held:
                conn.close()
    assert code == 1 and err.startswith(f"error: s3://{BUCKET}/silent/manifest.json did not "
                                        "answer within the timeouts"), err
    assert "0.5 s without a byte, CCAT_HTTP_STALL_TIMEOUT; ReadTimeoutError" in err
    assert opened and all(o["config_kwargs"]["read_timeout"] == 0.5 for o in opened)
