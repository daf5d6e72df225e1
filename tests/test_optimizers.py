"""optim.name and optim.schedule: what each builds, their one-sentence refusals, the exact
resume of every optimizer x schedule, and runs saved before the two keys existed."""

import itertools
import math

import pytest
import torch
import yaml

from ccat.config import OPTIMIZERS, SCHEDULES, ConfigError, merge
from ccat.errors import CcatError
from ccat.run_config import load_config
from ccat.train import fresh_step, make_optimizer, train
from train_helpers import interrupt_then_resume, tiny_config, write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("optim"),
                              counts={"train": 8, "val": 2, "test": 2}, size=16, steps=16)


class Wrapped(torch.nn.Module):
    """A linear model with what make_optimizer reads of a MultimodalModel."""

    modalities: list = []

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.net(x)

    def encoder_parameters(self, m):
        return []


def built(*overrides, epochs=None):
    cfg = load_config(None, list(overrides))
    return make_optimizer(Wrapped(), cfg, epochs)


def test_the_defaults_build_the_sgd_and_step_lr_of_before():
    opt, sched = built()
    assert type(opt) is torch.optim.SGD and type(sched) is torch.optim.lr_scheduler.StepLR
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == \
        (1e-3, 0.9, 0.1, False)
    assert (sched.step_size, sched.gamma) == (70, 0.1)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_and_adamw_take_their_own_settings(name, cls):
    opt, _ = built(f"optim.name={name}", "optim.betas=[0.8, 0.99]", "optim.eps=1e-6",
                   "optim.lr=0.003", "optim.weight_decay=0.01")
    group = opt.param_groups[0]
    assert type(opt) is cls
    assert (group["betas"], group["eps"], group["lr"], group["weight_decay"]) == \
        ((0.8, 0.99), 1e-6, 0.003, 0.01)
    default = built(f"optim.name={name}")[0].param_groups[0]
    assert (default["betas"], default["eps"]) == ((0.9, 0.999), 1e-8)  # torch's


def lrs(sched, epochs):
    seen = []
    for _ in range(epochs):
        seen.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return seen


def test_cosine_anneals_over_the_stage_and_constant_keeps_the_lr():
    _, sched = built("optim.schedule=cosine", "optim.lr=0.1", "optim.eta_min=0.01", epochs=4)
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)]
    assert lrs(sched, 5) == pytest.approx(expected, abs=1e-12)
    _, sched = built("optim.schedule=cosine", "optim.t_max=2", "optim.lr=0.1", epochs=4)
    assert lrs(sched, 3)[2] == pytest.approx(0.0, abs=1e-12)  # t_max, not the stage's epochs
    _, sched = built("optim.schedule=constant", "optim.lr=0.1")
    assert lrs(sched, 200) == [0.1] * 200


def test_a_methods_extra_optimizer_is_the_runs_kind():
    """G-Blending's copies (RunData.new_step) come from the same builder as the run's."""
    cfg = load_config(None, ["optim.name=adamw", "optim.lr=0.02", "optim.schedule=cosine"])
    step = fresh_step(Wrapped(), cfg)
    assert type(step.optimizer) is torch.optim.AdamW and not step.optimizer.state
    assert step.optimizer.param_groups[0]["lr"] == 0.02


@pytest.mark.parametrize("overrides, says", [
    (["optim.name=adam", "optim.momentum=0.5"],
     "optim.momentum is a setting of optim.name=sgd, but optim.name is adam; remove "
     "optim.momentum (or set it to null) or set optim.name=sgd"),
    (["optim.betas=[0.9, 0.9]"],
     "optim.betas is a setting of optim.name=adam, but optim.name is sgd"),
    (["optim.schedule=constant", "optim.step_size=3"],
     "optim.step_size is a setting of optim.schedule=step, but optim.schedule is constant"),
    (["optim.t_max=5"], "optim.t_max is a setting of optim.schedule=cosine, but "
     "optim.schedule is step"),
    (["optim.name=adam", "optim.betas=[0.9]"], "optim.betas is [0.9] but must be two numbers"),
    (["optim.name=adam", "optim.betas=[0.9, 1.0]"], "optim.betas[1] is 1.0 but must be in [0, 1)"),
    (["optim.name=adamw", "optim.eps=0"], "optim.eps is 0.0 but must be in (0, 1]"),
    (["optim.nesterov=true", "optim.momentum=0"], "Nesterov momentum needs a momentum above 0"),
    (["optim.name=lbfgs"], "'optim.name' must be one of sgd, adam, adamw, got 'lbfgs'"),
    (["optim.schedule=plateau"], "must be one of step, cosine, constant"),
])
def test_settings_of_another_optimizer_or_out_of_range_are_one_sentence(overrides, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert says in str(err.value) and str(err.value).count(". ") == 0


def test_a_layer_naming_another_optimizer_starts_its_settings_afresh(tmp_path):
    """configs/cremad.yaml sets SGD's momentum and the step schedule; a later layer naming
    Adam and cosine drops them, while momentum in that same layer is refused."""
    cfg = load_config("configs/cremad.yaml", ["optim.name=adam", "optim.schedule=cosine"])
    o = cfg.optim
    assert (o.name, o.momentum, o.betas, o.schedule, o.step_size, o.t_max) == \
        ("adam", None, [0.9, 0.999], "cosine", None, 0)
    path = tmp_path / "c.yaml"
    path.write_text("optim: {name: adam, momentum: 0.9}\n")
    with pytest.raises(ConfigError, match="optim.momentum is a setting of optim.name=sgd"):
        load_config(path)
    back = load_config(None, ["optim.name=adam", "optim.name=sgd"]).optim  # defaults again
    assert (back.momentum, back.nesterov, back.betas) == (0.9, False, None)


def state_equal(a, b):
    """Nested state dicts (tensors, numbers, lists) equal exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def chosen(name, schedule):
    return load_config(None, [f"optim.name={name}", f"optim.schedule={schedule}",
                              "optim.lr=0.05", "optim.weight_decay=0.01"]
                       + (["optim.step_size=1"] if schedule == "step" else []))


def train_epochs(net, opt, sched, epochs):
    """``epochs`` epochs of two steps each on fixed data, as the loop steps: the optimizer
    per batch, the schedule per epoch; returns each epoch's lr."""
    x, y = torch.linspace(-1, 1, 12).reshape(4, 3), torch.tensor([0, 1, 1, 0])
    seen = []
    for _ in range(epochs):
        seen.append(opt.param_groups[0]["lr"])
        for batch in (slice(0, 2), slice(2, 4)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("name, schedule", list(itertools.product(OPTIMIZERS, SCHEDULES)))
def test_a_resumed_optimizer_and_schedule_continue_exactly(name, schedule, tmp_path):
    """What ``--resume`` does (a new model and optimizer from make_optimizer, the saved
    states loaded through a file) ends where the uninterrupted run ends, bit for bit."""
    cfg = chosen(name, schedule)
    torch.manual_seed(0)
    full = Wrapped()
    cut = Wrapped()
    cut.load_state_dict(full.state_dict())
    opt_full, sched_full = make_optimizer(full, cfg, 4)
    lr_full = train_epochs(full, opt_full, sched_full, 4)
    opt, sched = make_optimizer(cut, cfg, 4)
    lr_cut = train_epochs(cut, opt, sched, 2)
    torch.save({"model": cut.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict()}, tmp_path / "last.pt")
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.manual_seed(1)
    resumed = Wrapped()  # other initial weights: everything must come from the file
    resumed.load_state_dict(saved["model"])
    opt_r, sched_r = make_optimizer(resumed, cfg, 4)
    opt_r.load_state_dict(saved["optimizer"])
    sched_r.load_state_dict(saved["scheduler"])
    lr_cut += train_epochs(resumed, opt_r, sched_r, 2)
    assert lr_full == lr_cut
    assert state_equal(full.state_dict(), resumed.state_dict())
    assert state_equal(opt_full.state_dict(), opt_r.state_dict())  # momentum, moments, steps
    assert state_equal(sched_full.state_dict(), sched_r.state_dict())
    assert opt_full.state_dict()["state"]
    if schedule != "constant":
        assert len(set(lr_full)) == 4  # the schedule moved the lr each epoch


def test_the_loop_resumes_adamw_with_cosine_exactly(tiny, tmp_path, monkeypatch):
    """Through train() and Ctrl-C: weights, Adam's moments and the schedule of the resumed
    run equal the uninterrupted run's."""
    cfg = tiny_config(tiny, tmp_path / "full", method="sum", epochs=2)
    merge(cfg.optim, {"name": "adamw", "schedule": "cosine", "weight_decay": 0.01})
    full_rows = train(cfg)
    cfg.out = str(tmp_path / "cut")
    cut_rows = interrupt_then_resume(cfg, monkeypatch, at_epoch=2)
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=False)
                 for run in ("full", "cut"))
    for key in ("model", "optimizer", "scheduler"):
        assert state_equal(full[key], cut[key]), key
    assert full["optimizer"]["state"]  # Adam's moments were saved and compared
    assert [r["lr"] for r in full_rows] == [r["lr"] for r in cut_rows]
    assert len({r["lr"] for r in full_rows}) == 2


def test_resume_refuses_another_optimizer_or_schedule_naming_the_key(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run", method="sum", epochs=1)
    train(cfg)
    for key, old, new in (("name", "sgd", "adamw"), ("schedule", "step", "cosine")):
        moved = tiny_config(tiny, tmp_path / "run", method="sum", epochs=1)
        merge(moved.optim, {key: new})
        with pytest.raises(CcatError, match=f"optim.{key}: '{old}' -> '{new}'"):
            train(moved, resume=True)


NEW_KEYS = ("name", "schedule", "nesterov", "betas", "eps", "t_max", "eta_min")


def test_a_run_saved_before_the_optimizer_keys_existed_resumes_as_sgd_and_step_lr(
        tiny, tmp_path, monkeypatch):
    """A run folder whose config.yaml and last.pt lack optim.name, optim.schedule and their
    settings (every run trained before they existed) continues as SGD with StepLR, and ends
    with the weights of an uninterrupted run."""
    cfg = tiny_config(tiny, tmp_path / "full", method="sum", epochs=2)
    train(cfg)
    cfg.out = str(tmp_path / "old")
    from train_helpers import interrupt

    interrupt(cfg, monkeypatch, at_epoch=2)
    old = tmp_path / "old"
    saved = yaml.safe_load((old / "config.yaml").read_text())
    ckpt = torch.load(old / "last.pt", weights_only=False)
    for values in (saved["optim"], ckpt["config"]["optim"]):
        for key in NEW_KEYS:
            del values[key]
    (old / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    torch.save(ckpt, old / "last.pt")
    train(cfg, resume=True)
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=False)
                 for run in ("full", "old"))
    assert state_equal(full["model"], cut["model"])
    assert state_equal(full["optimizer"], cut["optimizer"])
