"""OPM: the drop probabilities and one dropping step against the released code
(GeWu-Lab/BML_TPAMI2024 at 4b3aa4f, code/models/Classifier.py), written out below."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccat.config import ConfigError
from ccat.methods.ogm_ge import discrepancy_ratios
from ccat.methods.opm import drop_probabilities
from method_helpers import build_released
from train_helpers import CLASSES, TINY_MODALITIES, random_batch


class ReleasedScale(torch.autograd.Function):
    """Classifier.py L9-21 ``custom_autograd``: x / (1 - theta) forward, g / (1 - theta) back."""

    @staticmethod
    def forward(ctx, input, theta):
        ctx.save_for_backward(input, theta)
        return input / (1 - theta.item())

    @staticmethod
    def backward(ctx, grad_output):
        input, theta = ctx.saved_tensors
        return 1 / (1 - theta.item()) * grad_output.clone(), None


def released_calcu_q(performance_1, performance_2, q_base, fix_lambda):
    """Classifier.py L58-72 ``calcu_q``."""
    q = torch.tensor([0.0, 0.0])
    relu = nn.ReLU(inplace=True)
    ratio_1 = torch.tanh(relu(performance_1 / performance_2 - 1))
    ratio_2 = torch.tanh(relu(performance_2 / performance_1 - 1))
    q[0] = q_base * (1 + fix_lambda * ratio_1) if ratio_1 > 0 else 0
    q[1] = q_base * (1 + fix_lambda * ratio_2) if ratio_2 > 0 else 0
    return torch.clip(q, 0.0, 1.0)


def released_execute_drop(fead_list, q, dim_list, p_exe):
    """Classifier.py L31-55 ``Modality_drop.execute_drop`` on the CPU (the stray ``]`` that
    ends the released L53 removed)."""
    B, D = fead_list[0].shape
    exe_drop = torch.tensor(np.random.rand(1)) >= 1 - p_exe
    if not exe_drop:
        return fead_list, torch.ones([B], dtype=torch.int32)
    num_mod = len(fead_list)
    theta = sum(dim_list * q) / sum(dim_list)
    mask = torch.distributions.Bernoulli(1 - q).sample([B, 1]).permute(2, 1, 0).contiguous() \
        .reshape(num_mod, B, -1)
    concat_list = torch.mul(torch.stack(fead_list, dim=0), mask)
    concat_list = ReleasedScale.apply(concat_list, theta)
    update_flag = torch.sum(torch.transpose(mask, 0, 1).squeeze(-1), dim=1) > 0
    cleaned = torch.masked_select(concat_list, update_flag.unsqueeze(-1)).reshape(num_mod, -1, D)
    return [c.squeeze(0) for c in torch.chunk(cleaned, num_mod, dim=0)], update_flag


def test_drop_probabilities_equal_the_released_calcu_q():
    for s1, s2, q_base, lam in ((3.0, 2.0, 0.5, 0.5), (2.0, 3.0, 0.5, 0.5), (2.5, 2.5, 0.5, 0.5),
                                (9.0, 1.0, 0.8, 0.5), (1.0, 4.0, 0.4, 2.0), (1.2, 1.0, 0.0, 0.5)):
        ours = drop_probabilities(discrepancy_ratios({"audio": s1, "video": s2}), q_base, lam)
        released = released_calcu_q(torch.tensor(s1), torch.tensor(s2), q_base, lam)
        assert [ours["audio"], ours["video"]] == released.tolist()
    assert drop_probabilities({"audio": 9.0, "video": 1 / 9}, 0.8, 0.5)["audio"] == 1.0


def released_step(model, batch, q_base, lam, p_exe):
    """Classifier.forward L93-149 and main.py train() L95-114 after warm-up: the fused CE
    of the kept samples, backpropagated; returns the loss, or None for a skipped batch."""
    feats = model.encode_all(batch.inputs)
    z_1, z_2 = feats["audio"].pooled, feats["video"].pooled
    w, b = model.classifier.weight.clone().detach(), model.classifier.bias.clone().detach()
    width = z_1.shape[1]
    t1 = torch.mm(z_1, torch.transpose(w[:, :width], 0, 1)) + b / 2
    t2 = torch.mm(z_2, torch.transpose(w[:, width:], 0, 1)) + b / 2
    label = batch.label
    performance_1 = sum([t1.softmax(1)[i][int(label[i].item())] for i in range(t1.shape[0])])
    performance_2 = sum([t2.softmax(1)[i][int(label[i].item())] for i in range(t2.shape[0])])
    q = released_calcu_q(performance_1, performance_2, q_base, lam)
    cleaned, update_flag = released_execute_drop([z_1, z_2], q, torch.tensor([width, width]),
                                                 p_exe)
    out = model.classifier(torch.cat(cleaned, dim=1))
    if torch.sum(update_flag, dim=0) == 0:
        return None
    loss = F.cross_entropy(out, label[update_flag != 0])
    loss.backward()
    return loss


@pytest.mark.parametrize("seed,p_exe", [(1, 1.0), (0, 0.7), (5, 0.7)])
def test_a_dropping_step_equals_the_released_forward_and_backward(seed, p_exe):
    method, model, step = build_released("opm", p_exe=p_exe, q_base=0.5, lam=0.5)
    method.begin_epoch(6)  # main.py L91: warm_up = 0 from epoch 6 (0-based)
    reference = copy.deepcopy(model)
    batch = random_batch(6)
    for net in (model, reference):
        net.train()
    np.random.seed(seed)
    torch.manual_seed(seed)
    out = method.train_step(model, batch, step)
    np.random.seed(seed)
    torch.manual_seed(seed)
    loss = released_step(reference, batch, 0.5, 0.5, p_exe)
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(step.grads[0][name], grads[name].grad, rtol=1e-5, atol=1e-6), name
    if p_exe == 1.0:  # the dominant modality lost some samples' features, the other none
        assert max(out["dropped/audio"], out["dropped/video"]) > 0
        assert min(out["dropped/audio"], out["dropped/video"]) == 0
    if seed == 5:  # np.random.rand() = 0.22 < 1 - p_exe: this step does not drop
        assert out["dropped/audio"] == out["dropped/video"] == 0.0


def test_no_drop_during_warm_up_and_one_modality_is_refused():
    method, model, step = build_released("opm", p_exe=1.0)
    method.begin_epoch(5)
    reference = copy.deepcopy(model)
    batch = random_batch(6)
    state = np.random.get_state()[1].copy()
    out = method.train_step(model, batch, step)
    assert np.array_equal(np.random.get_state()[1], state)  # no draw in warm-up
    F.cross_entropy(reference.fused_logits(reference.encode_all(batch.inputs)),
                    batch.label).backward()
    assert out["dropped/audio"] == out["dropped/video"] == 0.0
    grads = dict(reference.named_parameters())
    assert all(torch.equal(g, grads[n].grad) for n, g in step.grads[0].items())
    with pytest.raises(ConfigError, match="needs at least two"):
        method.build_model({"audio": TINY_MODALITIES["audio"]}, len(CLASSES), None)
