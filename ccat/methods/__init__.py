"""Training methods, all behind :class:`ccat.methods.base.Method`, chosen by name."""

from ccat.methods import (agm, bigated, ccat, film, inforeg, joint, lfm, mla,  # noqa: F401
                          mmcosine, mmpareto, ogm_ge, pmr, qmf)  # (importing registers them)
from ccat.methods.base import METHODS, Method, Outputs, Stage, fuse_decisions

__all__ = ["METHODS", "Method", "Outputs", "Stage", "fuse_decisions"]
