"""One training step of every registered method: finite loss, exactly the intended params."""

import dataclasses
import math

import pytest
import torch

from ccat.config import (METHOD_CONFIGS, ConfigError, MethodConfig, ModelConfig, RunConfig,
                         read_yaml, save_config)
from ccat.methods import METHODS
from ccat.run_config import load_config
from ccat.step import NonFiniteLoss, Step
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


def test_ccat_pretrain_updates_encoders_fusion_classifier_not_lora():
    _, _, _, changes = one_step("ccat", 0)
    assert owners(changes[0]) == {"encoders.audio", "encoders.video", "fusion", "classifier"}


def test_ccat_alternate_updates_one_modality_at_a_time_through_a_fixed_classifier():
    _, model, out, changes = one_step("ccat", 1, beta=1.0)  # beta 1: every sample selected (c < 1)
    # Algorithm 1: primary audio, primary video, then secondary audio, secondary video.
    assert [owners(c) for c in changes] == [{"encoders.audio", "lora.audio"},
                                           {"encoders.video", "lora.video"}] * 2
    assert out["selected/audio"] == out["selected/video"] == 1.0


def test_ccat_without_selected_samples_skips_the_secondary_update():
    _, _, out, changes = one_step("ccat", 1, beta=0.0)
    assert len(changes) == 2 and out["selected/audio"] == 0.0


def test_ccat_ablations_change_what_is_updated():
    _, _, _, changes = one_step("ccat", 1, alternating=False, secondary=False,
                                fixed_classifier=False)
    assert owners(changes[0]) == {"encoders.audio", "encoders.video", "lora.audio",
                                  "lora.video", "classifier"}
    _, model, _, changes = one_step("ccat", 1, lora=False, secondary=False)
    assert len(model.lora) == 0 and owners(changes[0]) == {"encoders.audio"}


def test_fresh_encoders_restart_stage_two():
    for fresh in (True, False):
        m = METHODS.get("ccat")(MethodConfig(params={"fresh_encoders": fresh}), epochs=2)
        model = m.build_model(TINY_MODALITIES, len(CLASSES), TINY)
        before = model.encoders["audio"].proj.weight.detach().clone()
        m.begin_stage(m.stages()[1], model)
        assert torch.equal(model.encoders["audio"].proj.weight, before) is not fresh


def test_step_refuses_a_non_finite_loss():
    param = torch.nn.Parameter(torch.ones(2))
    step = Step(torch.optim.SGD([param], lr=0.1))
    step.zero_grad()
    step.backward((param * float("nan")).sum())
    with pytest.raises(NonFiniteLoss):
        step.step()
    assert torch.equal(param, torch.ones(2))


def test_unimodal_ensemble_keeps_each_encoder_on_its_own_loss():
    method, model, _, changes = one_step("unimodal", 0)
    assert owners(changes[0]) == {"encoders.audio", "encoders.video", "classifier"}
    out = method.predict(model, random_batch(3))
    assert torch.allclose(out.fused, (out.unimodal["audio"] + out.unimodal["video"]) / 2)


def test_step_clips_the_gradient_norm():
    param = torch.nn.Parameter(torch.zeros(4))
    step = Step(torch.optim.SGD([param], lr=1.0), grad_clip=0.5)
    step.zero_grad()
    step.backward((param * torch.tensor([10.0, 0.0, 0.0, 0.0])).sum())
    step.step()
    assert torch.allclose(param, torch.tensor([-0.5, 0.0, 0.0, 0.0]))


def test_ccat_ablation_switches_each_change_the_update():
    """Each of Table 2's switches gives a different stage-2 update than full CCAT, and a
    secondary pass that selects nothing leaves the model (batch-norm statistics included)
    exactly as if secondary updates were off."""

    def state(**switches):
        _, model, _, _ = one_step("ccat", 1, **switches)
        return {k: v.clone() for k, v in model.state_dict().items()}

    full = state(beta=1.0)
    for switch in ("alternating", "secondary", "fixed_classifier", "lora"):
        changed = state(beta=1.0, **{switch: False})
        assert any(not torch.equal(full[k], changed[k]) for k in full.keys() & changed.keys())
    nothing_selected, off = state(beta=0.0), state(secondary=False)
    assert all(torch.equal(nothing_selected[k], off[k]) for k in off)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_methods_params_round_trip_through_yaml_and_its_file_validates(name, tmp_path):
    """A method's Params, saved as a run config and loaded back, come back unchanged;
    configs/methods/<name>.yaml, where there is one, names the method, holds only values
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
