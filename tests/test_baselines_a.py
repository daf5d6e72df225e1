"""FiLM, BiGated, OGM-GE and QMF: each method's mathematics on hand-built tensors, a real
step of each, the unimodal protocol (Sec. 4.1) and a QMF run resumed through the loop."""

import copy
import io
import math

import pytest
import torch

from ccat.config import ConfigError, MethodConfig, ModelConfig
from ccat.methods import METHODS
from ccat.methods.ogm_ge import coefficients, correct_class_score, discrepancy_ratios
from ccat.methods.protocol import without_others
from ccat.methods.qmf import confidence, normalized, ranking_loss
from ccat.models import FUSIONS
from ccat.models.encoders import EncoderOutput
from ccat.step import Step
from ccat.train import train
from train_helpers import (CLASSES, TINY_MODALITIES, interrupt_then_resume, random_batch,
                           tiny_config, write_tiny_dataset)

TINY = ModelConfig(width=16, encoder_width=4, encoder_blocks=[1, 1, 1, 1], heads=2, ffn_mult=2)


def build(name, **params):
    method = METHODS.get(name)(MethodConfig(name=name, params=params), epochs=3)
    method.bind_data(train_samples=6, batches_per_epoch=1)  # random_batch(): 6 samples
    torch.manual_seed(0)
    return method, method.build_model(TINY_MODALITIES, len(CLASSES), TINY)


# OGM-GE


def test_ogm_scores_ratios_and_eq10_coefficients():
    uniform = torch.zeros(4, len(CLASSES))
    assert correct_class_score(uniform, torch.tensor([0, 1, 2, 0])) == pytest.approx(4 / 3)
    ratios = discrepancy_ratios({"audio": 2.0, "video": 1.0})
    assert ratios == pytest.approx({"audio": 2.0, "video": 0.5})
    assert coefficients(ratios, 0.8) == pytest.approx({"audio": 1 - math.tanh(1.6), "video": 1.0})
    # More than two modalities: each score over the mean of the others.
    assert discrepancy_ratios({"a": 4.0, "b": 2.0, "c": 2.0}) == pytest.approx(
        {"a": 2.0, "b": 2 / 3, "c": 2 / 3})
    with pytest.raises(ConfigError, match="modulation"):
        build("ogm_ge", modulation="OGM-GE")


def ogm_step(epoch, **params):
    """One OGM-GE step at ``epoch`` (lr 0, so gradients stay readable) and the plain
    fused-CE gradients of the same model for comparison."""
    method, model = build("ogm_ge", **params)
    reference = copy.deepcopy(model)
    batch = random_batch()
    reference.zero_grad()
    torch.nn.functional.cross_entropy(reference.fused_logits(reference.encode_all(batch.inputs)),
                                      batch.label).backward()
    method.begin_epoch(epoch)
    out = method.train_step(model, batch, Step(torch.optim.SGD(model.parameters(), lr=0.0)))
    plain = dict(reference.named_parameters())
    return out, model, {n: plain[n].grad for n, _ in model.named_parameters()}


def test_ogm_scales_only_the_dominant_encoder_gradient():
    out, model, plain = ogm_step(0, modulation="OGM")
    coefs = {m: out[f"coef/{m}"] for m in model.modalities}
    assert sorted(coefs.values())[0] < 1.0 == sorted(coefs.values())[1]
    for name, p in model.named_parameters():
        owner = name.split(".")[1] if name.startswith("encoders.") else None
        expected = plain[name] * coefs[owner] if owner else plain[name]
        assert torch.allclose(p.grad, expected, atol=1e-7), name


def test_ogm_ge_noise_only_inside_the_modulation_window():
    out, model, plain = ogm_step(0, modulation_starts=1, modulation_ends=2)
    assert all(out[f"coef/{m}"] == 1.0 for m in model.modalities)
    assert all(torch.equal(p.grad, plain[n]) for n, p in model.named_parameters())
    out, model, plain = ogm_step(1, modulation_starts=1, modulation_ends=2)
    assert torch.equal(model.classifier.weight.grad, plain["classifier.weight"])
    for m in model.modalities:
        name, p = max(((n, p) for n, p in model.named_parameters()
                       if n.startswith(f"encoders.{m}.")), key=lambda item: item[1].numel())
        noise = p.grad - plain[name] * out[f"coef/{m}"]
        assert noise.abs().max() > 0
        assert noise.std() == pytest.approx(plain[name].std().item(), rel=0.25)  # GE's N(0, std^2)


# QMF


def test_qmf_confidence_is_the_scaled_negative_energy():
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5]])
    expected = [0.1 * math.log(3.0), 0.1 * math.log(math.exp(2) + math.exp(-1) + math.exp(0.5))]
    assert confidence(logits, 0.1).tolist() == pytest.approx(expected)


def test_qmf_ranking_loss_is_zero_when_confidence_ranks_inversely_to_history():
    history = torch.tensor([0.0, 1.0])  # sample 0 has the better (lower) history
    assert ranking_loss(torch.tensor([2.0, 0.0]), history).item() == 0.0
    # Inverted: each pair pays the confidence gap plus the history gap, 2 + 1.
    assert ranking_loss(torch.tensor([0.0, 2.0]), history).item() == pytest.approx(3.0)
    # Right order but closer than the history gap: the margin is still owed.
    assert ranking_loss(torch.tensor([0.5, 0.0]), history).item() == pytest.approx(0.5)
    assert ranking_loss(torch.tensor([0.3, 0.9]), torch.tensor([0.5, 0.5])).item() == 0.0
    assert normalized({"a": 1.0, "b": 3.0, "c": 2.0}, ["c", "a"]).tolist() == [0.5, 0.0]


def test_qmf_step_keeps_a_loss_history_that_survives_a_checkpoint():
    method, model = build("qmf")
    batch = random_batch()
    with torch.no_grad():
        feats = model.encode_all(batch.inputs)
        first = {m: torch.nn.functional.cross_entropy(
            model.unimodal_logits(m, feats[m].pooled), batch.label, reduction="none").tolist()
            for m in model.modalities}
    step = Step(torch.optim.SGD(model.parameters(), lr=0.0))
    out = method.train_step(model, batch, step)
    assert out["rank"] >= 0 and math.isfinite(out["loss"])
    for m in model.modalities:
        assert list(method.history[m]) == batch.keys
        assert list(method.history[m].values()) == pytest.approx(first[m], rel=1e-5)
    method.train_step(model, batch, step)  # lr 0: the same losses again, accumulated
    assert list(method.history["audio"].values()) == pytest.approx(
        [2 * v for v in first["audio"]], rel=1e-5)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored, _ = build("qmf")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.history == method.history


def test_qmf_fuses_unimodal_logits_weighted_by_confidence():
    method, model = build("qmf", confidence_scale=0.5)
    model.eval()
    batch = random_batch(4)
    out = method.predict(model, batch)
    logits = {m: model.unimodal_logits(m, out.embeddings[m]) for m in model.modalities}
    expected = sum(0.5 * torch.logsumexp(v, 1, keepdim=True) * v for v in logits.values())
    assert torch.allclose(out.fused, expected, atol=1e-5)
    assert out.representation.shape == (4, 16 * len(model.modalities))


# FiLM and BiGated


def test_film_and_bigated_fusion_formulas():
    torch.manual_seed(0)
    film = FUSIONS.get("film")(["audio", "video"], TINY)
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        film.film.weight.zero_()
        film.film.bias.copy_(torch.cat([torch.full((16,), 2.0), torch.full((16,), 1.0)]))
    feats = {"audio": EncoderOutput(None, x), "video": EncoderOutput(None, y)}
    assert torch.allclose(film(feats), 2 * y + 1)
    gated = FUSIONS.get("bigated")(["audio", "video"], TINY)
    hx, hy = gated.proj[0](x), gated.proj[1](y)
    fused = gated(feats)
    assert fused.shape == (3, 16) and gated.out_dim == 16
    assert torch.allclose(fused, torch.sigmoid(hx) * hy + torch.sigmoid(hy) * hx)
    for name in ("film", "bigated"):
        with pytest.raises(ValueError, match="exactly two modalities"):
            FUSIONS.get(name)(["a", "b", "c"], TINY)


def test_without_others_zeroes_tokens_and_pooled_but_keeps_the_mask():
    mask = torch.ones(2, 3, dtype=torch.bool)
    feats = {"a": EncoderOutput(torch.ones(2, 3, 4), torch.ones(2, 4)),
             "b": EncoderOutput(torch.ones(2, 3, 4), torch.ones(2, 4), mask)}
    kept = without_others(feats, "a")
    assert kept["a"] is feats["a"] and kept["b"].mask is mask
    assert not kept["b"].tokens.any() and not kept["b"].pooled.any()


@pytest.mark.parametrize("name", ["film", "bigated", "ogm_ge", "qmf"])
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
    if name in ("film", "bigated"):  # the fusion scores one modality by the same protocol
        for m in model.modalities:
            assert torch.allclose(model.unimodal_logits(m, after.embeddings[m]),
                                  after.unimodal[m], atol=1e-6)


# Through the loop


def test_qmf_resume_restores_the_loss_history(tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "tiny", counts={"train": 8, "val": 2, "test": 2},
                              size=16, steps=16)
    cfg = tiny_config(data, tmp_path / "full", method="qmf", epochs=2)
    train(cfg)
    cfg.out = str(tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=2)
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                 for run in ("full", "cut"))
    assert full["method_state"]["history"] == cut["method_state"]["history"]
    assert full["method_state"]["history"]["audio"]  # keyed by the training samples' keys
    assert all(key.startswith("train_") for key in full["method_state"]["history"]["audio"])
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
