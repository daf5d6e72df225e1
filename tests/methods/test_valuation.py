"""Sample-level modality valuation: the value function, the Shapley contributions, the
bands and the dropped modality of the copies, and the zeroing of a dropped modality, each
against the released rule (GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation, code/);
then the valuation pass over a real split, real steps, the re-sampled epoch in the loop,
two ranks, and resume."""

import itertools
import socket
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from ccat.config import ConfigError, MethodConfig
from ccat.data import open_dataset
from ccat.data.device_cache import DeviceCache
from ccat.data.pipeline import num_train_batches
from ccat.methods import METHODS, RunData
from ccat.methods.valuation import copies_for, drop_modalities, resampled, shapley_values
from ccat.models.encoders import EncoderOutput
from ccat.train import train
from method_helpers import TINY, build_with_step
from train_helpers import (CLASSES, TINY_MODALITIES, interrupt_then_resume, random_batch,
                           tiny_config, write_tiny_dataset)


# The released rule, as code/ writes it


def released_contributions(index_all, index_a, index_v, label):
    """sample_level.py L109-121, for one sample."""
    value_all = value_a = value_v = 0.0
    if index_all == label:
        value_all = 2.0
    if index_v == label:
        value_v = 1.0
    if index_a == label:
        value_a = 1.0
    return (value_a + value_all - value_v) / 2.0, (value_v + value_all - value_a) / 2.0


def released_drops(contribution):
    """dataloader.py L147-186: the re-sampled dataset's drop flags (0 none, 1 audio,
    2 visual) for samples 0..n-1 with ``contribution[i] = (contrib_a, contrib_v)``."""
    drop = [0] * len(contribution)
    index = list(range(len(contribution)))
    for i in range(len(contribution)):
        contrib_a, contrib_v = contribution[i]
        if 0.4 < contrib_a < 1:
            index, drop = index + [i], drop + [2]
        elif -0.1 < contrib_a < 0.4:
            index, drop = index + [i] * 2, drop + [2] * 2
        elif contrib_a < -0.1:
            index, drop = index + [i] * 3, drop + [2] * 3
        if 0.4 < contrib_v < 1:
            index, drop = index + [i], drop + [1]
        elif -0.1 < contrib_v < 0.4:
            index, drop = index + [i] * 2, drop + [1] * 2
        elif contrib_v < -0.1:
            index, drop = index + [i] * 3, drop + [1] * 3
    return list(zip(index, drop))


def released_forward(a, v, drop, fc):
    """models.py L62-70: zero a[i] (drop 1) or v[i] (drop 2), then fc(cat(a, v))."""
    a, v = a.clone(), v.clone()
    for i in range(len(drop)):
        if drop[i] == 1:
            a[i, :] = 0.0
        elif drop[i] == 2:
            v[i, :] = 0.0
    return fc(torch.cat((a, v), 1))


RELEASED_DROP = {"video": 2, "audio": 1}  # dataloader.py L152: visual = 2, audio = 1


def test_shapley_values_are_the_released_contributions_for_every_outcome():
    outcomes = list(itertools.product([False, True], repeat=3))  # fused, audio, video right
    fused, audio, video = (torch.tensor(column) for column in zip(*outcomes))
    ours = shapley_values(fused, {"audio": audio, "video": video})
    for i, (f, a, v) in enumerate(outcomes):
        expected = released_contributions(int(not f), int(not a), int(not v), 0)
        assert (ours["audio"][i].item(), ours["video"][i].item()) == expected
    # all right: 1 each (no copy); only the fused and audio right: audio 1.5, video 0.5
    assert ours["audio"][-1].item() == ours["video"][-1].item() == 1.0
    assert (ours["audio"][6].item(), ours["video"][6].item()) == (1.5, 0.5)
    copies = copies_for(ours["audio"]) + copies_for(ours["video"])
    # the docstring's cost: 4 copies when the fused prediction is wrong, 1 when it is right
    # and exactly one modality alone is, none otherwise
    assert copies.tolist() == [4 if not f else int(a != v) for f, a, v in outcomes]


def test_bands_are_the_released_strict_ones_at_and_around_their_bounds():
    values = [-0.5, -0.1 - 1e-9, -0.1, -0.1 + 1e-9, 0.0, 0.4 - 1e-9, 0.4, 0.4 + 1e-9, 0.5,
              1 - 1e-9, 1.0, 1.5]
    contribution = {i: (c, 2.0) for i, c in enumerate(values)}  # video: never copied
    expected = Counter(i for i, drop in released_drops(contribution)[len(values):])
    ours = copies_for(torch.tensor(values, dtype=torch.float64))
    assert ours.tolist() == [expected[i] for i in range(len(values))]
    assert ours.tolist() == [3, 3, 0, 2, 2, 2, 0, 1, 1, 1, 0, 0]


def test_copies_train_the_low_modality_alone_by_dropping_the_other():
    values = {"audio": torch.tensor([0.5, 1.0, -0.5, 0.0, 1.5], dtype=torch.float64),
              "video": torch.tensor([0.5, 0.0, 1.5, 1.0, -0.5], dtype=torch.float64)}
    contribution = {i: (values["audio"][i].item(), values["video"][i].item()) for i in range(5)}
    released = Counter(released_drops(contribution)[5:])
    ours = Counter((e.index, RELEASED_DROP[e.drop]) for e in resampled(values))
    assert ours == released
    assert ours[(2, RELEASED_DROP["video"])] == 3  # audio at -0.5: 3 copies without video


def test_dropping_zeroes_the_modalitys_features_of_that_entry_as_released():
    torch.manual_seed(0)
    a, v = torch.randn(4, 3), torch.randn(4, 3)
    fc = torch.nn.Linear(6, 2)
    feats = {"audio": EncoderOutput(a[:, None].repeat(1, 2, 1), a),
             "video": EncoderOutput(v[:, None].repeat(1, 2, 1), v)}
    drop = torch.tensor([-1, 1, 0, -1])  # positions: video dropped for 1, audio for 2
    dropped = drop_modalities(feats, drop)
    ours = fc(torch.cat([dropped["audio"].pooled, dropped["video"].pooled], 1))
    assert torch.equal(ours, released_forward(a, v, [0, 2, 1, 0], fc))
    assert not dropped["video"].tokens[1].any() and torch.equal(dropped["video"].tokens[2],
                                                                 feats["video"].tokens[2])
    assert drop_modalities(feats, None) is feats


def test_a_train_step_on_copies_trains_the_kept_modality_alone():
    method, model, step = build_with_step("valuation")
    batch = random_batch(6)
    batch.drop = torch.full((6,), model.modalities.index("video"))
    out = method.train_step(model, batch, step)
    grads = step.grads[0]
    assert all(not g.any() for n, g in grads.items() if n.startswith("encoders.video"))
    assert any(g.any() for n, g in grads.items() if n.startswith("encoders.audio"))
    assert set(out) == {"loss"}  # no valuation yet: no shapley/ means


def test_a_plain_batch_trains_the_fused_ce():
    method, model, step = build_with_step("valuation")
    batch = random_batch(6)
    out = method.train_step(model, batch, step)
    _, model2, _ = build_with_step("valuation")  # the same initial weights
    with torch.no_grad():
        expected = F.cross_entropy(model2.fused_logits(model2.encode_all(batch.inputs)),
                                   batch.label)
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("valuation"),
                              counts={"train": 10, "val": 2, "test": 2}, size=16, steps=16)


def released_pass(model, dataset, data):
    """execute_modulation (L79-124) over the split, sample by sample, in its own loop."""
    contribution = {}
    with torch.no_grad():
        for batch in data.batches("train", train=False):
            feats = model.encode_all(batch.inputs)
            a, v = feats["audio"].pooled, feats["video"].pooled
            out = model.classifier(torch.cat((a, v), 1))
            out_v = model.classifier(torch.cat((torch.zeros_like(a), v), 1))
            out_a = model.classifier(torch.cat((a, torch.zeros_like(v)), 1))
            for i, key in enumerate(batch.keys):
                contribution[int(key[-4:])] = released_contributions(
                    out[i].argmax().item(), out_a[i].argmax().item(), out_v[i].argmax().item(),
                    batch.label[i].item())
    return contribution


@pytest.mark.parametrize("cached", [False, True], ids=["streaming", "device_cache"])
def test_the_valuation_pass_values_every_training_sample_as_released(tiny, cached):
    from ccat.config import DataConfig

    dataset = open_dataset(tiny)
    cfg = DataConfig(batch_size=4, workers=0)
    cache = DeviceCache(dataset, cfg, torch.device("cpu")) if cached else None
    data = RunData(dataset, cfg, 0, torch.device("cpu"), cache=cache)
    method = METHODS.get("valuation")(MethodConfig("valuation", {"warmup": 1}), epochs=3)
    torch.manual_seed(0)
    model = method.build_model(dataset.modalities, len(dataset.classes), TINY)
    model.eval()
    contribution = released_pass(model, dataset, data)
    method.begin_epoch(0)
    method.before_epoch(model, data)
    assert method.epoch_extras() == []  # warm-up: the split once
    method.begin_epoch(1)
    method.before_epoch(model, data)
    released = Counter(released_drops(contribution)[len(contribution):])
    assert Counter((e.index, RELEASED_DROP[e.drop]) for e in method.epoch_extras()) == released
    assert method.means["audio"] == pytest.approx(
        sum(c[0] for c in contribution.values()) / len(contribution))


def test_the_loop_trains_the_resampled_epoch_and_logs_its_copies(tiny, tmp_path, monkeypatch):
    from ccat.methods.valuation import Valuation

    chosen, trained = {}, []
    real_before, real_step = Valuation.before_epoch, Valuation.train_step

    def before(self, model, data):
        real_before(self, model, data)
        chosen[self.epoch] = list(self.extras)

    def step(self, model, batch, step):
        trained.append((self.epoch, len(batch.keys)))
        return real_step(self, model, batch, step)

    monkeypatch.setattr(Valuation, "before_epoch", before)
    monkeypatch.setattr(Valuation, "train_step", step)
    cfg = tiny_config(tiny, tmp_path / "run", method="valuation", epochs=2)
    cfg.data.batch_size = 2
    cfg.method.params = {"warmup": 1}
    rows = train(cfg)
    assert chosen[0] == [] and (rows[0]["extra/drop_audio"], rows[0]["extra/drop_video"]) == (0, 0)
    extras = chosen[1]
    assert extras, "the untrained tiny model is wrong on some samples: they get copies"
    assert rows[1]["extra/drop_video"] == sum(e.drop == "video" for e in extras)
    assert rows[1]["extra/drop_audio"] == sum(e.drop == "audio" for e in extras)
    assert sum(1 for epoch, _ in trained if epoch == 1) == \
        num_train_batches(open_dataset(tiny), 2, 1, len(extras))
    assert "shapley/audio" in rows[1] and "shapley/audio" not in rows[0]


@pytest.mark.parametrize("cached", [False, True], ids=["streaming", "device_cache"])
def test_a_resumed_resampled_run_ends_with_the_same_weights(tiny, tmp_path, monkeypatch, cached):
    cfg = tiny_config(tiny, tmp_path / "full", method="valuation", epochs=2)
    cfg.data.batch_size, cfg.data.device_cache = 4, cached
    cfg.method.params = {"warmup": 1}
    full_rows = train(cfg)
    cfg.out = str(tmp_path / "cut")
    cut_rows = interrupt_then_resume(cfg, monkeypatch, at_epoch=2)  # epoch 0 ran: the
    # resumed run values the checkpoint's model for its re-sampled epoch 1
    full, cut = (torch.load(tmp_path / run / "last.pt", weights_only=True)
                 for run in ("full", "cut"))
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    counts = [(r["extra/drop_audio"], r["extra/drop_video"]) for r in full_rows]
    assert counts == [(r["extra/drop_audio"], r["extra/drop_video"]) for r in cut_rows]
    assert sum(counts[1]) > 0  # epoch 1 was re-sampled


def test_other_than_two_modalities_and_a_warmup_of_zero_are_refused():
    method = METHODS.get("valuation")(MethodConfig("valuation", {}), epochs=1)
    three = dict(TINY_MODALITIES, extra=TINY_MODALITIES["audio"])
    with pytest.raises(ConfigError, match="needs exactly two modalities.*the data has 3"):
        method.build_model(three, len(CLASSES), TINY)
    with pytest.raises(ConfigError, match="warmup"):
        METHODS.get("valuation")(MethodConfig("valuation", {"warmup": 0}), epochs=1)


def _two_rank_valuation(rank, port, root, results):
    """One gloo rank: value its half of the split; the extras must be the whole split's."""
    import torch.distributed as dist

    from ccat.config import DataConfig

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        dataset = open_dataset(root)
        data = RunData(dataset, DataConfig(batch_size=3, workers=0), 0, torch.device("cpu"),
                       rank, 2)
        method = METHODS.get("valuation")(MethodConfig("valuation", {"warmup": 1}), epochs=3)
        torch.manual_seed(0)
        model = method.build_model(dataset.modalities, len(dataset.classes), TINY)
        method.begin_epoch(1)
        method.before_epoch(model, data)
        results[rank] = method.epoch_extras()
    finally:
        dist.destroy_process_group()


def test_two_ranks_resample_the_same_epoch_from_the_whole_splits_values(tiny):
    import torch.multiprocessing as mp

    from ccat.config import DataConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_two_rank_valuation, args=(port, tiny, results), nprocs=2)
    dataset = open_dataset(tiny)
    method = METHODS.get("valuation")(MethodConfig("valuation", {"warmup": 1}), epochs=3)
    torch.manual_seed(0)
    model = method.build_model(dataset.modalities, len(dataset.classes), TINY)
    method.begin_epoch(1)
    method.before_epoch(model, RunData(dataset, DataConfig(batch_size=3, workers=0), 0,
                                       torch.device("cpu")))
    assert results[0] == results[1] == method.epoch_extras() != []
