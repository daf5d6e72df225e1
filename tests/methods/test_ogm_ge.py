"""OGM-GE: the scores, ratios and Eq. 10 coefficients on hand-built tensors, a real step,
and the coefficients against the released code's branches (issue 13, item 12)."""

import copy
import math

import pytest
import torch

from ccat.config import ConfigError, differences, from_dict, to_dict
from ccat.methods.ogm_ge import (coefficients, correct_class_score, discrepancy_ratios,
                                  modulate)
from ccat.run_config import load_config
from ccat.step import Step
from method_helpers import build_pair as build
from train_helpers import CLASSES, random_batch


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


# Against the released code (issue 13, item 12)


def released_ogm_coefficients(score_a, score_v, alpha):
    """main.py: ratio_v = score_v / score_a; if ratio_v > 1 damp v, else damp a."""
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        return 1, 1 - math.tanh(alpha * max(ratio_v, 0))
    return 1 - math.tanh(alpha * max(ratio_a, 0)), 1


def test_ogm_coefficients_match_the_released_branches_ties_included():
    for score_a, score_v in ((2.0, 1.0), (1.0, 2.0), (1.5, 1.5), (0.3, 0.3), (1.0, 1.0001)):
        coefs = coefficients(discrepancy_ratios({"audio": score_a, "video": score_v}), 0.8)
        assert (coefs["audio"], coefs["video"]) == pytest.approx(
            released_ogm_coefficients(score_a, score_v, 0.8))
    tie = coefficients({"audio": 1.0, "video": 1.0}, 0.8)
    assert tie["audio"] == pytest.approx(0.336, abs=1e-3) and tie["video"] == 1.0


def released_modulation(named_grads, coeff, modulation):
    """main.py L135-148 for one modality's parameters: only 4-D gradients (convolution
    kernels) change; OGM_GE: g * coeff + zeros_like(g).normal_(0, g.std().item() + 1e-8),
    OGM: g *= coeff."""
    out = {}
    for name, grad in named_grads:
        grad = grad.clone()
        if len(grad.size()) == 4:
            if modulation == "OGM_GE":
                grad = grad * coeff + torch.zeros_like(grad).normal_(0, grad.std().item() + 1e-8)
            elif modulation == "OGM":
                grad *= coeff
        out[name] = grad
    return out


@pytest.mark.parametrize("modulation", ["OGM_GE", "OGM"])
def test_variant_released_modulates_as_the_released_code_on_hand_built_tensors(modulation):
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Flatten(),
                                  torch.nn.Linear(12, 2))
    grads = [torch.randn_like(p) for p in encoder.parameters()]
    for p, g in zip(encoder.parameters(), grads):
        p.grad = g.clone()
    torch.manual_seed(7)
    modulate(encoder, 0.3, noise=modulation == "OGM_GE", released=True)
    torch.manual_seed(7)
    expected = released_modulation(zip(range(len(grads)), grads), 0.3, modulation)
    for k, p in enumerate(encoder.parameters()):
        assert torch.equal(p.grad, expected[k]), k  # bit for bit, the noise's draws included
    assert torch.equal(encoder[2].weight.grad, grads[2])  # 2-D: untouched, as released


def test_variant_released_takes_the_released_window_and_old_runs_read_as_paper():
    for variant, modulated in (("paper", False), ("released", True)):  # main.py: epoch <= ends
        method, _ = build("ogm_ge", modulation_ends=2, variant=variant)
        method.begin_epoch(2)
        assert method.modulating() is modulated
    for variant in ("paper", "released"):  # OPG's ends (61) is the release's inclusive 60
        method, _ = build("opg", variant=variant)
        method.begin_epoch(60)
        assert method.modulating()
        method.begin_epoch(61)
        assert not method.modulating()
    for name in ("ogm_ge", "opg"):  # a run saved before the param: its code was "paper"
        saved = to_dict(load_config(None, [f"method.name={name}"]))
        del saved["method"]["params"]["variant"]
        saved = from_dict(saved)
        assert differences(saved, load_config(None, [f"method.name={name}"])) == []
        released = load_config(None, [f"method.name={name}", "method.params.variant=released"])
        assert differences(saved, released) == [("method.params.variant", "paper", "released")]
