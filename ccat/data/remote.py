"""Built datasets behind a URL: read the manifest first, fetch shards into a local cache.

``http(s)://`` goes through httpx, held to :class:`HttpLimits`: a connect timeout, a stall
timeout (no byte for that long), a minimum average rate, redirects only within the same
scheme and host, and a body cut and refused at the size the manifest gives it (a manifest
at :data:`ccat.data.spec.MANIFEST_MAX_BYTES`). Any other scheme (``s3://``, ``gs://``,
...) goes through fsspec and its backend, installed as optional extras, held to the same
size caps and rate. A manifest is data, not instructions: :func:`ccat.data.spec.check_manifest`
refuses shard names that are not plain file names, so a server cannot make the toolkit
run a command or read outside the dataset. Every fetched shard is checked against the
manifest's size and sha256 before it is used, and a cached shard whose bytes changed is
fetched again.
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
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import httpx

from ccat.data import spec
from ccat.errors import UserError

CHUNK = 1 << 20
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
        for name in ("connect_s", "stall_s"):
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


ENV_NAMES = {"connect_s": "CCAT_HTTP_CONNECT_TIMEOUT", "stall_s": "CCAT_HTTP_STALL_TIMEOUT",
             "min_rate": "CCAT_HTTP_MIN_RATE", "redirect_hosts": "CCAT_HTTP_REDIRECT_HOSTS"}


def _seconds_or_rate(env: str, raw: str) -> float:
    """The number that variable ``env`` holds; RemoteError when it is not one, or negative."""
    try:
        value = float(raw)
    except ValueError:
        raise RemoteError(f"${env} is {raw!r}, not a number") from None
    if not 0 <= value < math.inf:
        raise RemoteError(f"${env} is {raw!r}; it must be a finite number, 0 or more")
    return value


def is_remote(location: str | Path) -> bool:
    return "://" in str(location)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ccat" / "shards")


def url_of(base: str, name: str) -> str:
    """The URL of file ``name`` of the build at ``base``."""
    return base.rstrip("/") + "/" + name


class _Body(io.RawIOBase):
    """A response body read block by block: capped at ``max_bytes`` and held to the rate."""

    def __init__(self, url: str, blocks: Iterator[bytes], max_bytes: int, limits: HttpLimits,
                 what: str):
        super().__init__()
        self.url, self.blocks, self.max_bytes, self.limits, self.what = (
            url, blocks, max_bytes, limits, what)
        self.received, self.started, self.pending = 0, time.monotonic(), memoryview(b"")
        self.over = False  # the body went past max_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.pending:
            if self.over:
                raise self._too_long()
            block = next(self.blocks, b"")
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
    says why that is the cap); every failure is a RemoteError naming ``url``."""
    limits = limits or HttpLimits.from_env()
    opener = _http_blocks if url.startswith(HTTP_SCHEMES) else _fsspec_blocks
    with opener(url, max_bytes, limits) as blocks:
        with io.BufferedReader(_Body(url, blocks, max_bytes, limits, what), CHUNK) as stream:
            yield stream


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default certificate checks (certifi, or $SSL_CERT_FILE / $SSL_CERT_DIR), built
    once: loading the CA bundle costs about 17 ms, which a new client per shard paid again."""
    return httpx.create_ssl_context()


@contextlib.contextmanager
def _http_blocks(url: str, max_bytes: int, limits: HttpLimits) -> Iterator[Iterator[bytes]]:
    """The raw body of a GET of ``url`` (redirects checked), as blocks."""
    timeout = httpx.Timeout(connect=limits.connect_s, read=limits.stall_s,
                            write=limits.stall_s, pool=limits.connect_s)
    # identity: the bytes hashed are the bytes of the file, never a server's re-encoding
    with httpx.Client(timeout=timeout, follow_redirects=False, verify=_tls_context(),
                      headers={"Accept-Encoding": "identity"}) as client:
        response = _follow(client, url, limits)
        try:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise RemoteError(f"{url} announces {length} bytes, more than {max_bytes}; "
                                  "check that the server holds this build")
            yield _translated(url, response.iter_raw(), limits)
        finally:
            response.close()


def _follow(client: httpx.Client, url: str, limits: HttpLimits) -> httpx.Response:
    """The final response of a GET of ``url``, following only redirects ``limits`` allows."""
    current = httpx.URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        try:
            response = client.send(client.build_request("GET", current), stream=True)
        except httpx.HTTPError as err:
            raise _http_error(str(current), err, limits) from None
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


def _translated(url: str, blocks: Iterator[bytes], limits: HttpLimits) -> Iterator[bytes]:
    """``blocks``, with httpx's errors turned into RemoteErrors naming ``url``."""
    try:
        yield from blocks
    except httpx.HTTPError as err:
        raise _http_error(url, err, limits) from None


def _http_error(url: str, err: httpx.HTTPError, limits: HttpLimits) -> RemoteError:
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
def _fsspec_blocks(url: str, max_bytes: int, limits: HttpLimits) -> Iterator[Iterator[bytes]]:
    """The object at an fsspec ``url`` as blocks; its backend's errors name ``url``."""
    try:
        import fsspec

        handle = fsspec.open(url, "rb", **_backend_limits(url, limits)).open()
    except ImportError:
        raise RemoteError(missing_backend(url)) from None
    except FileNotFoundError:
        raise RemoteError(f"{url} does not exist; check the URL and that the whole build "
                          "was uploaded") from None
    except Exception as err:  # noqa: BLE001 - each backend raises its own errors
        if "Timeout" in type(err).__name__:  # botocore's ReadTimeoutError, ConnectTimeoutError
            raise RemoteError(f"{url} did not answer within the timeouts "
                              f"({limits.connect_s:g} s to connect, CCAT_HTTP_CONNECT_TIMEOUT; "
                              f"{limits.stall_s:g} s without a byte, CCAT_HTTP_STALL_TIMEOUT; "
                              f"{type(err).__name__}); check the endpoint and the network"
                              ) from None
        raise RemoteError(f"cannot read {url} ({type(err).__name__}: {err}); check the URL, "
                          "the endpoint and the credentials") from None
    with handle:
        yield _fsspec_reads(url, handle)


def _backend_limits(url: str, limits: HttpLimits) -> dict[str, Any]:
    """The fsspec storage options that hold a backend to ``limits``: botocore's connect and
    read timeouts for s3 (per attempt; botocore and s3fs retry a few times on their own).
    Other backends keep their own timeouts; the minimum rate holds for all of them."""
    if url.split("://", 1)[0] in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": limits.connect_s,
                                  "read_timeout": limits.stall_s}}
    return {}


def _fsspec_reads(url: str, handle: Any) -> Iterator[bytes]:
    try:
        yield from iter(lambda: handle.read(CHUNK), b"")
    except Exception as err:  # noqa: BLE001 - each backend raises its own errors
        raise RemoteError(f"reading {url} broke off ({type(err).__name__}: {err}); try again"
                          ) from None


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
    otherwise; a failed write is a RemoteError naming the cache."""
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as out:
            yield out
        os.replace(tmp, target)
    except OSError as err:
        _remove(tmp)
        raise cache_error(target.parent, err) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


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
