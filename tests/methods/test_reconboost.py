"""ReconBoost against its released rule (huacong/ReconBoost train.py at 14ab57a): the
boosting loss with its KL reconcilement, the constant c0 before any other learner, the GA
term's missing gradient, the round schedule, both phases' updates, the fresh momentum of
each phase, the ensemble's prediction and the state a resume restores."""

import math

import pytest
import torch
import torch.nn.functional as F

from ccat.config import ConfigError, MethodConfig
from ccat.methods import METHODS
from ccat.methods.reconboost import BOOST, RECTIFY, Turn, boosting_loss, turn_at
from ccat.step import Step
from ccat.train import train
from method_helpers import TINY, build_released, owners
from train_helpers import (CLASSES, TINY_MODALITIES, interrupt_then_resume, random_batch,
                           tiny_config, write_tiny_dataset)


# The released rule, as train.py writes it


def released_boosting_loss(out_obj, out_join, lbl, weight1, weight2, n_class):
    """train.py L337-340, per sample (its caller takes .mean() at L352)."""
    target = torch.zeros(len(lbl), n_class).scatter_(1, lbl.view(-1, 1), 1)
    return - weight1 * (target * out_obj.log_softmax(1)).mean(-1) \
        + weight2 * (target * out_join.detach().softmax(1) * out_obj.log_softmax(1)).mean(-1)


def released_c0_join(c0, batch_size):
    """train.py L331-332: an empty ensemble returns c0, viewed as one column per sample."""
    return torch.as_tensor(c0, dtype=torch.float32).view(-1, 1).expand(batch_size, 1)


def released_phase1_loss(out_obj, out_join, pre_out_obj, lbl, stage, alpha=0.5):
    """train.py L339-352 with use_ga: the boosting loss, plus alpha * the GA term after stage 0."""
    loss = released_boosting_loss(out_obj, out_join, lbl, 5.0, 1.0, out_obj.shape[1])
    if stage > 0:
        ga = F.mse_loss(out_obj.detach().softmax(1), pre_out_obj.detach().softmax(1))
        loss = loss + alpha * ga
    return loss.mean()


LOGITS = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [-1.0, 2.0, 0.0]]
OTHERS = [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 4.0], [3.0, 0.0, 0.0]]
LABEL = torch.tensor([0, 1, 2, 1])


def test_boosting_loss_and_its_gradient_are_the_released_ones_on_hand_built_tensors():
    ours_in = torch.tensor(LOGITS, requires_grad=True)
    released_in = torch.tensor(LOGITS, requires_grad=True)
    others = torch.tensor(OTHERS)
    ours = boosting_loss(ours_in, others, LABEL, 5.0, 1.0)
    released = released_boosting_loss(released_in, others, LABEL, 5.0, 1.0, 3).mean()
    assert ours.item() == pytest.approx(released.item(), rel=1e-6)
    ours.backward()
    released.backward()
    assert torch.allclose(ours_in.grad, released_in.grad, atol=1e-7)
    # The gradient the rule must produce: (w1 - w2 q_y) / C * (p - y) / B per sample.
    p, q = torch.tensor(LOGITS).softmax(1), others.softmax(1)[range(4), LABEL]
    expected = ((5.0 - q)[:, None] / 3 * (p - F.one_hot(LABEL, 3)) / 4)
    assert torch.allclose(ours_in.grad, expected, atol=1e-7)


def test_boosting_loss_is_the_weighted_ce_minus_the_kl_reconcilement():
    """C * loss_i = w1 CE_i - w2 KL(y * q || p) + w2 q_y log q_y: the KL against the others'
    correct-class confidence enters with a minus sign (the learner is pushed from them)."""
    logits, others = torch.tensor(LOGITS), torch.tensor(OTHERS)
    log_p, yq = logits.log_softmax(1), F.one_hot(LABEL, 3) * others.softmax(1)
    kl = F.kl_div(log_p, yq, reduction="none").sum(1)  # sum_c yq_c (log yq_c - log p_c)
    q_y = yq.sum(1)
    per_sample = 5.0 * F.cross_entropy(logits, LABEL, reduction="none") - 1.0 * kl \
        + 1.0 * q_y * q_y.log()
    assert boosting_loss(logits, others, LABEL, 5.0, 1.0).item() == \
        pytest.approx(per_sample.mean().item() / 3, rel=1e-6)
    # Uniform learner and others: (w1 - w2 / 3) log 3 / 3 for every sample.
    uniform = boosting_loss(torch.zeros(4, 3), torch.zeros(4, 3), LABEL, 5.0, 1.0)
    assert uniform.item() == pytest.approx((5.0 - 1 / 3) * math.log(3) / 3, rel=1e-6)


def test_before_any_other_learner_q_is_one_as_the_released_c0():
    logits = torch.tensor(LOGITS)
    released = released_boosting_loss(logits, released_c0_join(0.8444, 4), LABEL, 5.0, 1.0, 3)
    ours = boosting_loss(logits, None, LABEL, 5.0, 1.0)
    assert ours.item() == pytest.approx(released.mean().item(), rel=1e-6)
    assert ours.item() == pytest.approx((5.0 - 1.0) / 3 * F.cross_entropy(logits, LABEL).item(),
                                        rel=1e-6)


def test_the_released_ga_term_changes_the_loss_value_but_not_its_gradient():
    out_obj = torch.tensor(LOGITS, requires_grad=True)
    with_ga = released_phase1_loss(out_obj, torch.tensor(OTHERS), torch.tensor(OTHERS).flip(1),
                                   LABEL, stage=1)
    (grad_with,) = torch.autograd.grad(with_ga, out_obj)
    ours = boosting_loss(out_obj, torch.tensor(OTHERS), LABEL, 5.0, 1.0)
    (grad_ours,) = torch.autograd.grad(ours, out_obj)
    assert with_ga.item() > ours.item()
    assert torch.allclose(grad_with, grad_ours, atol=1e-7)


# The schedule


def test_rounds_map_onto_epochs_boosting_then_rectification_modalities_in_turn():
    mods = ["audio", "video"]
    turns = [turn_at(e, mods, 4, 4) for e in range(17)]
    assert turns[:4] == [Turn(0, BOOST, "audio")] * 4
    assert turns[4:8] == [Turn(0, RECTIFY, "audio")] * 4
    assert turns[8:12] == [Turn(1, BOOST, "video")] * 4
    assert turns[12:16] == [Turn(1, RECTIFY, "video")] * 4
    assert turns[16] == Turn(2, BOOST, "audio")
    assert [turn_at(e, mods + ["text"], 1, 0).modality for e in range(4)] == \
        ["audio", "video", "text", "audio"]


# Real steps (lr 0: the model stays put, the gradients stay readable)


def at_epoch(epoch, lr=0.0):
    """The method (one boosting and one rectification epoch per round) at ``epoch``."""
    method, model, step = build_released("reconboost", lr=lr, boost_epochs=1, rectify_epochs=1)
    method.begin_epoch(epoch)
    return method, model, step


def learner(model, batch, m):
    return model.unimodal_logits(m, model.encode(batch.inputs, m).pooled)


def test_a_boosting_step_trains_the_turns_learner_against_the_others_ensemble():
    method, model, step = at_epoch(2)  # round 1: video's turn, audio already a member
    batch = random_batch(6, seed=3)
    out = method.train_step(model, batch, step)
    assert owners(step.grads[0]) == {"encoders.video", "classifier"}
    with torch.no_grad():
        join = model.ensemble.rate * learner(model, batch, "audio")
        released = released_boosting_loss(learner(model, batch, "video"), join, batch.label,
                                          5.0, 1.0, len(CLASSES)).mean()
    assert out["loss"] == pytest.approx(released.item(), rel=1e-5)
    assert out["loss/video"] == out["loss"] and out["round"] == 1.0


def test_rectification_trains_every_member_the_head_and_the_boost_rate_on_the_ensembles_ce():
    method, model, step = at_epoch(1)  # round 0: only audio has joined
    batch = random_batch(6, seed=4)
    out = method.train_step(model, batch, step)
    assert owners(step.grads[0]) == {"encoders.audio", "classifier", "ensemble"}
    with torch.no_grad():
        ce = F.cross_entropy(model.ensemble.rate * learner(model, batch, "audio"), batch.label)
    assert out["loss"] == pytest.approx(ce.item(), rel=1e-5) and out["boost_rate"] == 1.0
    method.begin_epoch(3)  # round 1: both are members
    method.train_step(model, batch, step)
    assert owners(step.grads[1]) == {"encoders.audio", "encoders.video", "classifier",
                                     "ensemble"}


def test_each_phase_starts_from_an_empty_momentum_as_a_new_sgd_would():
    method, model, _ = build_released("reconboost", boost_epochs=1, rectify_epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step, weight = Step(opt), model.classifier[0].weight
    method.begin_epoch(0)
    method.train_step(model, random_batch(6, seed=0), step)
    method.begin_epoch(1)  # rectification: a new phase
    for seed, carried in ((1, 0.0), (2, 0.9)):
        before = opt.state[weight]["momentum_buffer"].clone()
        captured = []
        hook = weight.register_post_accumulate_grad_hook(lambda p: captured.append(p.grad.clone()))
        method.train_step(model, random_batch(6, seed=seed), step)
        hook.remove()
        assert torch.allclose(opt.state[weight]["momentum_buffer"],
                              carried * before + captured[0], atol=1e-7)


def test_the_ensemble_predicts_with_its_members_and_each_learner_alone():
    method, model, step = at_epoch(0)
    model.eval()
    batch = random_batch(4)
    with torch.no_grad():
        assert not method.predict(model, batch).fused.any()  # nobody's turn yet: empty
    model.train()
    method.train_step(model, random_batch(6), step)  # audio joins
    model.eval()
    changed = random_batch(4)
    changed.inputs["video"] = torch.randn_like(changed.inputs["video"])
    with torch.no_grad():
        before, after = method.predict(model, batch), method.predict(model, changed)
        assert torch.allclose(before.fused, model.ensemble.rate * before.unimodal["audio"])
        assert torch.equal(before.fused, after.fused)  # video is no member yet
        assert not torch.allclose(before.unimodal["video"], after.unimodal["video"])
        assert torch.allclose(before.unimodal["video"], learner(model, batch, "video"))
    assert model.state_dict()["ensemble.members"].tolist() == [1, 0]
    method.begin_epoch(2)
    model.train()
    method.train_step(model, random_batch(6), step)  # video's turn: both are members
    model.eval()
    with torch.no_grad():
        out = method.predict(model, batch)
    assert torch.allclose(out.fused, model.ensemble.rate * (out.unimodal["audio"]
                                                            + out.unimodal["video"]), atol=1e-6)
    assert out.representation is not None and set(out.embeddings) == set(model.modalities)


def test_state_round_trip_continues_the_phase_where_a_fresh_method_would_restart_it():
    method, model, step = build_released("reconboost", boost_epochs=3)
    method.begin_epoch(0)
    for seed in range(2):
        method.train_step(model, random_batch(6, seed=seed), step)
    state = method.state_dict()
    assert state == {"round": 0, "phase": BOOST, "modality": "audio", "phase_updates": 2}
    fresh, _ = build_released("reconboost", boost_epochs=3)[:2]
    resumed, _ = build_released("reconboost", boost_epochs=3)[:2]
    resumed.load_state_dict(state)
    for m in (fresh, resumed):
        m.begin_epoch(1)
    assert resumed.state_dict() == state
    assert fresh.phase_updates == 0  # what a resume without the state would do: new momentum
    resumed.begin_epoch(3)
    assert resumed.state_dict() == {"round": 0, "phase": RECTIFY, "modality": "audio",
                                    "phase_updates": 0}


def test_resume_in_the_middle_of_a_phase_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 8, "val": 2, "test": 2},
                              size=16, steps=16)
    cfg = tiny_config(data, tmp_path / "full", method="reconboost", epochs=4)
    cfg.method.params = {"boost_epochs": 2, "rectify_epochs": 1}
    history = train(cfg)
    assert ["loss/audio" in r for r in history] == [True, True, False, False]
    assert "boost_rate" in history[2] and "loss/video" in history[3]
    cfg.out = str(tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=2)  # cut between the two boosting epochs
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                 for run in ("full", "cut"))
    assert full["model"]["ensemble.members"].tolist() == [1, 1]
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])


def test_the_shared_head_is_the_released_mlp_or_one_linear_layer():
    _, model, _ = build_released("reconboost")
    assert [type(layer) for layer in model.classifier] == [torch.nn.Linear, torch.nn.ReLU,
                                                           torch.nn.Linear]
    assert model.classifier[0].out_features == 256
    method, model, step = build_released("reconboost", head_hidden=0)
    assert isinstance(model.classifier, torch.nn.Linear)
    method.train_step(model, random_batch(6), step)
    assert owners(step.grads[0]) == {"encoders.audio", "classifier"}


def test_one_modality_is_refused_in_one_sentence():
    method = METHODS.get("reconboost")(MethodConfig(name="reconboost"), epochs=2)
    with pytest.raises(ConfigError, match="needs at least two; the data has audio$"):
        method.build_model({"audio": TINY_MODALITIES["audio"]}, len(CLASSES), TINY)
