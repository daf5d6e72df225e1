"""Config strictness, the training loop, resume, fingerprint checks, non-finite losses."""

import json

import pytest
import torch

from ccat.config import METHOD_CONFIGS, ConfigError, RunConfig, save_config
from ccat.run_config import load_config
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
    params = load_config().method.params
    assert (params["lambda_reg"], params["temperature"], params["fresh_encoders"]) == \
        (0.001, 1.0, True)


def test_config_is_strict_and_layered(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: {params: {beta: 0.3}}\noptim: {epochs: 5}\n")
    cfg = load_config(path, ["method.params.beta=0.2", "model.encoder_blocks=[1, 1]"],
                      {"out": "x"})
    assert (cfg.method.params["beta"], cfg.optim.epochs, cfg.model.encoder_blocks, cfg.out) == \
        (0.2, 5, [1, 1], "x")
    with pytest.raises(ConfigError, match="'method.betta'"):
        load_config(None, ["method.betta=0.2"])
    with pytest.raises(ConfigError, match="has no param 'betta'.*its params are lambda_reg, rank"):
        load_config(None, ["method.params.betta=0.2"])
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
    methods = sorted(METHOD_CONFIGS.glob("*.yaml"))
    assert len(methods) >= 20  # the package's method files, found where the code runs
    for path in methods:
        assert load_config(path).method.name == path.stem  # each file is a method's
    assert load_config(root / "cremad.yaml").method.params["beta"] == 0.15
    assert load_config(root / "ks.yaml").method.params["beta"] == 0.30


def weights(path):
    return torch.load(path, weights_only=False)["model"]


def test_resume_ends_with_the_same_weights(tiny, tmp_path, monkeypatch):
    cfg = tiny_config(tiny, tmp_path / "full", epochs=3)  # CCAT's total: 1 + 2
    cfg.method.params["pretrain_epochs"] = 1
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
        train(cfg, overwrite=True)
    message = str(err.value)
    for part in ("stage 'joint'", "epoch 1", "step 1", "batch keys ['train_", "last good"):
        assert part in message


def test_method_yaml_is_a_layer_under_the_run_config(tmp_path):
    methods = tmp_path / "methods"
    methods.mkdir()
    (methods / "ccat.yaml").write_text("method:\n  params: {beta: 0.3, rank: 4}\n")
    run = tmp_path / "run.yaml"
    run.write_text("method:\n  params: {rank: 8}\n")
    cfg = load_config(run, [], None, method_configs=methods)
    params = cfg.method.params  # the run's file wins over the method's
    assert (params["beta"], params["rank"], params["lambda_reg"]) == (0.3, 8, 0.001)
    (methods / "ccat.yaml").write_text("method:\n  params: {betta: 0.3}\n")
    with pytest.raises(ConfigError, match="method.params.betta"):
        load_config(run, [], None, method_configs=methods)


def test_a_datasets_ccat_params_apply_to_ccat_only(pytestconfig, tmp_path):
    """configs/ks.yaml names ccat with beta 0.30: training another method from it leaves
    them out (checked all the same), while a --set param the chosen method lacks is an
    error naming that method's params."""
    ks = pytestconfig.rootpath / "configs" / "ks.yaml"
    assert load_config(ks, [], {"method.name": "ogm_ge"}).method.params == \
        load_config(None, ["method.name=ogm_ge"]).method.params
    with pytest.raises(ConfigError, match=r"^method 'ogm_ge' has no param 'beta' "
                       r"\(method.params.beta\); its params are alpha, modulation, "):
        load_config(ks, ["method.params.beta=0.2"], {"method.name": "ogm_ge"})
    typo = tmp_path / "typo.yaml"
    typo.write_text("method: {name: ccat, params: {betta: 0.2}}\n")
    with pytest.raises(ConfigError, match="method 'ccat' has no param 'betta'"):
        load_config(typo, [], {"method.name": "ogm_ge"})


def test_top_level_ccat_keys_are_refused_naming_the_new_key(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"^method.beta is now method.params.beta: "):
        load_config(None, ["method.beta=0.2"])
    old = tmp_path / "old.yaml"
    old.write_text("method: {name: ccat, rank: 4, lora: false}\n")
    with pytest.raises(ConfigError, match="method.rank, method.lora are now "
                       "method.params.rank, method.params.lora"):
        load_config(old)
    train(tiny_config(tiny, tmp_path / "run", method="sum"))
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    ckpt["config"]["method"]["beta"] = 0.15  # as runs saved before the move hold it
    torch.save(ckpt, tmp_path / "run" / "old.pt")
    with pytest.raises(ConfigError, match="method.beta is now method.params.beta"):
        evaluate_checkpoint(tmp_path / "run" / "old.pt")


def test_method_params_are_checked_against_the_method():
    from ccat.config import MethodConfig
    from ccat.methods import METHODS

    with pytest.raises(ConfigError, match="method 'sum' has no param 'alpha'.*takes no params"):
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


def test_scientific_notation_reads_as_float_in_set_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1e-3, weight_decay: 5E-4, encoder_lr: {text: 1e-5}}\n"
                    "method: {name: ogm_ge, params: {alpha: 5e-1}}\n")
    assert load_config(path).method.params["alpha"] == 0.5
    cfg = load_config(path, ["method.params.alpha=2.5e-1"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.encoder_lr) == \
        (1e-3, 5e-4, {"text": 1e-5})
    assert cfg.method.params["alpha"] == 0.25
    with pytest.raises(ConfigError, match="'optim.epochs' must be int"):
        load_config(None, ["optim.epochs=1e3"])  # ints stay ints


@pytest.mark.parametrize("override, says", [
    ("optim.lr=-1", "optim.lr is -1.0 but must be in (0, 10]"),
    ("data.batch_size=0", "data.batch_size is 0 but must be in [1, 65536]"),
    ("data.workers=-1", "data.workers is -1 but must be in [0, 256]"),
    ("optim.step_size=0", "optim.step_size is 0 but must be in [1, 1000000]"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer is 0 but must be in [1, 100000]"),
    ("data.frame_size=-5", "data.frame_size is -5 but must be in [0, 1024]"),
    ("data.crop_scale_min=5", "data.crop_scale_min is 5.0 but must be in (0, 1]"),
    ("method.params.rank=0", "method.params.rank is 0 but must be in [1, 16384]"),
    ("optim.epochs=0", "optim.epochs is 0 but must be in [1, 1000000]"),
    ("optim.epochs=-3", "optim.epochs is -3 but must be in [1, 1000000]"),
    ("model.encoder_blocks=[2, 0]", "model.encoder_blocks[1] is 0 but must be in [1, 64]"),
    ("optim.encoder_lr={text: -1e-5}", "optim.encoder_lr.text is -1e-05 but must be in (0, 10]"),
    ("optim.lr=.inf", "optim.lr is inf but must be a finite number in (0, 10]"),
])
def test_numbers_out_of_range_are_one_sentence_each(override, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == says + "."


def test_method_params_ranges_are_checked(tiny, tmp_path):
    from ccat.config import MethodConfig
    from ccat.methods import METHODS

    with pytest.raises(ConfigError, match=r"method.params.alpha is -0.5 but must be in \[0, "):
        METHODS.get("ogm_ge")(MethodConfig(name="ogm_ge", params={"alpha": -0.5}), 1)
    cfg = tiny_config(tiny, tmp_path / "run", method="sum")
    cfg.optim.epochs = 0  # a config built in Python is checked too
    with pytest.raises(ConfigError, match="optim.epochs is 0"):
        train(cfg)


def _numeric(hint):
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: a setting of
        hint = next(a for a in typing.get_args(hint) if a is not type(None))  # one optimizer
    args = typing.get_args(hint)
    return hint in (int, float) or (typing.get_origin(hint) in (list, dict)
                                    and args[-1] in (int, float))


def test_every_numeric_field_has_a_range():
    """Walk every config dataclass and every registered method's Params."""
    import dataclasses
    import typing

    from ccat.config import DataConfig, MethodConfig, ModelConfig, OptimConfig
    from ccat.methods import METHODS

    classes = [RunConfig, DataConfig, ModelConfig, OptimConfig, MethodConfig]
    classes += [METHODS.get(n).Params for n in METHODS.names() if METHODS.get(n).Params]
    for cls in classes:
        hints = typing.get_type_hints(cls)
        numeric = {f.name for f in dataclasses.fields(cls) if _numeric(hints[f.name])}
        assert numeric == set(getattr(cls, "RANGES", {})), cls.__qualname__


def test_config_differences_skip_only_the_free_keys():
    from ccat.config import UNSET, differences

    saved, new = RunConfig(), RunConfig()
    new.data.workers, new.threads, new.out, new.data.prefetch = 7, 3, "elsewhere", 9
    assert differences(saved, new) == []
    new.method.params, new.data.device_cache, new.select_split = {"alpha": 0.5}, True, "test"
    assert differences(saved, new) == [("data.device_cache", False, True),
                                       ("method.params.alpha", UNSET, 0.5),
                                       ("select_split", "", "test")]


def test_relations_between_fields_are_checked():
    from ccat.config import MethodConfig
    from ccat.methods import METHODS

    with pytest.raises(ConfigError, match="model.width 10 must be a multiple of model.heads 4"):
        load_config(None, ["model.width=10", "model.heads=4"])
    with pytest.raises(ConfigError, match="alpha_min 0.9 must not exceed method.params.alpha_max"):
        METHODS.get("lfm")(MethodConfig(name="lfm", params={"alpha_min": 0.9, "alpha_max": 0.5}),
                           1)


def test_before_epoch_gets_the_runs_data_once_per_epoch_and_again_on_resume(tiny, tmp_path,
                                                                           monkeypatch):
    from ccat.methods.joint import JointMethod

    calls = []

    def record(self, model, data):
        model.eval()  # the loop must put it back in train mode
        every = [k for b in data.batches("train", train=False) for k in b.keys]
        streamed = [k for b in data.batches("train", train=True, epoch=self.epoch) for k in b.keys]
        calls.append((self.epoch, sorted(every), len(streamed), len(set(streamed))))

    monkeypatch.setattr(JointMethod, "before_epoch", record)
    seen_modes = []
    real_step = JointMethod.train_step

    def step(self, model, batch, step):
        seen_modes.append(model.training)
        return real_step(self, model, batch, step)

    monkeypatch.setattr(JointMethod, "train_step", step)
    cfg = tiny_config(tiny, tmp_path / "run", method="concat", epochs=2)
    train(cfg)
    train_keys = sorted(f"train_{i:04d}" for i in range(24))
    assert calls == [(0, train_keys, 24, 24), (1, train_keys, 24, 24)]  # 24 = 3 full batches
    assert all(seen_modes)
    calls.clear()
    cfg.out = str(tmp_path / "cut")
    interrupt_then_resume(cfg, monkeypatch, at_epoch=2)  # epoch 0 ran, then a Ctrl-C
    assert [c[0] for c in calls] == [0, 1]  # the resumed run starts again at epoch 1


def test_checkpoints_and_eval_record_every_code_version_that_trained_the_run(tiny, tmp_path,
                                                                            monkeypatch):
    from ccat import provenance

    cfg = tiny_config(tiny, tmp_path / "run", method="sum", epochs=2)
    monkeypatch.setattr(provenance, "training_code", lambda: "commit `a1` (clean)")
    from train_helpers import interrupt
    interrupt(cfg, monkeypatch, at_epoch=2)
    monkeypatch.setattr(provenance, "training_code", lambda: "commit `b2` (clean)")
    train(cfg, resume=True)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["code"] == ["commit `a1` (clean)", "commit `b2` (clean)"]
    metrics = evaluate_checkpoint(tmp_path / "run" / "last.pt")
    assert metrics["code"] == ckpt["code"]


def test_the_running_code_is_stamped_with_its_commit():
    import subprocess
    from pathlib import Path

    import ccat
    from ccat import provenance

    package = Path(ccat.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode != 0:
        pytest.skip("ccat is installed outside a git checkout here")
    assert provenance.training_code().startswith(f"commit `{head.stdout.strip()}` (")


def test_evaluating_a_checkpoint_restores_the_methods_state(tiny, tmp_path):
    from ccat.checkpoint import open_checkpoint

    cfg = tiny_config(tiny, tmp_path / "run", method="pmr", epochs=2)
    train(cfg)
    with open_checkpoint(tmp_path / "run" / "last.pt", device="cpu") as opened:
        method, saved = opened.method, opened.ckpt.method_state["prototypes"]
    assert saved and method.prototypes.keys() == saved.keys()
    assert all(torch.equal(method.prototypes[m], saved[m]) for m in saved)
