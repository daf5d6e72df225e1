"""The designs of the built-in synthetic data: which accuracies can separate methods.

`ccat-data synth cremad|ks --design NAME` picks one; `--easy-reliability` and
`--hard-strength` override its values. Why each value, and what they measure, is in
:mod:`preprocess.datasets.synth`'s docstring and docs/datasets.md. This module holds only
the numbers, so that the recipes (which the generator imports) can name them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Design:
    """The two knobs that set where methods can differ."""

    easy_reliability: float  # fraction of each class's clips whose easy cue is present
    hard_strength: float  # scale of the hard cue (1: the calibrated contrast / gating depth)


DESIGNS = {
    # The easy cue on 70 % of the clips, the hard cue weaker: fused accuracy separates
    # joint training from the unimodal ensemble and from balancing methods.
    "fused": Design(easy_reliability=0.7, hard_strength=0.7),
    # The first design: the easy cue on every clip, so every method's fused accuracy is
    # 99-100 % and only the hard encoder's linear probe moves.
    "probe": Design(easy_reliability=1.0, hard_strength=1.0),
}
DEFAULT_DESIGN = "fused"


def resolve(name: str, easy_reliability: float | None,
            hard_strength: float | None) -> Design:
    """Design ``name`` with the values given explicitly (not None) put in its place."""
    design = DESIGNS[name]
    return Design(design.easy_reliability if easy_reliability is None else easy_reliability,
                  design.hard_strength if hard_strength is None else hard_strength)


DESIGN_HELP = ("The synthetic design: fused (the easy cue on part of the clips, fused accuracy "
               "separates methods) or probe (the first design: the easy cue on every clip).")
RELIABILITY_HELP = ("Fraction of each class's clips whose easy cue is present (the rest "
                    "have none); default: the design's.")
STRENGTH_HELP = ("Scale of the hard cue: lower makes the hard modality slower to learn (0 "
                 "removes its cue); default: the design's.")


def summary(easy: str, design: Design) -> str:
    """'audio is the easy modality, its cue on 70 % of the clips; hard cue at 0.7'."""
    return (f"{easy} is the easy modality, its cue on {100 * design.easy_reliability:g} % of "
            f"the clips; hard cue at {design.hard_strength:g}")
