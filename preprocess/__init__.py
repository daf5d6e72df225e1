"""Raw media -> WebDataset shards of cached features (the ``ccat-data`` CLI); CPU only.

This package imports only :mod:`ccat.data.spec` from ``ccat``: the format is the contract.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ccat")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
