"""PMR against its released rule (fanyunfeng-bit/Modal-Imbalance-PMR, main_Prototype_grad.py):
class-mean prototypes, -Euclidean prototypical logits, the hard alpha switch on the
prototypical score ratio, and the loss CE + beta PCE_a + lam PCE_v."""

import math

import pytest
import torch
import torch.nn.functional as F

from ccat.methods.pmr import class_means, pce_coefficients, prototypical_logits
from ccat.step import Step
from method_helpers import build_released
from train_helpers import CLASSES, random_batch


def released_eu_dist(x1, x2):
    """EU_dist as released (L69-75): the loop of sqrt(dot(x1_i - x2_j, x1_i - x2_j))."""
    d = torch.zeros(x1.shape[0], x2.shape[0])
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            d[i, j] = torch.sqrt(torch.dot(x1[i] - x2[j], x1[i] - x2[j]))
    return d


def released_loss(out, a, v, audio_proto, visual_proto, label, alpha):
    """L152-178: scores summed over the batch, ratio_a_p = score_a_p / score_v_p, then
    beta (audio) = 0, lam (visual) = alpha if ratio > 1; beta = alpha, lam = 0 if < 1;
    both 0 on a tie; loss = CE(out) + beta * CE(audio_sim) + lam * CE(visual_sim)."""
    audio_sim, visual_sim = -released_eu_dist(a, audio_proto), -released_eu_dist(v, visual_proto)
    score_a = sum(audio_sim.softmax(1)[i][label[i]] for i in range(len(label)))
    score_v = sum(visual_sim.softmax(1)[i][label[i]] for i in range(len(label)))
    ratio = score_a / score_v
    beta, lam = (0, alpha) if ratio > 1 else (alpha, 0) if ratio < 1 else (0, 0)
    loss = (F.cross_entropy(out, label) + beta * F.cross_entropy(audio_sim, label)
            + lam * F.cross_entropy(visual_sim, label))
    return loss.item(), ratio.item()


def test_prototypes_logits_and_switch_on_hand_built_tensors():
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    label = torch.tensor([0, 0, 1])
    sums = torch.zeros(3, 2).index_add_(0, label, feats)
    counts = torch.zeros(3).index_add_(0, label, torch.ones(3))
    previous = torch.full((3, 2), 7.0)
    # Class means (calculate_prototype); class 2 has no sample and keeps its previous row.
    assert torch.equal(class_means(sums, counts, previous),
                       torch.tensor([[1.0, 0.0], [0.0, 4.0], [7.0, 7.0]]))
    assert torch.equal(class_means(sums, counts, None)[2], torch.zeros(2))
    z = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert torch.allclose(prototypical_logits(z, protos), torch.tensor([[0.0, -math.sqrt(17)],
                                                                        [-math.sqrt(20), -3.0]]))
    assert torch.allclose(prototypical_logits(z, protos), -released_eu_dist(z, protos))
    # Audio scores 1.5 x video: the video PCE gets alpha, the audio's none; a tie: neither.
    assert pce_coefficients({"audio": 1.5, "video": 1 / 1.5}, 2.0) == {"audio": 0.0, "video": 2.0}
    assert pce_coefficients({"audio": 1.0, "video": 1.0}, 2.0) == {"audio": 0.0, "video": 0.0}


def test_train_step_builds_the_prototypes_then_adds_the_released_loss():
    method, model, step = build_released("pmr", alpha=2.0)  # lr 0: the model stays put
    method.begin_epoch(0)
    first = random_batch(6, seed=0)
    out = method.train_step(model, first, step)
    assert out["loss"] == out["ce"] and out["coef/audio"] == out["coef/video"] == 0.0
    with torch.no_grad():
        feats = model.encode_all(first.inputs)
    for m in model.modalities:  # the class means of the first window (one batch of four)
        z = feats[m].pooled
        expected = torch.stack([z[first.label == k].mean(0) for k in range(len(CLASSES))])
        assert torch.allclose(method.prototypes[m], expected, atol=1e-6)
    second = random_batch(6, seed=1)
    out = method.train_step(model, second, step)
    with torch.no_grad():
        feats = model.encode_all(second.inputs)
        loss, ratio = released_loss(model.fused_logits(feats), feats["audio"].pooled,
                                    feats["video"].pooled, method.prototypes["audio"],
                                    method.prototypes["video"], second.label, alpha=2.0)
    assert out["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["ratio/audio"] == pytest.approx(ratio, rel=1e-5)
    assert out["loss"] > out["ce"]  # one modality's PCE was added
    weak = "audio" if ratio < 1 else "video"
    assert out[f"coef/{weak}"] == 2.0


def test_prototypes_refresh_from_the_last_window_and_mix_from_epoch_two():
    method, model, step = build_released("pmr", momentum_coef=0.5)
    method.bind_data(train_samples=120, batches_per_epoch=20)  # windows of two batches
    method.begin_epoch(0)
    for seed in range(20):
        method.train_step(model, random_batch(6, seed=seed), step)
    with torch.no_grad():  # lr 0: the features the last two batches were trained on
        last = [random_batch(6, seed=s) for s in (18, 19)]
        z = torch.cat([model.encode_all(b.inputs)["audio"].pooled for b in last])
        label = torch.cat([b.label for b in last])
    means = torch.stack([z[label == k].mean(0) for k in range(len(CLASSES))])
    method.begin_epoch(1)  # after epoch 0: not mixed (the released epoch <= 0 case)
    assert torch.allclose(method.prototypes["audio"], means, atol=1e-6)
    old = method.prototypes["audio"].clone()
    for seed in range(20):
        method.train_step(model, random_batch(6, seed=100 + seed), step)
    with torch.no_grad():
        last = [random_batch(6, seed=s) for s in (118, 119)]
        z = torch.cat([model.encode_all(b.inputs)["audio"].pooled for b in last])
    fresh = torch.stack([z[label == k].mean(0) for k in range(len(CLASSES))])
    method.begin_epoch(2)
    assert torch.allclose(method.prototypes["audio"], 0.5 * fresh + 0.5 * old, atol=1e-6)


def test_pce_is_off_outside_the_inclusive_window():
    method, model, step = build_released("pmr", modulation_ends=1)
    for epoch in range(3):
        method.begin_epoch(epoch)
        outs = [method.train_step(model, random_batch(6, seed=s), step) for s in range(4)]
    assert all(o["coef/audio"] == o["coef/video"] == 0.0 for o in outs)  # epoch 2 > ends
    method.begin_epoch(1)
    out = method.train_step(model, random_batch(6, seed=9), step)
    assert max(out["coef/audio"], out["coef/video"]) == method.params.alpha


def _two_rank_prototypes(rank, port, results):
    """One gloo rank: build the first prototypes from this rank's own batch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        method, model, _ = build_released("pmr")
        step = Step(torch.optim.SGD(model.parameters(), lr=0.0))
        batch = random_batch(6, seed=rank)
        method.begin_epoch(0)
        method.train_step(model, batch, step)
        with torch.no_grad():
            z = model.encode_all(batch.inputs)["audio"].pooled
        zs, labels = [torch.zeros_like(z) for _ in range(2)], [torch.zeros_like(batch.label)
                                                               for _ in range(2)]
        dist.all_gather(zs, z)
        dist.all_gather(labels, batch.label)
        z, label = torch.cat(zs), torch.cat(labels)
        expected = torch.stack([z[label == k].mean(0) for k in range(len(CLASSES))])
        results[rank] = (method.prototypes["audio"], expected)
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_prototypes_of_both_ranks_batches():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_two_rank_prototypes, args=(port, results), nprocs=2)
    (p0, e0), (p1, e1) = results[0], results[1]
    assert torch.equal(p0, p1)
    assert torch.allclose(p0, e0, atol=1e-6) and torch.equal(e0, e1)


@pytest.mark.parametrize("rows", [4, 32])  # cdist's direct path, and its matrix path (> 25)
def test_a_feature_on_its_prototype_gives_the_release_nan_gradients_and_ours_finite(rows):
    """docs/methods.md, PMR: where a feature equals its class prototype (distance 0), the
    released sqrt(dot(d, d)) (EU_dist, L69-75) has the gradient inf * 0 = NaN, which the
    step then writes into that modality's encoder; torch.cdist's is finite."""
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(len(CLASSES), 5, generator=gen)
    z = torch.randn(rows, 5, generator=gen)
    label = torch.arange(rows) % len(CLASSES)
    z[1] = prototypes[label[1]]
    released = z.clone().requires_grad_()
    F.cross_entropy(-released_eu_dist(released, prototypes), label).backward()
    assert torch.isnan(released.grad[1]).all() and torch.isfinite(released.grad[0]).all()
    ours = z.clone().requires_grad_()
    F.cross_entropy(prototypical_logits(ours, prototypes), label).backward()
    assert torch.isfinite(ours.grad).all()
