"""The synthetic CREMA-D generator: real layout and media, determinism, cues of unequal difficulty.

The cue tests use cheap features of the raw files, not the shard builder: per-class means
and a linear rule (leave-one-out nearest class mean) on a binned audio magnitude spectrum,
mean log-spectrogram rows or block-averaged pixels, and a nonlinear sign- and
phase-invariant detector (texture energy along each class's colour axis, envelope energy
at each class's gating rate) for the hard cue.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from conftest import run_cli
from scipy.stats import f_oneway

from preprocess.datasets.designs import DESIGNS
from preprocess.datasets.synth import (CLASS_AM_RATES_HZ, CLASS_COLOUR_AXES, CLASS_TONES_HZ,
                                       CLASSES, synthesize_cremad)

ID_PATTERN = re.compile(r"^(10(?:0[1-9]|[1-8]\d|9[01]))_(IEO|TIE|IOM|IWW|TAI|MTI|IWL|ITH|DFA|ITS"
                        r"|TSI|WSI)_(ANG|DIS|FEA|HAP|NEU|SAD)_(LO|MD|HI|XX)$")
SIZE = (64, 48)
SMALL = dict(width=SIZE[0], height=SIZE[1], duration=(0.8, 1.6))
CUE_CLIPS = 36  # 6 per class: enough for leave-one-out class means
CHANCE = 1 / len(CLASSES)
SPECTRUM_BIN_HZ = 50.0  # binning makes spectra of clips of different lengths comparable
ENVELOPE_HOP_S = 0.01  # 100 Hz envelope: the fastest class rate (18 Hz) is well resolved
ENVELOPE_WINDOW = 512  # Hann-weighted, so a steady tone leaves no ripple (as in the STFT)
PIXEL_BLOCK = 8  # 64x48 frames -> 8x6 blocks of mean colour
STFT_WINDOW, STFT_HOP = 512, 256  # log-magnitude rows, as the builder's spectrogram
LOG_EPS = 1e-7
# One-way ANOVA over the 6 classes, per feature, Bonferroni-corrected over the features:
# a cue with a class-mean difference is far below EASY_P, one without stays above HARD_P.
EASY_P, HARD_P = 1e-6, 1e-3


def label(clip_id: str) -> int:
    return CLASSES.index(clip_id.split("_")[2])


def decoded_frames(path: Path) -> np.ndarray:
    """All frames of the clip's video track, [n, height, width, 3] uint8 RGB."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@functools.lru_cache(maxsize=None)
def sampled_frames(path: Path) -> np.ndarray:
    """The frames the shard builder keeps: centres of 3 equal segments, float [3, h, w, 3]."""
    frames = decoded_frames(path)
    return frames[[int((i + 0.5) * len(frames) / 3) for i in range(3)]].astype(np.float64)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[int]]:
    """12 clips of varying length; also records what `progress` was called with."""
    root = tmp_path_factory.mktemp("synth") / "cremad"
    calls: list[int] = []
    ids = synthesize_cremad(root, 12, 0, progress=calls.append, **SMALL)
    return root, ids, calls


@pytest.fixture(scope="module", params=["audio", "video"])
def cue_tree(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, list[str]]:
    root = tmp_path_factory.mktemp(f"easy_{request.param}")
    ids = synthesize_cremad(root, CUE_CLIPS, 3, easy=request.param, width=SIZE[0],
                            height=SIZE[1], duration=(1.0, 1.5))
    return request.param, root, ids


@pytest.fixture(scope="module", params=["audio", "video"])
def fused_tree(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, list[str]]:
    """The default design (`fused`): the easy cue on 70 % of each class's clips."""
    root = tmp_path_factory.mktemp(f"fused_{request.param}")
    design = DESIGNS["fused"]
    ids = synthesize_cremad(root, CUE_CLIPS, 3, easy=request.param, width=SIZE[0],
                            height=SIZE[1], duration=(1.0, 1.5),
                            easy_reliability=design.easy_reliability,
                            hard_strength=design.hard_strength)
    return request.param, root, ids


def test_layout_and_ids(tree: tuple[Path, list[str], list[int]]) -> None:
    root, ids, calls = tree
    assert ids == sorted(ids) and len(set(ids)) == 12
    assert all(ID_PATTERN.match(i) for i in ids), ids
    assert sorted(p.name for p in root.iterdir()) == ["AudioWAV", "VideoFlash"]
    assert sorted(p.name for p in (root / "AudioWAV").iterdir()) == [f"{i}.wav" for i in ids]
    assert sorted(p.name for p in (root / "VideoFlash").iterdir()) == [f"{i}.flv" for i in ids]
    assert np.bincount([label(i) for i in ids], minlength=6).tolist() == [2] * 6
    assert calls == list(range(1, 13))


def test_media_formats(tree: tuple[Path, list[str], list[int]]) -> None:
    root, ids, _ = tree
    durations = set()
    for clip_id in ids[:4]:
        info = soundfile.info(root / "AudioWAV" / f"{clip_id}.wav")
        assert (info.format, info.subtype, info.samplerate, info.channels) == (
            "WAV", "PCM_16", 16000, 1)
        with av.open(str(root / "VideoFlash" / f"{clip_id}.flv")) as container:
            assert container.format.name == "flv"
            video, audio = container.streams.video[0], container.streams.audio[0]
            assert video.codec_context.codec.canonical_name == "flv1"
            assert (video.codec_context.width, video.codec_context.height) == SIZE
            sound = np.concatenate([f.to_ndarray().ravel() for f in container.decode(audio)])
        frames = decoded_frames(root / "VideoFlash" / f"{clip_id}.flv")
        assert frames.shape[1:] == (SIZE[1], SIZE[0], 3)
        assert abs(len(frames) / 30 - info.duration) < 0.05  # audio and video agree
        assert len(sound) / audio.rate > 0.9 * info.duration and np.abs(sound).max() > 0.05
        durations.add(info.frames)
    assert len(durations) > 1, "a duration range must give clips of different lengths"


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path,
                                                 tree: tuple[Path, list[str], list[int]]) -> None:
    root, ids, _ = tree
    again = synthesize_cremad(tmp_path / "again", 12, 0, **SMALL)
    assert again == ids
    for clip_id in ids[:3]:
        for sub, suffix in (("AudioWAV", "wav"), ("VideoFlash", "flv")):
            name = f"{sub}/{clip_id}.{suffix}"
            assert (root / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
        assert np.array_equal(decoded_frames(root / "VideoFlash" / f"{clip_id}.flv"),
                              decoded_frames(tmp_path / "again" / "VideoFlash" / f"{clip_id}.flv"))
    other = synthesize_cremad(tmp_path / "other", 12, 1, **SMALL)
    assert other != ids
    assert ((root / "AudioWAV" / f"{ids[0]}.wav").read_bytes()
            != (tmp_path / "other" / "AudioWAV" / f"{other[0]}.wav").read_bytes())


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="easy"):
        synthesize_cremad(tmp_path, 6, easy="text")
    with pytest.raises(ValueError, match="even"):
        synthesize_cremad(tmp_path, 6, width=63)
    with pytest.raises(ValueError, match="num_clips"):
        synthesize_cremad(tmp_path, 0)


# ---------------------------------------------------------------- cue recoverability


def nearest_mean_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out accuracy of the nearest class mean, a linear rule."""
    x = features
    hits = 0
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        means = np.stack([x[keep & (labels == c)].mean(0) for c in range(len(CLASSES))])
        hits += int(np.argmin(((means - x[i]) ** 2).sum(1)) == labels[i])
    return hits / len(x)


def audio_spectrum(path: Path) -> np.ndarray:
    """Magnitude spectrum of the whole wav in SPECTRUM_BIN_HZ bins up to 8 kHz, unit sum."""
    sound, rate = soundfile.read(path, dtype="float64")
    magnitude = np.abs(np.fft.rfft(sound))
    bins = (np.fft.rfftfreq(len(sound), 1 / rate) // SPECTRUM_BIN_HZ).astype(int)
    binned = np.bincount(bins, magnitude, minlength=int(rate / 2 // SPECTRUM_BIN_HZ) + 1)
    return binned[: int(rate / 2 // SPECTRUM_BIN_HZ)] / binned.sum()


def block_pixels(path: Path) -> np.ndarray:
    """Mean over frames of PIXEL_BLOCK-px blocks of RGB: raw pixel means, a linear feature."""
    frames = sampled_frames(path).mean(0)
    h, w, _ = frames.shape
    blocks = frames.reshape(h // PIXEL_BLOCK, PIXEL_BLOCK, w // PIXEL_BLOCK, PIXEL_BLOCK, 3)
    return blocks.mean((1, 3)).ravel()


def modulation_class(path: Path) -> int:
    """The class rate with the most energy in the log-energy envelope (phase-invariant)."""
    sound, rate = soundfile.read(path, dtype="float64")
    frames = np.lib.stride_tricks.sliding_window_view(sound, ENVELOPE_WINDOW)
    frames = frames[:: int(rate * ENVELOPE_HOP_S)]
    envelope = np.log((frames ** 2 * np.hanning(ENVELOPE_WINDOW)).sum(1))
    envelope = (envelope - envelope.mean()) * np.hanning(len(envelope))  # no edge leakage
    t = np.arange(len(envelope)) * ENVELOPE_HOP_S
    energy = [abs((envelope * np.exp(-2j * np.pi * r * t)).sum()) for r in CLASS_AM_RATES_HZ]
    return int(np.argmax(energy))


def colour_axis_class(path: Path) -> int:
    """The class colour axis along which the pixels vary most about their mean colour
    (a quadratic feature: blind to the texture's random signs)."""
    pixels = sampled_frames(path).reshape(-1, 3)
    covariance = np.cov(pixels - pixels.mean(0), rowvar=False)
    return int(np.argmax([axis @ covariance @ axis for axis in CLASS_COLOUR_AXES]))


def mean_log_rows(path: Path) -> np.ndarray:
    """Mean over time of each row of the log-magnitude spectrogram (Hann STFT)."""
    sound, _ = soundfile.read(path, dtype="float64")
    frames = np.lib.stride_tricks.sliding_window_view(sound, STFT_WINDOW)[::STFT_HOP]
    magnitude = np.abs(np.fft.rfft(frames * np.hanning(STFT_WINDOW), axis=1))
    return np.log(magnitude + LOG_EPS).mean(0)


def class_mean_p(features: np.ndarray, labels: np.ndarray) -> float:
    """Smallest per-feature ANOVA p-value that the class means are equal, Bonferroni-scaled."""
    groups = [features[labels == c] for c in range(len(CLASSES))]
    p = np.nan_to_num(f_oneway(*groups).pvalue, nan=1.0)
    return float(min(1.0, p.min() * features.shape[1]))


LINEAR_FEATURE = {"audio": ("AudioWAV", "wav", audio_spectrum),
                  "video": ("VideoFlash", "flv", block_pixels)}
NONLINEAR_CLASS = {"audio": ("AudioWAV", "wav", modulation_class),
                   "video": ("VideoFlash", "flv", colour_axis_class)}
MEAN_FEATURE = {"audio": ("AudioWAV", "wav", mean_log_rows),
                "video": ("VideoFlash", "flv", block_pixels)}


def test_easy_modality_is_linear_hard_one_is_not(cue_tree: tuple[str, Path, list[str]]) -> None:
    easy, root, ids = cue_tree
    labels = np.array([label(i) for i in ids])
    for modality, (sub, suffix, feature) in LINEAR_FEATURE.items():
        features = np.stack([feature(root / sub / f"{i}.{suffix}") for i in ids])
        accuracy = nearest_mean_accuracy(features, labels)
        if modality == easy:
            assert accuracy >= 0.9, f"easy {modality}: linear rule only {accuracy:.2f}"
        else:
            assert accuracy <= CHANCE + 0.2, f"hard {modality}: linear rule {accuracy:.2f}"


def test_only_the_easy_cue_moves_the_class_means(cue_tree: tuple[str, Path, list[str]]) -> None:
    """Per-class mean spectrogram rows and mean frames: the easy modality's differ by class,
    the hard modality's are equal within noise (its cue has random sign or phase)."""
    easy, root, ids = cue_tree
    labels = np.array([label(i) for i in ids])
    for modality, (sub, suffix, feature) in MEAN_FEATURE.items():
        features = np.stack([feature(root / sub / f"{i}.{suffix}") for i in ids])
        p = class_mean_p(features, labels)
        if modality == easy:
            assert p < EASY_P, f"easy {modality}: class means barely differ (p {p:.2g})"
        else:
            assert p > HARD_P, f"hard {modality}: a class mean differs (p {p:.2g})"


def test_hard_modality_needs_a_nonlinear_feature(cue_tree: tuple[str, Path, list[str]]) -> None:
    """The energy detector finds the hard cue, and finds nothing in the easy modality."""
    easy, root, ids = cue_tree
    labels = np.array([label(i) for i in ids])
    for modality, (sub, suffix, detector) in NONLINEAR_CLASS.items():
        predicted = np.array([detector(root / sub / f"{i}.{suffix}") for i in ids])
        accuracy = np.mean(predicted == labels)
        if modality == easy:
            assert accuracy <= CHANCE + 0.2, f"easy {modality} has a hard cue too: {accuracy:.2f}"
        else:
            assert accuracy >= 0.8, f"hard {modality}: class energy detector only {accuracy:.2f}"


def test_zero_strength_removes_both_cues(tmp_path: Path) -> None:
    """The strength knobs really scale the cues: at 0 neither rule beats chance by much."""
    ids = synthesize_cremad(tmp_path, 18, 3, easy="audio", easy_strength=0.0, hard_strength=0.0,
                            width=SIZE[0], height=SIZE[1], duration=1.0)
    labels = np.array([label(i) for i in ids])
    spectra = np.stack([audio_spectrum(tmp_path / "AudioWAV" / f"{i}.wav") for i in ids])
    assert nearest_mean_accuracy(spectra, labels) <= 0.5
    predicted = [colour_axis_class(tmp_path / "VideoFlash" / f"{i}.flv") for i in ids]
    assert np.mean(np.array(predicted) == labels) <= 0.5


@pytest.mark.parametrize("args,named", [(["cremad", "--easy", "text"], "--easy 'text'"),
                                        (["ks", "--easy", "text"], "--easy 'text'"),
                                        (["ks", "--classes", "9"], "--classes 9"),
                                        (["cremad", "--hard-strength", "-1"], "--hard-strength"),
                                        (["cremad", "--easy-reliability", "1.5"],
                                         "--easy-reliability 1.5"),
                                        (["cremad", "--design", "loud"], "--design 'loud'"),
                                        (["ks", "--easy-reliability", "-0.1"],
                                         "--easy-reliability"),
                                        (["mvsa", "--easy", "audio"], "--easy 'audio'")])
def test_synth_refuses_bad_options_in_one_sentence(tmp_path, capsys, args, named) -> None:
    code, _, err = run_cli(["synth", *args, "--out", str(tmp_path / "raw")], capsys)
    assert code == 2 and named in err and "Traceback" not in err
    assert not (tmp_path / "raw").exists()


def test_synth_cli_passes_the_hard_strength(tmp_path: Path, capsys) -> None:
    """`--hard-strength 0.5` writes exactly what the library writes at hard_strength 0.5."""
    code, out, _ = run_cli(["synth", "cremad", "--out", str(tmp_path / "cli"), "--clips", "3",
                            "--width", str(SIZE[0]), "--height", str(SIZE[1]),
                            "--design", "probe", "--hard-strength", "0.5"], capsys)
    assert code == 0 and "wrote 3 clips" in out
    ids = synthesize_cremad(tmp_path / "lib", 3, 0, hard_strength=0.5, width=SIZE[0],
                            height=SIZE[1])
    synthesize_cremad(tmp_path / "default", 3, 0, width=SIZE[0], height=SIZE[1])
    name = f"VideoFlash/{ids[0]}.flv"
    assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes()
    assert (tmp_path / "cli" / name).read_bytes() != (tmp_path / "default" / name).read_bytes()


# ---------------------------------------------------------------- the fused design

TONE_PRESENT = 0.15  # a class tone of this amplitude or more: the easy audio cue (0.3)
TINT_PRESENT = 0.125  # a mean colour this far along the class hue: the easy video tint (0.25)


def tone_amplitude(path: Path) -> float:
    """The largest amplitude, over the class tones, of a steady tone within 2 % of one
    (Hann-windowed FFT; the amplitude of a sinusoid, whatever its phase)."""
    sound, rate = soundfile.read(path, dtype="float64")
    window = np.hanning(len(sound))
    magnitude = 2 * np.abs(np.fft.rfft(sound * window)) / window.sum()
    freqs = np.fft.rfftfreq(len(sound), 1 / rate)
    return max(float(magnitude[np.abs(freqs - f) < 0.02 * f].max()) for f in CLASS_TONES_HZ)


def class_tint(path: Path) -> float:
    """The clip's mean colour along its own class's tint direction (a unit chroma offset,
    the hue 60 degrees apart per class), in units of full scale."""
    colour = sampled_frames(path).reshape(-1, 3).mean(0) / 255
    hue = 2 * np.pi * label(path.stem) / len(CLASSES)
    direction = np.cos(hue - 2 * np.pi * np.arange(3) / 3) * np.sqrt(2 / 3)
    return float((colour - colour.mean()) @ direction)


EASY_PRESENCE = {"audio": ("AudioWAV", "wav", tone_amplitude, TONE_PRESENT),
                 "video": ("VideoFlash", "flv", class_tint, TINT_PRESENT)}


def easy_present(easy: str, root: Path, ids: list[str]) -> np.ndarray:
    sub, suffix, measure, threshold = EASY_PRESENCE[easy]
    return np.array([measure(root / sub / f"{i}.{suffix}") >= threshold for i in ids])


def test_the_easy_cue_is_on_the_stated_fraction_of_each_class(
        fused_tree: tuple[str, Path, list[str]]) -> None:
    """Counted on the media: in every class, round(0.7 * 6) = 4 of the 6 clips carry the
    easy cue, and on those the linear rule still reads the class."""
    easy, root, ids = fused_tree
    labels = np.array([label(i) for i in ids])
    present = easy_present(easy, root, ids)
    expected = round(DESIGNS["fused"].easy_reliability * CUE_CLIPS / len(CLASSES))
    assert np.bincount(labels[present], minlength=len(CLASSES)).tolist() == \
        [expected] * len(CLASSES)
    sub, suffix, feature = LINEAR_FEATURE[easy]
    features = np.stack([feature(root / sub / f"{i}.{suffix}") for i in ids])
    assert nearest_mean_accuracy(features[present], labels[present]) >= 0.9


def test_the_fused_designs_hard_cue_is_still_nonlinear_only(
        fused_tree: tuple[str, Path, list[str]]) -> None:
    """At the design's weaker hard strength the hard cue keeps equal class means, no linear
    rule, and an energy detector that finds it."""
    easy, root, ids = fused_tree
    hard = "video" if easy == "audio" else "audio"
    labels = np.array([label(i) for i in ids])
    sub, suffix, feature = MEAN_FEATURE[hard]
    features = np.stack([feature(root / sub / f"{i}.{suffix}") for i in ids])
    assert class_mean_p(features, labels) > HARD_P
    sub, suffix, feature = LINEAR_FEATURE[hard]
    features = np.stack([feature(root / sub / f"{i}.{suffix}") for i in ids])
    assert nearest_mean_accuracy(features, labels) <= CHANCE + 0.2
    sub, suffix, detector = NONLINEAR_CLASS[hard]
    predicted = np.array([detector(root / sub / f"{i}.{suffix}") for i in ids])
    assert np.mean(predicted == labels) >= 0.8


@pytest.mark.parametrize("reliability", [0.0, 0.5, 1.0])
def test_reliability_is_exact_per_class(tmp_path: Path, reliability: float) -> None:
    """0 removes the easy cue from every clip, 1 keeps it on every clip (the probe design),
    0.5 on exactly half of each class."""
    ids = synthesize_cremad(tmp_path, 12, 5, easy_reliability=reliability, width=SIZE[0],
                            height=SIZE[1], duration=0.5)
    labels = np.array([label(i) for i in ids])
    present = easy_present("audio", tmp_path, ids)
    assert np.bincount(labels[present], minlength=6).tolist() == [round(2 * reliability)] * 6


def test_cli_default_is_the_fused_design_and_probe_the_first_design(tmp_path: Path,
                                                                     capsys) -> None:
    """`ccat-data synth cremad` writes DESIGNS['fused']; `--design probe` writes exactly what
    the first design wrote (the library's defaults); an explicit knob beats the design's."""
    small = ["--clips", "6", "--width", str(SIZE[0]), "--height", str(SIZE[1])]
    for name, extra in (("default", []), ("probe", ["--design", "probe"]),
                        ("knob", ["--design", "probe", "--easy-reliability",
                                  str(DESIGNS["fused"].easy_reliability), "--hard-strength",
                                  str(DESIGNS["fused"].hard_strength)])):
        code, out, _ = run_cli(["synth", "cremad", "--out", str(tmp_path / name), *small,
                                *extra], capsys)
        assert code == 0 and "wrote 6 clips" in out
    fused = DESIGNS["fused"]
    assert f"its cue on {100 * fused.easy_reliability:g} % of the clips" in \
        run_cli(["synth", "cremad", "--out", str(tmp_path / "again"), *small], capsys)[1]
    ids = synthesize_cremad(tmp_path / "first", 6, 0, width=SIZE[0], height=SIZE[1])
    synthesize_cremad(tmp_path / "lib_fused", 6, 0, width=SIZE[0], height=SIZE[1],
                      easy_reliability=fused.easy_reliability, hard_strength=fused.hard_strength)

    def tree_bytes(name: str) -> list[bytes]:
        return [(tmp_path / name / sub / f"{i}.{suffix}").read_bytes() for i in ids
                for sub, suffix in (("AudioWAV", "wav"), ("VideoFlash", "flv"))]

    assert tree_bytes("probe") == tree_bytes("first")
    assert tree_bytes("default") == tree_bytes("lib_fused") == tree_bytes("knob")
    assert tree_bytes("default") != tree_bytes("first")
