"""OPG (Wei, Hu, Du and Wen, TPAMI 2024): the journal version's on-the-fly gradient
modulation (the paper's "OGM"; ``ogm_ge`` is the CVPR 2022 one it extends).

OGM-GE's rule after a warm-up: concat fusion on the fused CE; each modality's summed
correct-class confidence s^m from its block of the head with b / 2 gives rho^m = s^m /
s^other; the dominant modality's encoder gradient is scaled by 1 - tanh(alpha * rho^m)
and, in OGM_GE mode, Gaussian noise with the gradient's own spread is added, inside the
modulation window and never in the first ``warmup_epochs``. The paper's text was not at
hand: the formulas cite the released code.

Matched to the released code, GeWu-Lab/BML_TPAMI2024 (4b3aa4f): code/main.py ``train()``
L91 (warm-up ``epoch <= 5``), L114-116 (modulate after the backward, after warm-up), L119-120
(the ratios), L138-148 (the coefficients: the first modality is damped when its ratio is
above 1, else the second, so a tie damps the second), L154-169 (the inclusive window, the
scaling and the noise); code/models/Classifier.py L112-143 (the scores from the detached
head with b / 2); code/scripts/train_ogm.sh (alpha 0.8, epochs 0 to 60).

Departures from that code, as ``ogm_ge``'s: every parameter of the dominant encoder is
modulated (the release touches its 4-D convolution kernels only) and the noise's spread is
the gradient's std (the release adds 1e-8); ``variant: released`` takes the release's
(L154-169) for both; more than two modalities: rho^m = s^m / the
others' mean, every modality above 1 damped (a tie of all: the last). The release's
``--use_OGM_plus`` (a fixed 4x on the weaker modality) is not in its scripts nor here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ccat.config import NON_NEGATIVE, Range
from ccat.methods.base import METHODS, WindowEnd
from ccat.methods.ogm_ge import OGMGE


def opg_coefficients(ratios: dict[str, float], alpha: float) -> dict[str, float]:
    """1 - tanh(alpha * rho^m) for every rho^m above 1, else 1; when none is above 1 the
    last modality is damped (main.py L138-148: the else-branch damps the second)."""
    coefs = {m: 1.0 - math.tanh(alpha * rho) if rho > 1 else 1.0 for m, rho in ratios.items()}
    if not any(rho > 1 for rho in ratios.values()):
        last = list(ratios)[-1]
        coefs[last] = 1.0 - math.tanh(alpha * ratios[last])
    return coefs


@METHODS.register("opg")
class OPG(OGMGE):
    fusion = "concat"  # code/scripts/train_ogm.sh --fusion_method concat

    @dataclass
    class Params(OGMGE.Params):
        RANGES: ClassVar[dict[str, Range]] = {**OGMGE.Params.RANGES,
                                              "warmup_epochs": NON_NEGATIVE}
        # code/scripts/train_ogm.sh: --alpha 0.8 --modulation_starts 0 --modulation_ends 60;
        # main.py's --modulation default OGM_GE.
        alpha: float = 0.8
        # First epoch no longer modulated, 0-based: the released inclusive epoch <= 60.
        modulation_ends: int = 61
        # Epochs never modulated: main.py L91 warm_up = epoch <= 5 (0-based), so 6.
        warmup_epochs: int = 6

    # Its modulation_ends (61) already is the release's inclusive 60, so variant "released"
    # keeps the window and changes only what is modulated and the noise (OGMGE.Params).
    released_window = WindowEnd.EXCLUDED

    def modulating(self) -> bool:
        """Whether this epoch is past the warm-up and in [modulation_starts, modulation_ends)."""
        return self.epoch >= self.params.warmup_epochs and super().modulating()

    def damping(self, ratios: dict[str, float]) -> dict[str, float]:
        return opg_coefficients(ratios, self.params.alpha)
