"""The HTTP client against a misbehaving server on 127.0.0.1 (issue 11, items 4 and 5):
verify reads the server, and stalls, drips, endless bodies, huge manifests, redirects to
other hosts and errors each end in one sentence naming the URL."""

from __future__ import annotations

import http.server
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from ccat.data import open_dataset, remote
from ccat.data.reader import DatasetError
from conftest import run_cli

STALL_S = 0.3  # the test client's stall timeout; the server never waits longer than BOUND_S
MIN_RATE = 1000.0  # bytes/s
BOUND_S = 5.0  # no misbehaving answer lasts longer than this, whatever the client does
DRIP_EVERY_S = 0.05
ENDLESS_CAP = 256 << 20  # even an "endless" body stops here


class Misbehaving(http.server.SimpleHTTPRequestHandler):
    """Serves ``root``; the first path part picks how shards (and, for ``endless-all``,
    the manifest too) are answered: ok, stall, drip, endless, endless-all, error, announce
    (a length of 1 TiB and no body), same
    (a redirect to ok on this host), elsewhere (a redirect to ok on ``localhost``)."""

    stop: threading.Event
    port: int

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        mode, _, rest = self.path.lstrip("/").partition("/")
        shard = rest.endswith(".tar")
        if mode == "same":
            return self._redirect(f"/ok/{rest}")
        if mode == "elsewhere":
            return self._redirect(f"http://localhost:{self.port}/ok/{rest}")
        if mode == "error" and shard:
            return self.send_error(500)
        if mode == "announce" and shard:
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            return None
        if (mode in ("stall", "drip", "endless") and shard) or mode == "endless-all":
            return self._misbehave(mode)
        self.path = "/" + rest
        return super().do_GET()

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _misbehave(self, mode: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()  # no length: the body runs until the server closes
        deadline, sent = time.monotonic() + BOUND_S, 0
        block = b"\0" * (1 << 16)
        try:
            while time.monotonic() < deadline and not self.stop.is_set() and sent < ENDLESS_CAP:
                if mode == "stall":
                    self.stop.wait(0.05)
                    continue
                data = b"x" if mode == "drip" else block
                self.wfile.write(data)
                sent += len(data)
                if mode == "drip":
                    self.stop.wait(DRIP_EVERY_S)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should
        self.close_connection = True


@pytest.fixture()
def server(built: Path, tmp_path: Path, monkeypatch) -> Iterator[tuple[str, Path]]:
    """The tiny build served at http://127.0.0.1:<port>/<mode>/ds with tiny client limits;
    yields (http://127.0.0.1:<port>, the served folder)."""
    root = tmp_path / "www"
    shutil.copytree(built, root / "ds")
    stop = threading.Event()

    class Handler(Misbehaving):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    Handler.stop, Handler.port = stop, httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("CCAT_HTTP_STALL_TIMEOUT", str(STALL_S))
    monkeypatch.setenv("CCAT_HTTP_MIN_RATE", str(MIN_RATE))
    monkeypatch.setenv("CCAT_CACHE_DIR", str(tmp_path / "default-cache"))
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root / "ds"
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("train-*.tar"))[0]


def test_verify_reads_the_server_not_the_cache(server, tmp_path: Path, capsys) -> None:
    base, folder = server
    cache = tmp_path / "cache"
    code, out, _ = run_cli(["verify", f"{base}/ok/ds", "--cache-dir", cache], capsys)
    assert code == 0 and "ok: " in out
    assert len(list(cache.rglob("*.tar"))) == len(list(folder.glob("*.tar")))
    shard = first_shard(folder)
    shard.write_bytes(shard.read_bytes()[:1000])  # the served copy is damaged; the cache is not
    code, out, err = run_cli(["verify", f"{base}/ok/ds", "--cache-dir", cache], capsys)
    assert code == 1 and "ok: " not in out
    assert f"{base}/ok/ds/{shard.name}: 1000 bytes, the manifest says" in err
    assert len(err.strip().splitlines()) == 1


def test_verify_without_a_cache_dir_keeps_nothing(server, tmp_path: Path, capsys) -> None:
    base, _ = server
    code, out, _ = run_cli(["verify", f"{base}/ok/ds"], capsys)
    assert code == 0 and "ok: " in out
    assert not (tmp_path / "default-cache").exists()


def test_a_changed_byte_on_the_server_fails_verify_naming_the_shard(server, capsys) -> None:
    base, folder = server
    shard = first_shard(folder)
    data = bytearray(shard.read_bytes())
    data[700] ^= 1
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(["verify", f"{base}/ok/ds"], capsys)
    assert code == 1 and f"{base}/ok/ds/{shard.name}: sha256 differs" in err


@pytest.mark.parametrize("mode, message", [
    ("stall", f"sent no byte for {STALL_S:g} s (CCAT_HTTP_STALL_TIMEOUT)"),
    ("drip", "bytes/s on average, below the minimum of 1000 (CCAT_HTTP_MIN_RATE)"),
    ("endless", "bytes, the size the manifest gives it; refused at that size"),
    ("error", "answered HTTP 500 (Internal Server Error)"),
    ("announce", f"announces {1 << 40} bytes, more than"),
])
def test_a_misbehaving_shard_server_is_one_sentence_naming_the_url(
        server, tmp_path: Path, capsys, mode: str, message: str) -> None:
    base, folder = server
    shard = first_shard(folder)
    with pytest.raises(DatasetError, match="^(?!.*\n)") as refused:  # one line
        open_dataset(f"{base}/{mode}/ds", tmp_path / "cache")
    assert f"{base}/{mode}/ds/{shard.name}" in str(refused.value)
    assert message in str(refused.value)
    left = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert left == [], "a refused download leaves no partial file in the cache"
    code, _, err = run_cli(["verify", f"{base}/{mode}/ds"], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_an_endless_body_is_cut_at_the_size_asked_for(server) -> None:
    base, folder = server
    url, cap, got = f"{base}/endless/ds/{first_shard(folder).name}", 100_000, bytearray()
    with pytest.raises(remote.RemoteError, match=f"^{url} sends more than {cap} bytes"):
        with remote.open_stream(url, cap) as stream:
            for block in iter(lambda: stream.read(4096), b""):
                got += block
    assert 0 < len(got) <= cap


def test_a_manifest_over_the_cap_is_refused(server, tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(DatasetError, match=f"{base}/endless-all/ds/manifest.json sends more "
                       f"than {64 << 20} bytes, the cap on a manifest's size"):
        open_dataset(f"{base}/endless-all/ds", tmp_path / "cache")


def test_redirects_stay_on_the_same_host_unless_allowed(server, tmp_path: Path,
                                                        monkeypatch) -> None:
    base, folder = server
    same = open_dataset(f"{base}/same/ds", tmp_path / "cache")
    assert same.num_samples("train") > 0
    port = base.rsplit(":", 1)[1]
    with pytest.raises(DatasetError, match=f"{base}/elsewhere/ds/manifest.json redirects to "
                       f"http://localhost:{port}/ok/ds/manifest.json, another scheme or host"):
        open_dataset(f"{base}/elsewhere/ds", tmp_path / "other")
    monkeypatch.setenv("CCAT_HTTP_REDIRECT_HOSTS", "localhost")
    allowed = open_dataset(f"{base}/elsewhere/ds", tmp_path / "other")
    assert allowed.fingerprint == same.fingerprint


def test_a_limit_that_is_not_a_number_is_one_sentence(server, tmp_path: Path,
                                                      monkeypatch) -> None:
    base, _ = server
    monkeypatch.setenv("CCAT_HTTP_STALL_TIMEOUT", "soon")
    with pytest.raises(DatasetError, match=r"^\$CCAT_HTTP_STALL_TIMEOUT is 'soon', not a number$"):
        open_dataset(f"{base}/ok/ds", tmp_path / "cache")
