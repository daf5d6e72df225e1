"""CCAT's open readings (issue 13, items 1-6): each default and each option on hand-built
tensors or one real step."""

import copy
import math
from pathlib import Path

import pytest
import torch

from ccat.config import ConfigError, MethodConfig
from ccat.run_config import load_config
from ccat.contribution import contributions
from ccat.methods import METHODS
from ccat.methods.ccat import CCATParams, stage_epochs
from ccat.step import Step
from test_methods import TINY, one_step
from train_helpers import CLASSES, TINY_MODALITIES, random_batch

# 1. Budget


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


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_optim_epochs_in_total(name):
    """What `make table` relies on: the same optim.epochs is every method's whole budget."""
    cfg = load_config(None, [f"method.name={name}", "optim.epochs=30"])
    method = METHODS.get(name)(cfg.method, cfg.optim.epochs)
    assert sum(stage.epochs for stage in method.stages()) == 30


def test_demo_and_synth_configs_keep_six_epochs_per_stage():
    for name in ("demo.yaml", "synth.yaml"):
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
        stages = METHODS.get("ccat")(cfg.method, cfg.optim.epochs).stages()
        assert [(s.name, s.epochs) for s in stages] == [("pretrain", 6), ("alternate", 6)]


# 2. Secondary updates and momentum


def two_updates(momentum_second: bool) -> float:
    """A primary SGD step (lr 0.1, momentum 0.9, gradient 1) then a secondary step with a
    near-zero gradient; returns how far the secondary step moved the parameter."""
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    step = Step(torch.optim.SGD([param], lr=0.1, momentum=0.9))
    for grad, momentum in ((1.0, True), (1e-6, momentum_second)):
        before = param.detach().clone()
        step.zero_grad()
        step.backward((param * grad).sum())
        if momentum:
            step.step()
        else:
            step.step(momentum=False)
    return float(before - param.detach())


def test_shared_secondary_step_reapplies_momentum_and_plain_does_not():
    assert two_updates(True) == pytest.approx(0.1 * (0.9 * 1.0 + 1e-6))  # 0.09: momentum again
    assert two_updates(False) == pytest.approx(0.1 * 1e-6)  # plain SGD: lr * g only


def test_plain_step_is_sgd_without_momentum_and_keeps_the_buffers():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([param], lr=0.5, momentum=0.9, weight_decay=0.1)
    step = Step(opt)
    step.zero_grad()
    step.backward((param * torch.tensor([1.0, 2.0])).sum())
    step.step()
    buffer = opt.state[param]["momentum_buffer"].clone()
    before = param.detach().clone()
    step.zero_grad()
    step.backward((param * torch.tensor([3.0, 0.0])).sum())
    step.step(momentum=False)
    expected = before - 0.5 * (torch.tensor([3.0, 0.0]) + 0.1 * before)
    assert torch.allclose(param.detach(), expected)
    assert torch.equal(opt.state[param]["momentum_buffer"], buffer)


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


# 3. The secondary forward pass


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


# 4. The estimator


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
        assert "warning" not in capsys.readouterr().err  # not before the epoch's last step
        method.train_step(model, random_batch(seed=1), step)
        return capsys.readouterr().err

    err = epoch_warnings(beta=0.0)
    assert err.count("warning: epoch 1: the secondary update selected no") == 2
    assert "no audio sample" in err and "no video sample" in err
    assert "warning" not in epoch_warnings(beta=1.0)


# 5. Stage-2 initialisation: fresh_encoders (tests/test_methods.py::test_fresh_encoders_...)
# and `make ablation` (tests/test_report.py) report both readings.


# 6. LoRA scale


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
    with pytest.raises(ConfigError, match=r"method.params.lora_alpha is 0.0 but must be > 0"):
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
