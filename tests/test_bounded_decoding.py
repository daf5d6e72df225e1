"""Readers check a member's declared size in its header before decoding it (issue 11,
item 6): a 700-byte JPEG that claims 65000x65000 px, or a .npy header that claims 1.87 TiB,
is refused by verify (local and over HTTP), the dataset reader and `ccat eval`, naming the
shard and the key, without the allocation being tried."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ccat.cli import app as ccat_app, main as ccat_main
from ccat.data import kinds, open_dataset, shardio, spec
from ccat.data.integrity import ShardError
from conftest import run_cli, serve
from preprocess import verify as verifying
from train_helpers import write_tiny_dataset

HUGE = 65000
BOMB_MESSAGE = f"declares a {HUGE}x{HUGE} image"


def bomb_jpeg(width: int = HUGE, height: int = HUGE) -> bytes:
    """A real 8x8 JPEG whose frame header (SOF0) is rewritten to claim ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format="JPEG", quality=50)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def huge_npy(shape: tuple[int, ...], dtype: str = "<f2") -> bytes:
    """A .npy header claiming ``shape`` followed by a few bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + b"\0" * 64


def replace_member(root: Path, suffix: str, data: bytes, split: str = "train") -> tuple[str, str]:
    """Put ``data`` as member ``suffix`` of the first sample of ``split``'s first shard and
    record the shard's new size and hash in the manifest; returns (shard name, key)."""
    manifest = json.loads((root / spec.MANIFEST_NAME).read_text())
    entry = manifest["splits"][split]["shards"][0]
    path = root / entry["name"]
    with open(path, "rb") as f:
        samples = list(shardio.iter_tar_samples(f))
    key = samples[0][0]
    samples[0][1][suffix] = data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, members in samples:
            shardio.write_sample(tar, name, members)
    path.write_bytes(buf.getvalue())
    entry["bytes"], entry["sha256"] = len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()
    manifest["fingerprint"] = spec.compute_fingerprint(manifest)
    (root / spec.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return entry["name"], key


@pytest.fixture()
def bombed(built: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """A copy of the tiny build whose first train sample's frame 0 is the bomb JPEG."""
    root = Path(shutil.copytree(built, tmp_path / "bombed"))
    return (root, *replace_member(root, "video.0.jpg", bomb_jpeg()))


def test_the_bomb_is_a_small_valid_jpeg_header() -> None:
    data = bomb_jpeg()
    assert len(data) < 1000 and shardio.jpeg_size(data) == (HUGE, HUGE)


def test_verify_refuses_the_bomb_from_its_header(bombed, capsys) -> None:
    root, shard, key = bombed
    code, _, err = run_cli(["verify", root], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"{shard}: sample '{key}', member video.0.jpg: {BOMB_MESSAGE}" in err
    assert "the manifest allows 32x32; refused before decoding" in err


def test_verify_over_http_refuses_the_bomb_naming_the_url(bombed, capsys) -> None:
    root, shard, key = bombed
    with serve(root.parent) as base:
        url = f"{base}/{root.name}"
        code, _, err = run_cli(["verify", url], capsys)
    assert code == 1 and f"{url}/{shard}: sample '{key}', member video.0.jpg: {BOMB_MESSAGE}" in err


def test_the_dataset_reader_refuses_the_bomb_naming_shard_and_key(bombed) -> None:
    root, shard, key = bombed
    with pytest.raises(ShardError, match=f"^shard {shard} of .* has sample '{key}' that fails "
                       f"to decode \\(member video.0.jpg: {BOMB_MESSAGE}"):
        list(open_dataset(root).iter_samples("train"))


def test_ccat_eval_refuses_the_bomb_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    data = write_tiny_dataset(tmp_path / "tiny", counts={"train": 8, "val": 3, "test": 4})
    config = tmp_path / "c.yaml"
    config.write_text("method: {name: sum}\noptim: {epochs: 1}\n")
    result = CliRunner().invoke(ccat_app, [
        "train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "run"), "--set", "device=cpu",
        "--set", "data.batch_size=4", "--set", "data.workers=0", "--set", "model.width=16",
        "--set", "model.encoder_width=4", "--set", "model.encoder_blocks=[1, 1, 1, 1]",
        "--set", "model.heads=2"])
    assert result.exit_code == 0, result.output
    _, key = replace_member(data, "video.1.jpg", bomb_jpeg(), split="test")
    monkeypatch.setattr("sys.argv", ["ccat", "eval", "--ckpt", str(tmp_path / "run" / "last.pt")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        ccat_main()
    err = " ".join(capsys.readouterr().err.split())  # rich wraps the one sentence at 80 columns
    assert exit_.value.code != 0 and err.startswith("error: ") and "Traceback" not in err
    assert f"sample '{key}' that fails to decode (member video.1.jpg: {BOMB_MESSAGE}" in err


@pytest.mark.parametrize("suffix, payload, says", [
    ("audio.npy", huge_npy((1 << 20, 1 << 20)),
     "declares shape [1048576, 1048576], the manifest says [257, 63]; refused before reading"),
    ("audio.npy", huge_npy((257, 63), "<f4"), "declares dtype float32, the manifest says float16"),
    ("audio.npy", huge_npy((257, 63)), "declares 32382 bytes of data but holds 64"),
    ("video.2.jpg", bomb_jpeg(32, 33), "declares a 32x33 image, the manifest allows 32x32"),
    ("video.2.jpg", b"not a jpeg at all", "is not a JPEG"),
])
def test_array_and_frame_headers_are_checked_before_reading(
        built: Path, tmp_path: Path, suffix: str, payload: bytes, says: str) -> None:
    root = Path(shutil.copytree(built, tmp_path / "copy"))
    shard, key = replace_member(root, suffix, payload)
    with pytest.raises(verifying.VerifyError, match="^" + f"{shard}: sample '{key}', member "
                       f"{suffix}: {says}".replace("[", r"\[").replace("]", r"\]")):
        verifying.verify(root)


IMAGE_TEXT = {"image": {"kind": "image", "shorter_side": 40},
              "text": {"kind": "tokens", "vocab_size": 30522, "max_length": 8}}


def image_text_members(image: bytes, ids: np.ndarray) -> dict[str, bytes]:
    return {"image.jpg": image, "text.ids.npy": shardio.encode_npy(ids), "text.txt": b"hi",
            spec.LABEL_MEMBER: shardio.encode_label(0), spec.META_MEMBER: spec.encode_json({})}


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("image, ids, says", [
    (jpeg(40, 90), np.arange(8, dtype=np.int32), None),
    (jpeg(40, 40 * shardio.MAX_ASPECT + 2), np.arange(8, dtype=np.int32),
     f"declares a 40x{40 * shardio.MAX_ASPECT + 2} image, the manifest allows a shorter side of "
     f"40 and a longer side of at most {40 * shardio.MAX_ASPECT + 1}"),
    (jpeg(39, 90), np.arange(8, dtype=np.int32), "declares a 39x90 image"),
    (jpeg(40, 90), np.arange(9, dtype=np.int32), "declares shape [9], the manifest allows "
                                                 "[at most 8]"),
    (jpeg(40, 90), np.arange(8, dtype=np.int64), "declares dtype int64, the manifest says int32"),
])
def test_mvsa_images_and_token_ids_are_bounded_by_the_manifest(image, ids, says) -> None:
    members = image_text_members(image, ids)
    if says is None:
        sample = kinds.decode_sample("k", members, IMAGE_TEXT)
        assert sample.data["image"].shape == (90, 40, 3) and len(sample.data["text"]) == 8
        return
    with pytest.raises(spec.SpecError, match=r"^sample 'k', member .*: " + says.replace(
            "[", r"\[").replace("]", r"\]")):
        kinds.decode_sample("k", members, IMAGE_TEXT)


def test_decoding_without_a_manifest_still_refuses_huge_headers() -> None:
    with pytest.raises(spec.SpecError, match="at most 16384 px a side"):
        shardio.decode_member("x.jpg", bomb_jpeg())
    with pytest.raises(spec.SpecError, match="declares 2199023255552 bytes of data but holds 64"):
        shardio.decode_member("x.npy", huge_npy((1 << 20, 1 << 20)))


def test_a_tar_header_claiming_8_gib_allocates_only_what_is_there(tmp_path: Path) -> None:
    """A member header may claim up to 8 GiB; reading it must not reserve that first."""
    import tracemalloc

    info = shardio.tar_member_info("k_1.audio.npy", (8 << 30) - 1)
    path = tmp_path / "train-000000.tar"
    path.write_bytes(info.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * 100_000)
    tracemalloc.start()
    try:
        with open(path, "rb") as f, pytest.raises(spec.SpecError, match="ends inside a "
                                                  f"{(8 << 30) - 1}-byte member"):
            list(shardio.iter_tar_members(f))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
