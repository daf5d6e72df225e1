"""The contribution estimator (Eq. 5-6) on hand-built tensors."""

import torch

from ccat.contribution import contributions


def test_identical_modalities_get_equal_contributions():
    z = torch.randn(8, 6)
    shares = contributions({"a": z, "b": z.clone()}, torch.randn(8, 6))
    assert torch.allclose(shares["a"], torch.full((8,), 0.5))


def test_aligned_modality_gets_the_larger_share_and_shares_sum_to_one():
    fused = torch.randn(16, 8)
    shares = contributions({"aligned": fused + 0.01 * torch.randn(16, 8),
                            "noise": torch.randn(16, 8)}, fused)
    assert (shares["aligned"] > shares["noise"]).all()
    assert torch.allclose(shares["aligned"] + shares["noise"], torch.ones(16))


def test_temperature_sharpens_the_shares():
    torch.manual_seed(0)
    fused = torch.randn(16, 8)
    parts = {"aligned": fused + 0.5 * torch.randn(16, 8), "noise": torch.randn(16, 8)}
    soft = contributions(parts, fused)["aligned"].mean()
    sharp = contributions(parts, fused, temperature=0.1)["aligned"].mean()
    assert 0.5 < soft < sharp <= 1.0


def test_hand_computed_value():
    fused = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos 1 with its own fused vector, 0 across
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # cos 0 with its own, 1 across
    score_a = torch.log(torch.tensor(2.0)) + 1 - torch.logsumexp(torch.tensor([1.0, 0.0]), 0)
    score_b = torch.log(torch.tensor(2.0)) + 0 - torch.logsumexp(torch.tensor([0.0, 1.0]), 0)
    expected = torch.softmax(torch.stack([score_a, score_b]), 0)[0]
    assert torch.allclose(contributions({"a": a, "b": b}, fused)["a"], expected.expand(2))
