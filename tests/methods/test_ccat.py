"""CCAT: what each stage updates, its ablation switches, and its open readings (issue 13,
items 1-6), each default and each option on hand-built tensors or one real step."""

import copy
import math
from pathlib import Path

import pytest
import torch

from ccat.config import ConfigError, MethodConfig
from ccat.contribution import contributions
from ccat.methods import METHODS
from ccat.methods.ccat import CCATParams, stage_epochs
from ccat.run_config import load_config
from ccat.step import Step
from method_helpers import TINY, one_step, owners
from train_helpers import CLASSES, TINY_MODALITIES, random_batch


# What each stage updates


def test_ccat_pretrain_updates_encoders_fusion_classifier_not_lora():
    _, _, _, changes = one_step("ccat", 0)
    assert owners(changes[0]) == {"encoders.audio", "encoders.video", "fusion", "classifier"}


def test_ccat_alternate_updates_one_modality_at_a_time_through_a_fixed_classifier():
    _, model, out, changes = one_step("ccat", 1, beta=1.0)  # beta 1: every sample selected (c < 1)
    # Algorithm 1: primary audio, primary video, then secondary audio, secondary video.
    assert [owners(c) for c in changes] == [{"encoders.audio", "lora.audio"},
                                           {"encoders.video", "lora.video"}] * 2
    assert out["selected/audio"] == out["selected/video"] == 1.0


def test_ccat_without_selected_samples_skips_the_secondary_update():
    _, _, out, changes = one_step("ccat", 1, beta=0.0)
    assert len(changes) == 2 and out["selected/audio"] == 0.0


def test_ccat_ablations_change_what_is_updated():
    _, _, _, changes = one_step("ccat", 1, alternating=False, secondary=False,
                                fixed_classifier=False)
    assert owners(changes[0]) == {"encoders.audio", "encoders.video", "lora.audio",
                                  "lora.video", "classifier"}
    _, model, _, changes = one_step("ccat", 1, lora=False, secondary=False)
    assert len(model.lora) == 0 and owners(changes[0]) == {"encoders.audio"}


def test_ccat_ablation_switches_each_change_the_update():
    """Each of Table 2's switches gives a different stage-2 update than full CCAT, and a
    secondary pass that selects nothing leaves the model (batch-norm statistics included)
    exactly as if secondary updates were off."""

    def state(**switches):
        _, model, _, _ = one_step("ccat", 1, **switches)
        return {k: v.clone() for k, v in model.state_dict().items()}

    full = state(beta=1.0)
    for switch in ("alternating", "secondary", "fixed_classifier", "lora"):
        changed = state(beta=1.0, **{switch: False})
        assert any(not torch.equal(full[k], changed[k]) for k in full.keys() & changed.keys())
    nothing_selected, off = state(beta=0.0), state(secondary=False)
    assert all(torch.equal(nothing_selected[k], off[k]) for k in off)


# Reading 1. Budget (every method's budget: test_registry.py)


def test_total_budget_splits_optim_epochs_between_the_stages():
    assert stage_epochs(CCATParams(), 150) == (75, 75)  # "150 total epochs"
    assert stage_epochs(CCATParams(pretrain_fraction=0.2), 150) == (30, 120)
    assert stage_epochs(CCATParams(pretrain_epochs=50), 150) == (50, 100)
    assert stage_epochs(CCATParams(budget="per_stage"), 150) == (150, 150)
    assert stage_epochs(CCATParams(budget="per_stage", pretrain_epochs=20), 150) == (20, 150)
    with pytest.raises(ConfigError, match="optim.epochs=1 is CCAT's total budget"):
        stage_epochs(CCATParams(), 1)
    with pytest.raises(ConfigError, match="stage 1 would get 4"):
        stage_epochs(CCATParams(pretrain_epochs=4), 4)
    for bad in ({"pretrain_fraction": 1.0}, {"pretrain_fraction": 0.0}, {"budget": "stage"},
                {"pretrain_epochs": -1}):
        with pytest.raises(ConfigError, match="method."):
            METHODS.get("ccat")(MethodConfig(params=bad), 10)


def test_demo_and_synth_configs_keep_six_epochs_per_stage():
    for name in ("demo.yaml", "synth.yaml"):
        cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / name)
        stages = METHODS.get("ccat")(cfg.method, cfg.optim.epochs).stages()
        assert [(s.name, s.epochs) for s in stages] == [("pretrain", 6), ("alternate", 6)]


# Reading 2. Secondary updates and momentum (the Step itself: test_registry.py)


def test_ccat_plain_secondary_updates_leave_the_momentum_buffers_of_the_primaries():
    def state(**options):
        cfg = MethodConfig(params=dict(beta=1.0, **options))  # beta 1: every sample selected (c < 1)
        method = METHODS.get("ccat")(cfg, epochs=2)
        torch.manual_seed(0)
        model = method.build_model(TINY_MODALITIES, len(CLASSES), TINY)
        method.begin_stage(method.stages()[1], model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                              momentum=0.9)
        method.train_step(model, random_batch(), Step(opt))
        names = {id(p): n for n, p in model.named_parameters()}
        return ({names[id(p)]: s["momentum_buffer"].clone() for p, s in opt.state.items()},
                {n: p.detach().clone() for n, p in model.named_parameters()})

    primaries, _ = state(secondary=False)
    plain_buffers, plain_weights = state(secondary_optimizer="plain")
    shared_buffers, shared_weights = state()
    assert all(torch.equal(plain_buffers[n], primaries[n]) for n in primaries)
    assert any(not torch.equal(shared_buffers[n], primaries[n]) for n in primaries)
    assert any(not torch.equal(plain_weights[n], shared_weights[n]) for n in plain_weights)


# Reading 3. The secondary forward pass


def picked_loss(forward: str, selected: torch.Tensor):
    method = METHODS.get("ccat")(MethodConfig(params=dict(secondary_forward=forward)), epochs=2)
    torch.manual_seed(0)
    model = method.build_model(TINY_MODALITIES, len(CLASSES), TINY)
    method.begin_stage(method.stages()[1], model)
    batch = random_batch()
    reference = copy.deepcopy(model)
    loss = method._picked_loss(model, batch, "audio", selected, int(selected.sum()))
    return loss, reference, batch


def test_subset_forward_sees_only_the_selected_samples_and_batch_forward_all():
    selected = torch.tensor([True, False, True, True, False, False])
    subset, reference, batch = picked_loss("subset", selected)
    z = reference.encoders["audio"](batch.inputs["audio"][selected])[1]  # BN over the 3 picks
    expected = torch.nn.functional.cross_entropy(
        reference.unimodal_logits("audio", z, lora=True), batch.label[selected], reduction="sum")
    assert torch.allclose(subset, expected, atol=1e-5)
    whole, reference, batch = picked_loss("batch", selected)
    z = reference.encoders["audio"](batch.inputs["audio"])[1]  # BN over all 6
    expected = torch.nn.functional.cross_entropy(
        reference.unimodal_logits("audio", z, lora=True)[selected], batch.label[selected],
        reduction="sum")
    assert torch.allclose(whole, expected, atol=1e-5)
    assert not torch.allclose(whole, subset, atol=1e-4)


def test_subset_forward_skips_a_single_pick_and_says_so():
    # beta = 1 picks all 6 for both modalities; a subset of all 6 is an update.
    _, _, out, changes = one_step("ccat", 1, beta=1.0, secondary_forward="subset")
    assert len(changes) == 4 and out["updated/audio"] == 1.0
    method = METHODS.get("ccat")(MethodConfig(params=dict(secondary_forward="subset")), epochs=2)
    torch.manual_seed(0)
    model = method.build_model(TINY_MODALITIES, len(CLASSES), TINY)
    method.begin_stage(method.stages()[1], model)
    one = torch.tensor([False, True, False, False, False, False])
    zero = method._picked_loss(model, random_batch(), "audio", one, 0)
    assert zero.item() == 0.0 and zero.requires_grad  # same gradients as a real pass, all zero


# Reading 4. The estimator


def test_dot_similarity_uses_raw_dot_products():
    fused = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])

    def score(sim):  # Eq. 5 with the similarity matrix written out
        return math.log(2) + sim.diag() - torch.logsumexp(sim, 1)

    dot = contributions({"a": a, "b": b}, fused, similarity="dot")["a"]
    expected = torch.softmax(torch.stack([score(fused @ a.t()), score(fused @ b.t())], 1), 1)[:, 0]
    assert torch.allclose(dot, expected)
    cosine = contributions({"a": a, "b": b}, fused)["a"]
    assert not torch.allclose(dot, cosine)
    with pytest.raises(ConfigError, match="method.params.similarity"):
        METHODS.get("ccat")(MethodConfig(params=dict(similarity="l2")), 2)


def test_an_epoch_without_a_selected_sample_warns_once(capsys):
    def epoch_warnings(beta):
        method = METHODS.get("ccat")(MethodConfig(params=dict(beta=beta)), epochs=2)
        method.bind_data(train_samples=12, batches_per_epoch=2)
        torch.manual_seed(0)
        model = method.build_model(TINY_MODALITIES, len(CLASSES), TINY)
        method.begin_stage(method.stages()[1], model)
        method.begin_epoch(0)
        step = Step(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01))
        method.train_step(model, random_batch(), step)
        method.train_step(model, random_batch(seed=1), step)
        assert "warning" not in capsys.readouterr().err  # not before the epoch has ended
        method.end_epoch()
        return capsys.readouterr().err

    err = epoch_warnings(beta=0.0)
    assert err.count("warning: epoch 1: the secondary update selected no") == 2
    assert "no audio sample" in err and "no video sample" in err
    assert "warning" not in epoch_warnings(beta=1.0)


# Reading 5. Stage-2 initialisation: fresh_encoders (and `make ablation`,
# tests/test_report.py, reports both readings)


def test_fresh_encoders_restart_stage_two():
    for fresh in (True, False):
        m = METHODS.get("ccat")(MethodConfig(params={"fresh_encoders": fresh}), epochs=2)
        model = m.build_model(TINY_MODALITIES, len(CLASSES), TINY)
        before = model.encoders["audio"].proj.weight.detach().clone()
        m.begin_stage(m.stages()[1], model)
        assert torch.equal(model.encoders["audio"].proj.weight, before) is not fresh


# Reading 6. LoRA scale


def test_lora_scale_is_the_papers_alpha_by_default_and_hu_et_als_as_an_option():
    def adapter(**options):
        method = METHODS.get("ccat")(MethodConfig(params=dict(rank=2, **options)), epochs=2)
        return method.build_model(TINY_MODALITIES, len(CLASSES), TINY).lora["audio"]

    assert adapter().scale == 1.0  # Eq. 9: B A z, no scale
    assert adapter(lora_alpha=4.0).scale == 4.0
    assert adapter(lora_scale="alpha_over_rank").scale == 0.5
    assert adapter(lora_scale="alpha_over_rank", lora_alpha=4.0).scale == 2.0
    lora = adapter(lora_alpha=3.0)
    with torch.no_grad():
        lora.B.normal_()
    z = torch.randn(4, TINY.width)
    assert torch.allclose(lora(z), 3.0 * (lora.B @ (lora.A @ z.t())).t(), atol=1e-5)
    with pytest.raises(ConfigError, match="method.params.lora_scale' must be one of"):
        METHODS.get("ccat")(MethodConfig(params=dict(lora_scale="rank")), 2)
    with pytest.raises(ConfigError, match=r"method.params.lora_alpha is 0.0 but must be in \(0, "):
        load_config(overrides=["method.params.lora_alpha=0"])


def test_eval_reports_contributions_with_the_runs_similarity(tmp_path):
    """The same weights evaluated under each similarity: the contributions follow it."""
    from ccat.evaluate import evaluate_checkpoint
    from ccat.train import train
    from train_helpers import tiny_config, write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", counts={"train": 8, "val": 3, "test": 6})
    train(tiny_config(data, tmp_path / "run", epochs=2))
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    ckpt["config"]["method"]["params"]["similarity"] = "dot"
    torch.save(ckpt, tmp_path / "run" / "dot.pt")
    cosine = evaluate_checkpoint(tmp_path / "run" / "best.pt")
    dot = evaluate_checkpoint(tmp_path / "run" / "dot.pt")
    assert cosine["accuracy"] == dot["accuracy"]  # the same model
    assert cosine["contribution"] != pytest.approx(dot["contribution"], abs=1e-4)
