"""What a media file holds, from its container header (no decoding)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from edgefed.edge.media.container import open_container, video_streams
from edgefed.edge.media.errors import MediaError
from edgefed.edge.media.limits import MediaBudget

AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac"}
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".ts", ".mpg", ".mpeg"}


@dataclass(frozen=True)
class MediaInfo:
    has_video: bool  # moving pictures: an audio file's cover art does not count
    has_audio: bool
    duration_s: float  # 0.0 when the container does not say


def probe(path: str | os.PathLike, budget: MediaBudget | None = None) -> MediaInfo:
    """Which tracks the file has, once its format and headers pass `budget`'s limits (the defaults without one)."""
    path = str(path)
    with open_container(path, budget or MediaBudget.start()) as container:
        has_video = bool(video_streams(container))
        has_audio = bool(container.streams.audio)
        duration = (container.duration or 0) / 1_000_000
    if not (has_video or has_audio):
        raise MediaError(path, "no audio or video stream")
    return MediaInfo(has_video, has_audio, duration)
