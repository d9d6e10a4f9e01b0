"""Shot-boundary detectors over the decoder's Y, U and V thumbnails.

One small interface, as PySceneDetect's `process_frame`: `process(frame)`
returns the frame index where a new shot starts, if it decided one on this
sampled frame (detectors that look ahead decide a few frames late, so the
index can be an earlier frame's, at most `lag` sampled frames back), else
None. `flush()` is called at the end of the video and returns the cuts still
pending. `cuts` keeps them all.

`CutDetector` (the default, `cuts`) finds the hard cuts of real footage,
dark and low-contrast ones included, and the shot that starts out of a fade
through black, without firing on motion, flashes or fades (its docstring says
how). The others are simpler, and kept as options.

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

    lag = 0  # sampled frames a decision may trail the frame it places a cut at

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


def frame_change(previous: SampledFrame, current: SampledFrame) -> float:
    """Mean absolute change of Y, U and V, summed (0..765): chroma counts in full, for cuts between shots of
    one brightness; luma alone when a frame has no planar chroma."""
    change = _delta(previous.luma, current.luma)
    chroma = previous.chroma is not None and current.chroma is not None
    if chroma and previous.chroma[0].shape == current.chroma[0].shape:
        change += _delta(previous.chroma[0], current.chroma[0]) + _delta(previous.chroma[1], current.chroma[1])
    return change


def decorrelation(a: np.ndarray, b: np.ndarray) -> float:
    """1 - the correlation of two luma thumbnails (0: the same structure, whatever the brightness and
    contrast; about 1: unrelated pictures). A flat picture (black) against anything is 1."""
    x = a.astype(np.float32) - float(a.mean())
    y = b.astype(np.float32) - float(b.mean())
    norm_x, norm_y = float(np.sqrt((x * x).sum())), float(np.sqrt((y * y).sum()))
    if norm_x < 1e-3 * x.size or norm_y < 1e-3 * y.size:
        return 1.0
    return 1.0 - float((x * y).sum()) / (norm_x * norm_y)


def frame_score(previous: SampledFrame, current: SampledFrame) -> float:
    """Mean absolute change of Y, U and V averaged (0..255), like PySceneDetect's HSV average.

    Luma alone misses cuts between shots of equal brightness; chroma is free
    from the decoder's planes.
    """
    deltas = [_delta(previous.luma, current.luma)]
    if previous.chroma is not None and current.chroma is not None:
        deltas += [_delta(previous.chroma[0], current.chroma[0]), _delta(previous.chroma[1], current.chroma[1])]
    return sum(deltas) / len(deltas)


class CutDetector(ShotDetector):
    """Hard cuts and fades through black in real footage; motion, flashes, fades and camera jolts are no cut.

    A hard cut is a sampled frame whose change from the one before (`frame_change`) is
    - a spike: at least `ratio` times the mean change of the `window` frame pairs on each side (motion
      raises them all, a cut only its own; the ratio compares a scene with itself, so a dark or
      low-contrast scene is judged by its own standard), and at least `min_change`; or, out of fast
      motion, whose neighbouring changes are as large as a cut's, at least `motion_ratio` times them with
      a new picture that motion does not make: a luma decorrelation of at least `motion_decorrelation`
      and at least twice that of every neighbouring pair (a pan or a passing car moves the structure, a
      cut replaces it);
    - a new picture: the luma decorrelation of the two frames is at least `min_decorrelation` (a brightness
      step, a flash that washes the picture out or a jolt of the camera leaves the structure correlated);
    - lasting: the `ahead` frames after it still differ from the frame before it, and the frames before
      it had lasted too, each by at least half the spike (a flash is a spike out and one back).
    A fade through black spikes nowhere. A run of black frames (all but 5 % of the luma at most
    `black_level`, limited-range black being 16) that a picture came before ends with a new shot at its
    first frame that is not black, unless a cut was placed where the run began (a hard cut into black,
    which the fade-in out of it then continues) or the picture after it is the one before it (a blink).
    A fade from black at the start or to black at the end is no cut.

    Decisions trail the frame by `max(window, ahead)` sampled frames (`lag`).
    """

    def __init__(self, ratio: float = 4.0, min_change: float = 4.0, min_decorrelation: float = 0.1, window: int = 3,
                 ahead: int = 2, black_level: int = 24, min_shot_frames: int = 15, motion_ratio: float = 2.0,
                 motion_decorrelation: float = 0.6) -> None:
        super().__init__(min_shot_frames)
        self.ratio, self.min_change, self.min_decorrelation = ratio, min_change, min_decorrelation
        self.motion_ratio, self.motion_decorrelation = motion_ratio, motion_decorrelation
        self.window, self.ahead, self.black_level = window, ahead, black_level
        self.lag = max(window, ahead)
        # the last frames and the changes between them: _changes[j] is _frames[j] -> _frames[j + 1]
        self._frames: deque[SampledFrame] = deque(maxlen=2 * self.lag + 3)
        self._changes: deque[float] = deque(maxlen=2 * self.lag + 2)
        self._black_since: int | None = None  # first frame of the current black run
        self._last_picture: SampledFrame | None = None  # the last frame that was not black

    def process(self, frame: SampledFrame) -> int | None:
        found = []
        if self._frames:
            self._changes.append(frame_change(self._frames[-1], frame))
        self._frames.append(frame)
        if len(self._changes) > self.lag:
            found.append(self._decide(len(self._changes) - 1 - self.lag))
        found.append(self._out_of_black(frame))
        decided = [cut for cut in found if cut is not None]
        return decided[-1] if decided else None  # min-shot-frames leaves at most one per frame

    def flush(self) -> list[int]:
        pending = (self._decide(c) for c in range(max(0, len(self._changes) - self.lag), len(self._changes)))
        return [cut for cut in pending if cut is not None]

    def _decide(self, c: int) -> int | None:
        """The cut at the frame after change c, if that change is one."""
        change = self._changes[c]
        if change < self.min_change:
            return None
        around = range(max(0, c - self.window), min(len(self._changes), c + self.window + 1))
        neighbours = [self._changes[j] for j in around if j != c]
        usual = sum(neighbours) / len(neighbours) if neighbours else 0.0
        # + 0.5: a still scene's changes are compression noise, not zero
        if change < self.ratio * (usual + 0.5) and not self._replaced_in_motion(c, around, change, usual + 0.5):
            return None
        before, after = c, c + 1
        frames = self._frames
        for k in range(1, self.ahead + 1):
            if after + k < len(frames) and frame_change(frames[before], frames[after + k]) < change / 2:
                return None  # the new picture does not last: a flash
            if before - k >= 0 and frame_change(frames[before - k], frames[after]) < change / 2:
                return None  # the old one had not lasted: the end of a flash
        if self._decorrelation(c) < self.min_decorrelation:
            return None
        return self._accept(self._frames[after].index)

    def _replaced_in_motion(self, c: int, around: range, change: float, usual: float) -> bool:
        """Change c, too small a spike against fast motion, replaces the picture all the same."""
        if change < self.motion_ratio * usual:
            return False
        replaced = self._decorrelation(c)
        return replaced >= self.motion_decorrelation and all(
            replaced >= 2 * self._decorrelation(j) for j in around if j != c)

    def _decorrelation(self, c: int) -> float:
        return decorrelation(self._frames[c].luma, self._frames[c + 1].luma)

    def _out_of_black(self, frame: SampledFrame) -> int | None:
        if np.count_nonzero(frame.luma > self.black_level) <= 0.05 * frame.luma.size:
            if self._black_since is None:
                self._black_since = frame.index
            return None
        cut = None
        if self._black_since is not None and self._last_picture is not None:
            cut_into_black = bool(self.cuts) and self.cuts[-1] >= self._black_since - 2
            if not cut_into_black and frame_change(self._last_picture, frame) >= self.min_change:
                cut = self._accept(frame.index)
        self._black_since = None
        self._last_picture = frame
        return cut


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
        self.lag = window
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
        self.lag = max(d.lag for d in detectors)

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
    "cuts": lambda f: CutDetector(ratio=f.cut_ratio, min_shot_frames=f.min_shot_frames),
    "content": lambda f: ContentDetector(f.shot_threshold, f.min_shot_frames),
    "adaptive": lambda f: AdaptiveDetector(min_shot_frames=f.min_shot_frames),
    "fade": lambda f: FadeDetector(min_shot_frames=f.min_shot_frames),
}


def make_detector(features: FeatureSettings) -> ShotDetector:
    """The detector `shot-detector` names: cuts (default), content, adaptive, fade, or a `+` combination."""
    detectors = [DETECTORS[name](features) for name in features.shot_detectors]
    return detectors[0] if len(detectors) == 1 else CombinedDetector(detectors, features.min_shot_frames)
