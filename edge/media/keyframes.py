"""Shot-aware keyframes of a video: one streaming pass, bounded memory.

    VideoReader (decode loop) ──► ShotDetector (cuts) ──► KeyframeSelector (k per shot)
                                                     └──► budget: at most `max_keyframes` per video

Frames are held only as letterboxed thumbnails of the chosen keyframes and of
a few candidates per shot, so a long video takes the same memory as a short
one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from edge.media.decode import VideoReader
from edge.media.errors import MediaError
from edge.media.selectors import Keyframe, make_selector
from edge.media.shots import make_detector


@dataclass(frozen=True)
class KeyframeConfig:
    """How keyframes are chosen; part of the feature-cache key."""

    size: int = 112  # letterboxed square side
    per_shot: int = 2  # k keyframes per shot
    max_keyframes: int = 16  # budget per video
    detector: str = "content"  # content | adaptive, optionally +fade
    threshold: float = 12.0  # content detector: mean |Δluma| (0-255) that marks a cut
    min_shot_frames: int = 15
    selector: str = "sharpest"  # sharpest | even
    stride: int = 2  # look at every stride-th decoded frame (cuts land within stride-1 frames)


@dataclass
class VideoKeyframes:
    path: str
    keyframes: list[Keyframe]
    cuts: list[int]  # frame indices where a new shot starts
    shot_starts_ms: list[float]
    frames: int
    duration_ms: float
    fps: float
    width: int
    height: int
    rotation: int
    errors: list[str] = field(default_factory=list)

    @property
    def images(self) -> np.ndarray:
        return np.stack([k.image for k in self.keyframes])

    @property
    def timestamps_ms(self) -> list[float]:
        return [k.pts_ms for k in self.keyframes]


def extract_keyframes(path: str | os.PathLike, config: KeyframeConfig = KeyframeConfig()) -> VideoKeyframes:
    detector = make_detector(config.detector, config.threshold, config.min_shot_frames)
    selector = make_selector(config.selector, config.per_shot, config.size)
    chosen: list[Keyframe] = []
    shot_starts = [0.0]
    with VideoReader(path, stride=config.stride) as reader:
        seen_cuts = 0
        for frame in reader:
            detector.process(frame)
            if len(detector.cuts) > seen_cuts:  # a new shot starts at this frame
                seen_cuts = len(detector.cuts)
                chosen = _within_budget(chosen + selector.end_shot(), config.max_keyframes)
                shot_starts.append(frame.pts_ms)
            selector.offer(frame, reader)
        detector.flush()
        chosen = spread(chosen + selector.end_shot(), config.max_keyframes)
        if not chosen:
            raise MediaError(str(path), "no decodable video frames")
        fps = reader.fps
        last_ms = reader.last_pts_ms
        frames = reader.frames_read
        duration = last_ms + (1000.0 / fps if fps > 0 else 0.0)
        return VideoKeyframes(
            path=str(path), keyframes=chosen, cuts=list(detector.cuts), shot_starts_ms=shot_starts,
            frames=frames, duration_ms=duration, fps=fps, width=reader.width, height=reader.height,
            rotation=reader.rotation,
        )


def _within_budget(keyframes: list[Keyframe], budget: int) -> list[Keyframe]:
    """Thin an over-long list evenly, so long videos stay covered end to end in bounded memory."""
    if len(keyframes) <= 2 * budget:
        return keyframes
    return keyframes[::2]


def spread(keyframes: list[Keyframe], k: int) -> list[Keyframe]:
    """k keyframes spread evenly over the video (all of them if there are fewer)."""
    if len(keyframes) <= k:
        return keyframes
    picks = np.linspace(0, len(keyframes) - 1, k).round().astype(int)
    return [keyframes[i] for i in picks]
