"""How much of one untrusted file the device agrees to decode, checked as it is decoded.

A `MediaBudget` is started once per file (`MediaBudget.start(cfg.media_limits)`)
and handed to every stage that opens it (probe, keyframes, audio), so the wall
time of `max-media-seconds` covers the whole file, not each pass. The stream
headers are checked before anything is decoded (edge/media/container.py); the
decode loops call `check_video_frame` / `check_audio_frame` on every decoded
frame, which catches a file whose header lies or says nothing. Each check is a
few comparisons: it costs nothing next to decoding a frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgefed.common.config import MediaLimits
from edgefed.edge.media.errors import MediaError


@dataclass(frozen=True)
class MediaBudget:
    limits: MediaLimits
    deadline: float  # time.monotonic() at which the file's wall time is used up

    @classmethod
    def start(cls, limits: MediaLimits | None = None) -> MediaBudget:
        """A budget for one file whose clock starts now (the run config's defaults without `limits`)."""
        limits = limits or MediaLimits()
        return cls(limits, time.monotonic() + limits.max_media_seconds)

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    # --- the checks: each raises MediaError naming the limit and its setting ---------------------------
    def check_time(self, path: str) -> None:
        if time.monotonic() > self.deadline:
            raise self.too_slow(path)

    def too_slow(self, path: str) -> MediaError:
        return MediaError(path, f"extraction took longer than max-media-seconds ({self.limits.max_media_seconds:g} s)")

    def check_pixels(self, path: str, width: int, height: int) -> None:
        if width * height > self.limits.max_media_pixels:
            raise MediaError(path, f"frame size {width}x{height} is over max-media-pixels "
                                   f"({self.limits.max_media_pixels} pixels)")

    def check_duration(self, path: str, seconds: float, what: str = "duration") -> None:
        if seconds > self.limits.max_media_duration_s:
            raise MediaError(path, f"{what} {seconds:.1f} s is over max-media-duration-s "
                                   f"({self.limits.max_media_duration_s:g} s)")

    def check_frame_count(self, path: str, frames: int, what: str = "video frames") -> None:
        if frames > self.limits.max_media_frames:
            raise MediaError(path, f"{frames} {what} is over max-media-frames ({self.limits.max_media_frames})")

    def check_video_frame(self, path: str, count: int, elapsed_s: float) -> None:
        """The `count`-th decoded frame, `elapsed_s` after the stream's first one."""
        if count > self.limits.max_media_frames:
            raise MediaError(path, f"more than max-media-frames ({self.limits.max_media_frames}) video frames")
        if elapsed_s > self.limits.max_media_duration_s:
            raise MediaError(path, f"video runs past max-media-duration-s ({self.limits.max_media_duration_s:g} s)")
        if time.monotonic() > self.deadline:
            raise self.too_slow(path)

    def check_audio_frame(self, path: str, elapsed_s: float) -> None:
        if elapsed_s > self.limits.max_media_duration_s:
            raise MediaError(path, f"audio runs past max-media-duration-s ({self.limits.max_media_duration_s:g} s)")
        if time.monotonic() > self.deadline:
            raise self.too_slow(path)
