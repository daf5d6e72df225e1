"""G-Blending: the blend weights against the released formula (GeWu-Lab/BalanceBenchmark,
balancemm/trainer/GBlending_trainer.py) on hand-built numbers; the super-epoch estimate
against the released loop written out here; the blended step; the state a resume restores
and the refusals."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ccat.config import ConfigError, MethodConfig
from ccat.data.reader import open_dataset
from ccat.errors import CcatError
from ccat.methods import METHODS, RunData
from ccat.methods.gblending import FUSED, Measured, blend
from ccat.methods.zeroing import without_others
from ccat.run_config import load_config
from ccat.step import Step
from ccat.train import fresh_step, train
from method_helpers import TINY, build_with_step
from train_helpers import interrupt_then_resume, random_batch, tiny_config, write_tiny_dataset

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-4  # the copies' optimizer in these tests


# The released rule, as GBlending_trainer.py writes it


def released_weights(losses):
    """super_epoch_origin L361-373, for {modality: (pre_train_loss, pre_validation_loss,
    now_train_loss, now_validation_loss)}."""
    weights = {}
    for modality, (pre_train_loss, pre_validation_loss, now_train_loss,
                   now_validation_loss) in losses.items():
        g = now_validation_loss - pre_validation_loss
        o_pre = pre_validation_loss - pre_train_loss
        o_now = now_validation_loss - now_train_loss
        o = o_now - o_pre
        weights[modality] = abs((g) / (o ** 2))
    sums = sum(weights.values())
    for modality in weights.keys():
        weights[modality] /= sums
    return weights


def released_super_epoch(model, data, keep, super_epoch):
    """super_epoch_origin L312-360 for one output: a temp model loaded with the model's
    state, a fresh SGD, super_epoch epochs, loss.item() summed over the training batches,
    the validation loss summed after epochs 0 and super_epoch - 1 (the other modalities
    zeroed at the features, this port's departure from zeroing the input)."""
    temp_model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(temp_model.parameters(), lr=LR, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)

    def out(batch):
        feats = temp_model.encode_all(batch.inputs)
        return temp_model.fused_logits(feats if keep is None else without_others(feats, keep))

    for epoch in range(super_epoch):
        temp_model.train()
        _loss = 0.0
        for batch in data.batches("train", train=True, epoch=epoch):
            optimizer.zero_grad()
            loss = F.cross_entropy(out(batch), batch.label)
            loss.backward()
            optimizer.step()
            _loss += loss.item()
        if epoch == 0 or epoch == super_epoch - 1:
            temp_model.eval()
            with torch.no_grad():
                _loss_v = 0
                for batch in data.batches("val", train=False):
                    _loss_v += F.cross_entropy(out(batch), batch.label).item()
                if epoch == 0:
                    pre_train_loss, pre_validation_loss = _loss, _loss_v
                else:
                    now_train_loss, now_validation_loss = _loss, _loss_v
    return pre_train_loss, pre_validation_loss, now_train_loss, now_validation_loss


def test_weights_are_the_released_normalized_abs_gain_over_squared_overfitting():
    losses = {"audio": (10.0, 3.0, 6.0, 2.5), "video": (12.0, 3.2, 11.0, 3.0),
              FUSED: (9.0, 2.8, 5.0, 2.6)}
    ours = blend({k: Measured(*v) for k, v in losses.items()})
    # audio: dG = -0.5, dO = -3.5 - -7 = 3.5; video: -0.2, -8 - -8.8 = 0.8; fused: -0.2, 3.8
    raw = {"audio": 0.5 / 3.5 ** 2, "video": 0.2 / 0.8 ** 2, FUSED: 0.2 / 3.8 ** 2}
    assert ours == pytest.approx({k: w / sum(raw.values()) for k, w in raw.items()})
    assert ours == pytest.approx(released_weights(losses))
    assert sum(ours.values()) == pytest.approx(1.0)
    assert max(ours, key=ours.get) == "video"  # the least overfitting per unit of gain


def test_a_degenerate_estimate_is_none_where_the_released_code_divides_by_zero():
    flat = Measured(10.0, 3.0, 8.0, 1.0)  # dO = (1 - 8) - (3 - 10) = 0
    assert blend({"audio": flat, FUSED: Measured(9.0, 2.8, 5.0, 2.6)}) is None
    with pytest.raises(ZeroDivisionError):
        released_weights({"audio": (10.0, 3.0, 8.0, 1.0)})
    no_gain = Measured(10.0, 3.0, 8.0, 3.0)  # dG = 0 for every output
    assert blend({"audio": no_gain, FUSED: no_gain}) is None


# The estimate, run on a tiny dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("gblending"),
                              counts={"train": 16, "val": 6, "test": 2}, size=16, steps=16)


def run_data(root):
    cfg = tiny_config(root, root / "unused")  # batches of 8

    def new_step(model):
        return Step(torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                                    weight_decay=WEIGHT_DECAY))

    return RunData(open_dataset(root), cfg.data, cfg.seed, torch.device("cpu"),
                   new_step=new_step)


def built(data, **params):
    method = METHODS.get("gblending")(MethodConfig(name="gblending", params=params), epochs=4)
    torch.manual_seed(0)
    model = method.build_model(data.dataset.modalities, len(data.dataset.classes), TINY)
    method.begin_epoch(0)
    return method, model


def test_the_estimate_trains_copies_as_the_released_super_epoch_and_leaves_the_run_alone(tiny):
    data = run_data(tiny)
    method, model = built(data, super_epoch=2)
    expected = {k: released_super_epoch(model, data, None if k == FUSED else k, 2)
                for k in [*model.modalities, FUSED]}
    measured = method.measure(model, data, "audio")
    assert dataclasses.astuple(measured) == pytest.approx(expected["audio"], rel=1e-5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    method.before_epoch(model, data)
    assert method.weights == pytest.approx(released_weights(expected), rel=1e-4)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)  # the run's own random stream is untouched


def test_the_copies_step_is_the_runs_optimizer_as_it_starts():
    """balancemm/train.py L86-87 and L314: the run's optimizer type and settings, reset to
    its initial state (the base lr, whatever the schedule has reached; no momentum yet)."""
    cfg = tiny_config(Path("unused"), Path("unused"))
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = 0.02, 0.8, 0.003
    cfg.optim.grad_clip = 1.5
    _, model, _ = build_with_step("gblending")
    step = fresh_step(model, cfg)
    group = step.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.02, 0.8, 0.003)
    assert step.grad_clip == 1.5 and not step.optimizer.state
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}


def test_mean_losses_are_the_per_sample_means_of_the_same_passes(tiny):
    data = run_data(tiny)
    method, model = built(data, super_epoch=2)
    summed = method.measure(model, data, "audio")
    method.params.losses = "mean"
    mean = method.measure(model, data, "audio")
    # two full training batches of 8; validation: one batch of 6 samples
    assert mean.pre_train == pytest.approx(summed.pre_train / 2, rel=1e-5)
    assert mean.now_val == pytest.approx(summed.now_val, rel=1e-5)


def test_estimates_only_at_each_super_epochs_start(tiny):
    data = run_data(tiny)
    method, model = built(data, super_epoch=2)
    method.weights = {"audio": 0.2, "video": 0.3, FUSED: 0.5}
    method.begin_epoch(1)
    method.before_epoch(model, data)
    assert method.weights == {"audio": 0.2, "video": 0.3, FUSED: 0.5}
    method.begin_epoch(2)
    method.before_epoch(model, data)
    assert method.weights != {"audio": 0.2, "video": 0.3, FUSED: 0.5}
    assert sum(method.weights.values()) == pytest.approx(1.0)


# The blended step


def test_train_step_descends_the_released_weighted_sum_of_the_heads_losses():
    method, model, step = build_with_step("gblending")
    _, before, _ = build_with_step("gblending")  # the same seed: the model before the step
    weights = {"audio": 0.2, "video": 0.3, FUSED: 0.5}
    method.load_state_dict({"weights": weights})
    batch = random_batch()
    out = method.train_step(model, batch, step)
    assert {out[f"weight/{k}"] for k in weights} == set(weights.values())
    z = {m: f.pooled for m, f in before.encode_all(batch.inputs).items()}
    w, b, width = before.classifier.weight, before.classifier.bias, TINY.width
    # avclassify_model.py L289-293: each modality's block of fc_out plus bias / 2
    unimodal = {m: z[m] @ w[:, i * width:(i + 1) * width].t() + b / 2
                for i, m in enumerate(before.modalities)}
    fused = torch.cat([z[m] for m in before.modalities], 1) @ w.t() + b
    loss = sum(weights[m] * F.cross_entropy(unimodal[m], batch.label) for m in unimodal) \
        + weights[FUSED] * F.cross_entropy(fused, batch.label)  # training_step L300-301
    loss.backward()
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for name, p in before.named_parameters():
        assert torch.allclose(step.grads[0][name], p.grad, atol=1e-6), name


def test_uniform_weights_before_the_first_estimate():
    method, model, step = build_with_step("gblending")
    out = method.train_step(model, random_batch(), step)
    assert [out[f"weight/{k}"] for k in ("audio", "video", FUSED)] == [1 / 3] * 3


# State and resume


def test_weights_round_trip_through_the_state_dict():
    method, _, _ = build_with_step("gblending")
    method.weights, method.kept = {"audio": 0.1, "video": 0.6, FUSED: 0.3}, True
    fresh, _, _ = build_with_step("gblending")
    fresh.load_state_dict(method.state_dict())
    assert fresh.weights == method.weights and fresh.kept


def test_a_run_resumed_at_a_super_epoch_start_re_estimates_the_same_weights(tmp_path,
                                                                           monkeypatch):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 8, "val": 2, "test": 2},
                              size=16, steps=16)
    cfg = tiny_config(data, tmp_path / "full", method="gblending", epochs=3)
    cfg.method.params = {"super_epoch": 2}  # estimates at epochs 0 and 2
    full_history = train(cfg)
    cfg.out = str(tmp_path / "cut")
    cut_history = interrupt_then_resume(cfg, monkeypatch, at_epoch=3)
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                 for run in ("full", "cut"))
    assert full["method_state"] == cut["method_state"]
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    assert full_history[-1]["weight/audio"] == cut_history[-1]["weight/audio"]
    assert full_history[0]["weight/audio"] != full_history[-1]["weight/audio"]  # re-estimated


# Refusals


def test_a_dataset_without_the_validation_split_is_refused(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 8, "test": 2}, size=16,
                              steps=16)
    cfg = tiny_config(data, tmp_path / "run", method="gblending", epochs=2)
    with pytest.raises(CcatError, match="validation split 'val', which .* lacks"):
        train(cfg)


def test_out_of_range_params_are_refused():
    with pytest.raises(ConfigError, match="super_epoch"):
        load_config(None, ["method.name=gblending", "method.params.super_epoch=1"])
    with pytest.raises(ConfigError, match="optim.epochs epochs, which must be at least 2"):
        METHODS.get("gblending")(MethodConfig(name="gblending", params={"mode": "offline"}), 1)
