"""Shape decoded frames for the model: letterboxed for the tiny encoder, or the checkpoint's own geometry."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from edgefed.common.model.inputs import FrameInput
from edgefed.common.preprocessing import geometry

# A decoded BGR frame [H, W, 3] uint8 -> the model's RGB keyframe [h, w, 3] uint8.
FrameShaper = Callable[[np.ndarray], np.ndarray]


def frame_shaper(frames: FrameInput) -> FrameShaper:
    """How keyframes are shaped for `frames`: the tiny encoder's letterbox, or the checkpoint's image
    processor's resize and crop (common/preprocessing/frames.py, matched to transformers)."""
    if frames.geometry is None:
        return lambda bgr: cv2.cvtColor(letterbox(bgr, frames.height), cv2.COLOR_BGR2RGB)
    settings = frames.geometry
    return lambda bgr: geometry(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), settings)[0].permute(1, 2, 0).numpy()


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Fit `image` (H, W, 3) into a size x size black canvas without distorting it."""
    h, w = image.shape[:2]
    while max(h, w) >= 4 * size:
        # Halve by striding first: INTER_AREA on the full frame costs ~4x more
        # and the strided view is free.
        image = image[::2, ::2]
        h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    # INTER_AREA is the right filter for shrinking (no aliasing of fine patterns).
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = resized
    return canvas
