"""The unimodal ensemble: each encoder on its own loss, each modality its own head and bias
(issue 13, item 13)."""

import torch
import torch.nn.functional as F

from method_helpers import build_released as build
from method_helpers import one_step, owners
from train_helpers import random_batch


def test_unimodal_ensemble_keeps_each_encoder_on_its_own_loss():
    method, model, _, changes = one_step("unimodal", 0)
    assert owners(changes[0]) == {"encoders.audio", "encoders.video", "classifier"}
    out = method.predict(model, random_batch(3))
    assert torch.allclose(out.fused, (out.unimodal["audio"] + out.unimodal["video"]) / 2)


def test_unimodal_ensemble_gives_each_modality_its_own_head_and_bias():
    method, model, step = build("unimodal", lr=0.1)
    audio, video = model.classifier.heads
    batch = random_batch()
    z = model.encode(batch.inputs, "audio").pooled
    F.cross_entropy(model.unimodal_logits("audio", z), batch.label).backward()
    assert audio.bias.grad is not None and video.bias.grad is None  # nothing shared
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.train_step(model, batch, step)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"classifier.heads.0.bias", "classifier.heads.1.bias"} <= changed
