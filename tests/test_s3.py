"""``s3://`` for real: a local S3 API (moto's server on 127.0.0.1) holding the tiny build;
verify, info and a short training read it through s3fs, the endpoint given as
$AWS_ENDPOINT_URL as a user of an S3-compatible store gives it (issue 11, object storage)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import socket
import threading
import time
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


DEADLINE_S = 1.5  # the test client's total deadline (CCAT_HTTP_DEADLINE)
HOSTILE_BOUND_S = 12 * DEADLINE_S  # no hostile endpoint answers longer than this
DRIP_EVERY_S = 0.1  # below the stall timeout the tests set, so no per-read timeout trips


@contextlib.contextmanager
def hostile_endpoint(mode: str) -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1 that takes every connection and says nothing (silent) or
    drips a response head a byte at a time (drip); each connection for HOSTILE_BOUND_S at
    most, the whole server until the block ends. Yields its URL."""
    stop = threading.Event()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + b"X-Pad: " + b"p" * 400 + b"\r\n\r\n"

    def answer(conn: socket.socket) -> None:
        with conn:
            until = time.monotonic() + HOSTILE_BOUND_S
            with contextlib.suppress(OSError):
                for byte in head if mode == "drip" else itertools.repeat(0):  # silent: no end
                    if stop.wait(DRIP_EVERY_S) or time.monotonic() > until:
                        return
                    if mode == "drip":
                        conn.sendall(bytes([byte]))

    def accept(listener: socket.socket) -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                threading.Thread(target=answer, args=(listener.accept()[0],),
                                 daemon=True).start()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        threading.Thread(target=accept, args=(listener,), daemon=True).start()
        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            stop.set()


@pytest.fixture()
def aws_env(monkeypatch) -> pytest.MonkeyPatch:
    """Credentials for a local endpoint and a small stall timeout."""
    for name, value in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("CCAT_HTTP_STALL_TIMEOUT", "0.5")]:
        monkeypatch.setenv(name, value)
    return monkeypatch


@pytest.mark.parametrize("mode", ["silent", "drip"])
def test_a_silent_or_dripping_endpoint_ends_by_the_total_deadline(
        aws_env, tmp_path: Path, capsys, mode: str) -> None:
    """botocore's timeouts hold each read and are retried; the stated limit is the total:
    the error comes by CCAT_HTTP_DEADLINE, retries included, and says so."""
    aws_env.setenv("CCAT_HTTP_DEADLINE", str(DEADLINE_S))
    url = f"s3://{BUCKET}/{mode}"
    sentence = (f"{url}/manifest.json did not finish within {DEADLINE_S:g} s in total "
                "(connecting, response headers and body, retries included; "
                "CCAT_HTTP_DEADLINE); check the server, or raise CCAT_HTTP_DEADLINE for a "
                "slow link")
    started = time.monotonic()
    with hostile_endpoint(mode) as endpoint:
        aws_env.setenv("AWS_ENDPOINT_URL", endpoint)
        for args in (["info", url], ["verify", url]):
            code, _, err = run_cli(args, capsys)
            assert code == 1 and err.strip() == f"error: {sentence}", err
        with pytest.raises(DatasetError, match=f"^{re.escape(sentence)}$"):
            open_dataset(url, tmp_path / "cache")
    assert time.monotonic() - started < HOSTILE_BOUND_S, "a hang: the endpoint gave up first"


def test_timeouts_on_every_attempt_state_the_time_taken_in_all(aws_env, capsys) -> None:
    """When botocore and s3fs give up before the deadline, the sentence says how long all
    the attempts took, not the one attempt's timeout."""
    aws_env.setenv("AWS_MAX_ATTEMPTS", "1")
    with hostile_endpoint("silent") as endpoint:
        aws_env.setenv("AWS_ENDPOINT_URL", endpoint)
        started = time.monotonic()
        code, _, err = run_cli(["info", f"s3://{BUCKET}/silent"], capsys)
        took = time.monotonic() - started
    assert code == 1 and err.startswith(f"error: s3://{BUCKET}/silent/manifest.json did not "
                                        "answer within the timeouts on any attempt"), err
    assert "0.5 s without a byte, CCAT_HTTP_STALL_TIMEOUT; ReadTimeoutError; " in err
    stated = float(re.search(r"; ([0-9.]+) s in all, retries included\)", err).group(1))
    assert 0.5 < stated <= took  # s3fs retried: more than one attempt's timeout
