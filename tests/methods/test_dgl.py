"""DGL: the released two-pass gradients on hand-built tensors, the disentangled gradients
(the head from the fused loss alone, the encoders from the unimodal losses alone), and the
unimodal predictions (issue 26)."""

import pytest
import torch
import torch.nn.functional as F

from method_helpers import build_released
from train_helpers import random_batch


def released_grads(model, batch, alpha):
    """shicaiwei123/ICCV2025-GDL b72a55f0, main_dgl.py:97-122 with ConcatFusion_DGL
    (models/fusion_modules.py:51-59) written out; the model's classifier plays fc_out."""
    model.zero_grad(set_to_none=True)
    a, v = (model.encode(batch.inputs, m).pooled for m in model.modalities)
    fc_out = model.classifier
    output = torch.cat((a, v), dim=1)
    output = output.detach()
    out = fc_out(output)
    out_a = fc_out(torch.cat((a, torch.zeros_like(v)), dim=1))
    out_v = fc_out(torch.cat((torch.zeros_like(a), v), dim=1))
    loss_v = F.cross_entropy(out_v, batch.label)
    loss_a = F.cross_entropy(out_a, batch.label)
    loss_f = F.cross_entropy(out, batch.label)
    loss_unimodal = (loss_a + loss_v) * alpha
    loss_unimodal.backward(retain_graph=True)
    for name, parms in model.named_parameters():
        if name.startswith("classifier"):  # 'fusion' in the module's name (L114-119)
            parms.grad = None
    loss_f.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("alpha", [4.0, 0.5])
def test_dgl_gradients_equal_the_released_two_passes(alpha):
    method, model, step = build_released("dgl", alpha=alpha)
    batch = random_batch()
    expected = released_grads(model, batch, alpha)
    method.train_step(model, batch, step)  # lr 0: the model stays as it was
    ours = step.grads[0]
    assert ours.keys() == expected.keys()
    for name in ours:
        assert torch.allclose(ours[name], expected[name], rtol=1e-4, atol=1e-7), name


def test_dgl_head_learns_from_the_fused_loss_and_encoders_from_the_unimodal_losses():
    method, model, step = build_released("dgl", alpha=2.0)
    batch = random_batch()
    out = method.train_step(model, batch, step)
    assert set(out) == {"loss", "loss/audio", "loss/video"}
    grads = step.grads[0]
    feats = model.encode_all(batch.inputs)
    z = torch.cat([feats[m].pooled for m in model.modalities], 1)
    head = torch.autograd.grad(F.cross_entropy(model.classifier(z.detach()), batch.label),
                               list(model.classifier.parameters()))
    assert torch.allclose(grads["classifier.weight"], head[0], atol=1e-7)
    assert torch.allclose(grads["classifier.bias"], head[1], atol=1e-7)
    for i, m in enumerate(model.modalities):
        params = [(n, p) for n, p in model.named_parameters() if n.startswith(f"encoders.{m}.")]
        blocks = [z[:, :16], z[:, 16:]]
        kept = torch.cat([b if j == i else torch.zeros_like(b) for j, b in enumerate(blocks)], 1)
        own = 2.0 * F.cross_entropy(model.classifier(kept), batch.label)
        expected = torch.autograd.grad(own, [p for _, p in params], allow_unused=True)
        for (name, _), g in zip(params, expected):
            if g is not None:
                assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-7), name
    # the fused loss alone reaches no encoder
    assert all(g is None for g in torch.autograd.grad(
        F.cross_entropy(model.classifier(z.detach()), batch.label),
        [p for n, p in model.named_parameters() if n.startswith("encoders.")],
        allow_unused=True))


def test_dgl_unimodal_prediction_is_the_head_on_one_modality_with_the_full_bias():
    method, model, _ = build_released("dgl")
    model.eval()
    batch = random_batch(4)
    with torch.no_grad():
        out = method.predict(model, batch)
        z = out.embeddings
        w, b = model.classifier.weight, model.classifier.bias
        assert torch.allclose(out.unimodal["audio"], z["audio"] @ w[:, :16].t() + b, atol=1e-6)
        assert torch.allclose(out.unimodal["video"], z["video"] @ w[:, 16:].t() + b, atol=1e-6)
        assert torch.allclose(out.fused, torch.cat([z["audio"], z["video"]], 1) @ w.t() + b,
                              atol=1e-6)
