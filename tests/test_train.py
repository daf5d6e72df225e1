"""Config strictness, the training loop, resume, fingerprint checks, non-finite losses."""

import json

import pytest
import torch

from ccat.config import ConfigError, RunConfig, load_config, save_config
from ccat.errors import CcatError
from ccat.evaluate import evaluate_checkpoint
from ccat.train import train
from train_helpers import interrupt_then_resume, tiny_config, write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def test_config_defaults_are_the_papers():
    cfg = RunConfig()
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == \
        (32, 1e-3, 0.9, 0.1)
    assert (cfg.optim.step_size, cfg.optim.gamma, cfg.optim.epochs) == (70, 0.1, 150)
    assert (cfg.method.lambda_reg, cfg.method.temperature, cfg.method.fresh_encoders) == \
        (0.001, 1.0, True)


def test_config_is_strict_and_layered(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: {beta: 0.3}\noptim: {epochs: 5}\n")
    cfg = load_config(path, ["method.beta=0.2", "model.encoder_blocks=[1, 1]"], {"out": "x"})
    assert (cfg.method.beta, cfg.optim.epochs, cfg.model.encoder_blocks, cfg.out) == \
        (0.2, 5, [1, 1], "x")
    with pytest.raises(ConfigError, match="'method.betta'"):
        load_config(None, ["method.betta=0.2"])
    with pytest.raises(ConfigError, match="'optim.epochs'"):
        load_config(None, ["optim.epochs=ten"])
    with pytest.raises(ConfigError, match="'optim.lr'"):
        load_config(None, ["optim.lr=true"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_configs_in_the_repo_load(pytestconfig):
    root = pytestconfig.rootpath / "configs"
    for path in sorted(root.glob("*.yaml")):
        load_config(path)
    assert load_config(root / "cremad.yaml").method.beta == 0.15


def weights(path):
    return torch.load(path, weights_only=False)["model"]


def test_resume_ends_with_the_same_weights(tiny, tmp_path, monkeypatch):
    cfg = tiny_config(tiny, tmp_path / "full", epochs=3)  # CCAT's total: 1 + 2
    cfg.method.pretrain_epochs = 1
    history = train(cfg)
    assert [(r["stage"], r["epoch"]) for r in history] == [("pretrain", 1), ("alternate", 1),
                                                           ("alternate", 2)]
    cfg.out = str(tmp_path / "cut")
    resumed = interrupt_then_resume(cfg, monkeypatch, at_epoch=3)
    assert len(resumed) == 3
    full, cut = weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 1, 2]


def test_fingerprint_mismatch_is_refused(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path / "run", method="sum")
    train(cfg)
    other = write_tiny_dataset(tmp_path / "other", size=24)
    with pytest.raises(CcatError, match=r"modalities\.video\.size: 32 -> 24"):
        evaluate_checkpoint(tmp_path / "run" / "best.pt", str(other))
    with pytest.raises(CcatError, match="fingerprint"):
        train(tiny_config(other, tmp_path / "run", method="sum"), resume=True)


def test_non_finite_loss_names_stage_epoch_step_keys_and_checkpoint(tiny, tmp_path, monkeypatch):
    cfg = tiny_config(tiny, tmp_path / "nan", method="sum", epochs=2)
    train(cfg)
    from ccat.methods import joint

    monkeypatch.setattr(joint.F, "cross_entropy", lambda *a, **k: torch.tensor(float("nan"),
                                                                               requires_grad=True))
    with pytest.raises(CcatError) as err:
        train(cfg, resume=False)
    message = str(err.value)
    for part in ("stage 'joint'", "epoch 1", "step 1", "batch keys ['train_", "last good"):
        assert part in message


def test_method_yaml_is_a_layer_under_the_run_config(tmp_path):
    methods = tmp_path / "methods"
    methods.mkdir()
    (methods / "ccat.yaml").write_text("method:\n  beta: 0.3\n  params: {}\n  rank: 4\n")
    run = tmp_path / "run.yaml"
    run.write_text("method:\n  rank: 8\n")
    cfg = load_config(run, [], None, method_configs=methods)
    assert (cfg.method.beta, cfg.method.rank) == (0.3, 8)  # the run's file wins over the method's
    (methods / "ccat.yaml").write_text("method:\n  betta: 0.3\n")
    with pytest.raises(ConfigError, match="method.betta"):
        load_config(run, [], None, method_configs=methods)


def test_method_params_are_checked_against_the_method():
    from ccat.config import MethodConfig
    from ccat.methods import METHODS

    with pytest.raises(ConfigError, match="takes no method.params"):
        METHODS.get("sum")(MethodConfig(name="sum", params={"alpha": 1.0}), 1)


def test_compiled_encoders_train_and_save_plain_checkpoints(tmp_path):
    """compile=<backend> wraps each encoder in torch.compile in place: the checkpoint keeps
    the eager model's keys, so eval and resume read it without compiling."""
    data = write_tiny_dataset(tmp_path / "data", counts={"train": 8, "val": 3, "test": 3})
    cfg = tiny_config(data, tmp_path / "run", method="sum")
    cfg.compile = "eager"  # dynamo's tracing without a C++ compiler
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["model"])
    metrics = evaluate_checkpoint(tmp_path / "run" / "best.pt")
    assert metrics["num_samples"] == 3
