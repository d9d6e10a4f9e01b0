"""Shot-boundary detectors over luma thumbnails.

One small interface: `process(frame) -> bool` says whether a new shot starts
at this sampled frame (decisions may come a few frames late for detectors
that look ahead; they report the frame index of the cut through `cuts`).
`flush()` is called at the end of the video.

`ContentDetector` follows PySceneDetect's: the mean absolute difference
between consecutive (downscaled) frames above a threshold marks a cut, and a
minimum shot length suppresses flicker. Ours looks at luma only, which is what
the decoder gives us for free; hard cuts between shots move luma far more than
the 8-bit noise floor. `AdaptiveDetector` compares each score with its
neighbours' average (PySceneDetect's AdaptiveDetector), which tolerates fast
camera motion. `FadeDetector` catches fades through black, which frame
differences miss because each step is small.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

import numpy as np

from edge.media.decode import SampledFrame


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


def frame_score(previous: np.ndarray, current: np.ndarray) -> float:
    """Mean absolute luma difference, 0..255."""
    return float(np.abs(current.astype(np.int16) - previous.astype(np.int16)).mean())


class ContentDetector(ShotDetector):
    def __init__(self, threshold: float = 20.0, min_shot_frames: int = 15) -> None:
        super().__init__(min_shot_frames)
        self.threshold = threshold
        self._previous: np.ndarray | None = None

    def process(self, frame: SampledFrame) -> None:
        if self._previous is not None and frame_score(self._previous, frame.luma) >= self.threshold:
            self._accept(frame.index)
        self._previous = frame.luma


class AdaptiveDetector(ShotDetector):
    """A cut where the score exceeds `ratio` x the mean of the `window` scores on each side."""

    def __init__(self, ratio: float = 3.0, min_score: float = 12.0, window: int = 2, min_shot_frames: int = 15) -> None:
        super().__init__(min_shot_frames)
        self.ratio, self.min_score, self.window = ratio, min_score, window
        self._previous: np.ndarray | None = None
        self._scores: deque[tuple[int, float]] = deque(maxlen=2 * window + 1)

    def process(self, frame: SampledFrame) -> None:
        if self._previous is not None:
            self._scores.append((frame.index, frame_score(self._previous, frame.luma)))
            if len(self._scores) == self._scores.maxlen:
                self._decide(self.window)
        self._previous = frame.luma

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
    """A cut in the middle of every run of near-black frames (fade out, fade in)."""

    def __init__(self, black_level: float = 16.0, min_shot_frames: int = 15) -> None:
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
