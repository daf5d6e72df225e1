"""Training methods, all behind :class:`ccat.methods.base.Method`, chosen by name."""

from ccat.methods import (bigated, ccat, film, inforeg, joint, lfm, mla, mmcosine,  # noqa: F401
                          mmpareto, ogm_ge, pmr, qmf, valuation)  # (importing registers them)
from ccat.methods.base import METHODS, Method, Outputs, RunData, Stage, fuse_decisions

__all__ = ["METHODS", "Method", "Outputs", "RunData", "Stage", "fuse_decisions"]
