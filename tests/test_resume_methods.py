"""Resume equals an uninterrupted run for every registered method (and MLA's gsplugin,
whose state is the projector and the plugin's call count)."""

import pytest
import torch

from ccat import checkpoint
from ccat.methods import METHODS
from ccat.train import train
from train_helpers import interrupt, interrupt_then_resume, tiny_config, write_tiny_dataset

CASES = [(name, {}) for name in METHODS.names()] + [("mla", {"projection": "gsplugin"})]
# From the first step: OPM's random drops, OPG's gradient noise
CASES += [("opm", {"warmup_epochs": 0}), ("opg", {"warmup_epochs": 0})]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("resume"),
                              counts={"train": 8, "val": 2, "test": 2}, size=16, steps=16)


@pytest.mark.parametrize("name,params", CASES,
                         ids=[f"{n}{'-' if p else ''}{'-'.join(map(str, p.values()))}"
                              for n, p in CASES])
def test_interrupted_then_resumed_run_ends_with_the_same_weights(name, params, tiny, tmp_path,
                                                                  monkeypatch):
    cfg = tiny_config(tiny, tmp_path / "full", method=name, epochs=2)
    cfg.method.params = params
    train(cfg)
    cfg.out = str(tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=2)
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                 for run in ("full", "cut"))
    assert full["model"].keys() == cut["model"].keys()
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])


def test_a_run_saved_before_checkpoint_versions_resumes_to_the_same_weights(tiny, tmp_path,
                                                                           monkeypatch):
    # AUG: its checkpoint holds the layers it grew, which the resume must rebuild exactly
    cfg = tiny_config(tiny, tmp_path / "full", method="aug", epochs=2)
    train(cfg)
    cfg.out = str(tmp_path / "cut")
    interrupt(cfg, monkeypatch, at_epoch=2)
    last = tmp_path / "cut" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["version"]  # the dict as `ccat train` wrote it before the field (version 0)
    torch.save(state, last)
    assert checkpoint.load(last, checkpoint.RESUME_KEYS).version == 0
    train(cfg, resume=True)
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                 for run in ("full", "cut"))
    assert full["model"].keys() == cut["model"].keys() and cut["version"] == checkpoint.VERSION
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])


def test_a_device_cache_run_saved_before_the_one_partition_is_refused(tiny, tmp_path,
                                                                      monkeypatch):
    """Format 0's device cache dealt other batches than today's, so its resume is refused in
    one sentence rather than continued on batches the run never saw."""
    from ccat.errors import CcatError

    cfg = tiny_config(tiny, tmp_path / "cut", method="concat", epochs=2)
    cfg.data.device_cache = True
    interrupt(cfg, monkeypatch, at_epoch=2)
    last = tmp_path / "cut" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["version"]
    torch.save(state, last)
    with pytest.raises(CcatError, match="drew other batches than today's .*--overwrite"):
        train(cfg, resume=True)
