"""Feature extraction details that a build alone does not pin down."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from preprocess import media

GREY_STEP = 6  # frame i is flat grey 6i + 10: distinct frames, no overflow for 40 frames


@pytest.mark.parametrize("n, expected", [(75, [12, 37, 62]), (3, [0, 1, 2]), (2, [0, 1, 1]),
                                         (1, [0, 0, 0])])
def test_segment_centres(n: int, expected: list[int]) -> None:
    assert media.segment_centres(n, 3) == expected


def write_flv(path: Path, num_frames: int, size=(32, 24)) -> None:
    with av.open(str(path), "w", format="flv") as container:
        stream = container.add_stream("flv", rate=30)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for i in range(num_frames):
            image = np.full((size[1], size[0], 3), GREY_STEP * i + 10, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_a_clip_shorter_than_the_frames_asked_repeats_its_last_frame(tmp_path: Path) -> None:
    write_flv(tmp_path / "two.flv", 2)
    jpegs, meta = media.sample_frames(tmp_path / "two.flv", media.VideoParams(size=16))
    assert len(jpegs) == 3 and jpegs[1] == jpegs[2] != jpegs[0]
    assert meta["frames_repeated"] and meta["frame_indices"] == [0, 1, 1]


def test_keyframe_seeking_gives_the_frames_a_full_decode_gives(tmp_path: Path) -> None:
    write_flv(tmp_path / "long.flv", 40)
    jpegs, meta = media.sample_frames(tmp_path / "long.flv", media.VideoParams(size=16))
    from ccat.data.shardio import decode_member

    means = [decode_member("x.jpg", j).mean() for j in jpegs]
    assert meta["frame_indices"] == [6, 20, 33]
    assert np.allclose(means, [GREY_STEP * i + 10 for i in meta["frame_indices"]], atol=2)


def test_fit_duration_tiles_then_cuts() -> None:
    assert media.fit_duration(np.array([1.0, 2.0, 3.0]), 7).tolist() == [1, 2, 3, 1, 2, 3, 1]
    assert media.fit_duration(np.arange(10.0), 4).tolist() == [0, 1, 2, 3]


def test_spectrogram_frames_follow_the_formula() -> None:
    params = media.AudioParams(seconds=3.0)
    assert params.shape == [257, 1 + 66150 // 353] == [257, 188]
    assert media.AudioParams(seconds=20.0).shape == [257, 1250]
