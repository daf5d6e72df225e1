"""ccat: balanced multimodal learning, CCAT and its baselines, trained from cached shards."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ccat")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
