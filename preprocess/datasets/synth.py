"""Synthetic CREMA-D (and KS, MVSA): small raw trees in the real layouts, with a controlled
modality imbalance.

`synthesize_cremad` writes `AudioWAV/<id>.wav` (16 kHz mono PCM16) and `VideoFlash/<id>.flv`
(FLV1 video plus the same sound as MP3) for ids in the CREMA-D pattern
`<actor>_<sentence>_<EMO>_<level>`, so the real `cremad` recipe builds shards from it.

Each modality carries the class through one of two cues; `easy` picks which gets which.

- Easy cue, LINEAR: its class mean differs, so a joint model fits it within an epoch or two.
  Audio: a loud steady tone at a class frequency. Video: a class tint of the background.
- Hard cue, NONLINEAR but strong: its sign or phase is random per clip, so every class has
  the same mean input (no linear rule on the raw input beats chance), yet one
  rectification (an energy) finds it, so a small CNN trained on it alone learns it in a few
  epochs. Video: a high-contrast checkerboard of random signs along a class colour axis
  (6 equiangular RGB axes); it survives random crops, flips and resizing, unlike a
  spatial pattern. Audio: a buzz of random pitch gated fully on and off at a class rate
  with random phase (vertical stripes in the spectrogram; the CNN's pooling is blind to
  absolute time, so the rate, not the phase, is what it can pick up).

Why this design: under joint training the easy cue drives the fused loss near zero before
the hard encoder has learned its cue, so the hard encoder then gets little gradient and
stays behind; alone, it learns its cue quickly. The measured gap, its dependence on
`hard_strength` (lower: slower to learn alone and a larger gap, until it is not learned at
all) and the command that measures it are in docs/datasets.md.

Designs: which numbers the data can separate. With the easy cue on every clip (design
`probe`, the first one) every method reaches 99-100 % fused accuracy: the easy cue alone
solves every clip, and only the hard encoder's linear probe tells methods apart. Papers
compare fused accuracy, so the default design (`fused`) gives that number room to move:

- The easy cue carries the class on only part of the clips (`easy_reliability`, 0.7: in
  each class exactly that fraction, chosen at random). On the others it is absent (the
  clip keeps its class-independent background), so the easy modality alone is right on
  those by chance only: 0.7 + 0.3 / 6 = 75 %. It is never misleading, so when each
  modality is trained alone, the easy model is unsure exactly where the hard one is
  needed, and their average (the unimodal ensemble) is right almost everywhere.
- The hard cue is weaker (`hard_strength` 0.7): alone, its encoder needs a good part of
  the demo's 12 epochs to learn it. Under joint training the easy cue settles the clips
  that carry it within two or three epochs; from then on only the other 30 % of the clips
  send the hard encoder a gradient, so it often ends the budget half-trained, and the test
  clips without the easy cue pay for it: the fused accuracy of joint training sits below
  the ensemble's. How far below varies much from seed to seed (docs/datasets.md). A method that keeps training the hard modality (alternating updates, a
  unimodal loss per modality, modulating the easy gradient) closes that gap.

The measured numbers, and how `easy_reliability` and `hard_strength` move them, are in
docs/datasets.md.

Both cues survive the preprocessing: tones stay below 8 kHz (the 16 kHz Nyquist) and are
steady, so resampling to 22,050 Hz and tiling keep them; gating rates of 2-15 Hz are
periods of 4-31 frames of the 62.5 Hz spectrogram. Video cues are constant in time and
drawn on a coarse grid in frame-relative units, so any sampled frame at any size carries
them. Everything is drawn from `numpy` generators seeded by (seed, clip index).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile
import soxr

from preprocess.datasets import cremad, mvsa

CLASSES = tuple(cremad.CLASSES)
SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
ACTORS = tuple(range(1001, 1092))
INTENSITY_SENTENCE = "IEO"  # as in CREMA-D, only this sentence was recorded at graded levels
INTENSITY_LEVELS = ("LO", "MD", "HI", "XX")
UNGRADED_LEVEL = "XX"
MODALITIES = ("audio", "video")

# Audio (generated at `sample_rate`, amplitudes relative to full scale 1.0).
AUDIO_NOISE_STD = 0.05  # white noise floor under every clip
CLASS_TONES_HZ = (440.0, 660.0, 990.0, 1485.0, 2228.0, 3341.0)  # easy cue: x1.5 apart
TONE_JITTER = 0.01  # relative per-clip detuning of the class tone
TONE_AMPLITUDE = 0.3  # easy tone amplitude at easy_strength 1
CLASS_AM_RATES_HZ = (2.0, 3.0, 4.5, 6.75, 10.1, 15.2)  # hard cue: x1.5 apart, 4-31 STFT frames
FUNDAMENTAL_RANGE_HZ = (120.0, 300.0)  # hard cue carrier: a buzz of random (log-uniform) pitch
HARMONIC_CEILING_HZ = 4000.0  # its harmonics stop here
BUZZ_RMS = 0.1
AM_DEPTH = 1.0  # hard cue: gating depth at hard_strength 1 (capped at 1: fully on and off)
DISTRACTOR_TONE_RANGE_HZ = (200.0, 6000.0)  # steady tone at a random frequency, any class
DISTRACTOR_TONE_AMPLITUDE = 0.05
PEAK_LIMIT = 0.99  # scale down a clip whose peak would clip PCM16
FLV_AUDIO_RATE = 22050  # FLV's MP3 accepts 11025, 22050 or 44100 Hz
FLV_AUDIO_CODEC = "mp3"
MP3_COMPRESSION_LEVEL = 7  # LAME's -q: 0 slowest/best, 9 fastest; 7 halves the encode time

# Video (intensities in [0, 1], positions in frame-relative units).
BASE_GREY = 0.5
BACKGROUND_COLOUR_STD = 0.04  # per-clip random colour, the same for every class
TINT_AMPLITUDE = 0.25  # easy cue: class colour offset at easy_strength 1
_GOLDEN = (1 + 5 ** 0.5) / 2
# Hard cue: 6 colour axes through opposite vertices of an icosahedron, the 6 RGB directions
# as far apart as 6 lines can be (|cos| = 1/sqrt(5) between any two): the energy of a
# texture along its own axis is 5x its energy along any other class's axis.
CLASS_COLOUR_AXES = np.array([(0, 1, _GOLDEN), (0, 1, -_GOLDEN), (1, _GOLDEN, 0),
                              (1, -_GOLDEN, 0), (_GOLDEN, 0, 1), (_GOLDEN, 0, -1)]
                             ) / np.sqrt(1 + _GOLDEN ** 2)
TEXTURE_GRID = (6, 8)  # rows, cols of the hard cue's random-sign checkerboard cells
TEXTURE_AMPLITUDE = 0.12  # hard texture contrast along the class axis at hard_strength 1
BLOB_RADIUS = 0.15  # distractor: Gaussian blob of random colour on a random straight path
BLOB_AMPLITUDE = 0.25
NOISE_GRID = (24, 32)  # rows, cols of the coarse pixel-noise grid
PIXEL_NOISE_STD = 0.06
NOISE_CORRELATION_S = 0.3  # noise drifts (cheap to encode) yet differs between sampled frames
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],  # BT.601, the matrix FFmpeg assumes for FLV1
                       [-0.168736, -0.331264, 0.5],
                       [0.5, -0.418688, -0.081312]])
YUV_SCALE = np.array([219.0, 224.0, 224.0])  # limited ("TV") range levels per unit
YUV_OFFSET = np.array([16.0, 128.0, 128.0])
FLV_VIDEO_CODEC = "flv"
FLV_QSCALE = 6  # fixed quantiser (qmin = qmax; 2 is best, 31 worst): deterministic, clean


CARRIER_STREAM = 2  # the random stream that picks the clips carrying the easy cue


@dataclass(frozen=True)
class ClipPlan:
    """One clip to synthesize: its CREMA-D id, class index, length and random stream."""

    clip_id: str
    label: int
    num_frames: int
    seed: tuple[int, int]


def synthesize_cremad(out: Path, num_clips: int = 120, seed: int = 0, *, easy: str = "audio",
                      easy_strength: float = 1.0, hard_strength: float = 1.0,
                      easy_reliability: float = 1.0, width: int = 96, height: int = 72, fps: int = 30,
                      duration: float | tuple[float, float] = (2.0, 3.0),
                      sample_rate: int = 16000,
                      progress: Callable[[int], None] | None = None) -> list[str]:
    """Write a synthetic CREMA-D raw tree under `out` and return the sorted clip ids.

    `easy` names the modality that gets the linear cue; the other gets the sign- or
    phase-random cue. `easy_strength` and `hard_strength` scale the two cues' amplitudes (0
    removes a cue; the audio gating depth saturates at hard_strength 1 / AM_DEPTH).
    `easy_reliability` is the fraction of each class's clips whose easy cue is present
    (:func:`easy_carriers`). The defaults are design `probe`; the CLI's default is
    `designs.DESIGNS["fused"]`. `sample_rate` is the wav's; the FLV carries the same sound resampled to
    FLV_AUDIO_RATE.
    `duration` in seconds is fixed or a (low, high) range drawn per clip. Same arguments give
    byte-identical files. `progress(n)` is called with the number of clips written so far.
    """
    if easy not in MODALITIES:
        raise ValueError(f"easy must be one of {MODALITIES}, got {easy!r}.")
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {width}x{height}.")
    out = Path(out)
    (out / "AudioWAV").mkdir(parents=True, exist_ok=True)
    (out / "VideoFlash").mkdir(parents=True, exist_ok=True)
    roles = {m: "easy" if m == easy else "hard" for m in MODALITIES}
    plans = plan_clips(num_clips, seed, duration, fps)
    carriers = easy_carriers([plan.label for plan in plans], easy_reliability, seed)
    for done, (plan, carries) in enumerate(zip(plans, carriers), start=1):
        rng = np.random.default_rng(plan.seed)
        num_samples = round(plan.num_frames * sample_rate / fps)
        strengths = _strengths(roles, easy_strength if carries else 0.0, hard_strength)
        sound = AUDIO_CUES[roles["audio"]](plan.label, num_samples, sample_rate, rng,
                                          strengths["audio"])
        frames = VIDEO_CUES[roles["video"]](plan.label, plan.num_frames, width, height, fps, rng,
                                           strengths["video"])
        soundfile.write(out / "AudioWAV" / f"{plan.clip_id}.wav", sound, sample_rate,
                        subtype="PCM_16")
        _mux(out / "VideoFlash" / f"{plan.clip_id}.flv", FLV_MUXING, frames, sound,
             sample_rate, fps, (width, height))
        if progress is not None:
            progress(done)
    return sorted(plan.clip_id for plan in plans)


def replicate_cremad(raw: Path, ids: list[str], total: int) -> list[str]:
    """Copy the clips ``ids`` of the synthetic CREMA-D tree ``raw`` under fresh CREMA-D ids
    (actors 1001-1091, sentence WSI, the source's emotion) until it holds ``total`` clips;
    returns every id. For benchmarks: a copy decodes as its source does, and generating
    large clips is slow."""
    every = list(ids)
    for n in range(total - len(ids)):
        source = ids[n % len(ids)]
        emotion = source.split("_")[2]
        clip_id = f"{1001 + n % 91}_WSI_{emotion}_X{n // 91}"  # (actor, level) unique per n
        for folder, suffix in (("AudioWAV", ".wav"), ("VideoFlash", ".flv")):
            shutil.copyfile(raw / folder / f"{source}{suffix}", raw / folder / f"{clip_id}{suffix}")
        every.append(clip_id)
    return every


def easy_carriers(labels: list[int], reliability: float, seed: int) -> list[bool]:
    """Whether each clip's easy cue is present: in every class, round(reliability * n) of
    its n clips, picked by a seeded shuffle, so the fraction is exact per class (not only
    on average) and the absent ones are spread over the clip order and so over the splits."""
    if not 0 <= reliability <= 1:
        raise ValueError(f"easy_reliability must be in [0, 1], got {reliability}.")
    rng = np.random.default_rng([seed, len(labels), CARRIER_STREAM])
    carries = [False] * len(labels)
    for label in sorted(set(labels)):
        members = [i for i, other in enumerate(labels) if other == label]
        for i in rng.permutation(members)[:int(reliability * len(members) + 0.5)]:
            carries[i] = True
    return carries


def _strengths(roles: dict[str, str], easy: float, hard: float) -> dict[str, float]:
    """Each modality's cue scale from its role."""
    return {m: easy if role == "easy" else hard for m, role in roles.items()}


def plan_clips(num_clips: int, seed: int, duration: float | tuple[float, float],
               fps: int) -> list[ClipPlan]:
    """Unique CREMA-D ids with classes assigned round robin, and a length per clip."""
    per_class = len(ACTORS) * (len(SENTENCES) - 1 + len(INTENSITY_LEVELS))
    if not 0 < num_clips <= per_class * len(CLASSES):
        raise ValueError(f"num_clips must be in 1..{per_class * len(CLASSES)}, got {num_clips}.")
    low, high = (duration, duration) if np.isscalar(duration) else duration
    if not 0 < low <= high:
        raise ValueError(f"duration must be positive seconds or a (low, high) range, "
                         f"got {duration}.")
    rng = np.random.default_rng([seed, num_clips])
    used: set[str] = set()
    plans = []
    for index in range(num_clips):
        label = index % len(CLASSES)
        clip_id = _draw_unique_id(CLASSES[label], rng, used)
        seconds = rng.uniform(low, high)
        plans.append(ClipPlan(clip_id, label, max(1, round(seconds * fps)), (seed, index)))
    return plans


def _draw_unique_id(emotion: str, rng: np.random.Generator, used: set[str]) -> str:
    """Draw actor, sentence and level until the id is new; record it in `used`."""
    while True:
        actor = ACTORS[rng.integers(len(ACTORS))]
        sentence = SENTENCES[rng.integers(len(SENTENCES))]
        graded = sentence == INTENSITY_SENTENCE
        level = INTENSITY_LEVELS[rng.integers(len(INTENSITY_LEVELS))] if graded else UNGRADED_LEVEL
        clip_id = f"{actor}_{sentence}_{emotion}_{level}"
        if clip_id not in used:
            used.add(clip_id)
            return clip_id


def _audio_background(num_samples: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """White noise plus a steady tone at a random frequency, independent of the class."""
    t = np.arange(num_samples) / sample_rate
    freq = rng.uniform(*DISTRACTOR_TONE_RANGE_HZ)
    tone = DISTRACTOR_TONE_AMPLITUDE * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    return tone + AUDIO_NOISE_STD * rng.standard_normal(num_samples)


def _audio_easy(label: int, num_samples: int, sample_rate: int, rng: np.random.Generator,
                strength: float) -> np.ndarray:
    """Linear cue: a steady tone at the class frequency, slightly detuned per clip."""
    t = np.arange(num_samples) / sample_rate
    freq = CLASS_TONES_HZ[label] * (1 + rng.uniform(-TONE_JITTER, TONE_JITTER))
    cue = strength * TONE_AMPLITUDE * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    return _limit_peak(cue + _audio_background(num_samples, sample_rate, rng))


def _audio_hard(label: int, num_samples: int, sample_rate: int, rng: np.random.Generator,
                strength: float) -> np.ndarray:
    """Phase-random cue: a buzz of random pitch, gated on and off at the class rate."""
    t = np.arange(num_samples) / sample_rate
    fundamental = np.exp(rng.uniform(*np.log(FUNDAMENTAL_RANGE_HZ)))
    harmonics = fundamental * np.arange(1, int(HARMONIC_CEILING_HZ // fundamental) + 1)
    phases = rng.uniform(0, 2 * np.pi, len(harmonics))
    buzz = np.sin(2 * np.pi * harmonics[:, None] * t + phases[:, None]).sum(0)
    depth = min(1.0, strength * AM_DEPTH)
    envelope = 1 + depth * np.sign(np.sin(2 * np.pi * CLASS_AM_RATES_HZ[label] * t
                                          + rng.uniform(0, 2 * np.pi)))
    cue = BUZZ_RMS * np.sqrt(2 / len(harmonics)) * envelope * buzz
    return _limit_peak(cue + _audio_background(num_samples, sample_rate, rng))


def _limit_peak(sound: np.ndarray) -> np.ndarray:
    """Return float32 audio scaled down only if its peak would exceed PEAK_LIMIT."""
    peak = float(np.max(np.abs(sound), initial=0.0))
    scale = PEAK_LIMIT / peak if peak > PEAK_LIMIT else 1.0
    return (sound * scale).astype(np.float32)


@dataclass(frozen=True)
class _Scene:
    """Per-clip video state: colour, optional texture and distractor blob path."""

    colour: np.ndarray  # RGB background, shape [3]
    texture: np.ndarray | None  # RGB offset per noise-grid cell, shape [*NOISE_GRID, 3]
    blob_colour: np.ndarray  # RGB offset, shape [3]
    blob_path: np.ndarray  # (start, end) centre in frame units, shape [2, 2]


def _draw_scene(rng: np.random.Generator, tint: np.ndarray, axis: np.ndarray | None) -> _Scene:
    """Random scene; `tint` is added to the colour, `axis` (RGB, its length the contrast)
    colours a checkerboard of random signs."""
    colour = BASE_GREY + BACKGROUND_COLOUR_STD * rng.standard_normal(3) + tint
    signs = rng.choice([-1.0, 1.0], TEXTURE_GRID)  # mean zero for every class
    cells = np.kron(signs, np.ones((NOISE_GRID[0] // TEXTURE_GRID[0],
                                    NOISE_GRID[1] // TEXTURE_GRID[1])))
    texture = None if axis is None else cells[..., None] * axis
    blob_colour = BLOB_AMPLITUDE * rng.uniform(-1, 1, 3)
    return _Scene(colour, texture, blob_colour, rng.uniform(0, 1, (2, 2)))


def _class_tint(label: int) -> np.ndarray:
    """Unit-chroma RGB offset whose hue is set by the class (zero mean over channels)."""
    hue = 2 * np.pi * label / len(CLASSES)
    axes = 2 * np.pi * np.arange(3) / 3
    return np.cos(hue - axes) * np.sqrt(2 / 3)


def _video_easy(label: int, num_frames: int, width: int, height: int, fps: int,
                rng: np.random.Generator, strength: float) -> Iterator[np.ndarray]:
    """Linear cue: the background colour is tinted by the class hue."""
    scene = _draw_scene(rng, strength * TINT_AMPLITUDE * _class_tint(label), None)
    return _render(scene, num_frames, width, height, fps, rng)


def _video_hard(label: int, num_frames: int, width: int, height: int, fps: int,
                rng: np.random.Generator, strength: float) -> Iterator[np.ndarray]:
    """Sign-random cue: a checkerboard of random signs along the class colour axis."""
    axis = strength * TEXTURE_AMPLITUDE * CLASS_COLOUR_AXES[label]
    scene = _draw_scene(rng, np.zeros(3), axis)
    return _render(scene, num_frames, width, height, fps, rng)


class _Plane:
    """One image plane of a yuv420p frame: its sampling grid and a reusable float buffer."""

    def __init__(self, height: int, width: int) -> None:
        self.v = (np.arange(height, dtype=np.float32) + 0.5) / height
        self.u = (np.arange(width, dtype=np.float32) + 0.5) / width
        self.rows = np.arange(height) * NOISE_GRID[0] // height
        self.cols = np.arange(width) * NOISE_GRID[1] // width
        self.values = np.empty((height, width), np.float32)
        self.scratch = np.empty((height, width), np.float32)

    def add_blob(self, centre: np.ndarray, level: float) -> None:
        """Add a Gaussian blob (separable, so cheap) of peak `level` at `centre`."""
        spread = np.float32(2 * BLOB_RADIUS ** 2)
        across = np.exp(-(self.u - centre[0]) ** 2 / spread)
        down = np.exp(-(self.v - centre[1]) ** 2 / spread) * np.float32(level)
        np.multiply(down[:, None], across[None, :], out=self.scratch)
        self.values += self.scratch

    def fill_noise(self, grid: np.ndarray, base: float) -> None:
        """Set the plane to `base` plus the coarse noise `grid` upsampled by repetition."""
        np.take(grid[self.rows], self.cols, axis=1, out=self.values)
        self.values += np.float32(base)


def _render(scene: _Scene, num_frames: int, width: int, height: int, fps: int,
            rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yield yuv420p frames ([height * 3 // 2, width] uint8), drawn directly in BT.601 levels.

    Drawing in YUV skips an RGB buffer and a colour conversion per frame (2-3x faster at
    480x360); the scene is a sum of terms, each converted once with the 3x3 matrix.
    """
    planes = [_Plane(height, width), _Plane(height // 2, width // 2),
              _Plane(height // 2, width // 2)]
    to_levels = YUV_SCALE[:, None] * RGB_TO_YUV
    base, blob_levels = YUV_OFFSET + to_levels @ scene.colour, to_levels @ scene.blob_colour
    texture = 0.0 if scene.texture is None else scene.texture @ to_levels.T
    frame = np.empty(height * width * 3 // 2, np.uint8)
    bounds = np.cumsum([0] + [plane.values.size for plane in planes])
    memory = np.exp(-1 / (fps * NOISE_CORRELATION_S))
    noise = PIXEL_NOISE_STD * rng.standard_normal((*NOISE_GRID, 3)) @ to_levels.T
    for index in range(num_frames):
        fresh = PIXEL_NOISE_STD * rng.standard_normal((*NOISE_GRID, 3)) @ to_levels.T
        noise = memory * noise + np.sqrt(1 - memory ** 2) * fresh  # stationary AR(1) in time
        cells = noise + texture
        progress = index / max(1, num_frames - 1)
        centre = (1 - progress) * scene.blob_path[0] + progress * scene.blob_path[1]
        for channel, plane in enumerate(planes):
            plane.fill_noise(cells[..., channel].astype(np.float32), base[channel])
            plane.add_blob(centre, blob_levels[channel])
        for channel, plane in enumerate(planes):
            np.clip(plane.values, 0, 255, out=plane.values)
            plane.values += np.float32(0.5)  # round, then the cast truncates
            np.copyto(frame[bounds[channel]:bounds[channel + 1]], plane.values.ravel(),
                      casting="unsafe")
        yield frame.reshape(-1, width)


AUDIO_CUES = {"easy": _audio_easy, "hard": _audio_hard}
VIDEO_CUES = {"easy": _video_easy, "hard": _video_hard}


@dataclass(frozen=True)
class _Muxing:
    """How one container type is written: format, codecs, their options, audio rate."""

    format: str
    video_codec: str
    video_options: tuple[tuple[str, str], ...]
    audio_codec: str
    audio_rate: int | None  # None: the sound's own rate
    audio_options: tuple[tuple[str, str], ...] = ()


def _mux(path: Path, muxing: _Muxing, frames: Iterator[np.ndarray], sound: np.ndarray,
         sample_rate: int, fps: int, size: tuple[int, int]) -> None:
    """Encode yuv420p frames and the mono sound into `path`; both streams are added before
    the first packet is muxed, as MP4 requires."""
    rate = muxing.audio_rate or sample_rate
    with av.open(str(path), "w", format=muxing.format) as container:
        video = container.add_stream(muxing.video_codec, rate=fps)
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        video.codec_context.thread_count = 1
        video.options = dict(muxing.video_options)
        audio = container.add_stream(muxing.audio_codec, rate=rate)
        audio.layout = "mono"
        audio.options = dict(muxing.audio_options)
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if rate != sample_rate:
            sound = soxr.resample(sound, sample_rate, rate, quality="HQ")
        samples = np.clip(sound, -1, 1).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        container.mux(audio.encode(frame))
        container.mux(audio.encode())


FLV_MUXING = _Muxing("flv", FLV_VIDEO_CODEC,
                     (("qmin", str(FLV_QSCALE)), ("qmax", str(FLV_QSCALE))),
                     FLV_AUDIO_CODEC, FLV_AUDIO_RATE,
                     (("compression_level", str(MP3_COMPRESSION_LEVEL)),))


# ---------------------------------------------------------------- Kinetics-Sounds and MVSA
# The same cues in the KS and MVSA layouts: KS clips carry AUDIO_CUES in an AAC track and
# VIDEO_CUES in H.264 frames; MVSA images are one frame of VIDEO_CUES, and texts carry the
# class through words (easy: a class word; hard: a polarity word XOR a negation, which no
# bag-of-words linear rule separates).

KS_CLASSES = ("bell_ringing", "drum_tapping", "kettle_whistling", "gravel_crunching",
              "wind_chiming")  # made up; per-class folder names
KS_MODALITIES = ("audio", "video")
YOUTUBE_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
YOUTUBE_ID_LENGTH = 11
KS_MAX_START_S = 300  # clip start, the number after the id
MP4_VIDEO_CODEC, MP4_AUDIO_CODEC = "libx264", "aac"
X264_OPTIONS = (("preset", "ultrafast"), ("crf", "23"))
MP4_MUXING = _Muxing("mp4", MP4_VIDEO_CODEC, X264_OPTIONS, MP4_AUDIO_CODEC, None)

MVSA_CLASSES = tuple(mvsa.CLASSES)  # labelResultAll.txt's names, in order
MVSA_MODALITIES = ("text", "image")
MVSA_DISAGREE_EVERY = 10  # every 10th pair: the image label differs (dropped by `agree`)
CLASS_WORDS = (("awful", "terrible", "sad", "angry"), ("okay", "plain", "usual", "average"),
               ("great", "happy", "lovely", "wonderful"))  # easy text cue, by class
POLARITY_WORDS, NEGATION = ("bad", "good"), "not"  # hard text cue: positive = good XOR not
NEUTRAL_HARD_WORDS = ("maybe", "perhaps")
FILLER_WORDS = ("the", "a", "day", "city", "photo", "today", "street", "we", "saw", "this",
                "morning", "people", "new", "car", "park", "with", "friends", "after", "work",
                "and", "then", "went", "home", "look", "at", "that", "sky", "here", "is")
FILLER_RANGE = (6, 16)  # filler words per tweet
IMAGE_WIDTH_RANGE, IMAGE_HEIGHT_RANGE = (80, 128), (64, 112)  # varying image sizes, px


def synthesize_ks(out: Path, num_clips: int = 60, seed: int = 0, *, easy: str = "audio",
                  num_classes: int = len(KS_CLASSES), width: int = 96, height: int = 72,
                  fps: int = 25, duration: float = 2.0, sample_rate: int = 16000,
                  hard_strength: float = 1.0, easy_reliability: float = 1.0,
                  progress: Callable[[int], None] | None = None) -> list[str]:
    """Write `<class>/<11-char id>_<start>.mp4` clips (H.264 + AAC) under `out`.

    Classes are the first `num_classes` of KS_CLASSES, round robin; `easy` names the modality
    with the linear cue, `hard_strength` scales the other's cue and `easy_reliability` is the
    fraction of each class's clips with the easy cue, as in `synthesize_cremad`.
    Returns the sorted clip ids.
    """
    if easy not in KS_MODALITIES or not 1 < num_classes <= len(KS_CLASSES):
        raise ValueError(f"easy must be one of {KS_MODALITIES} and num_classes in "
                         f"2..{len(KS_CLASSES)}, got {easy!r}, {num_classes}.")
    roles = {m: "easy" if m == easy else "hard" for m in KS_MODALITIES}
    rng_ids, ids = np.random.default_rng([seed, num_clips, 1]), []
    carriers = easy_carriers([i % num_classes for i in range(num_clips)], easy_reliability,
                             seed)
    for index in range(num_clips):
        label = index % num_classes
        clip_id = _youtube_like_id(rng_ids, set(ids))
        strengths = _strengths(roles, 1.0 if carriers[index] else 0.0, hard_strength)
        rng = np.random.default_rng([seed, index])
        num_frames = max(1, round(duration * fps))
        sound = AUDIO_CUES[roles["audio"]](label, round(duration * sample_rate), sample_rate,
                                          rng, strengths["audio"])
        frames = VIDEO_CUES[roles["video"]](label, num_frames, width, height, fps, rng,
                                           strengths["video"])
        path = Path(out) / KS_CLASSES[label] / f"{clip_id}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        _mux(path, MP4_MUXING, frames, sound, sample_rate, fps, (width, height))
        ids.append(clip_id)
        if progress is not None:
            progress(index + 1)
    return sorted(ids)


def _youtube_like_id(rng: np.random.Generator, used: set[str]) -> str:
    """`<11 characters>_<start seconds>`, new to `used`."""
    while True:
        chars = rng.choice(list(YOUTUBE_ID_CHARS), YOUTUBE_ID_LENGTH)
        clip_id = f"{''.join(chars)}_{int(rng.integers(0, KS_MAX_START_S))}"
        if clip_id not in used:
            return clip_id


def synthesize_mvsa(out: Path, num_pairs: int = 90, seed: int = 0, *, easy: str = "text",
                    progress: Callable[[int], None] | None = None) -> list[str]:
    """Write MVSA-Single's layout under `out`: `data/<id>.jpg`, `data/<id>.txt` and
    `labelResultAll.txt`; every MVSA_DISAGREE_EVERY-th pair has disagreeing labels.

    `easy` names the modality with the easy cue (text: a class word; image: a class tint);
    the other gets the hard one (text: polarity XOR negation; image: the colour-axis texture).
    Returns the sorted ids.
    """
    if easy not in MVSA_MODALITIES:
        raise ValueError(f"easy must be one of {MVSA_MODALITIES}, got {easy!r}.")
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    rows = ["ID\ttext,image"]
    for index in range(num_pairs):
        key, label = str(index + 1), index % len(MVSA_CLASSES)
        image_label = (label + 1) % len(MVSA_CLASSES) if index % MVSA_DISAGREE_EVERY == \
            MVSA_DISAGREE_EVERY - 1 else label
        rng = np.random.default_rng([seed, index])
        tweet = _tweet(label, rng, hard=easy != "text")
        (out / "data" / f"{key}.txt").write_text(tweet + "\n", encoding="utf-8")
        _synth_image(image_label, rng, hard=easy != "image").save(out / "data" / f"{key}.jpg",
                                                                  quality=90)
        rows.append(f"{key}\t{MVSA_CLASSES[label]},{MVSA_CLASSES[image_label]}")
        if progress is not None:
            progress(index + 1)
    (out / "labelResultAll.txt").write_text("\r\n".join(rows) + "\r\n", encoding="utf-8")
    return sorted(str(i + 1) for i in range(num_pairs))


def _tweet(label: int, rng: np.random.Generator, hard: bool) -> str:
    """Filler words with the class cue inserted at a random place."""
    words = list(rng.choice(FILLER_WORDS, int(rng.integers(*FILLER_RANGE))))
    if not hard:
        cue = [str(rng.choice(CLASS_WORDS[label]))]
    elif MVSA_CLASSES[label] == "neutral":
        cue = [str(rng.choice(NEUTRAL_HARD_WORDS)), str(rng.choice(POLARITY_WORDS))]
    else:  # positive = good XOR not: each word alone says nothing about the class
        negated = bool(rng.integers(2))
        polarity = POLARITY_WORDS[int(MVSA_CLASSES[label] == "positive") ^ negated]
        cue = [NEGATION, polarity] if negated else [polarity]
    at = int(rng.integers(len(words) + 1))
    return " ".join(words[:at] + cue + words[at:])


def _synth_image(label: int, rng: np.random.Generator, hard: bool):
    """One frame of VIDEO_CUES as an RGB PIL image of a random size."""
    width = 2 * int(rng.integers(IMAGE_WIDTH_RANGE[0] // 2, IMAGE_WIDTH_RANGE[1] // 2 + 1))
    height = 2 * int(rng.integers(IMAGE_HEIGHT_RANGE[0] // 2, IMAGE_HEIGHT_RANGE[1] // 2 + 1))
    yuv = next(iter(VIDEO_CUES["hard" if hard else "easy"](label, 1, width, height, 1, rng, 1.0)))
    return av.VideoFrame.from_ndarray(yuv, format="yuv420p").to_image()


# ---------------------------------------------------------------- UPMC Food-101
# Images are one frame of VIDEO_CUES, as MVSA's; titles carry the class through words (easy:
# a class word; hard: two words whose indices sum to the class modulo the class count, so
# neither word alone says anything about it).

FOOD_CLASSES = ("apple_pie", "caesar_salad", "pad_thai", "ramen", "waffles")  # real names
FOOD_WORDS = (("cinnamon", "crust"), ("romaine", "croutons"), ("tamarind", "peanuts"),
              ("broth", "noodle"), ("batter", "syrup"))  # easy title cue, by class
FOOD_HARD_WORDS = (("red", "blue", "green", "gold", "white"),
                   ("north", "south", "east", "west", "inner"))  # hard cue: (a + b) mod k
TITLE_FILLER = ("best", "easy", "recipe", "homemade", "quick", "classic", "the", "with",
                "how", "to", "make", "kitchen", "dinner", "family", "style")
TITLE_SITES = ("Allrecipes", "Food Network", "My Blog", 'The "Good" Kitchen')  # , and " quoted


def synthesize_food101(out: Path, num_pairs: int = 60, seed: int = 0, *, num_classes: int = 4,
                       test_share: float = 0.25, easy: str = "text",
                       progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Write UPMC Food-101's layout under `out`: `images/{train,test}/<label>/<label>_<n>.jpg`
    and the header-less `texts/{train,test}_titles.csv` (`<image name>,<title>,<label>`,
    CSV-quoted where a title holds a comma or quote). Classes are the first `num_classes`
    of FOOD_CLASSES, round robin; every pair whose index falls in the last `test_share` of
    each class's pairs is a test pair. Returns the pairs per split."""
    if easy not in MVSA_MODALITIES or not 1 < num_classes <= len(FOOD_CLASSES):
        raise ValueError(f"easy must be one of {MVSA_MODALITIES} and num_classes in "
                         f"2..{len(FOOD_CLASSES)}, got {easy!r}, {num_classes}.")
    import csv

    out = Path(out)
    rows: dict[str, list[list[str]]] = {"train": [], "test": []}
    per_class = -(-num_pairs // num_classes)
    for index in range(num_pairs):
        label, n = index % num_classes, index // num_classes
        split = "test" if n >= per_class - round(test_share * per_class) else "train"
        name, rng = f"{FOOD_CLASSES[label]}_{n + 1}.jpg", np.random.default_rng([seed, index])
        title = _food_title(label, num_classes, rng, hard=easy != "text")
        folder = out / "images" / split / FOOD_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        _synth_image(label, rng, hard=easy != "image").save(folder / name, quality=90)
        rows[split].append([name, title, FOOD_CLASSES[label]])
        if progress is not None:
            progress(index + 1)
    (out / "texts").mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        with open(out / "texts" / f"{split}_titles.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(split_rows)
    return {split: len(split_rows) for split, split_rows in rows.items()}


def _food_title(label: int, num_classes: int, rng: np.random.Generator, hard: bool) -> str:
    """A recipe page title: filler words, the class cue, and a site name after a comma."""
    words = list(rng.choice(TITLE_FILLER, int(rng.integers(3, 8))))
    if hard:
        first = int(rng.integers(num_classes))
        cue = [FOOD_HARD_WORDS[0][first], FOOD_HARD_WORDS[1][(label - first) % num_classes]]
    else:
        cue = [str(rng.choice(FOOD_WORDS[label]))]
    at = int(rng.integers(len(words) + 1))
    site = TITLE_SITES[int(rng.integers(len(TITLE_SITES)))]
    return " ".join(words[:at] + cue + words[at:]) + ", " + site


# ---------------------------------------------------------------- UCF-101
# Clips of a smooth random texture drifting at a constant velocity over a tinted background.
# Easy video: the tint is the class hue; easy flow: the drift's direction is the class's.
# Hard video: the colour-axis texture of VIDEO_CUES on top; hard flow: the drift runs along
# the class's axis with a random sign, so every class's mean flow is zero.

UCF_CLASSES = ("Hammering", "HammerThrow", "HandstandPushups", "JumpingJack", "JumpRope")
UCF_MODALITIES = ("video", "flow")
UCF_LIST_SPELLING = {"HandstandPushups": "HandStandPushups"}  # file stems, as the real release
UCF_TEST_GROUPS = ((1, 7), (8, 14), (15, 21))  # official folds: test groups, inclusive
UCF_SIZE, UCF_FPS, UCF_FRAMES = (64, 48), 25, 20
UCF_SPEED = 1.5  # px per frame
UCF_TEXTURE_SIGMA = 2.0  # px: smooth enough for flow to be well defined
UCF_TEXTURE_CONTRAST = 60.0  # grey levels


def ucf_group(n: int) -> int:
    """The group of a class's n-th clip: 1, 8, 15, 22, 2, 9, ... so that every fold's test
    groups hold a clip once a class has three."""
    return 1 + 7 * (n % 4) + n // 4


def synthesize_ucf101(out: Path, num_clips: int = 24, seed: int = 0, *, num_classes: int = 3,
                      easy: str = "video", flow_tree: bool = True,
                      progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Write UCF-101's layout under `out`: `UCF-101/<Class>/v_<Class>_gGG_cCC.avi` (MPEG-4
    in AVI), `ucfTrainTestlist/` (classInd.txt and the three folds' lists, CRLF), and with
    `flow_tree` the released flow layout `tvl1_flow/{u,v}/<video>/frame%06d.jpg` holding the
    true (quantised) drift. Classes are the first `num_classes` of UCF_CLASSES (numbered in
    that order, which is not sorted()), round robin. Returns fold 1's clips per split."""
    if easy not in UCF_MODALITIES or not 1 < num_classes <= len(UCF_CLASSES):
        raise ValueError(f"easy must be one of {UCF_MODALITIES} and num_classes in "
                         f"2..{len(UCF_CLASSES)}, got {easy!r}, {num_classes}.")
    from scipy.ndimage import gaussian_filter

    from preprocess.flow import encode_plane, quantise

    out, classes = Path(out), UCF_CLASSES[:num_classes]
    names = []
    for index in range(num_clips):
        label, n = index % num_classes, index // num_classes
        rng = np.random.default_rng([seed, index])
        spelled = UCF_LIST_SPELLING.get(classes[label], classes[label])
        video = f"v_{spelled}_g{ucf_group(n):02d}_c01"
        angle = 2 * np.pi * label / num_classes if easy == "flow" else \
            np.pi * label / num_classes + np.pi * rng.integers(2)
        velocity = UCF_SPEED * np.array([np.cos(angle), np.sin(angle)])
        tint = _class_tint(label) * TINT_AMPLITUDE if easy == "video" else \
            _class_tint(int(rng.integers(6))) * TINT_AMPLITUDE
        margin = int(np.ceil(UCF_SPEED * UCF_FRAMES)) + 2
        width, height = UCF_SIZE
        texture = gaussian_filter(rng.standard_normal((height + 2 * margin, width + 2 * margin)),
                                  UCF_TEXTURE_SIGMA)
        texture *= UCF_TEXTURE_CONTRAST / texture.std()
        still = np.full((height, width, 3), 255 * (BASE_GREY + tint))
        if easy == "flow":  # hard video: the class's colour-axis checkerboard, random signs
            cell = (-(-height // TEXTURE_GRID[0]), -(-width // TEXTURE_GRID[1]))
            signs = np.kron(rng.choice([-1.0, 1.0], TEXTURE_GRID), np.ones(cell))
            still += 255 * TEXTURE_AMPLITUDE * signs[:height, :width, None] * \
                CLASS_COLOUR_AXES[label]
        frames = []
        for t in range(UCF_FRAMES):
            dx, dy = velocity * t
            shifted = _shift_crop(texture, margin - dy, margin - dx, height, width)
            frames.append(np.clip(np.rint(still + shifted[..., None]), 0, 255).astype(np.uint8))
        path = out / "UCF-101" / classes[label] / f"{video}.avi"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_avi(path, frames)
        if flow_tree:
            planes = quantise(np.broadcast_to(velocity[:, None, None], (2, height, width)))
            for axis_name, plane in zip(("u", "v"), planes):
                folder = out / "tvl1_flow" / axis_name / video.replace(
                    "HandStandPushups", "HandstandPushups")
                folder.mkdir(parents=True, exist_ok=True)
                jpeg = encode_plane(plane, max(width, height))
                for k in range(1, UCF_FRAMES):
                    (folder / f"frame{k:06d}.jpg").write_bytes(jpeg)
        names.append((classes[label], video, ucf_group(n)))
        if progress is not None:
            progress(index + 1)
    return _write_ucf_lists(out / "ucfTrainTestlist", classes, names)


def _shift_crop(texture: np.ndarray, top: float, left: float, height: int,
                width: int) -> np.ndarray:
    """The height x width window of `texture` at a fractional (top, left), bilinear."""
    from scipy.ndimage import map_coordinates

    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    return map_coordinates(texture, [rows + top, cols + left], order=1, mode="nearest")


def _write_avi(path: Path, frames: list[np.ndarray]) -> None:
    """MPEG-4 part 2 in AVI (UCF-101's clips are XviD), fixed quantiser: deterministic."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=UCF_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"qmin": "3", "qmax": "3"}
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _write_ucf_lists(folder: Path, classes: tuple[str, ...],
                     names: list[tuple[str, str, int]]) -> dict[str, int]:
    """classInd.txt and trainlist0F / testlist0F for the three folds, CRLF as published."""
    folder.mkdir(parents=True, exist_ok=True)
    crlf = lambda lines: "".join(f"{line}\r\n" for line in lines).encode("ascii")  # noqa: E731
    (folder / "classInd.txt").write_bytes(crlf(f"{i + 1} {c}" for i, c in enumerate(classes)))
    counts = {}
    for fold, (low, high) in enumerate(UCF_TEST_GROUPS, start=1):
        train = [f"{c}/{v}.avi {classes.index(c) + 1}" for c, v, g in sorted(names)
                 if not low <= g <= high]
        test = [f"{c}/{v}.avi" for c, v, g in sorted(names) if low <= g <= high]
        (folder / f"trainlist0{fold}.txt").write_bytes(crlf(train))
        (folder / f"testlist0{fold}.txt").write_bytes(crlf(test))
        if fold == 1:
            counts = {"train": len(train), "test": len(test)}
    return counts
