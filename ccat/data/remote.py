"""Built datasets behind a URL: read the manifest first, fetch shards into a local cache.

Every URL is read through :mod:`ccat.data.transport`, one transport per scheme
(``file://``, ``http(s)://``, ``s3://``, ``gs://``, ...) with the same promises: a total
deadline per request, size caps (a manifest at :data:`ccat.data.spec.MANIFEST_MAX_BYTES`,
a shard at the size the manifest gives it), the redirect policy and the minimum rate. A
manifest is data, not instructions: :func:`ccat.data.spec.check_manifest` refuses shard
names that are not plain file names, so a server cannot make the toolkit run a command or
read outside the dataset. Every fetched shard is checked against the manifest's size and
sha256 before it is used, and a cached shard whose bytes changed is fetched again. Shards
are fetched ``Limits.parallel`` at a time (``CCAT_FETCH_PARALLEL``) over one shared client
per scheme.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from ccat import fileio
from ccat.data import spec
from ccat.data.transport import (  # noqa: F401 - the names callers import from here
    CHUNK, ENV_NAMES, FSSPEC_EXTRAS, PARALLEL_ENV, Deadline, HttpLimits, Limits, RemoteError,
    Transports, missing_backend, open_stream)

CACHE_ENV = "CCAT_CACHE_DIR"


def is_remote(location: str | Path) -> bool:
    return "://" in str(location)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ccat" / "shards")


def url_of(base: str, name: str) -> str:
    """The URL of file ``name`` of the build at ``base``."""
    return base.rstrip("/") + "/" + name


def load_manifest(base: str, transports: Transports | None = None) -> dict[str, Any]:
    """Fetch and check ``<base>/manifest.json`` (at most MANIFEST_MAX_BYTES of it)."""
    url = url_of(base, spec.MANIFEST_NAME)
    with contextlib.ExitStack() as stack:
        if transports is None:
            transports = stack.enter_context(Transports())
        with transports.stream(url, spec.MANIFEST_MAX_BYTES,
                               "the cap on a manifest's size") as stream:
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
                transports: Transports) -> Path:
    """``folder/<shard>``, verified against the manifest; fetched when absent or changed."""
    target = folder / shard.name
    if (target.is_file() and target.stat().st_size == shard.bytes
            and spec.file_sha256(target) == shard.sha256):
        return target
    url = url_of(base, shard.name)
    digest, size = hashlib.sha256(), 0
    with cache_writer(target) as out, transports.stream(url, shard.bytes) as stream:
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


def fetch_shards(base: str, shards: list[spec.ShardInfo], folder: Path,
                 transports: Transports,
                 on_shard: Callable[[str], None] | None = None) -> None:
    """Every shard of ``shards`` into ``folder`` (:func:`fetch_shard`), ``parallel`` at a
    time over the shared transports. On failures the shards not yet started are dropped,
    those running end (each by its deadline), and the error raised is that of the first
    failing shard in manifest order, whatever the timing: the one a serial fetch would
    have raised."""
    parallel = transports.limits.parallel
    with concurrent.futures.ThreadPoolExecutor(parallel, "ccat-fetch") as pool:
        futures = [pool.submit(fetch_shard, base, shard, folder, transports)
                   for shard in shards]
        try:
            for future in concurrent.futures.as_completed(futures):
                if future.exception() is not None:
                    break
                if on_shard:
                    on_shard(future.result().name)
        finally:  # a failure, or an interrupt: start nothing more
            pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()


def materialize(base: str, cache_dir: Path | None = None,
                on_shard: Callable[[str], None] | None = None) -> Path:
    """A local, verified copy of the remote build at ``base``, reused across runs.

    The copy lives in ``cache_dir/<fingerprint>``: builds with other parameters never mix.
    """
    with Transports() as transports:
        manifest = load_manifest(base, transports)
        folder = cache_folder(manifest, cache_dir)
        shards = [shard for split in manifest["splits"]
                  for shard in spec.shards_of(manifest, split)]
        fetch_shards(base, shards, folder, transports, on_shard)
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
