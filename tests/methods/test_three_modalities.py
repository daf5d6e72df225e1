"""Every registered method on a three-modality build (a tiny synthetic CMU-MOSEI: text,
audio, vision feature sequences): one finite step of each stage for the methods that take
any number of modalities, a one-sentence refusal for those that need exactly two."""

import math

import pytest
import torch

from ccat.config import ConfigError, DataConfig, MethodConfig
from ccat.data import open_dataset
from ccat.data.pipeline import make_loader
from ccat.methods import METHODS
from method_helpers import TINY, RecordingStep
from preprocess import writer
from preprocess.datasets.mosei import Mosei
from preprocess.datasets.synth_mosei import synthesize_mosei

# Each refuses in its own words: the two pairwise fusions of CCAT, FiLM and BiGated, and
# the methods whose released rule is written for a pair.
NEEDS_TWO = {"bigated": "BiGated fuses exactly two modalities",
             "ccat": "BiCross fuses exactly two modalities",
             "film": "FiLM fuses exactly two modalities",
             "greedy": "method 'greedy' needs exactly two modalities",
             "valuation": "method 'valuation' needs exactly two modalities",
             # issue 26's methods whose released rule compares a pair (audio with video)
             "arl": "method 'arl' needs exactly two modalities",
             "aug": "method 'aug' needs exactly two modalities",
             "mbsd": "method 'mbsd' needs exactly two modalities",
             "remix": "method 'remix' needs exactly two modalities"}
# a per-modality parameter whose default is written for CREMA-D's two modalities
THREE = {"inforeg": {"beta": [0.95, 0.1, 0.1]}}


@pytest.fixture(scope="module")
def mosei(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosei")
    synthesize_mosei(root / "raw", 24, 0, "aligned", 1.0, lambda n: None)
    folds = root / "raw" / "splits" / "cmu_mosei_std_folds.py"
    writer.build(Mosei(), root / "raw", root / "out", dict.fromkeys(("train", "val", "test"),
                                                                  folds),
                 writer.BuildOptions(workers=1, shard_size=8))
    dataset = open_dataset(root / "out")
    batch = next(iter(make_loader(dataset, "train", DataConfig(batch_size=6, workers=0),
                                  train=True, seed=0)))
    return dataset, batch


def build(name, dataset, **params):
    method = METHODS.get(name)(MethodConfig(name=name, params=params), epochs=2)
    method.bind_data(train_samples=6, batches_per_epoch=1)
    torch.manual_seed(0)
    return method, method.build_model(dataset.modalities, len(dataset.classes), TINY)


@pytest.mark.parametrize("name", sorted(set(METHODS.names()) - set(NEEDS_TWO)))
def test_every_method_for_any_number_of_modalities_trains_each_stage_on_three(name, mosei):
    dataset, batch = mosei
    assert list(batch.inputs) == ["text", "audio", "vision"]
    method, model = build(name, dataset, **THREE.get(name, {}))
    for stage in method.stages():
        method.begin_stage(stage, model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                              momentum=0.9)
        step = RecordingStep(opt, model)
        out = method.train_step(model, batch, step)
        assert out and all(math.isfinite(v) for v in out.values()), out
        assert step.changes and all(step.changes)
    predicted = method.predict(model, batch)
    assert predicted.fused.shape == (6, len(dataset.classes))
    assert set(predicted.unimodal) <= {"text", "audio", "vision"}


@pytest.mark.parametrize("name", sorted(NEEDS_TWO))
def test_methods_that_need_two_modalities_refuse_three_in_one_sentence(name, mosei):
    dataset, _ = mosei
    with pytest.raises(ConfigError) as refused:
        build(name, dataset)
    message = str(refused.value)
    assert message.startswith(NEEDS_TWO[name]) and "\n" not in message
    assert "text" in message and "vision" in message  # names the data's modalities


def test_a_two_value_per_modality_parameter_is_refused_for_three_modalities(mosei):
    dataset, _ = mosei
    with pytest.raises(ConfigError, match=r"method.params.beta needs one value per modality "
                                          r"\(text, audio, vision\), got \[0.95, 0.1\]"):
        build("inforeg", dataset)
