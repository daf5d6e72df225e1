"""Raw media -> WebDataset shards of cached features (the ``ccat-data`` CLI); CPU only.

From ``ccat`` this package imports only :mod:`ccat.data` (the format is the contract; the
remote reader serves verify and info) and :mod:`ccat.errors` (the user-error base class).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ccat")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
