"""Encoders, fusions, LoRA and the registries."""

import pytest
import torch

from ccat.config import ModelConfig
from ccat.models import ENCODERS, FUSIONS, LoRA, build_model
from ccat.models.fusion import CrossBlock
from ccat.registry import Registry, RegistryError
from train_helpers import CLASSES, TINY_MODALITIES, random_batch

TINY = ModelConfig(width=16, encoder_width=4, encoder_blocks=[1, 1, 1, 1], heads=2, ffn_mult=2)


def test_registry_refuses_duplicates_and_names_known_entries():
    reg: Registry = Registry("thing")
    reg.register("a")(object)
    with pytest.raises(RegistryError, match="registered twice"):
        reg.register("a")(object)
    with pytest.raises(RegistryError, match="known: a"):
        reg.get("b")


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_model_shapes_for_every_fusion(fusion):
    model = build_model(TINY_MODALITIES, len(CLASSES), TINY, fusion, lora_rank=2)
    batch = random_batch(4)
    feats = model.encode_all(batch.inputs)
    for m, (tokens, pooled, mask) in feats.items():
        assert mask is None  # no padding in spectrograms and frames
        assert tokens.shape[0] == 4 and tokens.shape[2] == 16 and pooled.shape == (4, 16)
        assert model.unimodal_logits(m, pooled, lora=True).shape == (4, len(CLASSES))
    assert model.fused_logits(feats).shape == (4, len(CLASSES))


def test_every_encoder_is_built_by_kind():
    assert set(ENCODERS.names()) == {"resnet18_audio", "resnet18_video", "resnet50_image",
                                     "bert_text", "resnet18_flow", "transformer_features"}
    video = ENCODERS.get("resnet18_video")(TINY_MODALITIES["video"], TINY)
    out = video(torch.randn(2, 3, 3, 32, 32))
    assert torch.allclose(out.pooled, out.tokens.mean(1))  # pooled over time and space


def test_lora_at_init_leaves_logits_unchanged():
    model = build_model(TINY_MODALITIES, len(CLASSES), TINY, "bicross", lora_rank=2)
    z = torch.randn(5, 16)
    for m in model.modalities:
        assert torch.equal(model.unimodal_logits(m, z, lora=True), model.classifier(z))
    assert LoRA(16, 3, rank=4).scale == 0.25


def test_cross_block_residual_is_the_query():
    block = CrossBlock(8, 2, 2).eval()
    with torch.no_grad():
        block.attn.out_proj.weight.zero_()
        block.attn.out_proj.bias.zero_()
        for p in block.ffn.parameters():
            p.zero_()
    query, context = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    expected = block.norm2(block.norm1(query)).mean(1)  # Eq. 19 with attention and FFN off
    assert torch.allclose(block(query, context), expected, atol=1e-6)


def test_sum_and_concat_unimodal_logits_add_up_to_the_fused_logits():
    for fusion in ("sum", "concat"):
        model = build_model(TINY_MODALITIES, len(CLASSES), TINY, fusion)
        feats = model.encode_all(random_batch(3).inputs)
        parts = sum(model.unimodal_logits(m, feats[m].pooled) for m in model.modalities)
        assert torch.allclose(parts, model.fused_logits(feats), atol=1e-5)
