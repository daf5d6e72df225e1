"""One transport per scheme, the same promises (issue 27, item 4): the same hostile cases
run against ``file://``, ``http://`` on 127.0.0.1 and ``s3://`` on moto's server (behind a
127.0.0.1 front that can redirect or drip, which moto cannot), each ending in one sentence
naming the URL and the fix with no partial file left in the cache; and the cache is filled
in parallel, at most CCAT_FETCH_PARALLEL requests at once over one shared client."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from ccat.data import open_dataset
from ccat.data.reader import DatasetError
from ccat.data.transport import Transports

BUCKET = "ccat-transport"
DEADLINE_S = 3.0  # the slow case's total deadline (CCAT_HTTP_DEADLINE)
BOUND_S = 12 * DEADLINE_S  # no hostile answer lasts longer, whatever the client does
DRIP_EVERY_S = 0.05
OVERLAP_WAIT_S = 1.0  # how long a shard request waits for the others to be in flight
SCHEMES = ("file", "http", "s3")


@dataclass
class Front:
    """What a 127.0.0.1 front does: serve ``root`` or forward to ``upstream`` (moto),
    except for the files named in ``hostile`` (``redirect``: a 302 to ``localhost``;
    ``slow``: the response head a byte at a time). It counts shard requests in flight."""

    root: Path | None = None
    upstream: tuple[str, int] | None = None
    hostile: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    port: int = 0
    wait_for: int = 0  # shard requests wait (up to OVERLAP_WAIT_S) until this many are in
    in_flight: int = 0
    most: int = 0
    connections: int = 0
    lock: threading.Condition = field(default_factory=threading.Condition)


class FrontHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a shared client reuses its connections
    front: Front

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        with self.front.lock:
            self.front.connections += 1

    def do_HEAD(self) -> None:  # noqa: N802 - the http.server hook's name
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        mode = self.front.hostile.get(name)
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.front.port}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "slow":
            return self._drip()
        with self._counted(name.endswith(".tar") and body):
            if self.front.upstream:
                return self._forward(body)
            path = self.front.root / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    @contextlib.contextmanager
    def _counted(self, shard: bool) -> Iterator[None]:
        """Count this request in flight; a shard's waits for ``wait_for`` others."""
        if not shard:
            yield
            return
        with self.front.lock:
            self.front.in_flight += 1
            self.front.most = max(self.front.most, self.front.in_flight)
            self.front.lock.notify_all()
            self.front.lock.wait_for(lambda: self.front.in_flight >= self.front.wait_for,
                                     OVERLAP_WAIT_S)
        try:
            yield
        finally:
            with self.front.lock:
                self.front.in_flight -= 1

    def _forward(self, body: bool) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        conn = http.client.HTTPConnection(*self.front.upstream, timeout=BOUND_S)
        conn.request(self.command, self.path, body=self.rfile.read(length) if length else None,
                     headers={k: v for k, v in self.headers.items()})
        answer = conn.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length",
                                   "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", answer.getheader("Content-Length") or str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
        conn.close()

    def _drip(self) -> None:
        """A response head a byte every DRIP_EVERY_S: no per-read timeout ends it."""
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: " + b"p" * 400 + b"\r\n\r\n"
        until = time.monotonic() + BOUND_S
        with contextlib.suppress(OSError):
            for byte in head:
                if self.front.stop.wait(DRIP_EVERY_S) or time.monotonic() > until:
                    break
                self.wfile.write(bytes([byte]))
        self.close_connection = True


@contextlib.contextmanager
def serving(front: Front) -> Iterator[str]:
    """``front`` on 127.0.0.1; yields its URL."""
    handler = type("Handler", (FrontHandler,), {"front": front})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    front.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{front.port}"
    finally:
        front.stop.set()
        httpd.shutdown()
        httpd.server_close()


@dataclass
class Store:
    """A copy of the tiny build behind one scheme: its URL, how to change an object, and
    how to make one hostile."""

    url: str
    put: Callable[[str, bytes], None]
    remove: Callable[[str], None]
    make_hostile: Callable[[str, str], None]
    front: Front | None = None


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[tuple[str, int]]:
    """moto's S3 server on 127.0.0.1 (module-wide); yields (host, port)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (the test extra) "
                                      "is not installed: pip install -e '.[test]'")
    pytest.importorskip("s3fs", reason="s3fs (the s3 extra) is not installed: "
                        "pip install -e '.[s3]'")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield "127.0.0.1", port
    finally:
        server.stop()


def file_store(built: Path, tmp_path: Path) -> Iterator[Store]:
    folder = tmp_path / "build"
    shutil.copytree(built, folder)

    def hostile(name: str, mode: str) -> None:
        (folder / name).unlink()
        if mode == "redirect":  # file://'s redirect: a link out of the build's folder
            (tmp_path / "elsewhere").mkdir()
            shutil.copy(built / name, tmp_path / "elsewhere" / name)
            (folder / name).symlink_to(tmp_path / "elsewhere" / name)
        else:  # slow: a FIFO, whose opening blocks until someone writes to it
            os.mkfifo(folder / name)

    yield Store(folder.as_uri(), lambda n, d: (folder / n).write_bytes(d),
                lambda n: (folder / n).unlink(), hostile)


def http_store(built: Path, tmp_path: Path) -> Iterator[Store]:
    shutil.copytree(built, tmp_path / "www" / "ds")
    front = Front(root=tmp_path / "www")
    with serving(front) as base:
        folder = tmp_path / "www" / "ds"
        yield Store(f"{base}/ds", lambda n, d: (folder / n).write_bytes(d),
                    lambda n: (folder / n).unlink(), front.hostile.__setitem__, front)


def s3_store(built: Path, tmp_path: Path, endpoint: tuple[str, int],
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    import s3fs

    for name, value in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")]:
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True,
                           endpoint_url=f"http://{endpoint[0]}:{endpoint[1]}")
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    prefix = f"{BUCKET}/{tmp_path.name}"
    for path in sorted(built.iterdir()):
        fs.pipe(f"{prefix}/{path.name}", path.read_bytes())
    front = Front(upstream=endpoint)
    with serving(front) as base:
        monkeypatch.setenv("AWS_ENDPOINT_URL", base)
        yield Store(f"s3://{prefix}", lambda n, d: fs.pipe(f"{prefix}/{n}", d),
                    lambda n: fs.rm(f"{prefix}/{n}"), front.hostile.__setitem__, front)


@pytest.fixture(params=SCHEMES)
def store(request, built: Path, tmp_path: Path, monkeypatch) -> Iterator[Store]:
    """The tiny build behind each scheme in turn, a fresh copy per test."""
    monkeypatch.setenv("CCAT_CACHE_DIR", str(tmp_path / "default-cache"))
    if request.param == "file":
        yield from file_store(built, tmp_path)
    elif request.param == "http":
        yield from http_store(built, tmp_path)
    else:
        yield from s3_store(built, tmp_path, request.getfixturevalue("moto_endpoint"),
                            monkeypatch)


def first_shard(built: Path) -> tuple[str, bytes]:
    """The shard fetched first (the first of the manifest's first split): its failure is
    the one reported, however the parallel fetches interleave."""
    manifest = json.loads((built / "manifest.json").read_text())
    name = next(iter(manifest["splits"].values()))["shards"][0]["name"]
    return name, (built / name).read_bytes()


def scheme_of(store: Store) -> str:
    return store.url.split("://")[0]


DEADLINE = (r" did not finish within {d:g} s in total \(connecting, response headers and "
            r"body, retries included; CCAT_HTTP_DEADLINE\); check the server, or raise "
            r"CCAT_HTTP_DEADLINE for a slow link")
UPLOADED = "; check the URL and that the whole build was uploaded"
# case -> scheme -> the sentence after the shard's URL (a regular expression)
EXPECTED = {
    "oversize": {s: r" announces {big} bytes, more than {size} \(the size the manifest gives "
                    r"it\); check that the server holds this build" for s in SCHEMES},
    "truncated": {s: r" is truncated or corrupted \(1000 bytes, the manifest says {size}\); "
                     r"re-upload the shard or rebuild the dataset" for s in SCHEMES},
    "wrong bytes": {s: r" is truncated or corrupted \(its sha256 differs from the manifest's"
                       r"\); re-upload the shard or rebuild the dataset" for s in SCHEMES},
    "redirect": {"file": r" is a link to \S+, outside its folder; copy the file into the "
                         r"build or use the URL it leads to",
                 **{s: r" redirects to http://localhost:\d+/\S+, another scheme or host; set "
                       r"CCAT_HTTP_REDIRECT_HOSTS to allow that host, or use the final URL"
                    for s in ("http", "s3")}},
    "slow": {"file": r" is not a regular file; copy the file into the build",
             **{s: DEADLINE.format(d=DEADLINE_S) for s in ("http", "s3")}},
    "missing": {"file": " does not exist" + UPLOADED, "s3": " does not exist" + UPLOADED,
                "http": r" answered HTTP 404 \(Not Found\)" + UPLOADED},
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_every_scheme_refuses_a_hostile_shard_in_one_sentence(
        store: Store, built: Path, tmp_path: Path, monkeypatch, case: str) -> None:
    name, data = first_shard(built)
    if case == "oversize":
        store.put(name, data + b"\0" * 1000)
    elif case == "truncated":
        store.put(name, data[:1000])
    elif case == "wrong bytes":
        store.put(name, data[:700] + bytes([data[700] ^ 1]) + data[701:])
    elif case == "missing":
        store.remove(name)
    else:
        store.make_hostile(name, case)
    if case == "slow":
        monkeypatch.setenv("CCAT_HTTP_DEADLINE", str(DEADLINE_S))
        if scheme_of(store) == "s3":  # the shared client is made before the clock starts:
            # botocore loads its models for seconds on a loaded machine (fsspec keeps it)
            Transports().for_url(store.url).fs.info(f"{store.url}/manifest.json")
    sentence = EXPECTED[case][scheme_of(store)].format(big=len(data) + 1000, size=len(data))
    with pytest.raises(DatasetError) as refused:
        open_dataset(store.url, tmp_path / "cache")
    assert re.fullmatch(re.escape(f"{store.url}/{name}") + sentence, str(refused.value)), \
        str(refused.value)
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert name not in [p.name for p in left], "a refused shard is not kept"
    for path in left:  # shards fetched beside it are whole and verified; nothing partial
        assert path.read_bytes() == (built / path.name).read_bytes(), path.name


def test_every_scheme_reads_the_same_build(store: Store, built: Path, tmp_path: Path) -> None:
    fetched, local = open_dataset(store.url, tmp_path / "cache"), open_dataset(built)
    assert fetched.fingerprint == local.fingerprint
    for shard in local.manifest["splits"]["train"]["shards"]:
        assert (fetched.root / shard["name"]).read_bytes() == (built / shard["name"]).read_bytes()


@pytest.mark.parametrize("parallel", [2])
def test_shards_are_fetched_in_parallel_up_to_the_bound(
        store: Store, built: Path, tmp_path: Path, monkeypatch, parallel: int) -> None:
    """Each shard request waits at the server until ``parallel`` are in flight: a serial
    fetch never gets there, a fetch past the bound goes over it. Over HTTP the shared
    client reuses its connections: no more than the bound, whatever the number of shards."""
    if store.front is None:
        pytest.skip("file:// has no server to count requests at")
    monkeypatch.setenv("CCAT_FETCH_PARALLEL", str(parallel))
    store.front.wait_for = parallel
    shards = len(list(built.glob("*.tar")))
    assert shards > parallel
    dataset = open_dataset(store.url, tmp_path / "cache")
    assert len(list(dataset.root.glob("*.tar"))) == shards
    assert store.front.most == parallel
    if scheme_of(store) == "http":
        assert store.front.connections <= parallel


@pytest.mark.parametrize("value", ["0", "many", "1.5", "1000"])
def test_the_parallel_bound_refuses_a_value_that_is_not_one(
        tmp_path: Path, monkeypatch, value: str) -> None:
    monkeypatch.setenv("CCAT_FETCH_PARALLEL", value)
    with pytest.raises(DatasetError, match=rf"^\$CCAT_FETCH_PARALLEL is '{re.escape(value)}'; "
                       "it must be a whole number of requests at once, 1 to 256$"):
        open_dataset("http://127.0.0.1:9/ds", tmp_path / "cache")
