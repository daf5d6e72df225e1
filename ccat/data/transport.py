"""One transport per URL scheme, each held to the same promises.

A transport reads one object (a manifest, a shard) at a URL. Whatever the scheme
(``file://``, ``http(s)://``, ``s3://``, ``gs://``), :meth:`Transport.stream` promises:

- a **deadline**: the whole request, from connecting to its last byte (every response
  head, redirect and retry), ends by :class:`Limits`' ``deadline_s`` (:class:`Deadline`);
- a **size cap**: an object whose announced size (HTTP's Content-Length, the store's
  object size, the file's size) is over the cap is refused before its body is read, and
  a body that runs past the cap is cut there and refused;
- a **redirect policy**: a redirect is followed only within the same scheme and host, or
  to a host ``CCAT_HTTP_REDIRECT_HOSTS`` allows (HTTP); an object store's endpoint is
  never followed elsewhere (s3, gs); a ``file://`` link may not leave its folder;
- the **rate**: a body slower on average than ``min_rate`` once ``stall_s`` has passed is
  given up on; no byte for ``stall_s`` ends the request;
- one sentence, a :class:`RemoteError`, naming the URL and the fix, for every failure.

Integrity against the manifest (size and sha256) is checked by whoever reads a shard
(:func:`ccat.data.remote.fetch_shard`, ``ccat-data verify``) over the bytes a transport
hands out; a transport never hands out more than the cap.

A transport holds one client for its scheme (:class:`Transports` keeps one per scheme),
shared by every request and safe to use from several threads at once: the shard cache is
filled in parallel over it.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import functools
import io
import math
import os
import ssl
import stat
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import httpx

from ccat.errors import UserError

CHUNK = 1 << 20  # bytes handed out per read of a stream
FSSPEC_BLOCK = 8 << 20  # bytes per ranged read of an fsspec object
MAX_REDIRECTS = 5
HTTP_SCHEMES = ("http", "https")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# URL scheme -> the extra of pyproject.toml that installs fsspec with its backend
FSSPEC_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class RemoteError(UserError, RuntimeError):
    """A remote dataset cannot be read; the message names the URL and the fix."""


@dataclass(frozen=True)
class Limits:
    """What one request may take, for every scheme; each field is also read from its
    environment variable (named CCAT_HTTP_* since HTTP came first; they hold for all)."""

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
    # CCAT_FETCH_PARALLEL: shards fetched at once into the cache, over one client
    parallel: int = 8

    @classmethod
    def from_env(cls) -> "Limits":
        """The defaults, overridden by whichever CCAT_HTTP_* variables are set."""
        values: dict[str, Any] = {}
        for name, env in ENV_NAMES.items():
            raw = os.environ.get(env, "")
            if raw:
                values[name] = raw if name == "redirect_hosts" else _seconds_or_rate(env, raw)
        for name in ("deadline_s", "connect_s", "stall_s"):
            if values.get(name) == 0:
                raise RemoteError(f"${ENV_NAMES[name]} is 0; a timeout must be above 0 seconds")
        raw = os.environ.get(PARALLEL_ENV, "")
        if raw:
            values["parallel"] = _parallel(raw)
        return cls(**values)

    def allows_redirect(self, source: httpx.URL, target: httpx.URL) -> bool:
        """A redirect keeps the scheme, and keeps the host and port or goes to an allowed host."""
        if target.scheme != source.scheme:
            return False
        if (target.host, target.port) == (source.host, source.port):
            return True
        patterns = [p.strip() for p in self.redirect_hosts.split(",") if p.strip()]
        return any(fnmatch.fnmatch(target.host, pattern) for pattern in patterns)


HttpLimits = Limits  # the name before every scheme was held to them
ENV_NAMES = {"deadline_s": "CCAT_HTTP_DEADLINE", "connect_s": "CCAT_HTTP_CONNECT_TIMEOUT",
             "stall_s": "CCAT_HTTP_STALL_TIMEOUT", "min_rate": "CCAT_HTTP_MIN_RATE",
             "redirect_hosts": "CCAT_HTTP_REDIRECT_HOSTS"}
PARALLEL_ENV = "CCAT_FETCH_PARALLEL"
MAX_PARALLEL = 256


def _seconds_or_rate(env: str, raw: str) -> float:
    """The number that variable ``env`` holds; RemoteError when it is not one, or negative."""
    try:
        value = float(raw)
    except ValueError:
        raise RemoteError(f"${env} is {raw!r}, not a number") from None
    if not 0 <= value < math.inf:
        raise RemoteError(f"${env} is {raw!r}; it must be a finite number, 0 or more")
    return value


def _parallel(raw: str) -> int:
    """The whole number $CCAT_FETCH_PARALLEL holds, 1 to MAX_PARALLEL."""
    if not raw.strip().isdigit() or not 1 <= int(raw) <= MAX_PARALLEL:
        raise RemoteError(f"${PARALLEL_ENV} is {raw!r}; it must be a whole number of "
                          f"requests at once, 1 to {MAX_PARALLEL}")
    return int(raw)


class Deadline:
    """The end of one request's total time (CCAT_HTTP_DEADLINE): connecting, every response
    head (any number of ``100 Continue``), redirects, retries and the whole body.

    httpx's and botocore's timeouts hold one socket read each, so a server that sends a
    header byte now and then, or 100 Continue after 100 Continue, never trips them; this
    holds their sum. Over HTTP every socket operation of the request is given at most the
    time left (:class:`_DeadlineBackend`), pooled connections included; fsspec's calls get
    the time left as their timeout; every scheme checks it between blocks.
    """

    def __init__(self, url: str, total_s: float):
        self.url, self.total_s = url, total_s
        self.end = time.monotonic() + total_s

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.remaining() <= 0

    def check(self) -> None:
        """Raise the deadline's error once the time is up."""
        if self.passed():
            raise self.error()

    def error(self) -> RemoteError:
        return RemoteError(f"{self.url} did not finish within {self.total_s:g} s in total "
                           "(connecting, response headers and body, retries included; "
                           "CCAT_HTTP_DEADLINE); check the server, or raise "
                           "CCAT_HTTP_DEADLINE for a slow link")


def oversize(url: str, size: int, max_bytes: int, what: str) -> RemoteError:
    """The sentence for an object whose announced size is over its cap."""
    return RemoteError(f"{url} announces {size} bytes, more than {max_bytes} ({what}); "
                       "check that the server holds this build")


def refused_redirect(url: str, target: str) -> RemoteError:
    return RemoteError(f"{url} redirects to {target}, another scheme or host; set "
                       "CCAT_HTTP_REDIRECT_HOSTS to allow that host, or use the final URL")


def missing(url: str) -> RemoteError:
    return RemoteError(f"{url} does not exist; check the URL and that the whole build was "
                       "uploaded")


class _Body(io.RawIOBase):
    """A response body read block by block: capped at ``max_bytes`` and held to the rate and
    the deadline."""

    def __init__(self, url: str, blocks: Iterator[bytes], max_bytes: int, limits: Limits,
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


class Transport:
    """Reads objects of one URL scheme through one client, shared by every request (and
    every thread); :meth:`stream` holds each to the promises of this module."""

    def __init__(self, limits: Limits):
        self.limits = limits

    @contextlib.contextmanager
    def stream(self, url: str, max_bytes: int, what: str = "the size the manifest gives it"
               ) -> Iterator[BinaryIO]:
        """A readable binary stream of ``url`` that refuses to go past ``max_bytes`` (``what``
        says why that is the cap); every failure is a RemoteError naming ``url``. The request,
        reading included, ends by its :class:`Deadline`."""
        deadline = Deadline(url, self.limits.deadline_s)
        with self.open(url, deadline) as (size, blocks):
            if size is not None and size > max_bytes:
                raise oversize(url, size, max_bytes, what)
            body = _Body(url, blocks, max_bytes, self.limits, what, deadline)
            with io.BufferedReader(body, CHUNK) as stream:
                yield stream

    def open(self, url: str, deadline: Deadline
             ) -> contextlib.AbstractContextManager[tuple[int | None, Iterator[bytes]]]:
        """The object's announced size (None when unknown) and its bytes as blocks."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the shared client."""


class FileTransport(Transport):
    """``file://``: a regular file, never a link out of its folder; the deadline and the rate
    are checked between blocks (a local read has no server to stall, but a network file
    system may)."""

    @contextlib.contextmanager
    def open(self, url: str, deadline: Deadline
             ) -> Iterator[tuple[int | None, Iterator[bytes]]]:
        path = file_path(url)
        resolved, folder = path.resolve(), path.parent.resolve()
        if not resolved.is_relative_to(folder):
            raise RemoteError(f"{url} is a link to {resolved}, outside its folder; copy the "
                              "file into the build or use the URL it leads to")
        try:
            if not stat.S_ISREG(path.stat().st_mode):  # before opening: a FIFO would block
                raise RemoteError(f"{url} is not a regular file; copy the file into the "
                                  "build")
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise missing(url) from None
        except OSError as err:
            raise RemoteError(f"cannot read {url} ({err.strerror or err}); check the path "
                              "and its permissions") from None
        with f:
            yield os.fstat(f.fileno()).st_size, self._blocks(url, f, deadline)

    @staticmethod
    def _blocks(url: str, f: BinaryIO, deadline: Deadline) -> Iterator[bytes]:
        while True:
            deadline.check()
            try:
                block = f.read(CHUNK)
            except OSError as err:
                raise RemoteError(f"cannot read {url} ({err.strerror or err}); check the "
                                  "disk it is on") from None
            if not block:
                return
            yield block


def file_path(url: str) -> Path:
    """The local path of a ``file://`` URL (``file:///abs/path`` or ``file://localhost/...``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise RemoteError(f"{url} names host {parts.netloc!r}; a file:// URL reads this "
                          "machine, use file:///path")
    return Path(urllib.request.url2pathname(parts.path))


# -- http(s) -----------------------------------------------------------------------------

# The deadline of the request running in this thread (or context), read by every socket
# operation of the shared connection pool.
_CURRENT: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "ccat_deadline", default=None)


def _bounded(timeout: float | None, timed_out: type[Exception]) -> float | None:
    """``timeout`` cut to the time the current request's deadline leaves; ``timed_out`` at
    once when none is left."""
    deadline = _CURRENT.get()
    if deadline is None:
        return timeout
    left = deadline.remaining()
    if left <= 0:
        raise timed_out("the total deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream:
    """A network stream whose every read, write and TLS handshake ends by the deadline of
    the request using it, whichever request that is (connections are pooled)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        import httpcore

        return self.inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        import httpcore

        return self.inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> "_DeadlineStream":
        import httpcore

        return _DeadlineStream(self.inner.start_tls(
            ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class _DeadlineBackend:
    """httpcore's synchronous network backend, its streams held to the current deadline."""

    def __init__(self) -> None:
        import httpcore

        self.inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options: Any = None) -> Any:
        import httpcore

        return _DeadlineStream(self.inner.connect_tcp(
            host, port, _bounded(timeout, httpcore.ConnectTimeout), local_address,
            socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> Any:
        import httpcore

        return _DeadlineStream(self.inner.connect_unix_socket(
            path, _bounded(timeout, httpcore.ConnectTimeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def _httpx_error(err: Exception, request: httpx.Request) -> httpx.HTTPError:
    """httpcore's exception as the httpx exception of the same name (httpx's own transport
    does the same mapping)."""
    import httpcore

    for source, target in ((httpcore.ConnectTimeout, httpx.ConnectTimeout),
                           (httpcore.ReadTimeout, httpx.ReadTimeout),
                           (httpcore.WriteTimeout, httpx.WriteTimeout),
                           (httpcore.PoolTimeout, httpx.PoolTimeout),
                           (httpcore.ConnectError, httpx.ConnectError),
                           (httpcore.ReadError, httpx.ReadError),
                           (httpcore.WriteError, httpx.WriteError),
                           (httpcore.ProxyError, httpx.ProxyError),
                           (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
                           (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
                           (httpcore.LocalProtocolError, httpx.LocalProtocolError),
                           (httpcore.TimeoutException, httpx.TimeoutException),
                           (httpcore.NetworkError, httpx.NetworkError)):
        if isinstance(err, source):
            return target(str(err) or type(err).__name__, request=request)
    return httpx.TransportError(str(err) or type(err).__name__, request=request)


class _Raw(httpx.SyncByteStream):
    """httpcore's response body, its errors as httpx's."""

    def __init__(self, stream: Any, request: httpx.Request):
        self.stream, self.request = stream, request

    def __iter__(self) -> Iterator[bytes]:
        import httpcore

        try:
            yield from self.stream
        except httpcore.TimeoutException as err:
            raise _httpx_error(err, self.request) from err
        except (httpcore.NetworkError, httpcore.ProtocolError) as err:
            raise _httpx_error(err, self.request) from err

    def close(self) -> None:
        self.stream.close()


class _PooledTransport(httpx.BaseTransport):
    """One connection pool (and one per proxy from the environment, as httpx reads
    $HTTP_PROXY, $HTTPS_PROXY and $NO_PROXY) whose sockets keep to each request's deadline."""

    def __init__(self, max_connections: int):
        import httpcore

        pool = dict(ssl_context=_tls_context(), max_connections=max_connections,
                    network_backend=_DeadlineBackend())
        self.direct = httpcore.ConnectionPool(**pool)
        self.proxied = {scheme: httpcore.HTTPProxy(proxy_url=url, **pool)
                        for scheme, url in urllib.request.getproxies_environment().items()
                        if scheme in HTTP_SCHEMES}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        import httpcore

        pool = self.proxied.get(request.url.scheme, self.direct)
        if pool is not self.direct and urllib.request.proxy_bypass_environment(
                request.url.host):
            pool = self.direct
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions)
        try:
            response = pool.handle_request(core)
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
                httpcore.UnsupportedProtocol, httpcore.ProxyError) as err:
            raise _httpx_error(err, request) from err
        return httpx.Response(status_code=response.status, headers=response.headers,
                              stream=_Raw(response.stream, request),
                              extensions=response.extensions)

    def close(self) -> None:
        self.direct.close()
        for pool in self.proxied.values():
            pool.close()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default certificate checks (certifi, or $SSL_CERT_FILE / $SSL_CERT_DIR), built
    once: loading the CA bundle costs about 17 ms."""
    return httpx.create_ssl_context()


class HttpTransport(Transport):
    """``http(s)://`` through one httpx client over one connection pool (as many connections
    as ``limits.parallel``), redirects checked by :meth:`Limits.allows_redirect`."""

    def __init__(self, limits: Limits):
        super().__init__(limits)
        # identity: the bytes hashed are the bytes of the file, never a server's re-encoding
        self.client = httpx.Client(transport=_PooledTransport(limits.parallel),
                                   follow_redirects=False,
                                   headers={"Accept-Encoding": "identity"})

    @contextlib.contextmanager
    def open(self, url: str, deadline: Deadline
             ) -> Iterator[tuple[int | None, Iterator[bytes]]]:
        token = _CURRENT.set(deadline)
        try:
            response = self._follow(url, deadline)
            try:
                length = response.headers.get("content-length", "")
                yield (int(length) if length.isdigit() else None,
                       self._translated(url, response.iter_raw(), deadline))
            finally:
                response.close()
        finally:
            _CURRENT.reset(token)

    def close(self) -> None:
        self.client.close()

    def _request(self, url: httpx.URL, deadline: Deadline) -> httpx.Request:
        """A GET of ``url`` whose connect timeout ends by the deadline."""
        deadline.check()
        connect = min(self.limits.connect_s, deadline.remaining())
        timeout = httpx.Timeout(connect=connect, read=self.limits.stall_s,
                                write=self.limits.stall_s, pool=connect)
        return self.client.build_request("GET", url, timeout=timeout)

    def _follow(self, url: str, deadline: Deadline) -> httpx.Response:
        """The final response of a GET of ``url``, following only redirects the limits
        allow."""
        current = httpx.URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = self.client.send(self._request(current, deadline), stream=True)
            except httpx.HTTPError as err:
                raise self._error(str(current), err, deadline) from None
            if not response.is_redirect:
                if response.status_code == 200:
                    return response
                response.close()
                raise RemoteError(f"{current} answered HTTP {response.status_code} "
                                  f"({response.reason_phrase}); check the URL and that the "
                                  "whole build was uploaded")
            target = response.next_request.url if response.next_request else None
            response.close()
            if target is None or not self.limits.allows_redirect(current, target):
                raise refused_redirect(str(current), str(target))
            current = target
        raise RemoteError(f"{url} redirects more than {MAX_REDIRECTS} times; use the final URL")

    def _translated(self, url: str, blocks: Iterator[bytes],
                    deadline: Deadline) -> Iterator[bytes]:
        """``blocks``, with httpx's errors turned into RemoteErrors naming ``url``."""
        try:
            yield from blocks
        except httpx.HTTPError as err:
            raise self._error(url, err, deadline) from None

    def _error(self, url: str, err: httpx.HTTPError, deadline: Deadline) -> RemoteError:
        if deadline.passed():  # a socket operation was cut at the deadline: that is why
            return deadline.error()
        if isinstance(err, httpx.ConnectTimeout):
            return RemoteError(f"cannot reach {url} (no connection within "
                               f"{self.limits.connect_s:g} s, CCAT_HTTP_CONNECT_TIMEOUT); "
                               "check the address and the network")
        if isinstance(err, httpx.TimeoutException):
            return RemoteError(f"{url} sent no byte for {self.limits.stall_s:g} s "
                               "(CCAT_HTTP_STALL_TIMEOUT); try again or use another mirror")
        if isinstance(err, (httpx.ConnectError, httpx.UnsupportedProtocol)):
            return RemoteError(f"cannot reach {url} ({err}); check the address and the "
                               "network")
        return RemoteError(f"fetching {url} broke off ({err}); try again")


# -- fsspec: s3, gs and other object stores ----------------------------------------------

class RedirectRefused(Exception):
    """An object store's endpoint answered with a redirect, which is not followed."""

    def __init__(self, source: str, target: str):
        super().__init__(source, target)
        self.source, self.target = source, target


@functools.cache
def _no_redirect_session() -> type:
    """aiobotocore's aiohttp session, with every request sent ``allow_redirects=False`` and
    a 3xx answer refused: aiohttp follows redirects to any host by default, and botocore
    signs each request for its endpoint, so a redirect is never S3's own answer."""
    from aiobotocore.httpsession import AIOHTTPSession

    class Unfollowed:
        def __init__(self, session: Any):
            self.session = session

        async def request(self, method: str, url: Any, **kwargs: Any) -> Any:
            response = await self.session.request(method, url, allow_redirects=False,
                                                  **kwargs)
            if response.status in REDIRECT_STATUSES:
                response.release()
                raise RedirectRefused(str(url), response.headers.get("Location", "?"))
            return response

    class NoRedirectSession(AIOHTTPSession):
        async def _get_session(self, proxy_url: Any) -> Any:
            return Unfollowed(await super()._get_session(proxy_url))

    return NoRedirectSession


@functools.cache
def _refuse_redirects() -> Any:
    """An aiohttp trace that stops a redirect before it is followed (gcsfs's session)."""
    import aiohttp

    async def on_redirect(session: Any, context: Any, params: Any) -> None:
        raise RedirectRefused(str(params.url), params.response.headers.get("Location", "?"))

    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(on_redirect)
    return trace


def _backend_options(scheme: str, limits: Limits) -> dict[str, Any]:
    """The fsspec storage options that hold a backend to ``limits``: for s3 botocore's
    connect and read timeouts, per attempt (botocore and s3fs retry on their own, within
    the deadline), a pool as large as the parallel fetches, and no redirect followed; for
    gs no redirect followed (gcsfs keeps its own timeouts). The deadline, the size cap
    and the rate hold for every backend."""
    if scheme in ("s3", "s3a"):
        # the endpoint botocore would read from the environment, named so that fsspec's
        # cached instance (one per options) follows a change of it
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {**({"endpoint_url": endpoint} if endpoint else {}), "config_kwargs": {
            "connect_timeout": min(limits.connect_s, limits.deadline_s),
            "read_timeout": min(limits.stall_s, limits.deadline_s),
            "max_pool_connections": max(limits.parallel, 10),
            "http_session_cls": _no_redirect_session()}}
    if scheme in ("gs", "gcs"):
        return {"session_kwargs": {"trace_configs": [_refuse_redirects()]}}
    return {}


def missing_backend(url: str) -> str:
    """The sentence for a URL whose fsspec backend is not installed: the extra to install."""
    scheme = url.split("://", 1)[0]
    extra = FSSPEC_EXTRAS.get(scheme)
    fix = (f'pip install "ccat[{extra}]"' if extra else
           f'pip install "ccat[remote]" and the fsspec backend for {scheme}://')
    return f"reading {url} needs fsspec and its {scheme}:// backend, not installed here; {fix}"


class FsspecTransport(Transport):
    """``s3://``, ``gs://`` and any other fsspec scheme through one file system instance for
    the scheme: its size from the store, its bytes as ranged reads of FSSPEC_BLOCK, each
    call given the time the deadline leaves."""

    def __init__(self, scheme: str, limits: Limits, url: str):
        super().__init__(limits)
        try:
            import fsspec

            # fsspec keeps one instance per scheme and options, so runs in one process
            # share its client too (making one costs seconds: botocore loads its models)
            self.fs = fsspec.filesystem(scheme, **_backend_options(scheme, limits))
        except ImportError:
            raise RemoteError(missing_backend(url)) from None
        except Exception as err:  # noqa: BLE001 - each backend raises its own errors
            raise RemoteError(f"cannot read {url} ({type(err).__name__}: {err}); check the "
                              "URL, the endpoint and the credentials") from None

    @contextlib.contextmanager
    def open(self, url: str, deadline: Deadline
             ) -> Iterator[tuple[int | None, Iterator[bytes]]]:
        path = self.fs._strip_protocol(url)  # fsspec's own parse of its URLs
        size = self._call(url, deadline, "info", path).get("size")
        yield size, self._ranges(url, deadline, path, size)

    def _ranges(self, url: str, deadline: Deadline, path: str,
                size: int | None) -> Iterator[bytes]:
        """The bytes of ``path``, FSSPEC_BLOCK at a time, up to its size (and one block
        past a size the store did not give, for the cap to see)."""
        offset, end = 0, math.inf if size is None else size
        while offset < end:
            block = self._call(url, deadline, "cat_file", path, start=offset,
                               end=int(min(offset + FSSPEC_BLOCK, end)))
            if not block:
                return
            yield block
            offset += len(block)

    def _call(self, url: str, deadline: Deadline, method: str, *args: Any,
              **kwargs: Any) -> Any:
        """``fs.method(*args, **kwargs)``, given the time the deadline leaves: fsspec cancels
        an async backend's call (s3, gs), retries and all, at its ``timeout``; a sync
        backend's calls are checked between blocks only."""
        import fsspec.exceptions

        deadline.check()
        if getattr(self.fs, "async_impl", False):
            kwargs["timeout"] = deadline.remaining()
        try:
            return getattr(self.fs, method)(*args, **kwargs)
        except FileNotFoundError:
            raise missing(url) from None
        except fsspec.exceptions.FSTimeoutError:
            raise deadline.error() from None
        except Exception as err:  # noqa: BLE001 - each backend raises its own errors
            raise self._error(url, err, deadline) from None

    def _error(self, url: str, err: Exception, deadline: Deadline) -> RemoteError:
        """One sentence for a backend's error, with the time it took in all."""
        if deadline.passed():
            return deadline.error()
        redirect = _cause(err, RedirectRefused)
        if redirect is not None:
            return refused_redirect(url, redirect.target)
        if _is_timeout(err):
            spent = deadline.total_s - deadline.remaining()
            stated = math.floor(spent * 10) / 10  # rounded down: never more than was spent
            return RemoteError(f"{url} did not answer within the timeouts on any attempt "
                               f"({self.limits.connect_s:g} s to connect, "
                               f"CCAT_HTTP_CONNECT_TIMEOUT; {self.limits.stall_s:g} s "
                               f"without a byte, CCAT_HTTP_STALL_TIMEOUT; "
                               f"{type(err).__name__}; {stated:.1f} s in all, retries "
                               "included); check the endpoint and the network")
        return RemoteError(f"cannot read {url} ({type(err).__name__}: {err}); check the URL, "
                           "the endpoint and the credentials")


def _cause(err: BaseException, kind: type[BaseException]) -> Any:
    """The ``kind`` exception that ``err`` wraps, if any: through ``__cause__``,
    ``__context__`` and botocore's ``kwargs['error']``."""
    seen: set[int] = set()
    todo: list[Any] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        todo += [current.__cause__, current.__context__,
                 (getattr(current, "kwargs", None) or {}).get("error")]
    return None


def _is_timeout(err: Exception) -> bool:
    """botocore's ConnectTimeoutError and ReadTimeoutError (by type, not by name)."""
    try:
        from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
    except ImportError:
        return isinstance(err, TimeoutError)
    return isinstance(err, (ConnectTimeoutError, ReadTimeoutError, TimeoutError))


# -- one transport per scheme ------------------------------------------------------------

class Transports:
    """One :class:`Transport` per URL scheme, made when first needed and shared by every
    request and thread until :meth:`close`."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits.from_env()
        self._made: dict[str, Transport] = {}
        self._lock = threading.Lock()

    def for_url(self, url: str) -> Transport:
        scheme = url.split("://", 1)[0].lower()
        with self._lock:
            if scheme not in self._made:
                self._made[scheme] = self._make(scheme, url)
            return self._made[scheme]

    def _make(self, scheme: str, url: str) -> Transport:
        if scheme == "file":
            return FileTransport(self.limits)
        if scheme in HTTP_SCHEMES:
            return HttpTransport(self.limits)
        return FsspecTransport(scheme, self.limits, url)

    def stream(self, url: str, max_bytes: int, what: str = "the size the manifest gives it"
               ) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.for_url(url).stream(url, max_bytes, what)

    def close(self) -> None:
        with self._lock:
            for transport in self._made.values():
                transport.close()
            self._made.clear()

    def __enter__(self) -> "Transports":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def open_stream(url: str, max_bytes: int, what: str = "the size the manifest gives it",
                limits: Limits | None = None) -> Iterator[BinaryIO]:
    """One stream of ``url`` (:meth:`Transport.stream`) over a client made for it alone;
    many requests share a :class:`Transports`."""
    with Transports(limits) as transports, transports.stream(url, max_bytes, what) as stream:
        yield stream
