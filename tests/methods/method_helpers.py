"""Helpers for the method tests: a tiny model config, a method with its model built on
TINY_MODALITIES, and Steps that record what each update did."""

import torch

from ccat.config import MethodConfig, ModelConfig
from ccat.methods import METHODS
from ccat.step import Step
from train_helpers import CLASSES, TINY_MODALITIES, random_batch


TINY = ModelConfig(width=16, encoder_width=4, encoder_blocks=[1, 1, 1, 1], heads=2, ffn_mult=2)


class RecordingStep(Step):
    """A Step that records which parameters each update changed."""

    def __init__(self, optimizer, model):
        super().__init__(optimizer)
        self.model, self.changes = model, []

    def step(self):
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        super().step()
        self.changes.append({n for n, p in self.model.named_parameters()
                             if not torch.equal(p, before[n])})


class GradStep(Step):
    """A Step that records the gradients each update applies."""

    def __init__(self, optimizer, model):
        super().__init__(optimizer)
        self.model, self.grads = model, []

    def step(self, momentum=True):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                           if p.grad is not None})
        super().step(momentum)


def one_step(name, stage_index, **method):
    cfg = MethodConfig(name=name, params=method)
    m = METHODS.get(name)(cfg, epochs=2)  # CCAT: one epoch per stage
    m.bind_data(train_samples=6, batches_per_epoch=1)
    torch.manual_seed(0)
    model = m.build_model(TINY_MODALITIES, len(CLASSES), TINY)
    m.begin_stage(m.stages()[stage_index], model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9, weight_decay=0.1)
    step = RecordingStep(opt, model)
    out = m.train_step(model, random_batch(), step)
    return m, model, out, step.changes


def owners(names):
    """'encoders.audio.trunk...' -> 'encoders.audio'; 'classifier.weight' -> 'classifier'."""
    return {".".join(n.split(".")[:2]) if n.split(".")[0] in ("encoders", "lora")
            else n.split(".")[0] for n in names}


def build_pair(name, **params):
    """The method (3 epochs, one 6-sample batch each, as random_batch()) and its model."""
    method = METHODS.get(name)(MethodConfig(name=name, params=params), epochs=3)
    method.bind_data(train_samples=6, batches_per_epoch=1)  # random_batch(): 6 samples
    torch.manual_seed(0)
    return method, method.build_model(TINY_MODALITIES, len(CLASSES), TINY)


def build_with_step(name, **params):
    """The method (1 epoch), its model and a GradStep at lr 0.1 over every parameter."""
    method = METHODS.get(name)(MethodConfig(name=name, params=params), epochs=1)
    torch.manual_seed(0)
    model = method.build_model(TINY_MODALITIES, len(CLASSES), TINY)
    step = GradStep(torch.optim.SGD(model.parameters(), lr=0.1), model)
    return method, model, step


def build_released(name, lr=0.0, **params):
    """The method (3 epochs of four 6-sample batches), its model and a GradStep at ``lr``
    (0: the gradients stay readable) for the tests against the released code."""
    method = METHODS.get(name)(MethodConfig(name=name, params=params), epochs=3)
    method.bind_data(train_samples=6, batches_per_epoch=4)
    torch.manual_seed(0)
    model = method.build_model(TINY_MODALITIES, len(CLASSES), TINY)
    return method, model, GradStep(torch.optim.SGD(model.parameters(), lr=lr), model)
