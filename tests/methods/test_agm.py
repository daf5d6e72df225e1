"""AGM against its released rule (Lingy12/AGM_ICCV2023, model/CREMAD_net.py GradMod and
run/CREMAD_main.py train()): the Shapley responses, the scores, ratios, coefficients and
running means, the conditional clip, each on hand-built tensors; then whole steps against
the released step written out on the same model, the window, unimodal accuracy and the
state a resume restores."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import ConfigError, MethodConfig
from ccat.methods import METHODS
from ccat.methods.agm import (absent_input, clip_when_large, coefficients, eval_mode,
                              running_means, score_sum, shapley_responses)
from ccat.data.pipeline import PAD_ID
from method_helpers import TINY, build_pair, build_released
from train_helpers import CLASSES, random_batch


# The released rule, as run/CREMAD_main.py and model/CREMAD_net.py write it


def released_score(out, label):
    """train() L130-143: the mean over the batch of -log softmax(out)[k][label[k]], with
    -log(1e-8) where that log is infinite or the probability is below 1e-8."""
    softmax, score = nn.Softmax(dim=1), 0.0
    for k in range(out.size(0)):
        p = softmax(out)[k][label[k]]
        if torch.isinf(torch.log(p)) or p < 1e-8:
            score += -torch.log(torch.tensor(1e-8, dtype=out.dtype))
        else:
            score += -torch.log(p)
    return (score / out.size(0)).item()


def released_coeffs(score_audio, score_visual, train_score_a, train_score_v, alpha):
    """train() L145-152."""
    ratio_a = math.exp(score_visual - score_audio)
    ratio_v = math.exp(score_audio - score_visual)
    optimal_ratio_a = math.exp(train_score_v - train_score_a)
    optimal_ratio_v = math.exp(train_score_a - train_score_v)
    coeff_a = math.exp(alpha * (min(optimal_ratio_a - ratio_a, 10)))
    coeff_v = math.exp(alpha * (min(optimal_ratio_v - ratio_v, 10)))
    return coeff_a, coeff_v


def released_clip(model, fc_out_weight):
    """train() L233-238 (late fusion)."""
    grad_max, grad_min = torch.max(fc_out_weight.grad), torch.min(fc_out_weight.grad)
    if grad_max > 1 or grad_min < -1:
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)


class ReleasedAGM:
    """GradMod (CREMAD_net.py L25-72) around our model as its ``net``, and the AGM branch of
    train() (L63-69, L127-166, L233-238) without the optimizer step."""

    def __init__(self, model, alpha, modulation_starts, modulation_ends):
        self.net, self.alpha = model, alpha
        self.window = (modulation_starts, modulation_ends)
        self.m_a_o, self.m_v_o = nn.Identity(), nn.Identity()  # Modality_out
        self.scale_a = self.scale_v = 1.0
        self.m_a_o.register_full_backward_hook(self.hooka)
        self.m_v_o.register_full_backward_hook(self.hookv)
        self.train_score_a = self.train_score_v = 0.0

    def hooka(self, m, ginp, gout):
        gnew = ginp[0].clone()
        return gnew * self.scale_a,

    def hookv(self, m, ginp, gout):
        gnew = ginp[0].clone()
        return gnew * self.scale_v,

    def run_net(self, inputs, pad_audio, pad_visual):
        """AVClassifier.forward L100-122: padded inputs zeroed, both encoded, the head."""
        inputs = dict(inputs)
        if pad_audio:
            inputs["audio"] = torch.zeros_like(inputs["audio"])
        if pad_visual:
            inputs["video"] = torch.zeros_like(inputs["video"])
        return self.net.fused_logits(self.net.encode_all(inputs))

    def forward(self, inputs):
        """GradMod.forward L57-72."""
        total_out = self.run_net(inputs, False, False)
        self.net.eval()
        pad_visual_out = self.run_net(inputs, False, True)
        pad_audio_out = self.run_net(inputs, True, False)
        self.net.train()
        m_a = self.m_a_o(0.5 * (total_out - pad_audio_out + pad_visual_out))  # Modality_Audio
        m_v = self.m_v_o(0.5 * (total_out - pad_visual_out + pad_audio_out))  # Modality_Visual
        return total_out, pad_visual_out, pad_audio_out, m_a + m_v

    def step(self, batch, epoch, iteration):
        """One step at 1-based ``epoch`` and ``iteration``; the gradients stay in the net."""
        total_out, pad_visual_out, pad_audio_out, out = self.forward(batch.inputs)
        out_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
        out_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
        loss = nn.CrossEntropyLoss()(out, batch.label)
        self.net.zero_grad(set_to_none=True)
        score_audio = released_score(out_a, batch.label)
        score_visual = released_score(out_v, batch.label)
        coeff_a, coeff_v = released_coeffs(score_audio, score_visual, self.train_score_a,
                                           self.train_score_v, self.alpha)
        n = iteration
        self.train_score_a = self.train_score_a * (n - 1) / n + score_audio / n
        self.train_score_v = self.train_score_v * (n - 1) / n + score_visual / n
        if self.window[0] <= epoch <= self.window[1]:
            self.scale_a, self.scale_v = coeff_a, coeff_v  # update_scale
        loss.backward()
        released_clip(self.net, self.net.classifier.weight)
        return loss.item(), (out_a.detach(), out_v.detach())


# Each formula on hand-built tensors


def test_shapley_responses_are_the_released_ones_and_sum_to_the_output():
    gen = torch.Generator().manual_seed(0)
    total, pad_visual, pad_audio = (torch.randn(4, 3, generator=gen) for _ in range(3))
    values = {frozenset({"audio", "video"}): total, frozenset({"audio"}): pad_visual,
              frozenset({"video"}): pad_audio}
    phi = shapley_responses(values, ["audio", "video"])
    assert torch.allclose(phi["audio"], 0.5 * (total - pad_audio + pad_visual), atol=1e-6)
    assert torch.allclose(phi["video"], 0.5 * (total - pad_visual + pad_audio), atol=1e-6)
    # Three modalities: BalanceBenchmark's Modality_Audio (AGM_trainer.py L33-38), v(empty) = 0.
    names = ["A", "V", "T"]
    v = {frozenset(s): torch.randn(4, 3, generator=gen)
         for s in ("AVT", "AV", "AT", "VT", "A", "V", "T")}
    AVT, AV, AT, VT, A, V, T = (v[frozenset(s)] for s in ("AVT", "AV", "AT", "VT", "A", "V", "T"))
    phi = shapley_responses(v, names)
    assert torch.allclose(phi["A"], 1 / 3 * (AVT - VT) + 1 / 6 * (AV - V + AT - T) + 1 / 3 * A,
                          atol=1e-6)
    assert torch.allclose(sum(phi.values()), AVT, atol=1e-5)


def test_scores_floor_the_probability_at_1e_8_as_released():
    logits = torch.tensor([[0.0, 1.0, 2.0], [30.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    label = torch.tensor([2, 1, 0])  # the second sample's p = e^-30 < 1e-8: floored
    assert score_sum(logits, label).item() / 3 == pytest.approx(released_score(logits, label),
                                                                rel=1e-6)
    assert score_sum(logits[1:2], label[1:2]).item() == pytest.approx(-math.log(1e-8), rel=1e-6)


@pytest.mark.parametrize("scores,running,alpha", [
    ((1.2, 0.7), (0.0, 0.0), 1.0),   # the first step: running means 0, target ratios 1
    ((0.9, 1.4), (1.1, 1.0), 2.5),
    ((1.0, 1.0), (0.2, 3.2), 1.0),   # r*^a = e^3: the gap is capped at 10 for audio
])
def test_coefficients_are_the_released_ones(scores, running, alpha):
    ours = coefficients(dict(zip(("audio", "video"), scores)),
                        dict(zip(("audio", "video"), running)), alpha)
    expected = released_coeffs(*scores, *running, alpha)
    assert (ours["audio"], ours["video"]) == pytest.approx(expected, rel=1e-12)
    if running == (0.2, 3.2):
        assert ours["audio"] == pytest.approx(math.exp(10 * alpha))


def test_running_means_are_the_mean_of_every_step_so_far():
    running, history = {"audio": 0.0}, [1.5, 0.5, 2.5, 1.0]
    for n, s in enumerate(history, start=1):
        running = running_means(running, {"audio": s}, n)
    assert running["audio"] == pytest.approx(sum(history) / len(history))


def _clip_case(scale):
    torch.manual_seed(0)
    model = nn.Module()
    model.classifier, model.other = nn.Linear(3, 2), nn.Linear(2, 2)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    return model


@pytest.mark.parametrize("scale", [0.1, 3.0])  # inside [-1, 1]: untouched; outside: clipped
def test_clip_is_the_released_conditional_clip(scale):
    ours, released = _clip_case(scale), _clip_case(scale)
    before = [p.grad.clone() for p in ours.parameters()]
    clip_when_large(ours)
    released_clip(released, released.classifier.weight)
    for a, b, g in zip(ours.parameters(), released.parameters(), before):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)
        assert torch.equal(a.grad, g) == (scale < 1)
    norm = torch.cat([p.grad.flatten() for p in ours.parameters()]).norm()
    assert (norm.item() == pytest.approx(1.0, rel=1e-4)) == (scale > 1)


def test_absent_inputs_are_zero_after_normalization_and_padding_for_tokens():
    pixels = torch.full((2, 3, 4, 4), 200, dtype=torch.uint8)
    assert absent_input(pixels).dtype == torch.float32 and not absent_input(pixels).any()
    ids = torch.tensor([[101, 7, 102]])
    assert torch.equal(absent_input(ids), torch.full_like(ids, PAD_ID))
    spec = torch.ones(2, 5, dtype=torch.float16)
    assert absent_input(spec).dtype == torch.float16 and not absent_input(spec).any()


def test_eval_mode_restores_each_modules_own_mode():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout(0.5))
    model[1].eval()  # a submodule kept in eval by its owner
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


# Whole steps against the released step


def test_train_steps_apply_the_released_gradients_scores_and_window():
    """Two epochs of two steps, the window ending after the first (released 1-based
    epoch <= 1): the second epoch keeps the last coefficients the first set."""
    ours, model, step = build_released("agm", alpha=5.0, modulation_ends=1)
    _, twin, _ = build_released("agm")
    twin.load_state_dict(model.state_dict())
    released = ReleasedAGM(twin, alpha=5.0, modulation_starts=0, modulation_ends=1)
    iteration, outs = 0, []
    for epoch in range(2):
        ours.begin_epoch(epoch)
        for seed in range(2):
            batch = random_batch(6, seed=10 * epoch + seed)
            iteration += 1
            out = ours.train_step(model, batch, step)
            loss, _ = released.step(batch, epoch + 1, iteration)
            outs.append(out)
            assert out["loss"] == pytest.approx(loss, rel=1e-5)
            assert out["coef/audio"] == pytest.approx(released.scale_a, rel=1e-4)
            assert out["coef/video"] == pytest.approx(released.scale_v, rel=1e-4)
            assert ours.running["audio"] == pytest.approx(released.train_score_a, rel=1e-5)
            grads = step.grads[-1]
            for name, p in twin.named_parameters():
                assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-7), name
    assert outs[1]["coef/audio"] != pytest.approx(1.0, abs=1e-3)  # the modulation is visible
    assert outs[2]["coef/audio"] == outs[3]["coef/audio"] == outs[1]["coef/audio"]


def test_a_step_whose_head_gradient_leaves_the_unit_box_is_clipped_as_released():
    """Running means far apart (r*^a = e^2) make audio's coefficient e^32: the classifier's
    gradient leaves [-1, 1] and every gradient is clipped to norm 1, as released."""
    ours, model, step = build_released("agm", alpha=5.0)
    _, twin, _ = build_released("agm")
    twin.load_state_dict(model.state_dict())
    released = ReleasedAGM(twin, alpha=5.0, modulation_starts=0, modulation_ends=20)
    released.train_score_a, released.train_score_v = 1.0, 3.0
    ours.running, ours.iteration = {"audio": 1.0, "video": 3.0}, 4
    ours.begin_epoch(0)
    batch = random_batch(6, seed=5)
    ours.train_step(model, batch, step)
    released.step(batch, 1, 5)
    grads = step.grads[-1]
    for name, p in twin.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-7), name
    assert torch.cat([g.flatten() for g in grads.values()]).norm().item() == pytest.approx(
        1.0, rel=1e-4)

def test_the_coefficients_really_scale_the_backward():
    """The same step with alpha 0 (every coefficient 1) gives other encoder gradients."""
    grads = {}
    for alpha in (0.0, 5.0):
        method, model, step = build_released("agm", alpha=alpha)
        # Audio has fitted better so far (r*^a = e^0.5); now both fit alike: audio falls
        # short of its target ratio and is boosted, video exceeds its and is damped.
        method.running, method.iteration = {"audio": 1.0, "video": 1.5}, 5
        out = method.train_step(model, random_batch(6, seed=3), step)
        grads[alpha] = step.grads[-1]
    assert out["coef/video"] < 0.5 < 5.0 < out["coef/audio"]
    for m in ("audio", "video"):
        names = [k for k in grads[0.0] if k.startswith(f"encoders.{m}.")]
        assert not all(torch.allclose(grads[0.0][k], grads[5.0][k]) for k in names)


def test_modulation_waits_for_its_first_epoch():
    method, model, step = build_released("agm", alpha=5.0, modulation_starts=1)
    method.begin_epoch(0)
    out = method.train_step(model, random_batch(6, seed=0), step)
    assert out["coef/audio"] == out["coef/video"] == 1.0
    method.begin_epoch(1)
    out = method.train_step(model, random_batch(6, seed=1), step)
    assert out["coef/audio"] != 1.0 and out["coef/video"] != 1.0


# Unimodal accuracy, state, refusals


def test_unimodal_prediction_is_the_released_response_and_ignores_the_other_modality():
    method, model = build_pair("agm")
    model.eval()
    released = ReleasedAGM(model, 1.0, 0, 20)
    batch = random_batch(4)
    with torch.no_grad():
        before = method.predict(model, batch)
        total = released.run_net(batch.inputs, False, False)
        pad_visual, pad_audio = (released.run_net(batch.inputs, *pads)
                                 for pads in ((False, True), (True, False)))
        batch.inputs["video"] = torch.randn_like(batch.inputs["video"])
        after = method.predict(model, batch)
    assert torch.allclose(before.unimodal["audio"], 0.5 * (total - pad_audio + pad_visual),
                          atol=1e-5)
    assert torch.allclose(before.unimodal["video"], 0.5 * (total - pad_visual + pad_audio),
                          atol=1e-5)
    assert torch.allclose(before.fused, total, atol=1e-6)
    # Concat is linear: phi^a = W_a z^a + a constant, the video's change cancels (to rounding).
    assert torch.allclose(before.unimodal["audio"], after.unimodal["audio"], atol=1e-5)
    assert not torch.allclose(before.unimodal["video"], after.unimodal["video"])
    assert before.representation.shape == (4, 2 * TINY.width)
    assert set(before.embeddings) == set(model.modalities)


def test_state_round_trips_and_the_restored_method_continues_alike():
    method, model, step = build_released("agm", alpha=2.0, modulation_ends=1)
    for epoch, seed in ((0, 0), (0, 1), (1, 2)):
        method.begin_epoch(epoch)
        method.train_step(model, random_batch(6, seed=seed), step)
    state = method.state_dict()
    assert state["iteration"] == 3 and set(state["running"]) == set(state["scales"]) == {
        "audio", "video"}
    restored = METHODS.get("agm")(method.cfg, epochs=3)
    restored.load_state_dict(state)
    restored.begin_epoch(1)
    assert restored.state_dict() == state
    batch = random_batch(6, seed=7)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    first = method.train_step(model, batch, step)
    model.load_state_dict(model_state)
    second = restored.train_step(model, batch, step)
    assert first == second


def test_one_modality_and_an_overflowing_alpha_are_refused():
    method = METHODS.get("agm")(MethodConfig(name="agm"), epochs=1)
    with pytest.raises(ConfigError, match="needs at least two"):
        method.build_model({"audio": {"kind": "spectrogram", "shape": [257, 32],
                                      "dtype": "float16"}}, len(CLASSES), TINY)
    with pytest.raises(ConfigError, match="alpha"):
        METHODS.get("agm")(MethodConfig(name="agm", params={"alpha": 100.0}), epochs=1)

