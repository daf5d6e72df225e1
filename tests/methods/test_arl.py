"""ARL: the released weights (inverse entropy and logit magnitude through a tempered softmax)
on hand-built logits, the encoder gradients scaled by 1 + w after warm-up, the warm-up, and
the released reading (issue 26)."""

import pytest
import torch
import torch.nn.functional as F

from ccat.methods.arl import arl_weights, logit_magnitude, mean_entropy
from ccat.methods.zeroing import without_others
from method_helpers import build_released
from train_helpers import random_batch


def released_weights(out_a, out_v, T):
    """shicaiwei123/ICCV2025-ARL 358af4f6, main_arl_variance.py:116-153, written out."""
    calculate_a = torch.mean(torch.abs(out_a), 0).sum().cpu().detach().numpy()
    calculate_b = torch.mean(torch.abs(out_v), 0).sum().cpu().detach().numpy()
    out_a = torch.softmax(out_a, dim=1)
    out_v = torch.softmax(out_v, dim=1)
    H_a = torch.sum(-out_a * torch.log(out_a + 1e-16), dim=1).mean().cpu().detach().numpy()
    H_v = torch.sum(-out_v * torch.log(out_v + 1e-16), dim=1).mean().cpu().detach().numpy()
    H_a = H_a.item()
    H_v = H_v.item()
    H_a_n, H_v_n = H_a / (H_a + H_v), H_v / (H_a + H_v)
    H_a = torch.clamp(torch.tensor(H_a_n), 0.3).cpu().detach().numpy()
    H_v = torch.clamp(torch.tensor(H_v_n), 0.3).cpu().detach().numpy()
    a_weight = 1 / H_a
    v_weight = 1 / H_v
    calculate_a_n, calculate_b_n = calculate_a / (calculate_a + calculate_b), calculate_b / (
        calculate_a + calculate_b)
    calculate_a, calculate_b = calculate_a_n, calculate_b_n
    a_weight, v_weight = a_weight / (a_weight + v_weight), v_weight / (a_weight + v_weight)
    return F.softmax(torch.tensor([(calculate_b * a_weight) * T, calculate_a * v_weight * T]),
                     dim=0)  # the release's implicit dim, which is 0 for a vector


@pytest.mark.parametrize("sharp", [1.0, 6.0])  # 6: audio so sure that its entropy is floored
@pytest.mark.parametrize("T", [8.0, 1.0])
def test_arl_weights_equal_the_released_code(sharp, T):
    gen = torch.Generator().manual_seed(3)
    out_a = sharp * torch.randn(8, 6, generator=gen)
    out_a[torch.arange(8), torch.arange(8) % 6] += 3 * sharp
    out_v = 0.3 * torch.randn(8, 6, generator=gen)
    ours = arl_weights(torch.stack([logit_magnitude(out_a), logit_magnitude(out_v)]),
                       torch.stack([mean_entropy(out_a), mean_entropy(out_v)]), T, 0.3)
    expected = released_weights(out_a, out_v, T)
    assert torch.allclose(ours, expected.float(), rtol=1e-5, atol=1e-6)
    assert ours.sum().item() == pytest.approx(1.0)
    if sharp > 1:  # the floor is in play, and audio's weight reads video's small logits
        assert mean_entropy(out_a) / (mean_entropy(out_a) + mean_entropy(out_v)) < 0.3
        assert ours[0] < ours[1]


def plain_grads(model, batch, gamma):
    """Gradients of loss_f + gamma (loss_a + loss_v) with no scaling (L107-111, 159)."""
    model.zero_grad(set_to_none=True)
    feats = model.encode_all(batch.inputs)
    loss = F.cross_entropy(model.fused_logits(feats), batch.label) + gamma * sum(
        F.cross_entropy(model.fused_logits(without_others(feats, m)), batch.label)
        for m in model.modalities)
    loss.backward()
    weights = {}
    with torch.no_grad():
        logits = [model.fused_logits(without_others(feats, m)) for m in model.modalities]
        weights = released_weights(*logits, 8.0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, weights


@pytest.mark.parametrize("reading", ["paper", "released", "warmup"])
def test_arl_scales_each_encoders_gradient_by_one_plus_its_weight(reading):
    method, model, step = build_released("arl", weights="paper" if reading == "warmup"
                                         else reading)
    batch = random_batch()
    method.begin_epoch(5 if reading == "warmup" else 6)  # --start 5: epochs 0..5 warm up
    expected, weights = plain_grads(model, batch, 1.0 if reading == "warmup" else 4.0)
    out = method.train_step(model, batch, step)
    grads = step.grads[0]
    assert grads.keys() == expected.keys()
    scale = {"paper": 1 + weights, "released": torch.tensor([1.5, 1.5]),
             "warmup": torch.tensor([1.0, 1.0])}[reading]
    for name, g in grads.items():
        factor = 1.0
        for i, m in enumerate(model.modalities):
            if name.startswith(f"encoders.{m}."):
                factor = scale[i].item()
        assert torch.allclose(g, factor * expected[name], rtol=1e-4, atol=1e-5), \
            (name, (g - factor * expected[name]).abs().max())
    if reading == "paper":
        assert out["weight/audio"] == pytest.approx(weights[0].item(), rel=1e-5)
        assert scale[0] != scale[1]


def test_arl_resume_after_warm_up_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    from ccat.train import train
    from train_helpers import interrupt_then_resume, tiny_config, write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", counts={"train": 8, "val": 2, "test": 2},
                              size=16, steps=16)
    cfg = tiny_config(data, tmp_path / "full", method="arl", epochs=2)
    cfg.method.params = {"start": 0}  # epoch 1 (the resumed one) scales the gradients
    history = train(cfg)
    assert history[0]["weight/audio"] == 0.0 and 0 < history[1]["weight/audio"] < 1
    cfg.out = str(tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=2)
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                 for run in ("full", "cut"))
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
