"""``ccat probe`` and ``ccat eval --probe`` on real tiny runs: the JSON, its range and
determinism, and a probe of 1.0 on an encoder whose pooled feature is the label one-hot."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ccat import checkpoint
from ccat.analysis import probe as probe_module
from ccat.analysis.probe import fit_probe
from ccat.cli import app
from ccat.config import ModelConfig
from ccat.models import ENCODERS
from ccat.train import train
from train_helpers import CLASSES, tiny_config, write_tiny_dataset

runner = CliRunner()
BAND = 40  # tiny_members raises spectrogram rows [label * 40, label * 40 + 40) by 2.0


class LabelBandEncoder(nn.Module):
    """Reads the class band train_helpers.tiny_members writes into the spectrogram and
    returns the label's one-hot (padded to the model width) as its pooled feature. Its
    ``proj`` (the model reads its width there) is a frozen identity."""

    def __init__(self, params: dict, cfg: ModelConfig):
        super().__init__()
        self.width = cfg.width
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.proj.weight.data.copy_(torch.eye(cfg.width))
        self.proj.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bands = x.float()[:, :BAND * len(CLASSES)].reshape(x.shape[0], len(CLASSES), -1)
        onehot = self.proj(nn.functional.one_hot(bands.mean(2).argmax(1), self.width).float())
        return onehot.unsqueeze(1), onehot


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-epoch Concat run on tiny shards."""
    root = tmp_path_factory.mktemp("probe")
    data = write_tiny_dataset(root / "shards")
    cfg = tiny_config(data, root / "run", "concat")
    cfg.threads = 1
    train(cfg)
    return root


def probe_json(ckpt: Path, out: Path, *args: str) -> dict:
    result = runner.invoke(app, ["probe", "--ckpt", str(ckpt), "--json", str(out), *args])
    assert result.exit_code == 0, result.output
    assert "probe audio" in result.output and "probe video" in result.output
    return json.loads(out.read_text())


def test_probe_json_keys_range_and_determinism(tiny_run, tmp_path):
    ckpt = tiny_run / "run" / "best.pt"
    first = probe_json(ckpt, tmp_path / "a.json")
    assert first["split"] == "test" and set(first["probe"]) == {"audio", "video"}
    assert all(0.0 <= v <= 1.0 for v in first["probe"].values())
    assert first["num_samples"] == {"train": 24, "test": 12}
    assert first["probe_converged"] == {"audio": True, "video": True}
    assert first["run"] == {"method": "concat", "variant": "", "dataset": "tiny", "seed": 0}
    assert first["selection"]["select"] == "best" and first["selection"]["split"] == "val"
    manifest = json.loads((tiny_run / "shards" / "manifest.json").read_text())
    assert first["fingerprint"] == manifest["fingerprint"]
    probe_json(ckpt, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_eval_probe_adds_the_same_block(tiny_run, tmp_path):
    ckpt = tiny_run / "run" / "best.pt"
    alone = probe_json(ckpt, tmp_path / "probe.json")
    result = runner.invoke(app, ["eval", "--ckpt", str(ckpt), "--probe",
                                 "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["probe"] == alone["probe"] and "accuracy" in metrics
    plain = runner.invoke(app, ["eval", "--ckpt", str(ckpt), "--json",
                                str(tmp_path / "plain.json")])
    assert plain.exit_code == 0 and "probe" not in json.loads((tmp_path / "plain.json").read_text())


def test_eval_probe_loads_the_checkpoint_once_and_predicts_each_split_once(tiny_run, tmp_path,
                                                                          monkeypatch):
    ckpt = tiny_run / "run" / "best.pt"
    loads, predicted = [], []
    real_load, real_predict = torch.load, checkpoint.predict

    def counted_load(f, *args, **kwargs):  # torch's own load, counted for the checkpoint
        loads.extend([f] if Path(f) == ckpt else [])
        return real_load(f, *args, **kwargs)

    def counted_predict(method, model, dataset, split, *args, **kwargs):
        predicted.append(split)
        return real_predict(method, model, dataset, split, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted_load)
    monkeypatch.setattr(checkpoint, "predict", counted_predict)
    result = runner.invoke(app, ["eval", "--ckpt", str(ckpt), "--probe",
                                 "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert len(loads) == 1 and sorted(predicted) == ["test", "train"]
    assert set(json.loads((tmp_path / "eval.json").read_text())["probe"]) == {"audio", "video"}


def test_probe_of_a_label_one_hot_encoder_is_exact(tiny_run, tmp_path, monkeypatch):
    # registered for this test only: the registry lists the shipped encoders elsewhere
    monkeypatch.setitem(ENCODERS._entries, "test_label_band", LabelBandEncoder)
    cfg = tiny_config(tiny_run / "shards", tmp_path / "run", "concat")
    cfg.threads, cfg.model.encoders = 1, {"audio": "test_label_band"}
    train(cfg)
    result = probe_json(tmp_path / "run" / "best.pt", tmp_path / "probe.json")
    assert result["probe"]["audio"] == 1.0
    assert result["probe"]["video"] < 1.0  # the faint video cue after one epoch: not exact


def test_a_fit_that_does_not_converge_says_so():
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(60, 40)), np.arange(60) % 3  # separable only by memory
    accuracy, converged = fit_probe(feats, labels, feats, labels, seed=0)
    assert 0.0 <= accuracy <= 1.0 and converged
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probe_module, "MAX_ITER", 1)
        assert fit_probe(feats, labels, feats, labels, seed=0)[1] is False


def test_probe_refuses_scoring_on_its_fit_split_and_data_elsewhere(tiny_run, tmp_path):
    ckpt = tiny_run / "run" / "best.pt"
    result = runner.invoke(app, ["probe", "--ckpt", str(ckpt), "--split", "train"])
    assert result.exit_code != 0 and "fitted on 'train'" in str(result.exception)
    other = write_tiny_dataset(tmp_path / "other", seed=5)
    result = runner.invoke(app, ["probe", "--ckpt", str(ckpt), "--data", str(other)])
    assert result.exit_code != 0 and "fingerprint" in str(result.exception)
