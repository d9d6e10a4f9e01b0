"""What a media file holds, from its container header (no decoding)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import av

from edgefed.edge.media.errors import MediaError, ffmpeg_reason

AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac"}
VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".ts", ".mpg", ".mpeg"}


@dataclass(frozen=True)
class MediaInfo:
    has_video: bool
    has_audio: bool
    duration_s: float  # 0.0 when the container does not say


def probe(path: str | os.PathLike) -> MediaInfo:
    path = str(path)
    if not os.path.isfile(path):
        raise MediaError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "empty file (0 bytes)")
    try:
        with av.open(path) as container:
            has_video = bool(container.streams.video)
            has_audio = bool(container.streams.audio)
            duration = (container.duration or 0) / 1_000_000
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise MediaError(path, f"not a media file FFmpeg can open ({ffmpeg_reason(err)})") from None
    except PermissionError:
        raise MediaError(path, "permission denied") from None
    if not (has_video or has_audio):
        raise MediaError(path, "no audio or video stream")
    return MediaInfo(has_video, has_audio, duration)
