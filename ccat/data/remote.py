"""Built datasets behind a URL: read the manifest first, fetch shards into a local cache.

``http(s)://`` uses the standard library; any other scheme (``s3://``, ``gs://``, ...) goes
through fsspec and its backend, installed as optional extras. A manifest is data, not
instructions: :func:`ccat.data.spec.check_manifest` refuses shard names that are not plain
file names, so a server cannot make the toolkit run a command or read outside the dataset.
Every fetched shard is checked against the manifest's size and sha256 before it is used,
and a cached shard whose bytes changed is fetched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from ccat.data import spec

TIMEOUT_S = 60
CHUNK = 1 << 20
CACHE_ENV = "CCAT_CACHE_DIR"


class RemoteError(RuntimeError):
    """A remote dataset cannot be read; the message names the URL and the fix."""


def is_remote(location: str | Path) -> bool:
    return "://" in str(location)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ccat" / "shards")


def _url(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _open(url: str) -> Any:
    """A readable binary stream for ``url``; RemoteError naming it when it cannot be opened."""
    try:
        if url.startswith(("http://", "https://")):
            return urllib.request.urlopen(url, timeout=TIMEOUT_S)
        import fsspec

        return fsspec.open(url, "rb").open()
    except ImportError as err:
        raise RemoteError(f"reading {url} needs fsspec and the backend for its scheme "
                          f"({err.name} is missing): pip install fsspec plus e.g. s3fs or gcsfs"
                          ) from None
    except urllib.error.HTTPError as err:
        raise RemoteError(f"{url} answered HTTP {err.code} ({err.reason}); check the URL "
                          "and that the whole build was uploaded") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise RemoteError(f"cannot reach {url} ({reason}); check the address and the "
                          "network") from None


def load_manifest(base: str) -> dict[str, Any]:
    """Fetch and check ``<base>/manifest.json``."""
    url = _url(base, spec.MANIFEST_NAME)
    with _open(url) as stream:
        data = stream.read()
    try:
        manifest = json.loads(data.decode("utf-8"))
        spec.check_manifest(manifest, url)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise RemoteError(f"{url} is not a spec v{spec.SPEC_VERSION} manifest ({err})") from None
    except spec.SpecError as err:
        raise RemoteError(str(err)) from None
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_shard(base: str, shard: spec.ShardInfo, folder: Path) -> Path:
    """``folder/<shard>``, verified against the manifest; fetched when absent or changed."""
    target = folder / shard.name
    if target.is_file() and target.stat().st_size == shard.bytes and _sha256(target) == shard.sha256:
        return target
    url = _url(base, shard.name)
    tmp = target.with_name(f"{shard.name}.{os.getpid()}.part")
    digest, size = hashlib.sha256(), 0
    try:
        with _open(url) as stream, open(tmp, "wb") as out:
            for block in iter(lambda: stream.read(CHUNK), b""):
                digest.update(block)
                size += len(block)
                out.write(block)
    except (OSError, TimeoutError) as err:
        tmp.unlink(missing_ok=True)
        raise RemoteError(f"fetching {url} broke off ({err}); try again") from None
    if size != shard.bytes or digest.hexdigest() != shard.sha256:
        tmp.unlink(missing_ok=True)
        what = f"{size} bytes, the manifest says {shard.bytes}" if size != shard.bytes \
            else "its sha256 differs from the manifest's"
        raise RemoteError(f"{url} is truncated or corrupted ({what}); re-upload the shard "
                          "or rebuild the dataset")
    os.replace(tmp, target)
    return target


def materialize(base: str, cache_dir: Path | None = None,
                on_shard: Callable[[str], None] | None = None) -> Path:
    """A local, verified copy of the remote build at ``base``, reused across runs.

    The copy lives in ``cache_dir/<fingerprint>``: builds with other parameters never mix.
    """
    manifest = load_manifest(base)
    if not re.fullmatch(r"[0-9a-f]{64}", str(manifest["fingerprint"])):
        raise RemoteError(f"{_url(base, spec.MANIFEST_NAME)} has fingerprint "
                          f"{manifest['fingerprint']!r}, not a sha256; rebuild the dataset")
    folder = (cache_dir or default_cache_dir()) / manifest["fingerprint"]
    folder.mkdir(parents=True, exist_ok=True)
    for split in manifest["splits"]:
        for shard in spec.shards_of(manifest, split):
            fetch_shard(base, shard, folder)
            if on_shard:
                on_shard(shard.name)
    tmp = folder / f"{spec.MANIFEST_NAME}.{os.getpid()}.part"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / spec.MANIFEST_NAME)
    return folder
