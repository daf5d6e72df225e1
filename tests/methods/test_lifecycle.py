"""The loop owns a method's lifecycle: it calls the hooks in the order ``Method``'s
docstring writes down, in a run and in its resume, and it alone sets ``self.stage`` and
``self.epoch``; a method's modulation window ends as :class:`WindowEnd` names."""

import pytest

from ccat.config import MethodConfig
from ccat.methods import METHODS
from ccat.methods.base import Method, Stage, WindowEnd, in_window
from ccat.methods.ccat import CCAT, Phase
from ccat.train import train
from train_helpers import interrupt, tiny_config, write_tiny_dataset

HOOKS = ("on_stage", "load_state_dict", "on_epoch", "before_epoch", "epoch_extras",
         "train_step", "end_epoch", "predict", "state_dict")


def record_hooks(monkeypatch: pytest.MonkeyPatch, cls: type[Method]) -> list[tuple[str, str, int]]:
    """Every call of ``cls``'s HOOKS from now on, as (hook, self.stage's name, self.epoch),
    a run of calls of one hook in one stage and epoch written once."""
    calls: list[tuple[str, str, int]] = []
    for name in HOOKS:
        def hook(self, *args, _real=getattr(cls, name), _name=name):
            call = (_name, self.stage.name, self.epoch)
            if not calls or calls[-1] != call:
                calls.append(call)
            return _real(self, *args)
        monkeypatch.setattr(cls, name, hook)
    return calls


def epoch_hooks(stage: str, epoch: int) -> list[tuple[str, str, int]]:
    """One training epoch's hooks as the docstring orders them, then its evaluation and
    checkpoint."""
    return [(hook, stage, epoch) for hook in ("on_epoch", "before_epoch", "epoch_extras",
                                              "train_step", "end_epoch", "predict",
                                              "state_dict")]


def test_the_loop_calls_the_hooks_in_the_written_order_and_sets_stage_and_epoch(
        tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 16, "val": 6, "test": 6})
    calls = record_hooks(monkeypatch, CCAT)
    cfg = tiny_config(data, tmp_path / "run", "ccat", epochs=3)  # pretrain 2 epochs, alternate 1
    train(cfg)
    assert calls == [("on_stage", "pretrain", 0), *epoch_hooks("pretrain", 0),
                     *epoch_hooks("pretrain", 1), ("on_stage", "alternate", 1),
                     *epoch_hooks("alternate", 0)]
    cfg.out = str(tmp_path / "cut")
    interrupt(cfg, monkeypatch, at_epoch=2)  # Ctrl-C as pretrain's second epoch begins
    calls.clear()
    train(cfg, resume=True)
    assert calls == [("on_stage", "pretrain", 0), ("load_state_dict", "pretrain", 0),
                     *epoch_hooks("pretrain", 1), ("on_stage", "alternate", 1),
                     *epoch_hooks("alternate", 0)]


def test_a_method_that_overrides_what_the_loop_owns_is_refused():
    with pytest.raises(TypeError, match="overrides begin_epoch\\(\\), which the loop owns "
                                        "\\(it sets self.epoch\\); override on_epoch\\(\\)"):
        class SetsItsEpoch(Method):
            def begin_epoch(self, epoch: int) -> None:
                self.epoch = epoch
    with pytest.raises(TypeError, match="overrides begin_stage\\(\\).*override on_stage\\(\\)"):
        class SetsItsStage(Method):
            def begin_stage(self, stage: Stage, model) -> None:
                self.stage = stage


def test_stages_are_typed_and_record_plain_names():
    stages = METHODS.get("ccat")(MethodConfig(name="ccat"), 4).stages()
    assert [s.kind for s in stages] == [Phase.PRETRAIN, Phase.ALTERNATE]
    assert [type(s.name) for s in stages] == [str, str]  # as checkpoints and metrics rows hold
    assert [s.name for s in stages] == ["pretrain", "alternate"]


@pytest.mark.parametrize("end,inside", [(WindowEnd.INCLUDED, [1, 2, 3]),
                                        (WindowEnd.EXCLUDED, [1, 2])])
def test_a_window_holds_its_end_epoch_or_not_as_named(end, inside):
    assert [e for e in range(6) if in_window(e, 1, 3, end)] == inside


@pytest.mark.parametrize("name,end", [("ogm_ge", 1), ("agm", 1), ("pmr", 2), ("umt", 2),
                                      ("amco", 2), ("mbsd", 2), ("cml", 2)])
def test_each_method_modulates_through_the_window_its_release_names(name, end):
    """With the window 0..1: PMR, UMT, AMCo, MBSD and CML modulate epochs 0 and 1 (their
    releases' check on epochs from 0); AGM and OGM-GE epoch 0 only (see WindowEnd)."""
    method = METHODS.get(name)(MethodConfig(name=name, params={"modulation_ends": 1}), 4)
    method.begin_stage(method.stages()[-1], _model_for(method))
    modulated = []
    for epoch in range(4):
        method.begin_epoch(epoch)
        if (method.distilling() if name == "umt" else method.modulating()):
            modulated.append(epoch)
    assert modulated == list(range(end))


def _model_for(method: Method):
    from method_helpers import TINY
    from train_helpers import CLASSES, TINY_MODALITIES

    return method.build_model(TINY_MODALITIES, len(CLASSES), TINY)
