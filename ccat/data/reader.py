"""Open a built dataset and iterate its decoded samples.

The manifest is the only source of dataset facts (classes, modalities, shapes, counts):
training code asks a :class:`BuiltDataset`, never a table of dataset names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from ccat.data import integrity, remote, spec
from ccat.data.kinds import decode_sample
from ccat.data.shardio import Sample
from ccat.errors import UserError

__all__ = ["BuiltDataset", "DatasetError", "Sample", "decode_sample", "open_dataset"]


class DatasetError(UserError, RuntimeError):
    """A built dataset is missing, unfinished, or does not follow the shard format."""


class BuiltDataset:
    """A finished build on the local disk: its manifest and its shards, each shard's
    membership known (:func:`~ccat.data.integrity.with_membership`) so every read checks it."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = integrity.with_membership(root, manifest)

    @property
    def name(self) -> str:
        return self.manifest["dataset"]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def modalities(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest["modalities"])

    @property
    def splits(self) -> list[str]:
        known = [s for s in spec.SPLIT_NAMES if s in self.manifest["splits"]]
        return known + sorted(set(self.manifest["splits"]) - set(known))

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def num_samples(self, split: str) -> int:
        spec.shards_of(self.manifest, split)
        return self.manifest["splits"][split]["num_samples"]

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s.name for s in spec.shards_of(self.manifest, split)]

    def iter_samples(self, split: str) -> Iterator[Sample]:
        """Decoded samples of ``split`` in shard order; a shard holding other samples or
        labels than its membership, or a sample that fails to decode, is a
        :class:`~ccat.data.integrity.ShardError` naming the shard and the key."""
        for shard in spec.shards_of(self.manifest, split):
            for _, key, members in integrity.read_shard(self.root, shard):
                yield integrity.decode_checked(self.root, shard.name, key, members,
                                               self.modalities)


def open_dataset(path: str | Path, cache_dir: str | Path | None = None) -> BuiltDataset:
    """Open the built dataset at ``path``: a folder holding ``manifest.json``, or a URL
    (``file://``, ``http(s)://``, ``s3://``, ``gs://``: :mod:`ccat.data.transport`) whose
    shards are fetched into ``cache_dir`` (default ``$CCAT_CACHE_DIR`` or
    ``~/.cache/ccat/shards``) and verified first."""
    try:
        if remote.is_remote(path):
            root = remote.materialize(str(path), Path(cache_dir) if cache_dir else None)
        else:
            root = Path(path)
        return BuiltDataset(root, spec.load_manifest(root))
    except (spec.SpecError, remote.RemoteError) as err:
        raise DatasetError(str(err)) from None
