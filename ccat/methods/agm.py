"""AGM (Li et al., ICCV 2023): Adaptive Gradient Modulation.

Concat fusion trained on the CE of the fused logits, written as the sum of the modalities'
mono-modal responses: Shapley values of the model's output over the modalities, a
coalition S's value being the fused logits with the inputs outside S zeroed (the model in
eval mode) and the empty coalition's value 0. For two modalities

    phi^a = (f(a, v) - f(0, v) + f(a, 0)) / 2,   phi^v = (f(a, v) - f(a, 0) + f(0, v)) / 2,

so phi^a + phi^v = f(a, v). Each modality's score is the batch mean of its response's CE,
s^m = mean_i -log max(softmax(phi^m_i)_{y_i}, 1e-8); its ratio r^m = exp(s^other - s^m)
and its target ratio r*^m the same of the running means t^m of all steps' scores so far.
Backward scales the gradient reaching phi^m by c^m = exp(alpha * min(r*^m - r^m, 10)),
then every gradient is clipped to norm 1 when one of the classifier's weight gradients
leaves [-1, 1]. The paper's text was not at hand: the formulas cite the released code.

Matched to the released code, Lingy12/AGM_ICCV2023 (a24f2ce), CREMA-D late fusion:
model/CREMAD_net.py ``GradMod`` L39-72 (the passes, the responses and the backward hooks
that scale their gradient by ``scale_a`` / ``scale_v``), ``ConcatFusion`` L256-265 (the
fusion); run/CREMAD_main.py ``train()`` L63-69 (the responses and the loss), L130-157 (the
scores, ratios, coefficients and running means), L159-166 (the window and
``update_scale``), L233-238 (the clip); its ``test()`` L324-327 (unimodal accuracy).

Departures from that code, each for a reason:

- The coalitions' passes share their encoder passes: each encoder runs once in eval mode
  on its input and once on its zeroed input, and the head reads every coalition from
  them; the released code re-encodes per coalition, the same features, and also computes
  f(0, 0), which no formula reads. The numbers are the same.
- Zeroed input means what the encoder reads as zero: float frames are zeroed after
  normalization, as the released loader hands normalized frames to the model (uint8
  pixels become float zeros), and token ids become PAD_ID (an all-padding text).
- More than two modalities: the Shapley value over all non-empty coalitions with
  v(empty) = 0 (2^M - 2 coalition passes of the head), and r^m = exp(mean of the others'
  s - s^m), as BalanceBenchmark's AGM_trainer.py generalizes it; for two modalities both
  are the released rule.
- Under torchrun the scores are averaged over every rank's samples, so every rank keeps the
  same running means and coefficients; the clip reads each rank's own gradient, before
  Step averages the ranks' (the released code clips DataParallel's whole-batch gradient).
- The logits are taken in float32 before the responses are formed (bf16 autocast on CUDA
  would otherwise round the differences of nearly equal logits).

Kept from the released code as it is: outside the modulation window the gradients keep the
coefficients last set (``update_scale`` is only called inside it; before the first window
they are 1), and the running means count every step from the first.

Cost per step relative to Concat: each encoder runs three forward passes instead of one
(train mode on its input; eval mode on its input and on the zeroed input) and the backward
goes through all three, with three times the activation memory; the head runs
2^M - 1 times (3 for two modalities); one host sync for the scores, before the backward.
The released code runs the whole model four times. Evaluation encodes twice (the input
and the zeroed input).

Unimodal accuracy: the argmax of phi^m, the released ``test()``'s ``out_a`` and ``out_v``
(not the zeroing of ``zeroing.py``: the response is AGM's own measure of a modality).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from ccat.config import NON_NEGATIVE, ConfigError, MethodConfig, ModelConfig, Range
from ccat.data.pipeline import PAD_ID, Batch
from ccat.methods.base import METHODS, Method, Outputs, WindowEnd, in_window, predict_outputs
from ccat.models import MultimodalModel
from ccat.models.fusion import Features
from ccat.step import Step, host_floats

PROBABILITY_FLOOR = 1e-8  # L133-141: a correct-class probability below it scores -log(1e-8)
GAP_CAP = 10.0  # L151-152: exp(alpha * min(optimal_ratio - ratio, 10))
CLIP_TRIGGER = 1.0  # L235-237: clip when a classifier weight gradient leaves [-1, 1]
CLIP_NORM = 1.0  # L238: clip_grad_norm_(model.parameters(), max_norm=1.0)
MAX_ALPHA = 70.0  # exp(alpha * GAP_CAP) stays a finite float (exp overflows above ~709)

Coalition = frozenset[str]


def absent_input(x: torch.Tensor) -> torch.Tensor:
    """The zeroed input of a modality: float zeros (uint8 pixels: zeros after
    normalization, the released zeroed normalized frames), PAD_ID for token ids."""
    if x.dtype == torch.uint8:
        return torch.zeros(x.shape, device=x.device)
    if not x.is_floating_point():
        return torch.full_like(x, PAD_ID)
    return torch.zeros_like(x)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode for the block, then back to its own mode (GradMod.forward
    L61-66: ``self.net.eval()`` for the padded passes, ``train()`` after them)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def coalition_logits(model: MultimodalModel, present: Features, absent: Features,
                     full: torch.Tensor) -> dict[Coalition, torch.Tensor]:
    """f(S) for every non-empty coalition S, in float32: the fused logits of ``present``'s
    features for the modalities in S and ``absent``'s for the others; ``full`` is f(all)."""
    modalities = model.modalities
    values = {frozenset(modalities): full.float()}
    for size in range(1, len(modalities)):
        for members in itertools.combinations(modalities, size):
            feats = {m: present[m] if m in members else absent[m] for m in modalities}
            values[frozenset(members)] = model.fused_logits(feats).float()
    return values


def shapley_responses(values: dict[Coalition, torch.Tensor],
                      modalities: list[str]) -> dict[str, torch.Tensor]:
    """phi^m = sum over S not holding m of |S|! (M - |S| - 1)! / M! (v(S + m) - v(S)), with
    v(empty) = 0 (GradMod L67-68 and Modality_Audio / Modality_Visual L7-17 for M = 2)."""
    count = len(modalities)
    responses = {}
    for m in modalities:
        others = [k for k in modalities if k != m]
        terms = []
        for size in range(count):
            weight = math.factorial(size) * math.factorial(count - size - 1) / math.factorial(count)
            for members in itertools.combinations(others, size):
                without = frozenset(members)
                base = values[without] if without else 0.0
                terms.append(weight * (values[without | {m}] - base))
        responses[m] = torch.stack(terms).sum(0)
    return responses


def score_sum(response: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """sum_i -log max(softmax(phi_i)_{y_i}, 1e-8), the batch's summed score (L130-141)."""
    nll = -response.float().log_softmax(1).gather(1, label[:, None])
    return nll.clamp(max=-math.log(PROBABILITY_FLOOR)).sum()


def ratios(scores: dict[str, float]) -> dict[str, float]:
    """r^m = exp(mean of the others' scores - s^m) (L145-146, L148-149 on the running
    means): above 1 when m's response fits better than the others'."""
    out = {}
    for m, score in scores.items():
        others = [s for k, s in scores.items() if k != m]
        out[m] = math.exp(sum(others) / len(others) - score)
    return out


def coefficients(scores: dict[str, float], running: dict[str, float],
                 alpha: float) -> dict[str, float]:
    """c^m = exp(alpha * min(r*^m - r^m, 10)), r* from the running means (L151-152)."""
    now, target = ratios(scores), ratios(running)
    return {m: math.exp(alpha * min(target[m] - now[m], GAP_CAP)) for m in scores}


def running_means(running: dict[str, float], scores: dict[str, float],
                  iteration: int) -> dict[str, float]:
    """t^m <- t^m (n - 1) / n + s^m / n at the n-th step since training began (L154-155)."""
    return {m: running[m] * (iteration - 1) / iteration + s / iteration
            for m, s in scores.items()}


def scaled(coef: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook multiplying by ``coef`` (GradMod.hooka / hookv, L45-51)."""
    return lambda grad: grad * coef


def clip_when_large(model: MultimodalModel) -> None:
    """Clip every gradient to total norm 1 when a classifier weight gradient lies outside
    [-1, 1] (L233-238), decided on the device (no host sync): an unmet condition passes
    a zero norm, whose clip coefficient clamps to 1."""
    params = [p for p in model.parameters() if p.grad is not None]
    weight = model.classifier.weight.grad
    if not params or weight is None:
        return
    total = get_total_norm([p.grad for p in params])
    large = weight.abs().amax() > CLIP_TRIGGER
    clip_grads_with_norm_(params, CLIP_NORM, torch.where(large, total, torch.zeros_like(total)))


@METHODS.register("agm")
class AGM(Method):
    fusion = "concat"  # utils/config.py Cramed_config 'fusion': 'concat'; CREMAD_net.py L90-92

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "alpha": Range(0, MAX_ALPHA), "modulation_starts": NON_NEGATIVE,
            "modulation_ends": NON_NEGATIVE}
        # The released code has no CREMA-D script; its utils/config.py defaults are its
        # settings: --alpha 1.0, --modulation_starts 0, --modulation_ends 20.
        alpha: float = 1.0
        # First modulated epoch, 0-based (the released 1-based check starts <= epoch: its 0
        # and 1 both mean the first epoch).
        modulation_starts: int = 0
        # First epoch no longer modulated, 0-based: the released inclusive epoch <= ends on
        # 1-based epochs, the same number.
        modulation_ends: int = 20

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.running: dict[str, float] = {}  # t^m, the running means of the scores
        self.iteration = 0  # steps since training began
        self.scales: dict[str, float] = {}  # the coefficients the hooks apply (1 before any)

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        if len(modalities) < 2:
            raise ConfigError(f"method 'agm' balances modalities against each other and needs "
                              f"at least two; the data has {', '.join(modalities)}")
        return super().build_model(modalities, num_classes, cfg)

    def state_dict(self) -> dict[str, Any]:
        return {"running": dict(self.running), "iteration": self.iteration,
                "scales": dict(self.scales)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running = {m: float(v) for m, v in state.get("running", {}).items()}
        self.iteration = int(state.get("iteration", 0))
        self.scales = {m: float(v) for m, v in state.get("scales", {}).items()}

    def modulating(self) -> bool:
        """Whether this epoch lies in [modulation_starts, modulation_ends)."""
        p = self.params
        return in_window(self.epoch, p.modulation_starts, p.modulation_ends, WindowEnd.EXCLUDED)

    def responses(self, model: MultimodalModel, inputs: dict[str, torch.Tensor],
                  feats: Features, full: torch.Tensor) -> dict[str, torch.Tensor]:
        """phi^m of every modality, the coalitions encoded in eval mode (in eval mode
        already, the full pass's features are the present ones)."""
        reuse = not model.training
        with eval_mode(model):
            present = feats if reuse else model.encode_all(inputs)
            absent = {m: model.encode({m: absent_input(x)}, m) for m, x in inputs.items()
                      if m in model.modalities}
            values = coalition_logits(model, present, absent, full)
        return shapley_responses(values, model.modalities)

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        phi = self.responses(model, batch.inputs, feats, model.fused_logits(feats))
        loss = F.cross_entropy(torch.stack(list(phi.values())).sum(0), batch.label)  # L64-69
        local = host_floats({"loss": loss.detach(),
                             **{m: score_sum(v.detach(), batch.label) for m, v in phi.items()}})
        count = step.all_sum(float(len(batch.label)))
        scores = {m: step.all_sum(local[m]) / count for m in phi}
        coefs = coefficients(scores, {m: self.running.get(m, 0.0) for m in phi},
                             self.params.alpha)
        self.iteration += 1
        self.running = running_means({m: self.running.get(m, 0.0) for m in phi}, scores,
                                     self.iteration)
        if self.modulating():  # L159-165: update_scale inside the window only
            self.scales = coefs
        applied = {m: self.scales.get(m, 1.0) for m in phi}
        for m, response in phi.items():
            response.register_hook(scaled(applied[m]))
        step.backward(loss)
        clip_when_large(model)
        step.step()
        out = {"loss": local["loss"]}
        out.update({f"score/{m}": s for m, s in scores.items()})
        out.update({f"ratio/{m}": r for m, r in ratios(scores).items()})
        out.update({f"coef/{m}": c for m, c in applied.items()})
        return out

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused logits f(all); each modality's response phi^m (the released test())."""
        feats = model.encode_all(batch.inputs)
        phi = self.responses(model, batch.inputs, feats, model.fused_logits(feats))
        return predict_outputs(model, feats, phi)
