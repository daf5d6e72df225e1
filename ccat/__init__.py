"""ccat: balanced multimodal learning, CCAT and its baselines, trained from cached shards."""

__version__ = "0.1.0"
