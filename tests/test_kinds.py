"""The modality kinds: recipes encode through them, readers decode through them, the
writer refuses member names that are not the kind's, and shard bytes are what they were."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ccat.data import kinds, manifest_schema, shardio, spec
from preprocess import writer
from preprocess.datasets.cremad import Cremad

# sha256 of one tar sample per modality pair, written from the fixed values below with
# the member encoding of commit 1fb503a (before the table: the recipes built the member
# dicts by hand). Equal hashes: the table writes the same bytes.
GOLDEN_AUDIO_VIDEO = "d27535b7b2b8a1f33332a4d91820b35e49ef3eddfb5ea3d6580c94c5d0548dd3"
GOLDEN_IMAGE_TEXT = "b828b6233083c426b28b7c20c12c30e2411f4abc878c80ae28875191ac2affe7"


def fixed_values() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {"spectrogram": rng.standard_normal((257, 20)).astype(np.float16),
            "frames": [bytes(rng.integers(0, 256, 50, dtype=np.uint8)) for _ in range(3)],
            "image": bytes(rng.integers(0, 256, 80, dtype=np.uint8)),
            "tokens": (np.array([101, 7592, 2088, 102], dtype=np.int32), "héllo world")}


def tar_sha256(members: dict[str, bytes]) -> str:
    members = {**members, spec.LABEL_MEMBER: shardio.encode_label(2),
               spec.META_MEMBER: spec.encode_json({"id": "k_1"})}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        shardio.write_sample(tar, "k_1", members)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def test_the_table_encodes_the_bytes_the_recipes_wrote_before_it() -> None:
    v = fixed_values()
    audio_video = {**kinds.encode("audio", "spectrogram", v["spectrogram"]),
                   **kinds.encode("video", "frames", v["frames"])}
    image_text = {**kinds.encode("image", "image", v["image"]),
                  **kinds.encode("text", "tokens", v["tokens"])}
    assert tar_sha256(audio_video) == GOLDEN_AUDIO_VIDEO
    assert tar_sha256(image_text) == GOLDEN_IMAGE_TEXT


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


# one manifest entry and one value per kind, as a recipe would give them
EXAMPLES = {
    "spectrogram": ({"kind": "spectrogram", "shape": [257, 4], "dtype": "float16"},
                    np.arange(257 * 4, dtype=np.float16).reshape(257, 4)),
    "frames": ({"kind": "frames", "num_frames": 2, "size": 8}, [jpeg(8, 8), jpeg(8, 8)]),
    "image": ({"kind": "image", "shorter_side": 8, "max_aspect": 2.0}, jpeg(12, 8)),
    "tokens": ({"kind": "tokens", "max_length": 6, "vocab_size": 100},
               (np.array([1, 5, 2], dtype=np.int32), "a tweet")),
    "features": ({"kind": "features", "shape": [3, 2], "dtype": "float32"},
                 np.arange(6, dtype=np.float32).reshape(3, 2)),
    "flow": ({"kind": "flow", "num_snippets": 2, "stack": 1, "size": 8},
             [[jpeg(8, 8), jpeg(8, 8)], [jpeg(8, 8), jpeg(8, 8)]]),
}


@pytest.mark.parametrize("kind", sorted(kinds.KINDS))
def test_every_kind_round_trips_through_encode_decode_and_verify(kind: str) -> None:
    params, value = EXAMPLES[kind]
    members = {**kinds.encode("m", kind, value), spec.LABEL_MEMBER: shardio.encode_label(0),
               spec.META_MEMBER: spec.encode_json({})}
    sample = kinds.decode_sample("k", members, {"m": params})
    assert kinds.check_array("m", sample.data["m"], params) == ""
    if kind == "tokens":
        assert sample.text["m"] == value[1] and sample.data["m"].tolist() == [1, 5, 2]
    wrong = np.zeros((1, 1), dtype=np.float32)
    assert kinds.check_array("m", wrong, params) != ""


def test_every_kind_has_a_manifest_schema_and_a_registered_encoder() -> None:
    from ccat.models.encoders import ENCODERS

    assert set(manifest_schema.KINDS) == set(kinds.KINDS)
    for kind in kinds.KINDS.values():
        ENCODERS.get(kind.encoder)


def test_an_unknown_kind_is_one_sentence_naming_the_known_ones() -> None:
    with pytest.raises(spec.SpecError, match=r"^modality 'm' has unknown kind 'wave'; spec v\d "
                                             rf"knows {', '.join(kinds.KINDS)}$"):
        kinds.modality_members("m", {"kind": "wave"})


@dataclasses.dataclass
class MisnamedCremad(Cremad):
    """CREMA-D whose audio member is written under a name the spectrogram kind lacks."""

    def process(self, raw: Path, entry: Any) -> tuple[dict[str, bytes], dict[str, Any]]:
        members, meta = super().process(raw, entry)
        members["audio.npz"] = members.pop("audio.npy")
        return members, meta


@dataclasses.dataclass
class FrameShortCremad(Cremad):
    """CREMA-D that stores one frame fewer than its manifest's num_frames."""

    def process(self, raw: Path, entry: Any) -> tuple[dict[str, bytes], dict[str, Any]]:
        members, meta = super().process(raw, entry)
        del members[f"video.{self.num_frames - 1}.jpg"]
        return members, meta


@pytest.mark.parametrize("recipe,says", [
    (MisnamedCremad(seconds=1.0, frame_size=32), "members audio.npz that are not its "
                                                 "modalities' kinds', and without audio.npy"),
    (FrameShortCremad(seconds=1.0, frame_size=32), "members none that are not its modalities' "
                                                   "kinds', and without video.2.jpg")])
def test_a_member_name_that_is_not_the_kinds_stops_the_build(recipe, says, synth_raw: Path,
                                                             tmp_path: Path) -> None:
    options = writer.BuildOptions(shard_size=4, workers=1)
    with pytest.raises(spec.SpecError, match=r"^the recipe wrote sample '\w+' with " + says):
        writer.build(recipe, synth_raw, tmp_path / "o", {}, options)
    assert not (tmp_path / "o" / spec.MANIFEST_NAME).exists()


def test_the_kinds_hold_the_encoders_input_conventions() -> None:
    """uint8 pixels become ImageNet-normalized floats and uint8 flow [-1, 1], through the
    kind, in the encoder itself; already-float input is left as it is."""
    import torch

    from ccat.config import ModelConfig
    from ccat.models.encoders import FlowEncoder, FramesEncoder

    white = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor(kinds.IMAGENET_MEAN)) / torch.tensor(kinds.IMAGENET_STD)
    assert torch.allclose(kinds.IMAGE.normalize(white)[1, :, 2, 2], expected)
    assert kinds.FLOW.normalize(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1, 1]
    floats = torch.randn(2, 3, 4, 4)
    assert all(kind.normalize(floats) is floats for kind in kinds.KINDS.values())
    tiny = ModelConfig(width=8, encoder_width=4, encoder_blocks=[1, 1, 1, 1])
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, 3, 16, 16), dtype=torch.uint8)
    flow = torch.randint(0, 256, (2, 2, 4, 16, 16), dtype=torch.uint8)
    for encoder, kind, x in ((FramesEncoder({}, tiny), kinds.FRAMES, frames),
                             (FlowEncoder({"stack": 2}, tiny), kinds.FLOW, flow)):
        encoder.eval()
        assert torch.equal(encoder(x).pooled, encoder(kind.normalize(x)).pooled)
