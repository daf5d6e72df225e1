"""Built datasets behind a URL: read the manifest first, fetch shards into a local cache.

``http(s)://`` goes through httpx, held to :class:`HttpLimits`: a total deadline for the
whole request (:class:`Deadline`), a connect timeout, a stall timeout (no byte for that
long), a minimum average rate, redirects only within the same scheme and host, and a body
cut and refused at the size the manifest gives it (a manifest at
:data:`ccat.data.spec.MANIFEST_MAX_BYTES`). Any other scheme (``s3://``, ``gs://``, ...)
goes through fsspec and its backend, installed as optional extras, held to the same
deadline, size caps and rate. A manifest is data, not instructions:
:func:`ccat.data.spec.check_manifest` refuses shard names that are not plain file names, so
a server cannot make the toolkit run a command or read outside the dataset. Every fetched
shard is checked against the manifest's size and sha256 before it is used, and a cached
shard whose bytes changed is fetched again.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import hashlib
import io
import json
import math
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import httpx

from ccat import fileio
from ccat.data import spec
from ccat.errors import UserError

CHUNK = 1 << 20
FSSPEC_BLOCK = 8 << 20  # bytes per ranged read of an fsspec object
CACHE_ENV = "CCAT_CACHE_DIR"
MAX_REDIRECTS = 5
HTTP_SCHEMES = ("http://", "https://")
# URL scheme -> the extra of pyproject.toml that installs fsspec with its backend
FSSPEC_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class RemoteError(UserError, RuntimeError):
    """A remote dataset cannot be read; the message names the URL and the fix."""


@dataclass(frozen=True)
class HttpLimits:
    """What one request may take; each field is also read from its environment variable."""

    # CCAT_HTTP_DEADLINE: the most one request (a manifest, a shard) may take in all, from
    # connecting to its last byte: every response head (1xx included), redirect and retry
    deadline_s: float = 600.0
    connect_s: float = 10.0  # CCAT_HTTP_CONNECT_TIMEOUT: to open the connection
    stall_s: float = 30.0  # CCAT_HTTP_STALL_TIMEOUT: longest wait for the next byte
    # CCAT_HTTP_MIN_RATE, bytes/s: the average from the request's start, checked once
    # stall_s has passed; a server dripping a byte now and then is given up on.
    min_rate: float = 4096.0
    # CCAT_HTTP_REDIRECT_HOSTS: comma-separated host patterns (fnmatch, "*" for any) that
    # redirects may also lead to; by default only to the same scheme and host.
    redirect_hosts: str = ""

    @classmethod
    def from_env(cls) -> "HttpLimits":
        """The defaults, overridden by whichever CCAT_HTTP_* variables are set."""
        values: dict[str, Any] = {}
        for name, env in ENV_NAMES.items():
            raw = os.environ.get(env, "")
            if raw:
                values[name] = raw if name == "redirect_hosts" else _seconds_or_rate(env, raw)
        for name in ("deadline_s", "connect_s", "stall_s"):
            if values.get(name) == 0:
                raise RemoteError(f"${ENV_NAMES[name]} is 0; a timeout must be above 0 seconds")
        return cls(**values)

    def allows_redirect(self, source: httpx.URL, target: httpx.URL) -> bool:
        """A redirect keeps the scheme, and keeps the host and port or goes to an allowed host."""
        if target.scheme != source.scheme:
            return False
        if (target.host, target.port) == (source.host, source.port):
            return True
        patterns = [p.strip() for p in self.redirect_hosts.split(",") if p.strip()]
        return any(fnmatch.fnmatch(target.host, pattern) for pattern in patterns)


ENV_NAMES = {"deadline_s": "CCAT_HTTP_DEADLINE", "connect_s": "CCAT_HTTP_CONNECT_TIMEOUT",
             "stall_s": "CCAT_HTTP_STALL_TIMEOUT", "min_rate": "CCAT_HTTP_MIN_RATE",
             "redirect_hosts": "CCAT_HTTP_REDIRECT_HOSTS"}
# httpcore trace events whose return value is a connection's new network stream
NEW_STREAM_EVENTS = ("connection.connect_tcp.complete", "connection.start_tls.complete")


def _seconds_or_rate(env: str, raw: str) -> float:
    """The number that variable ``env`` holds; RemoteError when it is not one, or negative."""
    try:
        value = float(raw)
    except ValueError:
        raise RemoteError(f"${env} is {raw!r}, not a number") from None
    if not 0 <= value < math.inf:
        raise RemoteError(f"${env} is {raw!r}; it must be a finite number, 0 or more")
    return value


class Deadline:
    """The end of one request's total time (CCAT_HTTP_DEADLINE): connecting, every response
    head (any number of ``100 Continue``), redirects, retries and the whole body.

    httpx's and botocore's timeouts hold one socket read each, so a server that sends a
    header byte now and then, or 100 Continue after 100 Continue, never trips them; this
    holds their sum. For HTTP a watchdog thread shuts the request's sockets when the time is
    up, which ends a read blocked on them; fsspec's calls get the time left as their timeout.
    """

    def __init__(self, url: str, total_s: float):
        self.url, self.total_s = url, total_s
        self.end = time.monotonic() + total_s
        self._sockets: list[socket.socket] = []
        self._expired = threading.Event()
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self._expired.is_set() or self.remaining() <= 0

    def check(self) -> None:
        """Raise the deadline's error once the time is up."""
        if self.passed():
            raise self.error()

    def error(self) -> RemoteError:
        return RemoteError(f"{self.url} did not finish within {self.total_s:g} s in total "
                           "(connecting, response headers and body, retries included; "
                           "CCAT_HTTP_DEADLINE); check the server, or raise "
                           "CCAT_HTTP_DEADLINE for a slow link")

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's ``trace`` hook: keep the socket of each new connection, to shut it at
        the deadline (at once if the deadline passed while it was connecting)."""
        if event in NEW_STREAM_EVENTS and info.get("return_value") is not None:
            with self._lock:
                self._sockets.append(info["return_value"].get_extra_info("socket"))
                if self._expired.is_set():
                    _shut(self._sockets[-1])

    @contextlib.contextmanager
    def watchdog(self) -> Iterator[None]:
        """While the block runs, shut this request's sockets when the time is up."""
        timer = threading.Timer(max(self.remaining(), 0.0), self._expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self._expired.set()
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Shut ``sock`` both ways, which wakes a thread blocked reading it; one closed already
    (or handed over to TLS) needs nothing."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def is_remote(location: str | Path) -> bool:
    return "://" in str(location)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ccat" / "shards")


def url_of(base: str, name: str) -> str:
    """The URL of file ``name`` of the build at ``base``."""
    return base.rstrip("/") + "/" + name


class _Body(io.RawIOBase):
    """A response body read block by block: capped at ``max_bytes`` and held to the rate and
    the deadline."""

    def __init__(self, url: str, blocks: Iterator[bytes], max_bytes: int, limits: HttpLimits,
                 what: str, deadline: Deadline):
        super().__init__()
        self.url, self.blocks, self.max_bytes, self.limits, self.what = (
            url, blocks, max_bytes, limits, what)
        self.deadline = deadline
        self.received, self.started, self.pending = 0, time.monotonic(), memoryview(b"")
        self.over = False  # the body went past max_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.pending:
            if self.over:
                raise self._too_long()
            block = next(self.blocks, b"")
            self.deadline.check()  # an end cut by the deadline is not the body's end
            if not block:
                return 0
            room = self.max_bytes - self.received
            if len(block) > room:  # hand out what fits, refuse at the next read
                block, self.over = block[:room], True
                if not block:
                    raise self._too_long()
            self._account(len(block))
            self.pending = memoryview(block)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def _too_long(self) -> RemoteError:
        return RemoteError(f"{self.url} sends more than {self.max_bytes} bytes, {self.what}; "
                           "refused at that size, check that the server holds this build")

    def _account(self, size: int) -> None:
        self.received += size
        elapsed = time.monotonic() - self.started
        rate = self.received / elapsed if elapsed else float("inf")
        if elapsed > self.limits.stall_s and rate < self.limits.min_rate:
            raise RemoteError(f"{self.url} sends {rate:.0f} bytes/s on average, below the "
                              f"minimum of {self.limits.min_rate:.0f} (CCAT_HTTP_MIN_RATE); "
                              "try again or use another mirror")


@contextlib.contextmanager
def open_stream(url: str, max_bytes: int, what: str = "the size the manifest gives it",
                limits: HttpLimits | None = None) -> Iterator[BinaryIO]:
    """A readable binary stream of ``url`` that refuses to go past ``max_bytes`` (``what``
    says why that is the cap); every failure is a RemoteError naming ``url``. The request,
    reading included, ends by its :class:`Deadline`."""
    limits = limits or HttpLimits.from_env()
    deadline = Deadline(url, limits.deadline_s)
    opener = _http_blocks if url.startswith(HTTP_SCHEMES) else _fsspec_blocks
    with opener(url, max_bytes, limits, deadline) as blocks:
        body = _Body(url, blocks, max_bytes, limits, what, deadline)
        with io.BufferedReader(body, CHUNK) as stream:
            yield stream


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default certificate checks (certifi, or $SSL_CERT_FILE / $SSL_CERT_DIR), built
    once: loading the CA bundle costs about 17 ms, which a new client per shard paid again."""
    return httpx.create_ssl_context()


@contextlib.contextmanager
def _http_blocks(url: str, max_bytes: int, limits: HttpLimits,
                 deadline: Deadline) -> Iterator[Iterator[bytes]]:
    """The raw body of a GET of ``url`` (redirects checked), as blocks."""
    # identity: the bytes hashed are the bytes of the file, never a server's re-encoding
    with deadline.watchdog(), httpx.Client(follow_redirects=False, verify=_tls_context(),
                                           headers={"Accept-Encoding": "identity"}) as client:
        response = _follow(client, url, limits, deadline)
        try:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise RemoteError(f"{url} announces {length} bytes, more than {max_bytes}; "
                                  "check that the server holds this build")
            yield _translated(url, response.iter_raw(), limits, deadline)
        finally:
            response.close()


def _request(client: httpx.Client, url: httpx.URL, limits: HttpLimits,
             deadline: Deadline) -> httpx.Request:
    """A GET of ``url`` whose connect timeout ends by the deadline, traced for its sockets."""
    deadline.check()
    connect = min(limits.connect_s, deadline.remaining())
    timeout = httpx.Timeout(connect=connect, read=limits.stall_s, write=limits.stall_s,
                            pool=connect)
    return client.build_request("GET", url, timeout=timeout,
                                extensions={"trace": deadline.trace})


def _follow(client: httpx.Client, url: str, limits: HttpLimits,
            deadline: Deadline) -> httpx.Response:
    """The final response of a GET of ``url``, following only redirects ``limits`` allows."""
    current = httpx.URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        try:
            response = client.send(_request(client, current, limits, deadline), stream=True)
        except httpx.HTTPError as err:
            raise _http_error(str(current), err, limits, deadline) from None
        if not response.is_redirect:
            if response.status_code != 200:
                response.close()
                raise RemoteError(f"{current} answered HTTP {response.status_code} "
                                  f"({response.reason_phrase}); check the URL and that the "
                                  "whole build was uploaded")
            return response
        target = response.next_request.url if response.next_request else None
        response.close()
        if target is None or not limits.allows_redirect(current, target):
            raise RemoteError(f"{current} redirects to {target}, another scheme or host; "
                              "set CCAT_HTTP_REDIRECT_HOSTS to allow that host, or use the "
                              "final URL")
        current = target
    raise RemoteError(f"{url} redirects more than {MAX_REDIRECTS} times; use the final URL")


def _translated(url: str, blocks: Iterator[bytes], limits: HttpLimits,
                deadline: Deadline) -> Iterator[bytes]:
    """``blocks``, with httpx's errors turned into RemoteErrors naming ``url``."""
    try:
        yield from blocks
    except httpx.HTTPError as err:
        raise _http_error(url, err, limits, deadline) from None


def _http_error(url: str, err: httpx.HTTPError, limits: HttpLimits,
                deadline: Deadline) -> RemoteError:
    if deadline.passed():  # the watchdog shut the socket: whatever httpx saw, that is why
        return deadline.error()
    if isinstance(err, httpx.ConnectTimeout):
        return RemoteError(f"cannot reach {url} (no connection within {limits.connect_s:g} s, "
                           "CCAT_HTTP_CONNECT_TIMEOUT); check the address and the network")
    if isinstance(err, httpx.TimeoutException):
        return RemoteError(f"{url} sent no byte for {limits.stall_s:g} s "
                           "(CCAT_HTTP_STALL_TIMEOUT); try again or use another mirror")
    if isinstance(err, (httpx.ConnectError, httpx.UnsupportedProtocol)):
        return RemoteError(f"cannot reach {url} ({err}); check the address and the network")
    return RemoteError(f"fetching {url} broke off ({err}); try again")


def missing_backend(url: str) -> str:
    """The sentence for a URL whose fsspec backend is not installed: the extra to install."""
    scheme = url.split("://", 1)[0]
    extra = FSSPEC_EXTRAS.get(scheme)
    fix = (f'pip install "ccat[{extra}]"' if extra else
           f'pip install "ccat[remote]" and the fsspec backend for {scheme}://')
    return f"reading {url} needs fsspec and its {scheme}:// backend, not installed here; {fix}"


@contextlib.contextmanager
def _fsspec_blocks(url: str, max_bytes: int, limits: HttpLimits,
                   deadline: Deadline) -> Iterator[Iterator[bytes]]:
    """The object at an fsspec ``url`` as blocks, each one ranged read that ends by the
    deadline; its backend's errors name ``url``."""
    fs, path = _filesystem(url, limits)
    size = _fsspec_call(url, limits, deadline, fs, "info", path).get("size")
    yield _fsspec_ranges(url, limits, deadline, fs, path,
                         max_bytes + 1 if size is None else min(size, max_bytes + 1))


def _filesystem(url: str, limits: HttpLimits) -> tuple[Any, str]:
    """fsspec's file system for ``url`` (held to ``limits``) and the path on it."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url, **_backend_limits(url, limits))
    except ImportError:
        raise RemoteError(missing_backend(url)) from None
    except Exception as err:  # noqa: BLE001 - each backend raises its own errors
        raise RemoteError(f"cannot read {url} ({type(err).__name__}: {err}); check the URL, "
                          "the endpoint and the credentials") from None


def _backend_limits(url: str, limits: HttpLimits) -> dict[str, Any]:
    """The fsspec storage options that hold a backend to ``limits``: botocore's connect and
    read timeouts for s3, per attempt (botocore and s3fs retry on their own, within the
    deadline). Other backends keep their own timeouts; the deadline and the minimum rate
    hold for all of them."""
    if url.split("://", 1)[0] in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": min(limits.connect_s, limits.deadline_s),
                                  "read_timeout": min(limits.stall_s, limits.deadline_s)}}
    return {}


def _fsspec_ranges(url: str, limits: HttpLimits, deadline: Deadline, fs: Any, path: str,
                   end: int) -> Iterator[bytes]:
    """The bytes of ``path`` up to ``end``, FSSPEC_BLOCK at a time."""
    offset = 0
    while offset < end:
        block = _fsspec_call(url, limits, deadline, fs, "cat_file", path, start=offset,
                             end=min(offset + FSSPEC_BLOCK, end))
        if not block:
            return
        yield block
        offset += len(block)


def _fsspec_call(url: str, limits: HttpLimits, deadline: Deadline, fs: Any, method: str,
                 *args: Any, **kwargs: Any) -> Any:
    """``fs.method(*args, **kwargs)``, given the time the deadline leaves: fsspec cancels an
    async backend's call (s3, gs), retries and all, at its ``timeout``; a sync backend's
    calls are checked between blocks only."""
    import fsspec.exceptions

    deadline.check()
    if getattr(fs, "async_impl", False):
        kwargs["timeout"] = deadline.remaining()
    try:
        return getattr(fs, method)(*args, **kwargs)
    except FileNotFoundError:
        raise RemoteError(f"{url} does not exist; check the URL and that the whole build "
                          "was uploaded") from None
    except fsspec.exceptions.FSTimeoutError:
        raise deadline.error() from None
    except Exception as err:  # noqa: BLE001 - each backend raises its own errors
        raise _backend_error(url, err, limits, deadline) from None


@functools.cache
def backend_timeouts() -> tuple[type[BaseException], ...]:
    """The error types by which a backend says it gave up waiting: Python's TimeoutError
    (asyncio's and aiohttp's, for gs:// and http(s)://, are subclasses of it) and those of
    botocore (s3://) and urllib3, which are not."""
    types: list[type[BaseException]] = [TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
        types += [ConnectTimeoutError, ReadTimeoutError]
    with contextlib.suppress(ImportError):
        from urllib3.exceptions import TimeoutError as Urllib3Timeout
        types.append(Urllib3Timeout)
    return tuple(types)


def _backend_error(url: str, err: Exception, limits: HttpLimits,
                   deadline: Deadline) -> RemoteError:
    """One sentence for an fsspec backend's error, with the time it took in all."""
    if deadline.passed():
        return deadline.error()
    if isinstance(err, backend_timeouts()):
        spent = deadline.total_s - deadline.remaining()
        stated = math.floor(spent * 10) / 10  # rounded down: never more than was spent
        return RemoteError(f"{url} did not answer within the timeouts on any attempt "
                           f"({limits.connect_s:g} s to connect, CCAT_HTTP_CONNECT_TIMEOUT; "
                           f"{limits.stall_s:g} s without a byte, CCAT_HTTP_STALL_TIMEOUT; "
                           f"{type(err).__name__}; {stated:.1f} s in all, retries included); "
                           "check the endpoint and the network")
    return RemoteError(f"cannot read {url} ({type(err).__name__}: {err}); check the URL, "
                       "the endpoint and the credentials")


def load_manifest(base: str, limits: HttpLimits | None = None) -> dict[str, Any]:
    """Fetch and check ``<base>/manifest.json`` (at most MANIFEST_MAX_BYTES of it)."""
    url = url_of(base, spec.MANIFEST_NAME)
    with open_stream(url, spec.MANIFEST_MAX_BYTES, "the cap on a manifest's size",
                     limits) as stream:
        data = stream.read()
    try:
        return spec.parse_manifest(data, url)
    except spec.SpecError as err:
        raise RemoteError(str(err)) from None


def cache_error(where: Path, err: OSError) -> RemoteError:
    """One sentence for a cache that cannot be written, naming it and the fix."""
    why = {errno.EROFS: "is on a read-only file system", errno.ENOSPC: "is full",
           errno.EDQUOT: "is over its disk quota", errno.EFBIG: "cannot hold a file this large",
           errno.EACCES: "is not writable", errno.EPERM: "is not writable",
           errno.ENOTDIR: "is not a folder", errno.EEXIST: "is not a folder",
           }.get(err.errno or 0, "cannot be written")
    return RemoteError(f"the shard cache {where} {why} ({err.strerror or err}); point "
                       "$CCAT_CACHE_DIR, `--set data.cache_dir=DIR` (ccat) or `--cache-dir DIR` "
                       "(ccat-data verify) at a writable folder")


def cache_folder(manifest: dict[str, Any], cache_dir: Path | None) -> Path:
    """``cache_dir/<fingerprint>``, created: builds with other parameters never mix."""
    root = cache_dir or default_cache_dir()
    folder = root / manifest["fingerprint"]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise cache_error(root, err) from None
    return folder


@contextlib.contextmanager
def cache_writer(target: Path) -> Iterator[BinaryIO]:
    """A file that becomes ``target`` when the block ends without error, and is removed
    otherwise (:func:`ccat.fileio.atomic_writer`); a failed write is a RemoteError naming
    the cache."""
    try:
        with fileio.atomic_writer(target) as out:
            yield out
    except OSError as err:
        raise cache_error(target.parent, err) from None


def fetch_shard(base: str, shard: spec.ShardInfo, folder: Path,
                limits: HttpLimits | None = None) -> Path:
    """``folder/<shard>``, verified against the manifest; fetched when absent or changed."""
    target = folder / shard.name
    if (target.is_file() and target.stat().st_size == shard.bytes
            and spec.file_sha256(target) == shard.sha256):
        return target
    url = url_of(base, shard.name)
    digest, size = hashlib.sha256(), 0
    with cache_writer(target) as out, open_stream(url, shard.bytes, limits=limits) as stream:
        for block in iter(lambda: stream.read(CHUNK), b""):
            digest.update(block)
            size += len(block)
            out.write(block)
        if size != shard.bytes or digest.hexdigest() != shard.sha256:
            what = f"{size} bytes, the manifest says {shard.bytes}" if size != shard.bytes \
                else "its sha256 differs from the manifest's"
            raise RemoteError(f"{url} is truncated or corrupted ({what}); re-upload the shard "
                              "or rebuild the dataset")
    return target


def materialize(base: str, cache_dir: Path | None = None,
                on_shard: Callable[[str], None] | None = None) -> Path:
    """A local, verified copy of the remote build at ``base``, reused across runs.

    The copy lives in ``cache_dir/<fingerprint>``: builds with other parameters never mix.
    """
    limits = HttpLimits.from_env()
    manifest = load_manifest(base, limits)
    folder = cache_folder(manifest, cache_dir)
    for split in manifest["splits"]:
        for shard in spec.shards_of(manifest, split):
            fetch_shard(base, shard, folder, limits)
            if on_shard:
                on_shard(shard.name)
    write_cached_manifest(folder, manifest)
    return folder


def write_cached_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """``folder/manifest.json``, last, so a cached copy is whole when it has one; left as it
    is when it already says the same (a read-only cache filled before is used as it is)."""
    data = json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n"
    target = folder / spec.MANIFEST_NAME
    if target.is_file() and target.read_bytes() == data:
        return
    with cache_writer(target) as out:
        out.write(data)
