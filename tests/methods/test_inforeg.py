"""InfoReg: the Fisher trace, the prime-learning-window rate, the regulation coefficients
and the proximal pull, each against the released rule (GeWu-Lab/InfoReg_CVPR2025 main.py
at ea7b9d5) on hand-built tensors; then real steps and the state a resume restores."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import ConfigError
from ccat.methods.inforeg import pull_back, regulation, trace_step, window_rate
from method_helpers import build_pair, build_released
from ccat.train import train
from train_helpers import interrupt_then_resume, random_batch, tiny_config, write_tiny_dataset


# The released rule, as main.py writes it


def released_trace(grads_per_step):
    """main.py 507-513, 569-572: fim[name] += g * g every step; at the epoch's end
    fim_trace = sum over layers of fim[name].mean()."""
    fim = [torch.zeros_like(g) for g in grads_per_step[0]]
    for grads in grads_per_step:
        for acc, g in zip(fim, grads):
            acc += g * g
    return sum(acc.mean().item() for acc in fim)


def released_k(audio_trace_list, epoch):
    """main.py 237-243 (audio_trace_list starts as ten zeros, main.py 694)."""
    if epoch == 0:
        return 1
    tr1 = sum(audio_trace_list[-10:]) / 10
    tr2 = sum(audio_trace_list[-11:-1]) / 10
    return (tr1 - tr2) / tr1


def released_betas(score_a, score_v, k):
    """main.py 465-485."""
    if score_a > score_v and k > 0.05:
        return 0.95 * math.exp(math.tanh(score_a - score_v)), 0
    if score_a < score_v and k > 0.05:
        return 0, 0.1 * math.exp(math.tanh(score_v - score_a))
    return 0, 0


def test_trace_is_the_released_sum_of_layer_means_of_squared_gradients():
    encoder = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    steps = [[torch.tensor([1.0, -2.0]).view(2, 1, 1, 1), torch.arange(6.0).view(3, 2)],
             [torch.tensor([3.0, 0.5]).view(2, 1, 1, 1), -torch.ones(3, 2)]]
    ours = 0.0
    for conv_grad, linear_grad in steps:
        for p in encoder.parameters():  # biases and batch norm get gradients the trace ignores
            p.grad = torch.full_like(p, 100.0)
        encoder[0].weight.grad, encoder[3].weight.grad = conv_grad.clone(), linear_grad.clone()
        ours += trace_step(encoder).item()
    # step 1: mean(1, 4) + mean(0, 1, 4, 9, 16, 25) = 2.5 + 55 / 6; step 2: 4.625 + 1
    assert ours == pytest.approx(2.5 + 55 / 6 + 4.625 + 1)
    assert ours == pytest.approx(released_trace(steps))


def test_window_rate_is_the_released_ten_epoch_moving_average_rate():
    padded = [0.0] * 10
    assert window_rate(padded, 10) == 1 == released_k(padded, 0)
    # after three epochs with traces 4, 2, 1: tr1 = 7 / 10, tr2 = 6 / 10, k = 1 / 7
    history = padded + [4.0, 2.0, 1.0]
    assert window_rate(history, 10) == pytest.approx(1 / 7) == released_k(history, 3)
    for epochs in (1, 5, 11, 25):  # growing, then flat information: k falls below 0.05
        history = padded + [1.0 - 0.9 ** (e + 1) for e in range(epochs)]
        assert window_rate(history, 10) == pytest.approx(released_k(history, epochs))
    assert window_rate(padded + [1.0] * 20, 10) == 0.0  # flat: the window has closed
    assert window_rate(padded + [0.0], 10) == 0.0  # no information measured: no regulation


def test_regulation_coefficients_are_the_released_branches():
    base = {"audio": 0.95, "video": 0.1}
    for score_a, score_v, k in ((3.0, 1.0, 0.5), (1.0, 3.0, 0.5), (2.0, 2.0, 0.5),
                                (3.0, 1.0, 0.05), (3.0, 1.0, 0.04), (1.5, 1.2, 1.0)):
        betas = regulation({"audio": score_a, "video": score_v}, base, k, 0.05)
        assert (betas["audio"], betas["video"]) == pytest.approx(
            released_betas(score_a, score_v, k))
    betas = regulation({"audio": 3.0, "video": 1.0}, base, 0.5, 0.05)
    assert betas["audio"] == pytest.approx(0.95 * math.exp(math.tanh(2.0)))  # 0.95 e^0.964
    # three modalities: the top one against the mean of the others
    three = regulation({"a": 4.0, "b": 1.0, "c": 3.0}, {"a": 1.0, "b": 1.0, "c": 1.0}, 1.0, 0.05)
    assert three == pytest.approx({"a": math.exp(math.tanh(2.0)), "b": 0.0, "c": 0.0})


def test_pull_back_adds_beta_times_the_distance_to_the_reference():
    encoder = nn.Linear(2, 1)
    reference = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    with torch.no_grad():
        encoder.weight.copy_(torch.tensor([[1.0, -1.0]]))
        encoder.bias.fill_(0.5)
    reference["weight"] = torch.tensor([[0.0, 1.0]])
    reference["bias"] = torch.tensor([0.0])
    encoder.weight.grad = torch.tensor([[0.1, 0.2]])
    encoder.bias.grad = None  # no gradient: left without one
    pull_back(encoder, reference, 2.0)
    assert torch.allclose(encoder.weight.grad, torch.tensor([[0.1 + 2.0, 0.2 - 4.0]]))
    assert encoder.bias.grad is None


# Real steps


def plain_grads(model, batch):
    """The gradient of CE(fused) + sum_m CE(unimodal_m) (main.py 456-458) on a copy."""
    copy_ = copy.deepcopy(model)
    feats = copy_.encode_all(batch.inputs)
    loss = F.cross_entropy(copy_.fused_logits(feats), batch.label) + sum(
        F.cross_entropy(copy_.unimodal_logits(m, feats[m].pooled), batch.label)
        for m in copy_.modalities)
    loss.backward()
    return {n: p.grad for n, p in copy_.named_parameters() if p.grad is not None}


def test_steps_pull_the_more_confident_encoder_to_its_epoch_start_and_measure_it():
    method, model, step = build_released("inforeg", lr=0.5)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.begin_epoch(0)
    first = method.train_step(model, random_batch(seed=0), step)
    assert first["window_rate"] == 1.0  # epoch 0: inside the window
    batch = random_batch(seed=1)
    expected = plain_grads(model, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = method.train_step(model, batch, step)
    regulated = [m for m in model.modalities if out[f"beta/{m}"] > 0]
    assert len(regulated) == 1 and all(out[f"beta/{m}"] == 0 for m in model.modalities
                                       if m not in regulated)
    prefix, beta = f"encoders.{regulated[0]}.", out[f"beta/{regulated[0]}"]
    for name, grad in step.grads[1].items():
        pull = beta * (before[name] - start[name]) if name.startswith(prefix) else 0.0
        assert torch.allclose(grad, expected[name] + pull, atol=1e-6), name
    assert any(not torch.equal(before[n], start[n]) for n in start if n.startswith(prefix))
    method.begin_epoch(1)  # the epoch's traces closed: one value per modality after the zeros
    assert all(len(t) == 11 and t[-1] > 0 for t in method.traces.values())
    assert method.rate == 1.0  # (t - 0) / t: the second epoch is inside the window too


def test_outside_the_window_the_update_is_the_plain_joint_one():
    method, model, step = build_released("inforeg", lr=0.5)
    method.traces = {m: [0.0] * 9 + [1.0] * 11 for m in model.modalities}  # flat: k = 0
    method.begin_epoch(20)
    assert method.rate == 0.0
    method.train_step(model, random_batch(seed=0), step)
    batch = random_batch(seed=1)
    expected = plain_grads(model, batch)
    out = method.train_step(model, batch, step)
    assert all(out[f"beta/{m}"] == 0 for m in model.modalities)
    assert all(torch.allclose(g, expected[n], atol=1e-6) for n, g in step.grads[1].items())


def test_state_round_trip_gives_the_same_next_window_rate():
    method, model, step = build_released("inforeg", lr=0.1)
    for epoch in range(2):
        method.begin_epoch(epoch)
        method.train_step(model, random_batch(seed=epoch), step)
    state = method.state_dict()
    fresh, _ = build_pair("inforeg")
    fresh.load_state_dict(state)
    method.begin_epoch(2)
    fresh.begin_epoch(2)
    assert fresh.traces == method.traces and fresh.rate == method.rate
    assert len(method.traces["audio"]) == 12


def test_params_that_do_not_fit_the_data_are_refused():
    with pytest.raises(ConfigError, match="one value per modality"):
        build_pair("inforeg", beta=[0.95])
    with pytest.raises(ConfigError, match="window_modality must be one of audio, video"):
        build_pair("inforeg", window_modality="text")
    method, _ = build_pair("inforeg", window_modality="video")
    assert method.watched() == "video"


def test_resume_restores_the_trace_history(tmp_path, monkeypatch):
    """A three-epoch run cut before its third epoch and resumed ends with the same method
    state as the uninterrupted run: the first two epochs' traces survive the cut."""
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 8, "val": 2, "test": 2},
                              size=16, steps=16)
    cfg = tiny_config(data, tmp_path / "full", method="inforeg", epochs=3)
    cfg.method.params = {"window": 1}
    train(cfg)
    cfg.out = str(tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=3)
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)["method_state"]
                 for run in ("full", "cut"))
    assert len(full["traces"]["audio"]) == 1 + 2 and full["traces"]["audio"][-1] > 0
    assert cut == full
