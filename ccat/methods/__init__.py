"""Training methods, all behind :class:`ccat.methods.base.Method`, chosen by name."""

from ccat.methods import (bigated, ccat, film, gblending, inforeg, joint, lfm, mla,  # noqa: F401
                          mmcosine, mmpareto, ogm_ge, pmr, qmf)  # (importing registers the methods)
from ccat.methods.base import METHODS, Method, Outputs, RunData, Stage, fuse_decisions

__all__ = ["METHODS", "Method", "Outputs", "RunData", "Stage", "fuse_decisions"]
