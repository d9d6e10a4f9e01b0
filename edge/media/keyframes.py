"""Shot-aware keyframes of a video: one streaming pass, bounded memory.

    VideoReader (decode loop) ──► ShotDetector (cuts) ──► KeyframeSelector (k per shot)
                                                     └──► budget: at most `max_keyframes` per video

A detector may decide a cut a few sampled frames after the frame it places it
at (its `lag`): those frames wait, held, until no cut can fall before them,
so every frame is offered to the shot it belongs to.

Frames are held only as letterboxed thumbnails of the chosen keyframes and of
a few candidates per shot, so a long video takes the same memory as a short
one.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgefed.common.config import FeatureSettings
from edgefed.common.model.inputs import FrameInput
from edgefed.edge.media.decode import HeldFrame, SampledFrame, VideoReader
from edgefed.edge.media.errors import MediaError
from edgefed.edge.media.frames import FrameShaper, frame_shaper
from edgefed.edge.media.limits import MediaBudget
from edgefed.edge.media.selectors import Keyframe, make_selector
from edgefed.edge.media.shots import make_detector

# Every stride-th decoded frame is looked at: cuts land within stride-1 frames.
SAMPLE_STRIDE = 2


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


def extract_keyframes(path: str | os.PathLike, features: FeatureSettings = FeatureSettings(),
                      budget: MediaBudget | None = None, shape: FrameShaper | None = None) -> VideoKeyframes:
    """The keyframes `features` asks for: `keyframes-per-shot` per detected shot, at least `num-keyframes`
    (filled from spare candidates when shots are few), at most `max-keyframes` spread over the video.

    `budget` bounds what is decoded (MediaError past a limit); without one, the default limits apply.
    `shape` makes the model's keyframe of a decoded frame (`frame_shaper`); default: letterboxed to `image-size`."""
    detector = make_detector(features)
    if shape is None:
        shape = frame_shaper(FrameInput.letterboxed(features.image_size))
    selector = make_selector(features.keyframe_selector, features.keyframes_per_shot, shape)
    min_keyframes = features.num_keyframes
    max_keyframes = max(features.max_keyframes, features.num_keyframes)
    chosen: list[Keyframe] = []
    spares: list = []  # held candidates, kept only while chosen < min_keyframes
    shot_starts = [0.0]
    cuts: list[int] = []

    def end_shot() -> None:
        nonlocal chosen, spares
        picked, extra = selector.end_shot()
        chosen = _within_budget(chosen + picked, max_keyframes)
        spares = [] if len(chosen) >= min_keyframes else _within_budget(spares + extra, min_keyframes)

    waiting: deque[tuple[SampledFrame, HeldFrame]] = deque()  # not yet offered: a cut may still fall before them

    def offer_before(limit: float) -> None:
        while waiting and waiting[0][0].index < limit:
            selector.offer(*waiting.popleft())

    def new_shot(cut: int, pts_ms: float) -> None:
        offer_before(cut)  # the ending shot's frames
        cuts.append(cut)
        end_shot()
        shot_starts.append(waiting[0][0].pts_ms if waiting else pts_ms)

    with VideoReader(path, stride=SAMPLE_STRIDE, budget=budget) as reader:
        for frame in reader:
            waiting.append((frame, reader.hold()))
            cut = detector.process(frame)
            if cut is not None:  # a new shot starts (decided up to `lag` sampled frames late)
                new_shot(cut, frame.pts_ms)
            while len(waiting) > detector.lag + 1:
                selector.offer(*waiting.popleft())
        for cut in detector.flush():
            new_shot(cut, reader.last_pts_ms)
        offer_before(float("inf"))
        end_shot()
        if len(chosen) < min_keyframes and spares:
            fill = spread(spares, min_keyframes - len(chosen))
            chosen = sorted(chosen + [selector.convert(c) for c in fill], key=lambda kf: kf.index)
        chosen = spread(chosen, max_keyframes)
        if not chosen:
            raise MediaError(str(path), "no decodable video frames")
        fps = reader.fps
        last_ms = reader.last_pts_ms
        frames = reader.frames_read
        duration = last_ms + (1000.0 / fps if fps > 0 else 0.0)
        return VideoKeyframes(
            path=str(path), keyframes=chosen, cuts=cuts, shot_starts_ms=shot_starts,
            frames=frames, duration_ms=duration, fps=fps, width=reader.width, height=reader.height,
            rotation=reader.rotation, errors=list(reader.warnings),
        )


def _within_budget(keyframes: list, budget: int) -> list:
    """Thin an over-long list evenly, so long videos stay covered end to end in bounded memory."""
    if len(keyframes) <= 2 * budget:
        return keyframes
    return keyframes[::2]


def spread(keyframes: list, k: int) -> list:
    """k keyframes spread evenly over the video (all of them if there are fewer)."""
    if len(keyframes) <= k:
        return keyframes
    picks = np.linspace(0, len(keyframes) - 1, k).round().astype(int)
    return [keyframes[i] for i in picks]
