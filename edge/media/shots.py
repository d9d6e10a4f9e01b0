"""Shot-boundary detectors over luma thumbnails.

One small interface: `process(frame) -> bool` says whether a new shot starts
at this sampled frame (decisions may come a few frames late for detectors
that look ahead; they report the frame index of the cut through `cuts`).
`flush()` is called at the end of the video.

`ContentDetector` follows PySceneDetect's: the mean absolute difference
between consecutive (downscaled) frames above a threshold marks a cut, and a
minimum shot length suppresses flicker. Ours averages the Y, U and V planes the
decoder hands over unconverted, where PySceneDetect converts every frame to
HSV first. `AdaptiveDetector` compares each score with its
neighbours' average (PySceneDetect's AdaptiveDetector), which tolerates fast
camera motion. `FadeDetector` catches fades through black, which frame
differences miss because each step is small.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

import cv2
import numpy as np

from edgefed.edge.media.decode import SampledFrame


class ShotDetector(ABC):
    """Consumes sampled frames in order; accumulates cut frame indices in `cuts`."""

    def __init__(self, min_shot_frames: int) -> None:
        self.min_shot_frames = min_shot_frames
        self.cuts: list[int] = []

    def _accept(self, index: int) -> bool:
        last = self.cuts[-1] if self.cuts else 0
        if index - last < self.min_shot_frames:
            return False
        self.cuts.append(index)
        return True

    @abstractmethod
    def process(self, frame: SampledFrame) -> None:
        """Look at the next sampled frame."""

    def flush(self) -> None:
        """End of video: settle decisions still pending."""


def _delta(a: np.ndarray, b: np.ndarray) -> float:
    return cv2.mean(cv2.absdiff(a, b))[0]  # saturating uint8 |a - b|, no int16 copies


def frame_score(previous: SampledFrame, current: SampledFrame) -> float:
    """Mean absolute change of Y, U and V averaged (0..255), like PySceneDetect's HSV average.

    Luma alone misses cuts between shots of equal brightness; chroma is free
    from the decoder's planes.
    """
    deltas = [_delta(previous.luma, current.luma)]
    if previous.chroma is not None and current.chroma is not None:
        deltas += [_delta(previous.chroma[0], current.chroma[0]), _delta(previous.chroma[1], current.chroma[1])]
    return sum(deltas) / len(deltas)


class ContentDetector(ShotDetector):
    def __init__(self, threshold: float = 20.0, min_shot_frames: int = 15) -> None:
        super().__init__(min_shot_frames)
        self.threshold = threshold
        self._previous: SampledFrame | None = None

    def process(self, frame: SampledFrame) -> None:
        if self._previous is not None and frame_score(self._previous, frame) >= self.threshold:
            self._accept(frame.index)
        self._previous = frame


class AdaptiveDetector(ShotDetector):
    """A cut where the score exceeds `ratio` x the mean of the `window` scores on each side."""

    def __init__(self, ratio: float = 3.0, min_score: float = 12.0, window: int = 2, min_shot_frames: int = 15) -> None:
        super().__init__(min_shot_frames)
        self.ratio, self.min_score, self.window = ratio, min_score, window
        self._previous: SampledFrame | None = None
        self._scores: deque[tuple[int, float]] = deque(maxlen=2 * window + 1)

    def process(self, frame: SampledFrame) -> None:
        if self._previous is not None:
            self._scores.append((frame.index, frame_score(self._previous, frame)))
            if len(self._scores) == self._scores.maxlen:
                self._decide(self.window)
        self._previous = frame

    def _decide(self, centre: int) -> None:
        index, score = self._scores[centre]
        others = [s for i, (_, s) in enumerate(self._scores) if i != centre]
        average = sum(others) / max(len(others), 1)
        if score >= self.min_score and score >= self.ratio * max(average, 1e-3):
            self._accept(index)

    def flush(self) -> None:
        # The last `window` scores never had a full right-hand neighbourhood.
        for centre in range(max(0, len(self._scores) - self.window), len(self._scores)):
            if len(self._scores) > self.window:
                self._decide(centre)


class FadeDetector(ShotDetector):
    """A cut in the middle of every run of near-black frames (fade out, fade in).

    Black is Y=16 in the limited range most video uses, hence a level above 16.
    """

    def __init__(self, black_level: float = 24.0, min_shot_frames: int = 15) -> None:
        super().__init__(min_shot_frames)
        self.black_level = black_level
        self._dark_since: int | None = None
        self._seen_light = False

    def process(self, frame: SampledFrame) -> None:
        dark = float(frame.luma.mean()) < self.black_level
        if dark and self._dark_since is None:
            self._dark_since = frame.index
        elif not dark:
            if self._dark_since is not None and self._seen_light:
                self._accept((self._dark_since + frame.index) // 2)
            self._dark_since = None
            self._seen_light = True


class CombinedDetector(ShotDetector):
    """Union of several detectors' cuts, merged under one minimum shot length."""

    def __init__(self, detectors: list[ShotDetector], min_shot_frames: int = 15) -> None:
        super().__init__(min_shot_frames)
        self.detectors = detectors

    def process(self, frame: SampledFrame) -> None:
        for detector in self.detectors:
            detector.process(frame)
        self._merge()

    def flush(self) -> None:
        for detector in self.detectors:
            detector.flush()
        self._merge()

    def _merge(self) -> None:
        pending = sorted({c for d in self.detectors for c in d.cuts if not self.cuts or c > self.cuts[-1]})
        for cut in pending:
            self._accept(cut)


def make_detector(name: str, threshold: float, min_shot_frames: int) -> ShotDetector:
    """`content` (default), `adaptive`, or either with `+fade` (e.g. `content+fade`)."""
    parts = name.split("+")
    detectors: list[ShotDetector] = []
    for part in parts:
        if part == "content":
            detectors.append(ContentDetector(threshold, min_shot_frames))
        elif part == "adaptive":
            detectors.append(AdaptiveDetector(min_shot_frames=min_shot_frames))
        elif part == "fade":
            detectors.append(FadeDetector(min_shot_frames=min_shot_frames))
        else:
            raise ValueError(f"unknown shot detector {part!r} (content, adaptive, fade)")
    return detectors[0] if len(detectors) == 1 else CombinedDetector(detectors, min_shot_frames)
