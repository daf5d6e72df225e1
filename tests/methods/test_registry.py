"""What every registered method shares: one finite training step of each method and stage,
its whole budget, its Params round trip; the Step every method updates through; and the
unimodal protocol (Sec. 4.1) of the fusion baselines. One method's own tests are in
test_<name>.py beside this file."""

import dataclasses
import math

import pytest
import torch

from ccat.config import (METHOD_CONFIGS, ConfigError, MethodConfig, RunConfig, read_yaml,
                         save_config)
from ccat.methods import METHODS
from ccat.methods.zeroing import without_others
from ccat.models.encoders import EncoderOutput
from ccat.run_config import load_config
from ccat.step import NonFiniteLoss, Step
from method_helpers import build_pair as build
from method_helpers import one_step
from train_helpers import CLASSES, random_batch


# Every method


CASES = [(name, i) for name in METHODS.names()
         for i in range(len(METHODS.get(name)(MethodConfig(name=name), 2).stages()))]


@pytest.mark.parametrize("name,stage_index", CASES)
def test_one_step_of_every_method_and_stage_is_finite(name, stage_index):
    method, model, out, changes = one_step(name, stage_index)
    assert out and all(math.isfinite(v) for v in out.values())
    assert changes and all(changes)
    predicted = method.predict(model, random_batch(4))
    assert predicted.fused.shape == (4, len(CLASSES))
    assert set(predicted.unimodal) == set(model.modalities)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_optim_epochs_in_total(name):
    """What `make table` relies on: the same optim.epochs is every method's whole budget."""
    cfg = load_config(None, [f"method.name={name}", "optim.epochs=30"])
    method = METHODS.get(name)(cfg.method, cfg.optim.epochs)
    assert sum(stage.epochs for stage in method.stages()) == 30


@pytest.mark.parametrize("name", METHODS.names())
def test_every_methods_params_round_trip_through_yaml_and_its_file_validates(name, tmp_path):
    """A method's Params, saved as a run config and loaded back, come back unchanged;
    ccat/configs/methods/<name>.yaml, where there is one, names the method, holds only values
    that differ from the Params defaults and loads into the defaults plus those."""
    cls = METHODS.get(name).Params
    defaults = dataclasses.asdict(cls()) if cls else {}
    path = tmp_path / "run.yaml"
    save_config(RunConfig(method=MethodConfig(name=name, params=defaults)), path)
    cfg = load_config(path, method_configs=None)
    assert cfg.method.params == defaults
    assert METHODS.get(name)(cfg.method, 2).params == (cls() if cls else None)
    with pytest.raises(ConfigError, match=f"method {name!r} has no param 'no_such_key'"):
        load_config(path, ["method.params.no_such_key=1"], method_configs=None)
    method_file = METHOD_CONFIGS / f"{name}.yaml"
    if method_file.is_file():
        written = read_yaml(method_file)["method"]
        assert written["name"] == name
        differs = written.get("params", {})
        assert all(defaults[k] != v for k, v in differs.items()), "a copy of a default"
        assert load_config(None, [f"method.name={name}"]).method.params == {**defaults,
                                                                             **differs}


# The Step


def test_step_refuses_a_non_finite_loss():
    param = torch.nn.Parameter(torch.ones(2))
    step = Step(torch.optim.SGD([param], lr=0.1))
    step.zero_grad()
    step.backward((param * float("nan")).sum())
    with pytest.raises(NonFiniteLoss):
        step.step()
    assert torch.equal(param, torch.ones(2))


def test_step_clips_the_gradient_norm():
    param = torch.nn.Parameter(torch.zeros(4))
    step = Step(torch.optim.SGD([param], lr=1.0), grad_clip=0.5)
    step.zero_grad()
    step.backward((param * torch.tensor([10.0, 0.0, 0.0, 0.0])).sum())
    step.step()
    assert torch.allclose(param, torch.tensor([-0.5, 0.0, 0.0, 0.0]))


def two_updates(momentum_second: bool) -> float:
    """A primary SGD step (lr 0.1, momentum 0.9, gradient 1) then a secondary step with a
    near-zero gradient; returns how far the secondary step moved the parameter."""
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    step = Step(torch.optim.SGD([param], lr=0.1, momentum=0.9))
    for grad, momentum in ((1.0, True), (1e-6, momentum_second)):
        before = param.detach().clone()
        step.zero_grad()
        step.backward((param * grad).sum())
        if momentum:
            step.step()
        else:
            step.step(momentum=False)
    return float(before - param.detach())


def test_shared_secondary_step_reapplies_momentum_and_plain_does_not():
    assert two_updates(True) == pytest.approx(0.1 * (0.9 * 1.0 + 1e-6))  # 0.09: momentum again
    assert two_updates(False) == pytest.approx(0.1 * 1e-6)  # plain SGD: lr * g only


def test_plain_step_is_sgd_without_momentum_and_keeps_the_buffers():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([param], lr=0.5, momentum=0.9, weight_decay=0.1)
    step = Step(opt)
    step.zero_grad()
    step.backward((param * torch.tensor([1.0, 2.0])).sum())
    step.step()
    buffer = opt.state[param]["momentum_buffer"].clone()
    before = param.detach().clone()
    step.zero_grad()
    step.backward((param * torch.tensor([3.0, 0.0])).sum())
    step.step(momentum=False)
    expected = before - 0.5 * (torch.tensor([3.0, 0.0]) + 0.1 * before)
    assert torch.allclose(param.detach(), expected)
    assert torch.equal(opt.state[param]["momentum_buffer"], buffer)


# The unimodal protocol (Sec. 4.1)


def test_without_others_zeroes_tokens_and_pooled_but_keeps_the_mask():
    mask = torch.ones(2, 3, dtype=torch.bool)
    feats = {"a": EncoderOutput(torch.ones(2, 3, 4), torch.ones(2, 4)),
             "b": EncoderOutput(torch.ones(2, 3, 4), torch.ones(2, 4), mask)}
    kept = without_others(feats, "a")
    assert kept["a"] is feats["a"] and kept["b"].mask is mask
    assert not kept["b"].tokens.any() and not kept["b"].pooled.any()


@pytest.mark.parametrize("name", ["film", "bigated", "ogm_ge", "qmf", "pmr", "greedy",
                                  "valuation"])
def test_unimodal_prediction_ignores_the_other_modality(name):
    method, model = build(name)
    model.eval()
    batch = random_batch(4)
    with torch.no_grad():
        before = method.predict(model, batch)
        batch.inputs["video"] = torch.randn_like(batch.inputs["video"])
        after = method.predict(model, batch)
    assert torch.equal(before.unimodal["audio"], after.unimodal["audio"])
    assert not torch.allclose(before.unimodal["video"], after.unimodal["video"])
    assert not torch.allclose(before.fused, after.fused)
    assert set(before.embeddings) == set(model.modalities)
    assert before.representation is not None and after.representation is not None  # probe, t-SNE
    if name in ("film", "bigated"):  # the fusion scores one modality by the same protocol
        for m in model.modalities:
            assert torch.allclose(model.unimodal_logits(m, after.embeddings[m]),
                                  after.unimodal[m], atol=1e-6)
