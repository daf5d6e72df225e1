"""Decode raw media and turn it into the cached features of the shard format.

Audio follows the published recipe made exact (DESIGN.md, "Preprocessing rules"):
mono by channel mean, soxr 'HQ' resampling to 22,050 Hz, tiled up to a fixed duration and
cut there, clipped to [-1, 1], centred STFT (zero padding, periodic Hann), log(|S| + eps).
Video: the frames at the centres of equal segments of the clip, resized with swscale's
bicubic filter (antialiased when downscaling) and stored as JPEG.
"""

from __future__ import annotations

import bisect
import io
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter
import soundfile
import soxr
import torch
from PIL import Image

from ccat.errors import UserError
from preprocess import rawhash

LOG_EPS = 1e-7  # log(|S| + eps) of the published CREMA-D recipe
TARGET_SAMPLE_RATE = 22050  # librosa's default rate, used by the published code
N_FFT = 512
HOP_LENGTH = 353
JPEG_QUALITY = 95
TRUNCATED_SHARE = 0.75  # video ending before this share of the declared duration,
TRUNCATED_MIN_SECONDS = 0.5  # and this long before it, is cut off
SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".aiff", ".aif"}
MAX_IMAGE_PIXELS = 50_000_000  # declared size above which an image is skipped undecoded
MAX_IMAGE_ASPECT = 20.0  # longer side / shorter side; beyond it the resize explodes
Window = tuple[float, float]  # [start, end) seconds of a clip, e.g. an AVE event


class MediaError(UserError, ValueError):
    """A raw media file cannot be turned into features.

    ``reason`` is a short, stable phrase (summaries group by it); ``detail`` says more.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AudioParams:
    """Everything that changes the bytes of a stored spectrogram."""

    seconds: float = 3.0
    sample_rate: int = TARGET_SAMPLE_RATE
    n_fft: int = N_FFT
    hop_length: int = HOP_LENGTH
    log_eps: float = LOG_EPS

    @property
    def num_samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))

    @property
    def shape(self) -> list[int]:
        return [self.n_fft // 2 + 1, 1 + self.num_samples // self.hop_length]

    def manifest_entry(self) -> dict[str, Any]:
        return {"kind": "spectrogram", **asdict(self), "window": "hann-periodic",
                "center": True, "pad_mode": "constant", "mono": "channel-mean",
                "resampler": "soxr-HQ", "compute_dtype": "float64", "clip": [-1.0, 1.0],
                "shape": self.shape, "dtype": "float16"}


@dataclass(frozen=True)
class VideoParams:
    """Everything that changes the bytes of the stored frames."""

    num_frames: int = 3
    size: int = 224
    quality: int = JPEG_QUALITY

    def manifest_entry(self) -> dict[str, Any]:
        return {"kind": "frames", **asdict(self), "encoding": "jpeg",
                "sampling": "segment-centres", "resize": "swscale-bicubic-then-rgb",
                "color": "RGB"}


# ---------------------------------------------------------------- audio


def load_audio(path: Path) -> tuple[np.ndarray, int, int]:
    """Decode ``path`` to a mono float64 signal: ``(signal, sample_rate, channels)``.

    WAV and other soundfile formats are read directly; anything else is decoded with
    PyAV from its first audio track.
    """
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        source = rawhash.media_source(path)
        try:
            data, rate = soundfile.read(source, dtype="float64", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as err:
            raise MediaError("audio is unreadable", _named(str(err), source, path)) from None
        channels = data.shape[1]
        signal = data.mean(axis=1)
    else:
        signal, rate, channels = _decode_audio_track(path)
    if signal.size == 0:
        raise MediaError("audio has no samples")
    return signal, int(rate), int(channels)


def _decode_audio_track(path: Path) -> tuple[np.ndarray, int, int]:
    source = rawhash.media_source(path)
    try:
        with av.open(source) as container:
            if not container.streams.audio:
                raise MediaError("the clip has no audio track")
            stream = container.streams.audio[0]
            chunks = [_planar_float(frame) for frame in container.decode(stream)]
    except av.FFmpegError as err:
        raise MediaError("audio is unreadable", _named(str(err), source, path)) from None
    if not chunks:
        return np.zeros(0), stream.rate or 0, stream.channels or 1
    return np.concatenate(chunks, axis=1).mean(axis=0), stream.rate, chunks[0].shape[0]


def _planar_float(frame: av.AudioFrame) -> np.ndarray:
    """A decoded audio frame as float64 [channels, samples] in [-1, 1]."""
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    kind = frame.format.name.rstrip("p")
    if kind == "u8":
        return (data.astype(np.float64) - 128.0) / 128.0
    if kind in ("s16", "s32", "s64"):
        return data.astype(np.float64) / float(2 ** (frame.format.bits - 1))
    return data.astype(np.float64)


def _named(message: str, source: Any, path: Path) -> str:
    """A decoder's error message as it reads for ``path`` when the decoder was given the
    file's bytes (:func:`preprocess.rawhash.media_source`): soundfile names the buffer
    object, PyAV writes '<none>' for it. Skip records stay as they were, and machine-free."""
    if isinstance(source, str):
        return message
    return message.replace(repr(source), repr(str(path))).replace("'<none>'", repr(str(path)))


def fit_duration(signal: np.ndarray, num_samples: int) -> np.ndarray:
    """Tile ``signal`` up to ``num_samples`` and cut there (the published recipe's rule)."""
    reps = math.ceil(num_samples / signal.size)
    return np.tile(signal, reps)[:num_samples] if reps > 1 else signal[:num_samples]


def log_spectrogram(signal: np.ndarray, rate: int, params: AudioParams) -> np.ndarray:
    """float16 log-magnitude STFT [n_fft // 2 + 1, T] of a mono signal at ``rate`` Hz."""
    if rate != params.sample_rate:
        signal = soxr.resample(signal, rate, params.sample_rate, quality="HQ")
    fixed = np.clip(fit_duration(signal, params.num_samples), -1.0, 1.0)
    # float64 throughout: near-silent bins (|S| ~ eps) amplify float32 rounding in the log.
    window = _hann(params.n_fft)
    stft = torch.stft(torch.from_numpy(fixed), params.n_fft, params.hop_length, window=window,
                      center=True, pad_mode="constant", return_complex=True)
    magnitude = np.abs(stft.numpy())
    magnitude += params.log_eps  # in place: the same values as log(|S| + eps), no temporaries
    return np.log(magnitude, out=magnitude).astype(np.float16)


@lru_cache(maxsize=4)
def _hann(n_fft: int) -> torch.Tensor:
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float64)


def audio_features(path: Path, params: AudioParams, window: Window | None = None,
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """The stored spectrogram of ``path`` and its provenance for ``meta.json``; with a
    ``window``, of the samples from its start second up to (not including) its end."""
    signal, rate, channels = load_audio(path)
    meta: dict[str, Any] = {}
    if window is not None:
        duration = signal.size / rate
        signal = signal[round(window[0] * rate):round(window[1] * rate)]
        if signal.size == 0:
            raise MediaError("the event window holds no audio",
                             f"[{window[0]:g}, {window[1]:g}) s of {duration:.2f} s")
        meta["window"] = list(window)
    fixed_at_source_rate = params.seconds * rate
    meta = {"sample_rate": rate, "channels": channels,
            "duration": round(signal.size / rate, 6),
            "replicated": bool(signal.size < fixed_at_source_rate),
            "truncated": bool(signal.size > fixed_at_source_rate), **meta}
    return log_spectrogram(signal, rate, params), meta


# ---------------------------------------------------------------- video


def segment_centres(num_available: int, num_frames: int) -> list[int]:
    """Indices floor((i + 0.5) * n / k) of the centres of k equal segments of n frames."""
    return [int((i + 0.5) * num_available / num_frames) for i in range(num_frames)]


def sample_frames(path: Path, params: VideoParams, window: Window | None = None,
                  ) -> tuple[list[bytes], dict[str, Any]]:
    """JPEG bytes of the segment-centre frames of a clip (of the frames shown in
    ``window``, seconds from the first frame, when one is given), and their provenance.

    Packets are demuxed (cheap) to count frames exactly; only the stretches from the
    keyframe before each wanted frame up to it are decoded.
    """
    source = rawhash.media_source(path)
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise MediaError("the clip has no video track")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # one process per core; --workers scales
            everything = [p for p in container.demux() if p.size]
            packets = [p for p in everything if p.stream is stream]
            if not packets:
                raise MediaError("video has no frames")
            _check_complete(container, stream, everything, packets)
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            first, count = _frames_in(window, packets, stream, fps)
            indices = [first + i for i in segment_centres(count, params.num_frames)]
            frames = _decode_at(stream.codec_context, packets, indices)
    except av.FFmpegError as err:
        raise MediaError("video is unreadable", _named(str(err), source, path)) from None
    jpegs = [_encode_jpeg(frame, params) for frame in frames]
    meta = {"fps": round(fps, 6), "num_frames": len(packets), "frame_indices": indices,
            "width": frames[0].width, "height": frames[0].height,
            "frames_repeated": count < params.num_frames}
    return jpegs, meta if window is None else {**meta, "window": list(window)}


def _frames_in(window: Window | None, packets: list[av.Packet], stream: av.video.VideoStream,
               fps: float) -> tuple[int, int]:
    """``(first presentation index, count)`` of the frames shown in ``window``: those
    whose time since the first frame is in [start, end); all frames without a window."""
    if window is None:
        return 0, len(packets)
    if any(p.pts is None for p in packets) or not stream.time_base:
        times = [i / fps if fps else 0.0 for i in range(len(packets))]
    else:
        pts = sorted(p.pts for p in packets)
        times = [float((t - pts[0]) * stream.time_base) for t in pts]
    first, end = bisect.bisect_left(times, window[0]), bisect.bisect_left(times, window[1])
    if end <= first:
        raise MediaError("the event window holds no video frames",
                         f"[{window[0]:g}, {window[1]:g}) s of {len(times)} frames")
    return first, end - first


def _check_complete(container: av.container.InputContainer, stream: av.video.VideoStream,
                    everything: list[av.Packet], packets: list[av.Packet]) -> None:
    """A cut-off file shows as a damaged last packet (of any stream) or, cut between
    packets, as video ending well before the duration the container's header declares."""
    damaged = [p for p in everything if p.is_corrupt]
    if damaged:
        raise MediaError("video is truncated or corrupt",
                         f"a {damaged[0].stream.type} packet is damaged")
    last = max(p.pts for p in packets if p.pts is not None) if packets[0].pts is not None else None
    declared = container.duration / av.time_base if container.duration else None
    if last is not None and declared and stream.time_base:
        shown = float((last + (packets[-1].duration or 0)) * stream.time_base)
        if shown < TRUNCATED_SHARE * declared and declared - shown > TRUNCATED_MIN_SECONDS:
            raise MediaError("video is truncated or corrupt",
                             f"video ends at {shown:.2f} s, the header says {declared:.2f} s")


def _decode_at(codec: av.VideoCodecContext, packets: list[av.Packet],
               indices: list[int]) -> list[av.VideoFrame]:
    """Decode the frames at presentation ``indices`` (ascending), seeking to keyframes."""
    if any(p.pts is None for p in packets):
        decoded = [f for p in [*packets, None] for f in codec.decode(p)]
        return [decoded[min(i, len(decoded) - 1)] for i in indices]
    wanted = [sorted(p.pts for p in packets)[i] for i in indices]
    frames: dict[int, av.VideoFrame] = {}
    position = 0
    for target in dict.fromkeys(wanted):
        start = _keyframe_before(packets, target)
        if start >= position:
            codec.flush_buffers()
            position = start
        while target not in frames:
            if position > len(packets):
                raise MediaError("video is truncated or corrupt",
                                 f"the frame at pts {target} never decoded")
            for frame in codec.decode(packets[position] if position < len(packets) else None):
                frames[frame.pts] = frame
            position += 1
    return [frames[t] for t in wanted]


def _keyframe_before(packets: list[av.Packet], target_pts: int) -> int:
    """Decode-order index of the last keyframe packet shown at or before ``target_pts``."""
    best = 0
    for i, packet in enumerate(packets):
        if packet.is_keyframe and (packet.pts is None or packet.pts <= target_pts):
            best = i
    return best


# Reused scalers keep their swscale contexts: a fresh one per frame costs ~2 ms to set up.
_RESIZER, _TO_RGB = VideoReformatter(), VideoReformatter()


def _encode_jpeg(frame: av.VideoFrame, params: VideoParams) -> bytes:
    """Resize in the decoder's colour space, then convert the small frame to RGB: half the
    cost of converting at full size, the same antialiased bicubic filter."""
    resized = _RESIZER.reformat(frame, width=params.size, height=params.size,
                                interpolation="BICUBIC", threads=1)
    rgb = _TO_RGB.reformat(resized, format="rgb24", threads=1).to_ndarray()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=params.quality)
    return buf.getvalue()


# ---------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageParams:
    """Everything that changes the bytes of a stored image."""

    shorter_side: int = 256
    quality: int = JPEG_QUALITY
    max_pixels: int = MAX_IMAGE_PIXELS
    max_aspect: float = MAX_IMAGE_ASPECT

    def manifest_entry(self) -> dict[str, Any]:
        return {"kind": "image", **asdict(self), "encoding": "jpeg", "exif_transpose": True,
                "alpha": "composited on white", "resize": "pil-bicubic", "color": "RGB"}


def image_features(path: Path, params: ImageParams) -> tuple[bytes, dict[str, Any]]:
    """JPEG bytes of the image upright, in RGB, shorter side resized; and its provenance."""
    from PIL import ImageOps, UnidentifiedImageError

    source = rawhash.media_source(path)
    try:
        with Image.open(source) as img:  # lazy: the header's size, nothing decoded yet
            check_image_size(img.width, img.height, params)
            img.seek(0)  # an animated GIF's first frame
            meta = {"format": img.format, "mode": img.mode, "width": img.width,
                    "height": img.height}
            upright = ImageOps.exif_transpose(img)
            rgb = _to_rgb(upright)
    except MediaError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own cap, met in Image.open
        raise MediaError("image is too large", str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MediaError("image is unreadable", _named(str(err), source, path)) from None
    scale = params.shorter_side / min(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    resized = rgb.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    resized.save(buf, format="JPEG", quality=params.quality)
    meta.update(stored_width=size[0], stored_height=size[1])
    return buf.getvalue(), meta


def check_image_size(width: int, height: int, params: ImageParams) -> None:
    """MediaError when an image's declared size passes the pixel or aspect-ratio cap."""
    if width * height > params.max_pixels:
        raise MediaError("image is too large", f"{width}x{height} is {width * height / 1e6:.1f} "
                         f"Mpx, the cap is {params.max_pixels / 1e6:g} Mpx")
    if max(width, height) > params.max_aspect * min(width, height):
        raise MediaError("image is too elongated", f"{width}x{height} is beyond the aspect "
                         f"ratio cap of 1:{params.max_aspect:g}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: alpha composited on white, 16/32-bit greys scaled to 8 bits."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(grey.max()), 1.0)
        img = Image.fromarray(np.clip(grey / peak * 255.0, 0, 255).astype(np.uint8))
    if img.mode == "P" or img.mode in ("LA", "PA", "RGBA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
