"""Greedy (Wu et al., ICML 2022): balanced multi-modal learning by conditional learning speed.

Each modality m has its own branch, encoder and head, whose prediction is y^m; the model
predicts the mean of the y^m and trains on sum_m CE(y^m). The branches exchange
information through an MMTM, a squeeze-excitation module: the squeezed features of both
modalities pass one shared layer and, per modality, an excitation layer whose sigmoid
rescales that modality's features channel by channel. The excitation layer of m and the
shared layer carry the other modality into branch m (m's "bypass"). The conditional
learning speed compares how fast each branch's bypass learns with how fast its own
parameters learn: M^m_bypass and M^m_main are the sums over all measured steps of
||grad||^2 / ||theta||^2 of those parameter groups, BDR^m = log10(M^m_bypass / M^m_main)
and d = BDR^0 - BDR^1. When |d| exceeds epsilon the next ``window`` steps are
re-balancing steps: the branch with the larger BDR (the first when d > 0) gets its
excitation replaced by its running average, so it receives nothing from the other
modality and must learn from its own. The random variant picks after every step, with
equal chances, a regular step or a re-balancing step of either branch.

Matched to the released code, nyukat/greedy_multimodal_learning at a190e03 (no copy of
the paper was at hand, so the citations are the released files and lines):
``MMTM_mitigate`` (src/balanced_mmtm.py L16-154: the squeeze L94-101, the excitations
L103-111, the running averages L113-116, their use in curation mode L135-152, the
cross-modal flow turned off for evaluation L72-91); the two heads and their mean
(src/model.py L53-60, L102-108); the loss, blend_loss (train.py L21-28); the conditional
learning speed, ``Bias_Mitigation_Strong.compute_BDR`` (src/callbacks.py L199-233), and
the guided switch, ``on_backward_end`` (L240-263), unlocked from ``starting_epoch`` (L265-267);
the random switch, ``Bias_Mitigation_Random`` (L270-302); the settings, configs/training_guided.gin.

Our model has one encoder per modality and a fusion at the end, so the reading is: ONE
MMTM between the encoders' pooled outputs z^m (the squeeze of a token map is its mean,
and rescaling every token by the excitation then pooling equals rescaling z^m), then each
modality's head (the untied ``sum`` fusion's heads) on its rescaled z^m. main^m is
encoder m plus head m (the released ``net_view_m``, its ``fc`` included); bypass^m is
the excitation layer of m plus the shared squeeze layer (L207-218).

Departures from the released code, one line each:

- One MMTM at the encoders' outputs, after their projection to the model width, where the
  released model has three inside its ResNets (after layer2, layer3 and layer4): our
  encoders are opaque registered modules (BERT among them); only their outputs are reachable.
- The running averages are updated by training steps only; the released forward also
  updates them on validation and test batches (test data reaching training).
- Each modality's running average follows its own excitation; the released L114 feeds the
  second modality's from the first's (a copy slip, L31 too; BalanceBenchmark uses each
  modality's own). ``running_average=released`` reproduces L114.
- Evaluation always uses the full exchange; the released evaluation inherits whatever
  curation mode the last training batch left on.
- Unimodal accuracy (the paper's A(m), from which its conditional utilization rate comes):
  branch m's head with the other modality's squeeze replaced by its mean, as the released
  ``turnoff_cross_modal_flow`` (L72-91); the mean is over the last training epoch's
  batches (train-mode features, kept as model buffers), not an extra eval-mode pass over
  the training set with the final model (configs/recording.gin); zeros before training.
- Gradient norms are read after Step's averaging over ranks (and its clipping, when
  optim.grad_clip is set), weight norms before the update; so under torchrun every rank
  measures the whole batch and switches alike. A parameter without a gradient counts 0
  (the released zero_grad left zeros), a group of all-zero weights speed 0 and d is 0
  while an M is still 0, where the released code divides by zero.
- Under torchrun the running averages and the squeeze means are per rank within an epoch
  and averaged over ranks at its end (the loop averages floating buffers); the random
  switch draws from a generator seeded with the run's seed, the same on every rank.
- Exactly two modalities: the released module, d and the switch are defined for two.
- The optimizer (released: SGD lr 0.1, no momentum, no weight decay, batch 8,
  ReduceLROnPlateau) is the run config's; with momentum, a frozen excitation layer's
  momentum pauses (no gradient) where the released zero gradient would let it coast.

BalanceBenchmark's Greedy_trainer.py differs from the release and is not followed: MMTMs
at four depths, concat fusion trained on the fused CE only, re-balancing from the first
step (no starting epoch), main^m = the encoder without a head, epsilon 0.001.

Cost over Sum: one forward and one backward pass per step, as Sum. Per step the MMTM's
two small layers on the pooled vectors; on every measured step (guided mode outside the
re-balancing window) the squared norm of every parameter and of its gradient, fetched
with the losses in one host sync. At evaluation M more MMTM and head evaluations on the
pooled vectors (the unimodal predictions), no extra encoder pass.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, ConfigError, MethodConfig,
                         ModelConfig, Range)
from ccat.data.pipeline import Batch
from ccat.methods.base import METHODS, Method, Outputs, fuse_decisions, require_two_modalities
from ccat.models import MultimodalModel
from ccat.step import Step, host_floats

EXCHANGE = "mmtm"  # the exchange module's name in the model (its state_dict prefix)
RANDOM_MODES = (0, 1, 2)  # callbacks.py L285: regular, re-balance branch 1, re-balance branch 0


class SqueezeExchange(nn.Module):
    """MMTM between the pooled z^m of two modalities (balanced_mmtm.py L16-154).

    Buffers: ``running`` (M, D), each modality's running average of its batch-mean
    excitation over the training steps, and ``steps``, their count (L30-32, L113-116);
    ``squeeze_sum`` (M, D) and ``squeeze_count``, the sums of z^m over the current
    training epoch, whose mean replaces the other modality in the unimodal predictions.
    """

    def __init__(self, modalities: list[str], width: int, ratio: float):
        super().__init__()
        joint = width * len(modalities)
        hidden = int(2 * joint / ratio)  # L25-26: dim_out = int(2 * dim / ratio)
        if hidden < 1:
            raise ConfigError(f"method.params.ratio {ratio:g} leaves the MMTM no hidden unit "
                              f"(2 x {joint} / ratio < 1); use a ratio of at most {2 * joint}")
        self.modalities = list(modalities)
        self.squeeze = nn.Linear(joint, hidden)  # fc_squeeze, L38
        self.excite = nn.ModuleDict({m: nn.Linear(hidden, width) for m in modalities})  # L44-45
        self.register_buffer("running", torch.zeros(len(modalities), width))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("squeeze_sum", torch.zeros(len(modalities), width))
        self.register_buffer("squeeze_count", torch.zeros(()))

    def excitations(self, squeezed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """sigmoid(fc_m(relu(fc_squeeze([s^0; s^1])))) for every m (L99-111)."""
        hidden = torch.relu(self.squeeze(torch.cat([squeezed[m] for m in self.modalities], 1)))
        return {m: torch.sigmoid(self.excite[m](hidden)) for m in self.modalities}

    def forward(self, pooled: dict[str, torch.Tensor], frozen: str | None = None,
                track: str | None = None) -> dict[str, torch.Tensor]:
        """Each z^m times its excitation; ``frozen``'s excitation is its running average
        (curation mode, L135-152), taken after this batch updated it. ``track`` ("own" or
        "released") updates the running averages and squeeze sums (training only)."""
        scales = self.excitations(pooled)
        if track is not None:
            self.track(scales, pooled, track)
        if frozen is not None:
            average = self.running[self.modalities.index(frozen)]
            scales[frozen] = average.to(scales[frozen].dtype).expand_as(scales[frozen])
        return {m: pooled[m] * scales[m] for m in self.modalities}

    @torch.no_grad()
    def track(self, scales: dict[str, torch.Tensor], pooled: dict[str, torch.Tensor],
              source: str) -> None:
        """running^m <- (mean_batch(e^m) + running^m * steps) / (steps + 1) (L113-116), e^m
        being m's excitation ("own") or the first modality's for every m ("released", L114);
        and the batch's z^m added to the epoch's squeeze sums."""
        first = self.modalities[0]
        for k, m in enumerate(self.modalities):
            batch_mean = scales[m if source == "own" else first].float().mean(0)
            self.running[k] = (batch_mean + self.running[k] * self.steps) / (self.steps + 1)
            self.squeeze_sum[k] += pooled[m].float().sum(0)
        self.steps += 1
        self.squeeze_count += next(iter(pooled.values())).shape[0]

    @torch.no_grad()
    def reset_squeeze(self) -> None:
        """Start a new epoch's squeeze sums."""
        self.squeeze_sum.zero_()
        self.squeeze_count.zero_()

    def isolated(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each z^m rescaled with the cross-modal flow turned off (L72-91): the other
        modality's squeeze replaced by its mean over the training epoch (zeros before any)."""
        means = self.squeeze_sum / self.squeeze_count.clamp(min=1)
        out = {}
        for m, z in pooled.items():
            squeezed = {k: z if k == m else means[i].to(z.dtype).expand_as(z)
                        for i, k in enumerate(self.modalities)}
            out[m] = z * self.excitations(squeezed)[m]
        return out


def exchange_of(model: MultimodalModel) -> SqueezeExchange:
    """The MMTM that :meth:`Greedy.build_model` added to ``model``."""
    module = model.get_submodule(EXCHANGE)
    assert isinstance(module, SqueezeExchange)
    return module


def speed(weight_sq: float, grad_sq: float) -> float:
    """mu = ||grad||^2 / ||theta||^2 of one parameter group (callbacks.py L225-228); 0 for a
    group whose weights are all zero (the released code divides by zero)."""
    return grad_sq / weight_sq if weight_sq > 0 else 0.0


def balance_difference(bypass: dict[str, float], main: dict[str, float]) -> float:
    """d = BDR^0 - BDR^1, BDR^m = log10(M^m_bypass / M^m_main) (L230-233), the modalities
    in the data's order; 0 while any M is 0 (nothing measured yet)."""
    if any(v <= 0 for v in [*bypass.values(), *main.values()]):
        return 0.0
    first, second = (math.log10(bypass[m] / main[m]) for m in bypass)
    return first - second


def weight_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """sum ||theta||^2 over ``params``, on the device (callbacks.py L204)."""
    return torch.stack([p.detach().float().square().sum() for p in params]).sum()


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """sum ||grad||^2 over ``params``, on the device (L205); a parameter without a
    gradient adds 0."""
    grads = [p.grad.float().square().sum() for p in params if p.grad is not None]
    return torch.stack(grads).sum() if grads else torch.zeros((), device=params[0].device)


@METHODS.register("greedy")
class Greedy(Method):
    fusion = "sum"  # a head per modality, fc_m(z^m): the released net_view_m.fc

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {
            "epsilon": NON_NEGATIVE, "window": AT_LEAST_ONE, "starting_epoch": NON_NEGATIVE,
            "ratio": POSITIVE}
        # configs/training_guided.gin: Bias_Mitigation_Strong (guided); training_random.gin:
        # Bias_Mitigation_Random (random); none: the MMTM model trained without re-balancing.
        rebalancing: Literal["guided", "random", "none"] = "guided"
        epsilon: float = 0.01  # training_guided.gin: Bias_Mitigation_Strong.epsilon=0.01
        window: int = 5  # training_guided.gin: curation_windowsize=5 re-balancing steps
        # First epoch (0-based) that may re-balance: the released starting_epoch=2 counts
        # epochs from 1 (framework.py L293; callbacks.py L276 for the random switch).
        starting_epoch: int = 1
        ratio: float = 4.0  # src/model.py L58-60: MMTM(128, 128, 4), the squeeze ratio
        # "own": each modality's running average of its own excitation; "released": every
        # modality's from the first modality's excitation (balanced_mmtm.py L114).
        running_average: Literal["own", "released"] = "own"

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.modalities: list[str] = []
        self.bypass: dict[str, float] = {}  # M^m_bypass: the summed speeds since training began
        self.main: dict[str, float] = {}  # M^m_main
        self.active = False  # the released curation_mode: the next step re-balances
        self.curation_step = 0  # re-balancing steps taken in the current window
        self.frozen = ""  # the modality whose excitation the next step freezes ("" = none)
        self.d_speed = 0.0  # the last measured d (the released d_BDR)
        self.rng = random.Random(0)  # the random switch's generator, reseeded in build_model
        self.fresh_epoch = True  # the next step starts an epoch: reset the squeeze sums

    def build_model(self, modalities: dict[str, dict[str, Any]], num_classes: int,
                    cfg: ModelConfig) -> MultimodalModel:
        """The ``sum`` model (a head per modality) plus the MMTM, for exactly two modalities."""
        require_two_modalities("greedy", modalities,
                               "its MMTM and its speed difference are defined for two")
        model = super().build_model(modalities, num_classes, cfg)
        model.add_module(EXCHANGE, SqueezeExchange(list(modalities), cfg.width, self.params.ratio))
        self.modalities = list(modalities)
        self.bypass = {m: self.bypass.get(m, 0.0) for m in modalities}
        self.main = {m: self.main.get(m, 0.0) for m in modalities}
        self.rng = random.Random(torch.initial_seed())  # the run's seed, the same on every rank
        return model

    def on_epoch(self, epoch: int) -> None:
        self.fresh_epoch = True

    def unlocked(self) -> bool:
        """Whether this epoch may re-balance (callbacks.py L265-267, L300-302)."""
        return self.epoch >= self.params.starting_epoch

    def state_dict(self) -> dict[str, Any]:
        """The summed speeds, the switch and the random generator; the running averages and
        squeeze sums are model buffers."""
        return {"bypass": dict(self.bypass), "main": dict(self.main), "active": self.active,
                "curation_step": self.curation_step, "frozen": self.frozen,
                "d_speed": self.d_speed, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bypass = {m: float(v) for m, v in state.get("bypass", {}).items()}
        self.main = {m: float(v) for m, v in state.get("main", {}).items()}
        self.active = bool(state.get("active", False))
        self.curation_step = int(state.get("curation_step", 0))
        self.frozen = str(state.get("frozen", ""))
        self.d_speed = float(state.get("d_speed", 0.0))
        if "rng" in state:
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))

    def groups(self, model: MultimodalModel) -> dict[str, list[nn.Parameter]]:
        """main/<m>: encoder m and head m; bypass/<m>: m's excitation layer and the shared
        squeeze layer (callbacks.py L207-223)."""
        exchange = exchange_of(model)
        heads = model.classifier.heads  # the sum fusion's BlockHeads, one per modality
        out = {}
        for k, m in enumerate(model.modalities):
            out[f"main/{m}"] = [*model.encoders[m].parameters(), *heads[k].parameters()]
            out[f"bypass/{m}"] = [*exchange.excite[m].parameters(),
                                  *exchange.squeeze.parameters()]
        return out

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        exchange = exchange_of(model)
        if self.fresh_epoch:
            exchange.reset_squeeze()
            self.fresh_epoch = False
        frozen = self.frozen if self.active else None
        step.zero_grad()
        feats = model.encode_all(batch.inputs)
        scaled = exchange({m: feats[m].pooled for m in model.modalities}, frozen,
                          track=self.params.running_average)
        losses = {m: F.cross_entropy(model.unimodal_logits(m, z), batch.label)
                  for m, z in scaled.items()}
        loss = torch.stack(list(losses.values())).sum()  # train.py L21-28: blend_loss
        step.backward(loss)
        measuring = self.params.rebalancing == "guided" and not self.active
        groups = self.groups(model) if measuring else {}
        weights = {name: weight_norm(params) for name, params in groups.items()}  # pre-update
        step.step()  # the gradients stay in .grad, averaged over ranks
        values: dict[str, torch.Tensor | float] = {"loss": loss.detach()}
        values.update({f"loss/{m}": v.detach() for m, v in losses.items()})
        values.update({f"w2/{name}": w for name, w in weights.items()})
        values.update({f"g2/{name}": grad_norm(params) for name, params in groups.items()})
        floats = host_floats(values)
        if measuring:
            self.measure(floats)
        out = {k: v for k, v in floats.items() if not k.startswith(("w2/", "g2/"))}
        out["d_speed"] = self.d_speed
        out.update({f"rebalanced/{m}": float(m == frozen) for m in model.modalities})
        self.switch()
        return out

    def measure(self, floats: dict[str, float]) -> None:
        """M += mu of every group, then d (callbacks.py L225-233)."""
        for m in self.modalities:
            self.bypass[m] += speed(floats[f"w2/bypass/{m}"], floats[f"g2/bypass/{m}"])
            self.main[m] += speed(floats[f"w2/main/{m}"], floats[f"g2/main/{m}"])
        self.d_speed = balance_difference(self.bypass, self.main)

    def switch(self) -> None:
        """Whether the next step re-balances, and which branch: the guided switch
        (callbacks.py L240-263) or the random one (L282-298)."""
        mode = self.params.rebalancing
        if mode == "none" or not self.unlocked():
            self.active, self.frozen = False, ""
        elif mode == "random":
            choice = self.rng.choice(RANDOM_MODES)  # 0: regular; 1, 2: freeze branch 1, 0
            self.active = choice != 0
            self.frozen = {0: "", 1: self.modalities[1], 2: self.modalities[0]}[choice]
        elif self.active:  # guided, inside the window: count it, close it after `window`
            self.curation_step += 1
            if self.curation_step == self.params.window:
                self.active = False
        elif abs(self.d_speed) > self.params.epsilon:
            self.active, self.curation_step = True, 0
            self.frozen = self.modalities[1] if self.d_speed < 0 else self.modalities[0]
        else:
            self.active, self.frozen = False, ""

    def predict(self, model: MultimodalModel, batch: Batch) -> Outputs:
        """Fused: the mean of the branches' logits with the full exchange (src/model.py
        L108); unimodal: each branch with the cross-modal flow turned off (L72-91)."""
        exchange = exchange_of(model)
        feats = model.encode_all(batch.inputs)
        pooled = {m: feats[m].pooled for m in model.modalities}
        scaled = exchange(pooled)
        branches = {m: model.unimodal_logits(m, z) for m, z in scaled.items()}
        unimodal = {m: model.unimodal_logits(m, z) for m, z in exchange.isolated(pooled).items()}
        return Outputs(fused=fuse_decisions(branches, "mean"), unimodal=unimodal,
                       embeddings=pooled,
                       representation=torch.cat([scaled[m] for m in model.modalities], 1))
