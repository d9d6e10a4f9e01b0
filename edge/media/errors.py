"""Typed errors of media extraction: one bad file fails that file, never the dataset."""


class MediaError(Exception):
    """A media file could not be turned into features; `reason` says why in one line."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def ffmpeg_reason(err: Exception) -> str:
    """The useful part of a PyAV/FFmpeg exception, for a MediaError reason."""
    return getattr(err, "strerror", None) or str(err) or type(err).__name__
