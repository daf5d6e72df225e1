"""What the audio-video recipes share (CREMA-D, Kinetics-Sounds, VGGSound, AVE): a
fixed-length spectrogram of a clip's audio and segment-centre frames of its video, the
three options that set them, and finding clips by file name.

A recipe mixes in :class:`AudioVideo` and declares the three fields with the functions
below, where its ``ccat-data build`` lists them among its own options (dataclass
inheritance would put them first). What changes a stored byte stays in
:class:`preprocess.media.AudioParams` and :class:`preprocess.media.VideoParams`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from ccat.data import kinds
from preprocess import media
from preprocess.datasets import FRAME_SIZE, NUM_FRAMES, SECONDS, option
from preprocess.splits import Entry

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi")  # clip files holding both tracks
CLIP_FRAMES_HELP = "Frames sampled per clip (segment centres)."


def seconds_option(default: float, help: str) -> Any:
    """The ``--seconds`` field: the fixed audio duration, its default the dataset's."""
    return option(default, help, within=SECONDS)


def frame_size_option() -> Any:
    """The ``--frame-size`` field: the side of the stored square frames."""
    return option(media.VideoParams.size, "Side of the square stored frames, px.",
                  within=FRAME_SIZE)


def num_frames_option(help: str = CLIP_FRAMES_HELP) -> Any:
    """The ``--num-frames`` field: frames sampled per clip (or per event)."""
    return option(media.VideoParams.num_frames, help, within=NUM_FRAMES)


class AudioVideo:
    """A recipe's audio and video modalities, from its fields ``seconds``, ``frame_size``
    and ``num_frames``; ``process`` reads both from one clip file, ``sources["clip"]``."""

    seconds: float
    frame_size: int
    num_frames: int
    unit: ClassVar[str] = "clips"  # what the build summary counts

    @property
    def audio(self) -> media.AudioParams:
        """The spectrogram parameters of the audio track."""
        return media.AudioParams(seconds=self.seconds)

    @property
    def video(self) -> media.VideoParams:
        """The frame parameters of the video track."""
        return media.VideoParams(num_frames=self.num_frames, size=self.frame_size)

    def modalities(self) -> dict[str, dict[str, Any]]:
        return {"audio": self.audio.manifest_entry(), "video": self.video.manifest_entry()}

    def process(self, raw: Path, entry: Entry) -> tuple[dict[str, bytes], dict[str, Any]]:
        path = raw / entry.sources["clip"]
        return self.encode_clip(path, path)

    def encode_clip(self, audio: Path, video: Path, window: Optional[media.Window] = None
               ) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The members of the spectrogram of ``audio`` and the frames of ``video`` (of
        ``window`` only, when given), and their provenance for ``meta.json``."""
        spectrogram, audio_meta = media.audio_features(audio, self.audio, window)
        frames, video_meta = media.sample_frames(video, self.video, window)
        members = {**kinds.encode("audio", "spectrogram", spectrogram),
                   **kinds.encode("video", "frames", frames)}
        return members, {"audio": audio_meta, "video": video_meta}


def clip_files(raw: Path) -> list[Path]:
    """Every clip file under ``raw``, flat or in folders, sorted."""
    return sorted(p for p in raw.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES
                  and p.is_file())


def keyed_clips(raw: Path, clips: list[Path], clip_key: Callable[[str], Optional[str]]
                ) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """Each clip by the key of its file name, in the order given; a name that is no clip
    id, or a second file of one key, is unusable (recorded with its path)."""
    found: dict[str, Path] = {}
    unusable: list[dict[str, Any]] = []
    for path in clips:
        key, relative = clip_key(path.stem), path.relative_to(raw).as_posix()
        if key is None or key in found:
            reason = "the same clip is stored twice" if key else "file name is not a clip id"
            unusable.append({"id": key or path.stem, "split": None, "reason": reason,
                             "detail": relative})
            continue
        found[key] = path
    return found, unusable
