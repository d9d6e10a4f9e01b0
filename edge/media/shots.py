"""Shot-boundary detectors over luma thumbnails.

One small interface, as PySceneDetect's `process_frame`: `process(frame)`
returns the frame index where a new shot starts, if it decided one on this
sampled frame (detectors that look ahead decide a few frames late, so the
index can be an earlier frame's), else None. `flush()` is called at the end
of the video and returns the cuts still pending. `cuts` keeps them all.

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
from collections.abc import Callable

import cv2
import numpy as np

from edgefed.common.config import FeatureSettings
from edgefed.edge.media.decode import SampledFrame


class ShotDetector(ABC):
    """Consumes sampled frames in order; returns each cut as it decides it, and keeps them in `cuts`."""

    def __init__(self, min_shot_frames: int) -> None:
        self.min_shot_frames = min_shot_frames
        self.cuts: list[int] = []

    def _accept(self, index: int) -> int | None:
        """The cut, unless it would make a shot shorter than `min_shot_frames`."""
        last = self.cuts[-1] if self.cuts else 0
        if index - last < self.min_shot_frames:
            return None
        self.cuts.append(index)
        return index

    @abstractmethod
    def process(self, frame: SampledFrame) -> int | None:
        """Look at the next sampled frame; the frame index of a new shot's start if one was decided."""

    def flush(self) -> list[int]:
        """End of video: the cuts of decisions still pending."""
        return []


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

    def process(self, frame: SampledFrame) -> int | None:
        cut = None
        if self._previous is not None and frame_score(self._previous, frame) >= self.threshold:
            cut = self._accept(frame.index)
        self._previous = frame
        return cut


class AdaptiveDetector(ShotDetector):
    """A cut where the score exceeds `ratio` x the mean of the `window` scores on each side."""

    def __init__(self, ratio: float = 3.0, min_score: float = 12.0, window: int = 2, min_shot_frames: int = 15) -> None:
        super().__init__(min_shot_frames)
        self.ratio, self.min_score, self.window = ratio, min_score, window
        self._previous: SampledFrame | None = None
        self._scores: deque[tuple[int, float]] = deque(maxlen=2 * window + 1)

    def process(self, frame: SampledFrame) -> int | None:
        cut = None
        if self._previous is not None:
            self._scores.append((frame.index, frame_score(self._previous, frame)))
            if len(self._scores) == self._scores.maxlen:
                cut = self._decide(self.window)
        self._previous = frame
        return cut

    def _decide(self, centre: int) -> int | None:
        index, score = self._scores[centre]
        others = [s for i, (_, s) in enumerate(self._scores) if i != centre]
        average = sum(others) / max(len(others), 1)
        if score >= self.min_score and score >= self.ratio * max(average, 1e-3):
            return self._accept(index)
        return None

    def flush(self) -> list[int]:
        # The last `window` scores never had a full right-hand neighbourhood.
        if len(self._scores) <= self.window:
            return []
        decided = (self._decide(c) for c in range(max(0, len(self._scores) - self.window), len(self._scores)))
        return [cut for cut in decided if cut is not None]


class FadeDetector(ShotDetector):
    """A cut in the middle of every run of near-black frames (fade out, fade in).

    Black is Y=16 in the limited range most video uses, hence a level above 16.
    """

    def __init__(self, black_level: float = 24.0, min_shot_frames: int = 15) -> None:
        super().__init__(min_shot_frames)
        self.black_level = black_level
        self._dark_since: int | None = None
        self._seen_light = False

    def process(self, frame: SampledFrame) -> int | None:
        cut = None
        dark = float(frame.luma.mean()) < self.black_level
        if dark and self._dark_since is None:
            self._dark_since = frame.index
        elif not dark:
            if self._dark_since is not None and self._seen_light:
                cut = self._accept((self._dark_since + frame.index) // 2)
            self._dark_since = None
            self._seen_light = True
        return cut


class CombinedDetector(ShotDetector):
    """Union of several detectors' cuts, merged under one minimum shot length."""

    def __init__(self, detectors: list[ShotDetector], min_shot_frames: int = 15) -> None:
        super().__init__(min_shot_frames)
        self.detectors = detectors

    def process(self, frame: SampledFrame) -> int | None:
        found = [cut for detector in self.detectors if (cut := detector.process(frame)) is not None]
        merged = self._merge(found)
        return merged[-1] if merged else None  # min-shot-frames leaves at most one per frame

    def flush(self) -> list[int]:
        return self._merge([cut for detector in self.detectors for cut in detector.flush()])

    def _merge(self, found: list[int]) -> list[int]:
        accepted = (self._accept(c) for c in sorted(set(found)) if not self.cuts or c > self.cuts[-1])
        return [cut for cut in accepted if cut is not None]


# One builder per name of `ShotDetectorName` (tests/test_media.py keeps the two in step).
DETECTORS: dict[str, Callable[[FeatureSettings], ShotDetector]] = {
    "content": lambda f: ContentDetector(f.shot_threshold, f.min_shot_frames),
    "adaptive": lambda f: AdaptiveDetector(min_shot_frames=f.min_shot_frames),
    "fade": lambda f: FadeDetector(min_shot_frames=f.min_shot_frames),
}


def make_detector(features: FeatureSettings) -> ShotDetector:
    """The detector `shot-detector` names: content (default), adaptive, fade, or a `+` combination."""
    detectors = [DETECTORS[name](features) for name in features.shot_detectors]
    return detectors[0] if len(detectors) == 1 else CombinedDetector(detectors, features.min_shot_frames)
