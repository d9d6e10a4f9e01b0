"""Keyframe selectors: which frames of a shot represent it.

One small interface: `offer(frame, decoded)` for every sampled frame of the
current shot (with the decoded frame it holds), `end_shot()` returns the
chosen keyframes. A shot's length is
unknown until it ends, so candidates live in bins whose width doubles
whenever there are too many; memory stays O(k) however long the shot is, and
candidates are held unconverted: only the k frames finally chosen per shot
are converted to colour.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import cv2
import numpy as np

from edgefed.edge.media.decode import HeldFrame, SampledFrame
from edgefed.edge.media.frames import FrameShaper


@dataclass
class Keyframe:
    index: int
    pts_ms: float
    sharpness: float
    image: np.ndarray  # [h, w, 3] uint8 RGB, shaped for the model (edge/media/frames.py)


@dataclass
class _Candidate:
    index: int
    pts_ms: float
    sharpness: float
    frame: HeldFrame  # unconverted until chosen


def sharpness(luma: np.ndarray) -> float:
    """Variance of the Laplacian: high for crisp detail, low for blur."""
    return float(cv2.Laplacian(luma, cv2.CV_32F).var())


class KeyframeSelector(ABC):
    def __init__(self, k: int, shape: FrameShaper) -> None:
        self.k, self.shape = k, shape
        self._bin_width = 1
        self._first_index: int | None = None
        self._bins: dict[int, _Candidate] = {}

    def offer(self, frame: SampledFrame, decoded: HeldFrame) -> None:
        if self._first_index is None:
            self._first_index = frame.index
        slot = (frame.index - self._first_index) // self._bin_width
        score = self._score(frame)
        held = self._bins.get(slot)
        if held is None or self._better(score, held):
            self._bins[slot] = _Candidate(frame.index, frame.pts_ms, score, decoded)
        if len(self._bins) > 2 * self.k:
            self._coarsen()

    def _coarsen(self) -> None:
        """Double the bin width, keeping the better candidate of each merged pair."""
        self._bin_width *= 2
        merged: dict[int, _Candidate] = {}
        for slot, frame in self._bins.items():
            held = merged.get(slot // 2)
            if held is None or self._better(frame.sharpness, held):
                merged[slot // 2] = frame
        self._bins = merged

    def end_shot(self) -> tuple[list[Keyframe], list[_Candidate]]:
        """The shot's k keyframes spread over it (converted), and the other candidates (held).

        The spares let a video with too few shots still fill the model's
        keyframe slots; the caller drops them once it has enough.
        """
        candidates = [self._bins[s] for s in sorted(self._bins)]
        self._bins, self._bin_width, self._first_index = {}, 1, None
        picks = set(range(len(candidates)))
        if len(candidates) > self.k:
            picks = set(np.linspace(0, len(candidates) - 1, self.k).round().astype(int).tolist())
        chosen = [self.convert(c) for i, c in enumerate(candidates) if i in picks]
        spares = [c for i, c in enumerate(candidates) if i not in picks]
        return chosen, spares

    def convert(self, candidate: _Candidate) -> Keyframe:
        image = self.shape(candidate.frame.bgr())
        return Keyframe(candidate.index, candidate.pts_ms, candidate.sharpness, image)

    @abstractmethod
    def _score(self, frame: SampledFrame) -> float: ...

    @abstractmethod
    def _better(self, score: float, held: _Candidate) -> bool: ...


class SharpestSelector(KeyframeSelector):
    """The sharpest frame of each part of the shot."""

    def _score(self, frame: SampledFrame) -> float:
        return sharpness(frame.luma)

    def _better(self, score: float, held: _Candidate) -> bool:
        return score > held.sharpness


class EvenSelector(KeyframeSelector):
    """The first frame of each part of the shot: evenly spaced, no scoring."""

    def _score(self, frame: SampledFrame) -> float:
        return 0.0

    def _better(self, score: float, held: _Candidate) -> bool:
        return False


# One class per name of `KeyframeSelectorName` (tests/test_media.py keeps the two in step).
SELECTORS: dict[str, type[KeyframeSelector]] = {"sharpest": SharpestSelector, "even": EvenSelector}


def make_selector(name: str, k: int, shape: FrameShaper) -> KeyframeSelector:
    return SELECTORS[name](k, shape)
