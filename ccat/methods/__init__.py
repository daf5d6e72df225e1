"""Training methods, all behind :class:`ccat.methods.base.Method`, chosen by name."""

from ccat.methods import (agm, bigated, ccat, film, gblending, greedy, inforeg, joint, lfm,  # noqa: F401
                          mla, mmcosine, mmpareto, ogm_ge, pmr, qmf, reconboost, relearning,
                          umt, valuation)  # (importing registers the methods)
from ccat.methods import arl, aug, dgl, remix  # noqa: F401  (issue 26's 2025 methods)
from ccat.methods import amco, cml, mbsd, opg, opm  # noqa: F401  (issue 26)
from ccat.methods.base import METHODS, Method, Outputs, RunData, Stage, fuse_decisions

__all__ = ["METHODS", "Method", "Outputs", "RunData", "Stage", "fuse_decisions"]
