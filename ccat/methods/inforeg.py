"""InfoReg (Huang et al., CVPR 2025): Adaptive Unimodal Regulation for Balanced Multimodal
Information Acquisition.

Concat fusion trained on the fused CE plus each modality's CE from its block of the head.
Each epoch the information a modality's encoder acquires is measured by the trace of its
(diagonal, empirical) Fisher information, the squared gradients summed over the epoch's
steps. While the window modality's trace still grows fast, the prime learning window,
the modality whose batch confidence in the correct class is higher is slowed by a
proximal term pulling its encoder back to its parameters at the start of the epoch,
with a coefficient that grows with the confidence gap.

Matched to the released code, GeWu-Lab/InfoReg_CVPR2025 main.py at ea7b9d5 ("Ours", the
default --modulation); line numbers below are that file's. The paper's own text was not
available to us, so the equations cited are the released code's lines. The first upload
(41d887f, March 2025) differs: separate unimodal heads, threshold 0.04, and an elif that
repeats the first test, so only audio is ever regulated; we follow the current main.py.

Departures from the released code, each for a reason: the trace reads the gradient after
Step's averaging over ranks (and its clipping, when optim.grad_clip is set), so under
torchrun every rank measures the whole batch's gradient, as DataParallel does there, and the
confidences are summed over ranks, so every rank regulates alike; it also counts the
encoder's linear projection to the shared width, which the released ResNet-18 lacks; a
zero trace gives k = 0 where the released code divides by zero; more than two modalities
compare the top score with the mean of the others. The released code's three extra
backward passes that only log gradients (main.py 406-453) are left out: they are zeroed
before the update. The optimizer (released: SGD lr 0.002, momentum 0.9, weight decay 1e-4,
batch 64, lr / 10 after 30 of 50 epochs) is the run config's, shared by every method.

Cost over Concat: the unimodal logits (a slice of the head, no extra pass) and their CE,
in the same one backward; per step a mean of the squared gradient of every convolution
and linear weight of every encoder, the regulated encoder's proximal term (one
elementwise op per parameter) and one host sync for the confidences; per epoch one copy
of the encoders' parameters (the reference), kept in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import AT_LEAST_ONE, NON_NEGATIVE, ConfigError, MethodConfig, ModelConfig, Range
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, predict_outputs
from ccat.models import MultimodalModel
from ccat.step import Step, host_floats

MEASURED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # main.py 503-513: Conv2d and Linear


def trace_step(encoder: nn.Module) -> torch.Tensor:
    """sum over the encoder's convolution and linear weights W of mean(grad_W ** 2).

    main.py 507-513 adds grad_W ** 2 into a per-layer sum over the epoch's steps and
    577 takes, at the epoch's end, sum over layers of mean(that sum); the mean is linear,
    so the epoch's trace is the sum over steps of this value. A weight without a
    gradient adds nothing.
    """
    grads = [module.weight.grad for module in encoder.modules() if isinstance(module, MEASURED)
             and module.weight.requires_grad and module.weight.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.stack([g.float().square().mean() for g in grads]).sum()


def window_rate(history: list[float], window: int) -> float:
    """k = (tr1 - tr2) / tr1, tr1 the mean of the last ``window`` epochs' traces and tr2
    the mean of the ``window`` before the last (main.py 237-243); ``history`` starts with
    ``window`` zeros (main.py 694), and k = 1 before the first epoch's trace exists.
    A zero tr1 (no measured weight) gives k = 0: the released code divides by zero."""
    if len(history) <= window:  # epoch 0: only the padding
        return 1.0
    tr1 = sum(history[-window:]) / window
    tr2 = sum(history[-window - 1:-1]) / window
    return (tr1 - tr2) / tr1 if tr1 != 0 else 0.0


def regulation(scores: dict[str, float], base: dict[str, float], rate: float,
               threshold: float) -> dict[str, float]:
    """beta^m for each modality (main.py 465-485): inside the window (k > threshold), the
    modality m whose score beats every other's gets base^m * exp(tanh(s^m - s^other)),
    every other 0; outside it, or on a tie for the top, all are 0.

    With more than two modalities s^other is the mean of the others' scores (our
    generalization, equal to the released rule for two)."""
    betas = {m: 0.0 for m in scores}
    if not rate > threshold:
        return betas
    top = max(scores, key=scores.__getitem__)
    others = [s for m, s in scores.items() if m != top]
    if any(s >= scores[top] for s in others):
        return betas
    betas[top] = base[top] * math.exp(math.tanh(scores[top] - sum(others) / len(others)))
    return betas


@torch.no_grad()
def pull_back(encoder: nn.Module, reference: dict[str, torch.Tensor], beta: float) -> None:
    """grad <- grad + beta * (theta - theta_ref) for every trained parameter of the encoder
    (main.py 489-495): the gradient of (beta / 2) * ||theta - theta_ref||^2. A parameter
    without a gradient is left without one, so every rank reduces the same set."""
    for name, p in encoder.named_parameters():
        if p.requires_grad and p.grad is not None:
            p.grad.add_(p.detach() - reference[name], alpha=beta)


@METHODS.register("inforeg")
class InfoReg(Method):
    fusion = "concat"  # main.py 32: --fusion_method concat; the head reads [z^a; z^v]

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {"window": AT_LEAST_ONE, "threshold": NON_NEGATIVE,
                                              "beta": NON_NEGATIVE}
        # main.py 240-241, 694: traces averaged over 10 epochs, the history padded with 10 zeros.
        window: int = 10
        # main.py 465, 473: regulate while k > 0.05 (the March 2025 upload, 41d887f, has 0.04).
        threshold: float = 0.05
        # main.py 468, 476: base coefficient per modality in the data's order (CREMA-D:
        # audio 0.95, video 0.1).
        beta: list[float] = field(default_factory=lambda: [0.95, 0.1])
        # The modality whose trace decides the window (main.py 240-241: audio's); empty =
        # the data's first modality (audio for CREMA-D and Kinetics-Sounds).
        window_modality: str = ""

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.modalities: list[str] = []
        self.traces: dict[str, list[float]] = {}  # finished epochs' traces, after the padding
        self.trace_epoch = -1  # the epoch `self.running` belongs to; -1 = none yet
        self.running: dict[str, torch.Tensor | float] = {}  # this epoch's trace so far
        self.reference: dict[str, dict[str, torch.Tensor]] | None = None  # theta at epoch start
        self.rate = 1.0  # k of the current epoch

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        self.bind_modalities(list(modalities))
        return super().build_model(modalities, num_classes, cfg)

    def bind_modalities(self, modalities: list[str]) -> None:
        """Check ``beta`` and ``window_modality`` against the data's modalities."""
        p = self.params
        if len(p.beta) != len(modalities):
            raise ConfigError(f"method.params.beta needs one value per modality "
                              f"({', '.join(modalities)}), got {p.beta!r}")
        if p.window_modality and p.window_modality not in modalities:
            raise ConfigError(f"method.params.window_modality must be one of "
                              f"{', '.join(modalities)}, not {p.window_modality!r}")
        self.modalities = modalities
        self.traces = {m: self.traces.get(m, [0.0] * p.window) for m in modalities}

    def watched(self) -> str:
        return self.params.window_modality or self.modalities[0]

    def on_epoch(self, epoch: int) -> None:
        """Close the last epoch's traces (main.py 594-595), compute this epoch's k and drop
        the reference, retaken at the epoch's first step (main.py 259)."""
        if self.trace_epoch >= 0 and self.trace_epoch != epoch:
            for m, value in self.running.items():
                self.traces[m].append(float(value))
            self.running, self.trace_epoch = {}, -1
        self.rate = window_rate(self.traces[self.watched()], self.params.window) \
            if self.modalities else 1.0
        self.reference = None

    def state_dict(self) -> dict[str, Any]:
        """The trace histories and the running epoch's traces; checkpoints are written at
        epoch ends, after which the reference and k are made anew, so neither is saved."""
        return {"traces": {m: list(t) for m, t in self.traces.items()},
                "running": {m: float(v) for m, v in self.running.items()},
                "trace_epoch": self.trace_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.traces = {m: [float(v) for v in t] for m, t in state.get("traces", {}).items()}
        self.running = {m: float(v) for m, v in state.get("running", {}).items()}
        self.trace_epoch = int(state.get("trace_epoch", -1))

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        if not self.modalities:
            self.bind_modalities(model.modalities)
        if self.reference is None:
            self.reference = {m: {n: p.detach().clone() for n, p in
                                  model.encoders[m].named_parameters()} for m in model.modalities}
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        fused = model.fused_logits(feats)
        logits = {m: model.unimodal_logits(m, feats[m].pooled) for m in model.modalities}
        ce = F.cross_entropy(fused, batch.label)  # main.py 361-363, 378-380, 456-458
        unimodal = {m: F.cross_entropy(v, batch.label) for m, v in logits.items()}
        loss = ce + torch.stack(list(unimodal.values())).sum()
        step.backward(loss)
        with torch.no_grad():  # main.py 460-461: s^m = sum_i softmax(out_m)_{i, y_i}
            local = host_floats({m: v.float().softmax(1).gather(1, batch.label[:, None]).sum()
                                 for m, v in logits.items()})
        scores = {m: step.all_sum(s) for m, s in local.items()}  # all ranks decide alike
        base = dict(zip(model.modalities, self.params.beta))
        betas = regulation(scores, base, self.rate, self.params.threshold)
        for m, beta in betas.items():
            if beta > 0:
                pull_back(model.encoders[m], self.reference[m], beta)
        step.step()
        self._measure(model)
        out = {"loss": loss.item(), "ce": ce.item(), "window_rate": self.rate}
        out.update({f"loss/{m}": v.item() for m, v in unimodal.items()})
        out.update({f"beta/{m}": b for m, b in betas.items()})
        return out

    def _measure(self, model: MultimodalModel) -> None:
        """Add this step's trace term, read after Step's averaging over ranks (so every
        rank measures the same gradient, the whole batch's, as DataParallel's does)."""
        self.trace_epoch = self.epoch
        for m in model.modalities:
            self.running[m] = self.running.get(m, 0.0) + trace_step(model.encoders[m]).detach()

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused logits; each modality's block of the head with half the bias (Sec. 4.1's
        rule for concat, and main.py 643-645's valid())."""
        return predict_outputs(model, model.encode_all(batch.inputs), model.unimodal_logits)
