"""QMF: confidence, ranking loss and loss history on hand-built tensors, a real step, a run
resumed through the loop, and the history's normalization against the released code
(issue 13, item 10)."""

import io
import math

import numpy as np
import pytest
import torch

from ccat.config import ConfigError
from ccat.methods.qmf import confidence, normalized, ranking_loss
from ccat.step import Step
from ccat.train import train
from method_helpers import build_pair as build
from method_helpers import build_released
from train_helpers import interrupt_then_resume, random_batch, tiny_config, write_tiny_dataset


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


# Against the released code (issue 13, item 10)


def released_history_normalized(n_data, updates, query):
    """QMF's History: np.zeros(n_data), += per-sample losses, min-max over all n_data."""
    correctness = np.zeros(n_data)
    for idx, losses in updates:
        correctness[idx] += losses
    data = correctness[query]
    return (data - correctness.min()) / (correctness.max() - correctness.min())


def test_qmf_history_normalizes_over_every_training_sample_as_released():
    updates = [([0, 1], np.array([1.0, 3.0])), ([2, 1], np.array([2.0, 1.0]))]
    history: dict[str, float] = {}
    for idx, losses in updates:
        for i, v in zip(idx, losses):
            history[f"k{i}"] = history.get(f"k{i}", 0.0) + v
    expected = released_history_normalized(5, updates, [2, 0])  # samples 3, 4 unseen
    assert normalized(history, ["k2", "k0"], total=5).tolist() == pytest.approx(expected.tolist())
    assert normalized(history, ["k2", "k0"], total=3).tolist() == pytest.approx(
        released_history_normalized(3, updates, [2, 0]).tolist())  # all seen: the same rule
    assert normalized(history, ["k2", "k0"]).tolist() == pytest.approx([1 / 3, 0.0])  # seen


def test_qmf_step_ranks_against_the_released_normalization():
    batch = random_batch()

    def rank(**params):
        method, model, step = build_released("qmf", **params)
        method.bind_data(train_samples=100, batches_per_epoch=1)
        return method.train_step(model, batch, step)["rank"]

    assert rank() != pytest.approx(rank(history_norm="seen"))
    with pytest.raises(ConfigError, match="history_norm"):
        build_released("qmf", history_norm="all")
