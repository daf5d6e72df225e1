"""Training methods, all behind :class:`ccat.methods.base.Method`, chosen by name."""

from ccat.methods import ccat, joint  # noqa: F401  (registers the methods)
from ccat.methods.base import METHODS, Method, Outputs, Stage, fuse_decisions

__all__ = ["METHODS", "Method", "Outputs", "Stage", "fuse_decisions"]
