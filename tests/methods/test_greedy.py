"""Greedy against its released rule (nyukat/greedy_multimodal_learning at a190e03): the MMTM
with its running averages and its cross-modal flow turned off (src/balanced_mmtm.py), the
conditional learning speed and the guided and random switches (src/callbacks.py), each
written out below as the released code computes it; then real steps and the state."""

import copy
import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccat.config import ConfigError, MethodConfig
from ccat.methods import METHODS
from ccat.methods.greedy import (SqueezeExchange, balance_difference, exchange_of, grad_norm,
                                 speed, weight_norm)
from ccat.step import host_floats
from ccat.train import train
from method_helpers import TINY, build_pair, build_released
from train_helpers import (CLASSES, TINY_MODALITIES, interrupt_then_resume, random_batch,
                           tiny_config, write_tiny_dataset)


# The released rule, as the released files write it


def released_mmtm(visual, skeleton, mmtm, state, curation_mode=False, caring_modality=0):
    """MMTM_mitigate.forward (balanced_mmtm.py L93-154, SEonly and shareweight off) on
    feature maps (B, C, L); ``state`` holds running_avg_weight_visual / _skeleton and step."""
    squeeze_array = [t.view(t.shape[:2] + (-1,)).mean(-1) for t in (visual, skeleton)]
    excitation = torch.relu(mmtm.squeeze(torch.cat(squeeze_array, 1)))
    vis_out = torch.sigmoid(mmtm.excite["audio"](excitation))  # fc_visual
    sk_out = torch.sigmoid(mmtm.excite["video"](excitation))  # fc_skeleton
    step = state["step"]
    state["visual"] = (vis_out.mean(0) + state["visual"] * step).detach() / (step + 1)
    state["skeleton"] = (vis_out.mean(0) + state["skeleton"] * step).detach() / (step + 1)  # L114
    state["step"] += 1
    if curation_mode and caring_modality == 0:
        vis_out = torch.stack(vis_out.shape[0] * [state["visual"]])
    elif curation_mode and caring_modality == 1:
        sk_out = torch.stack(sk_out.shape[0] * [state["skeleton"]])
    return visual * vis_out[..., None], skeleton * sk_out[..., None]


def released_turnoff(visual, skeleton, mmtm, average_squeezemaps):
    """The turnoff_cross_modal_flow branch (L72-91): each view's squeeze next to the other
    view's average squeeze map."""
    squeeze = torch.cat([visual.view(visual.shape[:2] + (-1,)).mean(-1),
                         torch.stack(visual.shape[0] * [average_squeezemaps[1]])], 1)
    vis_out = torch.sigmoid(mmtm.excite["audio"](torch.relu(mmtm.squeeze(squeeze))))
    squeeze = torch.cat([torch.stack(skeleton.shape[0] * [average_squeezemaps[0]]),
                         skeleton.view(skeleton.shape[:2] + (-1,)).mean(-1)], 1)
    sk_out = torch.sigmoid(mmtm.excite["video"](torch.relu(mmtm.squeeze(squeeze))))
    return visual * vis_out[..., None], skeleton * sk_out[..., None]


class ReleasedStrong:
    """Bias_Mitigation_Strong (callbacks.py L173-267) over named parameters."""

    def __init__(self, epsilon, windowsize, starting_epoch=2):
        self.epsilon, self.windowsize, self.starting_epoch = epsilon, windowsize, starting_epoch
        self.branchnames, self.MMTMnames = ["net_view_0", "net_view_1"], ["visual", "skeleton"]
        self.M = {"bypass": [0.0, 0.0], "main": [0.0, 0.0]}
        self.curation_mode, self.caring_modality, self.unlock = False, None, False

    def compute_BDR(self, named_parameters):
        wn_main, wn_bypass, gn_main, gn_bypass = [0, 0], [0, 0], [0, 0], [0, 0]
        for name, parameter, grad in named_parameters:
            wn, gn = (parameter ** 2).sum().item(), (grad ** 2).sum().item()
            if "mmtm" in name:
                shared = True
                for ind, modal in enumerate(self.MMTMnames):
                    if modal in name:
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
                        shared = False
                if shared:
                    for ind in range(2):
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
            else:
                for ind, modal in enumerate(self.branchnames):
                    if modal in name:
                        wn_main[ind] += wn
                        gn_main[ind] += gn
        for ind in range(2):
            self.M["bypass"][ind] += gn_bypass[ind] / wn_bypass[ind]
            self.M["main"][ind] += gn_main[ind] / wn_main[ind]
        bdr = [np.log10(self.M["bypass"][i] / self.M["main"][i]) for i in range(2)]
        return bdr[0] - bdr[1]

    def on_backward_end(self, compute):
        """L240-263; ``compute()`` stands for compute_BDR on this step's parameters."""
        if self.unlock:
            if not self.curation_mode:
                self.d_BDR = compute()
                if abs(self.d_BDR) > self.epsilon:
                    self.curation_mode, self.curation_step = True, 0
                    self.caring_modality = 1 if np.sign(self.d_BDR) == -1 else 0
                else:
                    self.curation_mode, self.caring_modality = False, 0
            else:
                self.curation_step += 1
                if self.curation_step == self.windowsize:
                    self.curation_mode = False
        else:
            self.d_BDR = compute()
            self.curation_mode, self.caring_modality = False, 0

    def on_epoch_begin(self, epoch):  # epochs counted from 1 (framework.py L293)
        if epoch >= self.starting_epoch:
            self.unlock = True


RELEASED_NAMES = {"encoders.audio.": "net_view_0.", "encoders.video.": "net_view_1.",
                  "classifier.heads.0.": "net_view_0.fc.", "classifier.heads.1.": "net_view_1.fc.",
                  "mmtm.excite.audio.": "mmtm4.fc_visual.",
                  "mmtm.excite.video.": "mmtm4.fc_skeleton.", "mmtm.squeeze.": "mmtm4.fc_squeeze."}


def released_named(model, grads):
    """The model's parameters under the released model's names, with ``grads`` (zeros for
    a parameter without one, as the released zero_grad leaves)."""
    out = []
    for name, p in model.named_parameters():
        prefix = next(k for k in RELEASED_NAMES if name.startswith(k))  # every one maps
        grad = grads.get(name, torch.zeros_like(p))
        out.append((RELEASED_NAMES[prefix] + name[len(prefix):], p.detach(), grad))
    return out


# The rule on hand-built tensors


def test_speed_and_difference_on_hand_built_numbers():
    assert speed(4.0, 2.0) == 0.5 and speed(0.0, 2.0) == 0.0
    # BDR_a = log10(10 / 1) = 1, BDR_v = log10(1 / 10) = -1: d = 2
    assert balance_difference({"a": 10.0, "v": 1.0}, {"a": 1.0, "v": 10.0}) == pytest.approx(2.0)
    assert balance_difference({"a": 0.0, "v": 1.0}, {"a": 1.0, "v": 1.0}) == 0.0  # unmeasured


def test_exchange_is_the_released_mmtm_with_its_running_averages():
    torch.manual_seed(0)
    visual, skeleton = torch.randn(4, 6, 5), torch.randn(4, 6, 5)  # (B, C, L) maps
    pooled = {"audio": visual.mean(-1), "video": skeleton.mean(-1)}
    for source in ("released", "own"):
        ours = SqueezeExchange(["audio", "video"], 6, 4.0)
        assert ours.squeeze.out_features == 6  # int(2 * 12 / 4)
        state = {"visual": torch.zeros(6), "skeleton": torch.zeros(6), "step": 0}
        own_video = []
        for curation, caring in ((False, 0), (True, 0), (True, 1), (False, 0)):
            frozen = ["audio", "video"][caring] if curation else None
            with torch.no_grad():
                own_video.append(ours.excitations(pooled)["video"].mean(0))
                got = ours(pooled, frozen, track=source)
                vis, sk = released_mmtm(visual, skeleton, ours, state, curation, caring)
            assert torch.allclose(got["audio"], vis.mean(-1), atol=1e-6)
            assert torch.allclose(ours.running[0], state["visual"], atol=1e-6)
            if source == "released":  # L114: the second average follows the first's excitation
                assert torch.allclose(got["video"], sk.mean(-1), atol=1e-6)
                assert torch.allclose(ours.running[1], state["skeleton"], atol=1e-6)
            else:
                assert torch.allclose(ours.running[1], torch.stack(own_video).mean(0), atol=1e-6)
        assert int(ours.steps) == 4 and float(ours.squeeze_count) == 16


def test_unimodal_exchange_is_the_released_cross_modal_flow_turned_off():
    torch.manual_seed(1)
    ours = SqueezeExchange(["audio", "video"], 6, 4.0)
    visual, skeleton = torch.randn(3, 6, 5), torch.randn(3, 6, 5)
    averages = [torch.randn(6), torch.randn(6)]
    ours.squeeze_sum.copy_(torch.stack(averages) * 8)
    ours.squeeze_count.fill_(8)
    with torch.no_grad():
        got = ours.isolated({"audio": visual.mean(-1), "video": skeleton.mean(-1)})
        vis, sk = released_turnoff(visual, skeleton, ours, averages)
    assert torch.allclose(got["audio"], vis.mean(-1), atol=1e-6)
    assert torch.allclose(got["video"], sk.mean(-1), atol=1e-6)


def test_conditional_learning_speed_is_the_released_compute_bdr():
    method, model = build_pair("greedy")
    released = ReleasedStrong(0.01, 5)
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 3.0):  # two steps: the sums M accumulate
        grads = {n: scale * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()
                 if not n.startswith("encoders.video.trunk.stem")}  # some without a gradient
        for n, p in model.named_parameters():
            p.grad = grads.get(n)
        groups = method.groups(model)
        method.measure(host_floats({**{f"w2/{k}": weight_norm(v) for k, v in groups.items()},
                                    **{f"g2/{k}": grad_norm(v) for k, v in groups.items()}}))
        expected = released.compute_BDR(released_named(model, grads))
        assert method.d_speed == pytest.approx(expected, abs=1e-6)  # float32 sums
    assert [method.bypass[m] for m in model.modalities] == pytest.approx(released.M["bypass"])
    assert [method.main[m] for m in model.modalities] == pytest.approx(released.M["main"])


def test_guided_switch_is_the_released_on_backward_end():
    method, model = build_pair("greedy", epsilon=0.3, window=3)
    released = ReleasedStrong(0.3, 3)
    rng = np.random.default_rng(0)
    for epoch in range(3):
        method.begin_epoch(epoch)
        released.on_epoch_begin(epoch + 1)
        for d in rng.normal(0, 0.4, 12):
            released.on_backward_end(lambda d=d: d)
            if not method.active:  # train_step measures outside the window
                method.d_speed = d
            method.switch()
            assert method.active == released.curation_mode
            if method.active:
                assert method.frozen == model.modalities[released.caring_modality]
    assert released.unlock  # the windows opened after the first epoch


def test_random_switch_draws_like_the_released_callback():
    method, model = build_pair("greedy", rebalancing="random")
    method.rng = random.Random(7)
    reference = random.Random(7)
    method.begin_epoch(0)  # the released starting_epoch 2 of 1-based epochs: no draw yet
    method.switch()
    assert not method.active and method.frozen == ""
    method.begin_epoch(1)
    for _ in range(30):
        method.switch()
        mode = reference.choice([0, 1, 2])  # callbacks.py L285-294
        assert method.active == (mode != 0)
        if mode:
            assert method.frozen == model.modalities[{1: 1, 2: 0}[mode]]


# Real steps


def released_loss(model, batch, frozen=None):
    """blend_loss (train.py L21-28) of the two branches on a copy of the model."""
    model = copy.deepcopy(model)
    exchange = exchange_of(model)
    feats = model.encode_all(batch.inputs)
    scaled = exchange({m: feats[m].pooled for m in model.modalities}, frozen, track="own")
    return sum(F.cross_entropy(model.unimodal_logits(m, z), batch.label)
               for m, z in scaled.items())


def test_regular_step_trains_the_blend_loss_and_measures_the_released_speed():
    method, model, step = build_released("greedy")  # lr 0: the weights stay readable
    released = ReleasedStrong(0.01, 5)
    method.begin_epoch(0)
    for seed in range(2):
        batch = random_batch(seed=seed)
        expected = released_loss(model, batch)
        out = method.train_step(model, batch, step)
        assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)
        d = released.compute_BDR(released_named(model, step.grads[-1]))
        assert out["d_speed"] == pytest.approx(d, abs=1e-6)  # float32 sums
        assert set(step.grads[-1]) == {n for n, _ in model.named_parameters()}  # all trained
    assert not method.active  # epoch 0: measured, never re-balanced


def test_a_window_of_rebalancing_steps_freezes_one_branch_to_its_running_average():
    method, model, step = build_released("greedy", lr=0.1, epsilon=0.0, window=3,
                                         starting_epoch=0)
    method.begin_epoch(0)
    flags = []
    for seed in range(6):
        batch = random_batch(seed=seed)
        frozen = method.frozen if method.active else None
        expected = released_loss(model, batch, frozen) if frozen else None
        out = method.train_step(model, batch, step)
        flags.append(tuple(out[f"rebalanced/{m}"] for m in model.modalities))
        if frozen:
            assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)
            assert not any(n.startswith(f"mmtm.excite.{frozen}.") for n in step.grads[-1])
            other = next(m for m in model.modalities if m != frozen)
            assert any(n.startswith(f"mmtm.excite.{other}.") for n in step.grads[-1])
    # step 1 measures |d| > 0 and opens a window of 3 steps; step 5 measures again
    assert [sum(f) for f in flags] == [0, 1, 1, 1, 0, 1]
    assert len(set(flags[1:4])) == 1


def test_unimodal_prediction_reads_the_epoch_mean_of_the_other_squeeze():
    method, model, step = build_released("greedy")  # lr 0: the features stay put
    method.begin_epoch(0)
    batches = [random_batch(seed=s) for s in (0, 1)]
    for batch in batches:
        method.train_step(model, batch, step)
    exchange = exchange_of(model)
    with torch.no_grad():  # train mode, as the steps saw them
        video = torch.cat([model.encode_all(b.inputs)["video"].pooled for b in batches])
    assert torch.allclose(exchange.squeeze_sum[1] / exchange.squeeze_count, video.mean(0),
                          atol=1e-5)
    model.eval()
    with torch.no_grad():
        test = random_batch(4, seed=5)
        out = method.predict(model, test)
        z = model.encode_all(test.inputs)["audio"].pooled
        squeezed = {"audio": z, "video": video.mean(0).expand_as(z)}
        expected = model.unimodal_logits("audio", z * exchange.excitations(squeezed)["audio"])
    assert torch.allclose(out.unimodal["audio"], expected, atol=1e-5)
    model.train()
    method.begin_epoch(1)  # a new epoch's first step restarts the squeeze sums
    method.train_step(model, random_batch(seed=2), step)
    assert float(exchange.squeeze_count) == 6


def test_state_round_trip_continues_the_same_switch():
    method, model, step = build_released("greedy", lr=0.1, rebalancing="random")
    for epoch in range(2):
        method.begin_epoch(epoch)
        for seed in range(3):
            method.train_step(model, random_batch(seed=seed), step)
    saved = io.BytesIO()
    torch.save(method.state_dict(), saved)  # as checkpoints hold it
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    fresh, _ = build_pair("greedy", rebalancing="random")
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    fresh.begin_epoch(1)
    for _ in range(5):
        method.switch()
        fresh.switch()
        assert (fresh.active, fresh.frozen) == (method.active, method.frozen)


def test_other_modality_counts_and_unknown_modes_are_refused():
    method = METHODS.get("greedy")(MethodConfig(name="greedy"), epochs=2)
    three = {**TINY_MODALITIES, "extra": TINY_MODALITIES["audio"]}
    with pytest.raises(ConfigError, match="needs exactly two modalities.*the data has 3"):
        method.build_model(three, len(CLASSES), TINY)
    with pytest.raises(ConfigError, match="rebalancing"):
        build_pair("greedy", rebalancing="sometimes")
    with pytest.raises(ConfigError, match="no hidden unit"):
        build_pair("greedy", ratio=1000.0)


def test_resume_inside_a_rebalancing_window_continues_it(tmp_path, monkeypatch):
    """Three one-batch epochs: with epsilon 0 the first step opens a window of two
    re-balancing steps (epochs 2 and 3); a cut before epoch 3 resumes inside it,
    and ends with the uninterrupted run's weights, buffers and method state."""
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 8, "val": 2, "test": 2},
                              size=16, steps=16)
    cfg = tiny_config(data, tmp_path / "full", method="greedy", epochs=3)
    cfg.method.params = {"epsilon": 0.0, "window": 2, "starting_epoch": 0}
    history = train(cfg)
    assert [sum(row[f"rebalanced/{m}"] for m in ("audio", "video")) for row in history] \
        == [0.0, 1.0, 1.0]
    cfg.out = str(tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=3)
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                 for run in ("full", "cut"))
    assert cut["method_state"] == full["method_state"]
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    assert float(full["model"]["mmtm.squeeze_count"]) == 8  # the last epoch's samples
