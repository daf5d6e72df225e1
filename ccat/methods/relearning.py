"""Diagnosing & Re-learning (Wei, Li, Feng, Hu, ECCV 2024): Diagnosing and Re-learning for
Balanced Multimodal Learning.

Concat fusion trained on the fused CE alone. Every ``reinit_epoch`` epochs, ``reinit_num``
times, each modality's learning state is diagnosed from the separability of its pooled
features z^m: the features of the training split and of the held-out ``val`` split are
each min-max scaled to [-1, 1] per dimension and clustered by k-means into as many
clusters as classes; the purity P of a clustering is the share of samples carrying their
cluster's majority label. The gap g^m = |P^m_train - P^m_val| (large for a modality
whose features separate the training data much better than held-out data: learnt well,
toward over-fitting) sets the re-initialization strength alpha^m = tanh(lambda g^m), and every parameter of encoder m is moved toward its
initial value: theta^m <- alpha^m theta^m_init + (1 - alpha^m) theta^m. The paper's text
was not at hand to check its equation numbers, so the formulas cite the released lines.

Matched to the released code, GeWu-Lab/Diagnosing_Relearning_ECCV2024 code/ours.py at
59b5787: ``purity_score`` (L63-95), ``reinit_score`` (L99-135: MinMaxScaler(-1, 1) fit per
split and modality, ``KMeans(n_clusters=n_classes, random_state=0)``, the gap, tanh),
``reinit`` (L139-169: every ``named_parameters()`` entry of ``audio_net`` / ``visual_net``,
so batch-norm running statistics and the optimizer's momentum are kept), ``get_feature``
(L300-324: the pooled encoder outputs ``a``, ``v`` in eval mode, no gradient, float32, so
also on CUDA without ccat's bf16 autocast), the schedule
(L415-427: after training epoch e when e % reinit_epoch == 0 and e > 0, the first
reinit_num times) and script/ours.sh (CREMA-D: move_lambda 3, reinit_epoch 20, reinit_num 3,
90 epochs). GeWu-Lab/BalanceBenchmark's ReLearning_trainer.py repeats the same rule.

Departures from that code, each for a reason:

- The schedule runs at the start of epoch e + 1 (0-based), the first moment the loop gives
  a method: the same model, since nothing happens between the released epoch e's
  evaluation and its re-init. A re-init due after the last epoch is skipped: the released
  code applies it to a model that is never trained or evaluated again.
- ``n_init`` is pinned (the released call leaves it to scikit-learn, whose default changed
  from 10 runs to ``'auto'`` in 1.4, one run for k-means++): 1, ``'auto'``'s value, as
  BalanceBenchmark's requirements.txt pins scikit-learn 1.4.2 for the same call;
  ``method.params.n_init=10`` is the pre-1.4 reading. ``algorithm='lloyd'``, ``init`` and
  ``max_iter`` are scikit-learn's defaults since 1.1, passed explicitly.
- The training split's features are read in the evaluation loader's order; the released
  loader for them shuffles (its transform is the evaluation one, without augmentation),
  which changes only where k-means++ starts.
- The features are z^m, the encoder's pooled output that the head reads, as the released
  ``a``, ``v`` are; ccat's encoders end in a linear projection to the model width, which is
  part of the encoder and is re-initialized with it.
- More than two modalities: each is diagnosed and re-initialized by the same rule, as
  BalanceBenchmark's trainer loops over its modalities.
- Under torchrun each rank's share of the features is gathered, rank 0 clusters the whole
  of each split and broadcasts the strengths, so every rank re-initializes alike.

The optimizer of the released run (SGD lr 0.002, momentum 0.9, weight decay 1e-4, batch 64,
no lr schedule: ``lr_decay_step`` is parsed and never used) is the run config's, shared by
every method. Unimodal accuracy: the released ``valid()`` scores only the fused output (the
model's ``head_audio``, ``head_video`` are never trained nor read), so each modality's
prediction is its block of the concat head with half the bias, Concat's rule (Sec. 4.1),
and re-learning's numbers compare with Concat's.

Cost over Concat: the same step (one forward, one backward). Per diagnosis (3 in the
CREMA-D setting's 90 epochs): one forward pass in eval mode without gradients over the
train and val splits, and 2 x (modalities) k-means fits on the CPU (``n_init`` runs each)
of N x D features; the encoders' initial parameters are kept in memory and in every
checkpoint until the last diagnosis (once more the encoders' size); with
``data.device_cache`` the train split's evaluation view is cached on the device besides its
training view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ccat.config import AT_LEAST_ONE, NON_NEGATIVE, MethodConfig, Range
from ccat.data.pipeline import Batch
from ccat.errors import CcatError
from ccat.methods.base import METHODS, RunData
from ccat.methods.joint import JointMethod
from ccat.models import MultimodalModel
from ccat.step import Step

HELD_OUT = "val"  # ours.py L356, L425: the diagnosis's second split is the validation set
KMEANS_SEED = 0  # ours.py L110: KMeans(..., random_state=0)
SCALED_RANGE = (-1, 1)  # ours.py L108: MinMaxScaler(feature_range=(-1, 1))


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """P = (1 / N) sum over clusters k of max over classes j of |cluster k and class j|:
    each cluster votes its majority label (purity_score, L63-95)."""
    from sklearn.metrics.cluster import contingency_matrix  # here: ccat imports every method

    table = contingency_matrix(labels, clusters)  # (classes, clusters)
    return float(table.max(axis=0).sum() / len(labels))


def cluster_purity(features: np.ndarray, labels: np.ndarray, num_classes: int,
                   n_init: int) -> float:
    """The purity of k-means (k = classes) on the features min-max scaled to [-1, 1]
    (reinit_score, L107-115)."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import MinMaxScaler

    scaled = MinMaxScaler(feature_range=SCALED_RANGE).fit_transform(features)
    clusters = KMeans(n_clusters=num_classes, init="k-means++", n_init=n_init,
                      algorithm="lloyd", random_state=KMEANS_SEED).fit_predict(scaled)
    return purity(labels, clusters)


def reinit_strength(train_purity: float, val_purity: float, move_lambda: float) -> float:
    """alpha^m = tanh(lambda |P^m_train - P^m_val|) (L122-127), by torch's float64 tanh as
    released (math.tanh can differ in the last bit)."""
    gap = torch.tensor(move_lambda * abs(train_purity - val_purity), dtype=torch.float64)
    return torch.tanh(gap).item()


@torch.no_grad()
def soft_reinit(encoder: nn.Module, initial: dict[str, torch.Tensor], strength: float) -> None:
    """theta <- alpha theta_init + (1 - alpha) theta for every parameter of ``encoder``, in
    place (L156-166); buffers (batch-norm running statistics) are left as they are."""
    for name, p in encoder.named_parameters():
        p.copy_(strength * initial[name].to(p.device) + (1 - strength) * p)


def diagnosis_epochs(reinit_epoch: int, reinit_num: int, epochs: int) -> list[int]:
    """The 0-based epochs that start with a diagnosis: the released re-init after epoch
    e = k * reinit_epoch, k = 1 .. reinit_num (L418-420), is the start of epoch e + 1; one
    at or past ``epochs`` never comes."""
    return [k * reinit_epoch + 1 for k in range(1, reinit_num + 1)
            if k * reinit_epoch + 1 < epochs]


def _whole_split(local: tuple[dict[str, np.ndarray], np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every rank's (features, labels) share concatenated in rank order (this rank's alone
    without torchrun)."""
    if not dist.is_initialized():
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return ({m: np.concatenate([p[0][m] for p in parts]) for m in local[0]},
            np.concatenate([p[1] for p in parts]))


@torch.no_grad()
def split_features(model: MultimodalModel, data: RunData, split: str
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each modality's pooled z^m (float32) and the labels of every sample of ``split``, in
    eval mode without augmentation (get_feature, L300-324)."""
    model.eval()
    feats: dict[str, list[np.ndarray]] = {m: [] for m in model.modalities}
    labels = []
    for batch in data.batches(split, train=False):
        encoded = model.encode_all(batch.inputs)
        for m in model.modalities:
            feats[m].append(encoded[m].pooled.float().cpu().numpy())
        labels.append(batch.label.cpu().numpy())
    return _whole_split(({m: np.concatenate(v) for m, v in feats.items()},
                         np.concatenate(labels)))


@METHODS.register("relearning")
class Relearning(JointMethod):
    fusion = "concat"  # models.py L94-95: head(cat(a, v)), one linear layer

    @dataclass
    class Params:
        RANGES: ClassVar[dict[str, Range]] = {"move_lambda": NON_NEGATIVE,
                                              "reinit_epoch": AT_LEAST_ONE,
                                              "reinit_num": NON_NEGATIVE, "n_init": AT_LEAST_ONE}
        move_lambda: float = 3.0  # lambda in tanh(lambda g); ours.sh --move_lambda 3
        reinit_epoch: int = 20  # ours.sh --reinit_epoch 20: after epochs 20, 40, 60 (0-based)
        reinit_num: int = 3  # ours.sh --reinit_num 3; 0 = Concat
        n_init: int = 1  # k-means runs: scikit-learn >= 1.4's 'auto' (see the docstring)

    def __init__(self, cfg: MethodConfig, epochs: int):
        super().__init__(cfg, epochs)
        self.initial: dict[str, dict[str, torch.Tensor]] = {}  # encoder m's theta at epoch 0
        self.strengths: dict[str, float] = {}  # this epoch's alpha^m; 0 without a diagnosis
        self.checked = False  # whether the data was checked for the diagnosis

    def schedule(self) -> list[int]:
        p = self.params
        return diagnosis_epochs(p.reinit_epoch, p.reinit_num, self.epochs)

    def state_dict(self) -> dict[str, Any]:
        """The encoders' initial parameters while a diagnosis is still to come."""
        return {"initial": self.initial}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial = {m: dict(p) for m, p in state.get("initial", {}).items()}

    def before_epoch(self, model: MultimodalModel, data: RunData) -> None:
        """Keep the initial encoders at epoch 0; at a scheduled epoch, diagnose and softly
        re-initialize every encoder (L418-427)."""
        self.strengths = {m: 0.0 for m in model.modalities}
        pending = [e for e in self.schedule() if e >= self.epoch]
        if not pending:
            return
        if not self.checked:
            check_data(data)
            self.checked = True
        if self.epoch == 0:
            self.initial = {m: {n: p.detach().clone() for n, p in
                                model.encoders[m].named_parameters()} for m in model.modalities}
        if self.epoch != pending[0]:
            return
        self.strengths = self.diagnose(model, data)
        for m, strength in self.strengths.items():
            soft_reinit(model.encoders[m], self.initial[m], strength)
        if len(pending) == 1:
            self.initial = {}  # the last diagnosis: nothing needs the initial weights now

    def diagnose(self, model: MultimodalModel, data: RunData) -> dict[str, float]:
        """alpha^m for every modality from the train and val purities (reinit_score), the
        same on every rank: rank 0's."""
        train, train_labels = split_features(model, data, "train")
        held, held_labels = split_features(model, data, HELD_OUT)
        strengths: dict[str, float] | None = None
        if data.rank == 0:
            classes, p = len(data.dataset.classes), self.params
            strengths = {m: reinit_strength(
                cluster_purity(train[m], train_labels, classes, p.n_init),
                cluster_purity(held[m], held_labels, classes, p.n_init), p.move_lambda)
                for m in model.modalities}
        if dist.is_initialized():
            box = [strengths]
            dist.broadcast_object_list(box, src=0)
            strengths = box[0]
        return strengths

    def train_step(self, model: MultimodalModel, batch: Batch, step: Step) -> dict[str, float]:
        """Concat's step; logs alpha^m applied at this epoch's start (0 without one)."""
        out = super().train_step(model, batch, step)
        out.update({f"reinit/{m}": self.strengths.get(m, 0.0) for m in model.modalities})
        return out


def check_data(data: RunData) -> None:
    """The diagnosis clusters train and val into as many clusters as classes: both splits
    must be there with at least that many samples."""
    dataset, classes = data.dataset, len(data.dataset.classes)
    if HELD_OUT not in dataset.splits:
        raise CcatError(f"method 'relearning' diagnoses each modality on the {HELD_OUT!r} "
                        f"split, which {dataset.root} lacks; build the data with a validation "
                        f"split, or set method.params.reinit_num=0")
    for split in ("train", HELD_OUT):
        if dataset.num_samples(split) < classes:
            raise CcatError(f"method 'relearning' clusters the {split!r} split of "
                            f"{dataset.root} ({dataset.num_samples(split)} samples) into its "
                            f"{classes} classes and needs at least {classes} samples there; "
                            f"build the data with more, or set method.params.reinit_num=0")
