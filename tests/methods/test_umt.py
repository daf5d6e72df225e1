"""UMT against its released rule (GeWu-Lab/BalanceBenchmark, balancemm/trainer/UMT_trainer.py
lines 129-147): loss = CE(fused) + scaling * sum_m MSE(teacher feature, student feature)
inside the modulation window; the teachers, trained first, are the unimodal ensemble."""

import pytest
import torch
import torch.nn.functional as F

from ccat.config import ConfigError, MethodConfig
from ccat.methods import METHODS
from ccat.methods.umt import UMTParams, distillation_loss, stage_epochs
from ccat.methods.zeroing import without_others
from ccat.train import param_groups, train
from method_helpers import build_released, one_step, owners
from train_helpers import interrupt_then_resume, random_batch, tiny_config, write_tiny_dataset


def released_mse(teacher, student):
    """nn.MSELoss() (line 133) as written out: the mean of the squared differences over
    every element of the (B, D) features."""
    return ((teacher - student) ** 2).sum() / teacher.numel()


def released_loss(out, label, teacher_feats, student_feats, scaling):
    """Lines 137-144: loss = criterion(out, label), then per modality
    loss += scaling * MSE(out_unimodal, model.encoder_result[modality])."""
    loss = F.cross_entropy(out, label)
    for m in teacher_feats:
        loss = loss + scaling * released_mse(teacher_feats[m], student_feats[m])
    return loss


def distill_stage(method, model, epoch=0):
    method.begin_stage(method.stages()[1], model)
    method.begin_epoch(epoch)


def test_distillation_loss_and_its_gradient_on_hand_built_tensors():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0], [3.0, 0.0]], requires_grad=True)
    loss = distillation_loss(student, teacher)
    assert loss.item() == pytest.approx((1 + 0 + 0 + 16) / 4)  # 4.25
    assert loss.item() == pytest.approx(released_mse(teacher, student).item())
    loss.backward()
    # d/ds mean((s - t)^2) = 2 (s - t) / (B * D); the teacher is a fixed target.
    assert torch.allclose(student.grad, torch.tensor([[0.5, 0.0], [0.0, 2.0]]))
    assert teacher.grad is None


def test_distill_step_is_ce_plus_scaled_mse_and_trains_only_the_student():
    method, model, step = build_released("umt", scaling=10.0)  # lr 0: the model stays put
    distill_stage(method, model)
    batch = random_batch(6)
    buffers = {k: v.clone() for k, v in model.teachers.state_dict().items()}
    out = method.train_step(model, batch, step)
    after = model.teachers.state_dict()  # the frozen teachers' weights and norm statistics
    assert all(torch.equal(after[k], v) for k, v in buffers.items())
    with torch.no_grad():
        feats = model.encode_all(batch.inputs)
        teacher = {m: model.teachers.encode(batch.inputs, m).pooled for m in model.modalities}
        expected = released_loss(model.fused_logits(feats), batch.label, teacher,
                                 {m: f.pooled for m, f in feats.items()}, 10.0)
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"] > out["ce"] and {"mse/audio", "mse/video"} <= set(out)
    assert owners(step.grads[0]) == {"encoders.audio", "encoders.video", "classifier"}


def test_outside_the_window_the_step_is_plain_ce():
    method, model, step = build_released("umt", modulation_starts=1, modulation_ends=1)
    for epoch, distilled in ((0, False), (1, True), (2, False)):
        distill_stage(method, model, epoch)
        out = method.train_step(model, random_batch(6), step)
        assert ("mse/audio" in out) == distilled
        assert (out["loss"] == out["ce"]) == (not distilled)


def test_running_teacher_norm_reads_the_teachers_in_eval_mode():
    method, model, _ = build_released("umt", teacher_norm="running")
    distill_stage(method, model)
    batch = random_batch(6)
    train_mode = method.teacher_features(model, batch)
    assert model.teachers.training  # the mode is restored
    model.teachers.eval()
    with torch.no_grad():
        expected = {m: model.teachers.encode(batch.inputs, m).pooled for m in model.modalities}
    assert all(torch.equal(train_mode[m], expected[m]) for m in expected)
    batch_norm, _, _ = build_released("umt")
    with torch.no_grad():
        batch_stats = batch_norm.teacher_features(model.train(), batch)
    assert not torch.allclose(batch_stats["audio"], expected["audio"])


def test_teachers_stage_is_the_unimodal_method_step_for_step():
    """Built from one seed, UMT's teachers start as the `unimodal` model and one step of
    stage 1 updates them exactly as `unimodal` updates its model; the student is untouched."""
    umt, taught, _, umt_changes = one_step("umt", 0)
    ume, alone, _, _ = one_step("unimodal", 0)
    assert {n.split(".")[0] for n in umt_changes[0]} == {"teachers"}
    assert all(torch.equal(v, taught.teachers.state_dict()[k])
               for k, v in alone.state_dict().items())
    batch = random_batch(4)
    with torch.no_grad():
        got, want = umt.predict(taught, batch), ume.predict(alone, batch)
    assert torch.equal(got.fused, want.fused)  # stage 1 reports the ensemble (UME)


def test_distill_stage_unimodal_prediction_zeroes_the_other_modality():
    method, model, _ = build_released("umt")
    distill_stage(method, model)
    model.eval()
    batch = random_batch(4)
    with torch.no_grad():
        before = method.predict(model, batch)
        feats = model.encode_all(batch.inputs)
        alone = model.fused_logits(without_others(feats, "audio"))
        batch.inputs["video"] = torch.randn_like(batch.inputs["video"])
        after = method.predict(model, batch)
    assert torch.allclose(before.unimodal["audio"], alone)
    assert torch.equal(before.unimodal["audio"], after.unimodal["audio"])
    assert not torch.allclose(before.fused, after.fused)
    assert torch.equal(before.representation, model.fusion(feats))  # the probe's vector: f


def test_budget_split_and_its_refusal():
    assert stage_epochs(UMTParams(), 150) == (75, 75)
    assert stage_epochs(UMTParams(teacher_epochs=30), 150) == (30, 120)
    assert stage_epochs(UMTParams(budget="per_stage"), 150) == (150, 150)
    assert stage_epochs(UMTParams(budget="per_stage", teacher_epochs=20), 150) == (20, 150)
    with pytest.raises(ConfigError, match="UMT's total budget .* set method.params.budget"):
        METHODS.get("umt")(MethodConfig(name="umt"), epochs=1)


def test_encoder_lr_reaches_the_encoder_each_stage_trains():
    method, model, _ = build_released("umt")
    for stage, trained in zip(method.stages(), (model.teachers.encoders, model.encoders)):
        method.begin_stage(stage, model)
        groups = param_groups(model, {"audio": 1e-5})
        assert {id(p) for p in groups[1]["params"]} == \
            {id(p) for p in trained["audio"].parameters()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("umt"),
                              counts={"train": 8, "val": 2, "test": 2}, size=16, steps=16)


def test_a_run_trains_the_unimodal_teachers_then_distills_and_resumes_mid_stage(
        tiny, tmp_path, monkeypatch):
    """One run: stage 1's teachers are a `unimodal` run of the same epochs, weight for
    weight, kept in the checkpoint; a run cut in its second distillation epoch and resumed
    ends with the uninterrupted run's weights."""
    cfg = tiny_config(tiny, tmp_path / "full", method="umt", epochs=3)
    cfg.method.params = {"teacher_epochs": 1}
    history = train(cfg)
    assert [row["stage"] for row in history] == ["teachers", "distill", "distill"]
    assert "mse/audio" in history[1] and "loss/audio" in history[0]
    ume = tiny_config(tiny, tmp_path / "ume", method="unimodal", epochs=1)
    train(ume)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    alone = torch.load(tmp_path / "ume" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(full[f"teachers.{k}"], v) for k, v in alone.items())
    cfg.out = str(tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=3)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert full.keys() == cut.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)
