"""Keyframes of a clip: evenly spaced over its duration (the spine's simple selector).

Decodes with OpenCV's FFmpeg backend, streaming: only the chosen frames are
kept, and only they are colour-converted and resized.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge.media.errors import MediaError
from edge.media.frames import letterbox


@dataclass
class Keyframes:
    frames: np.ndarray  # [k, size, size, 3] uint8 RGB
    timestamps_ms: list[float]  # presentation time of each frame
    duration_ms: float


def extract_keyframes(path: str, k: int, size: int) -> Keyframes:
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        raise MediaError(path, "not a readable video (OpenCV/FFmpeg could not open it)")
    try:
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if count <= 0:
            raise MediaError(path, "video stream reports no frames")
        wanted = sorted({min(count - 1, int((i + 0.5) * count / k)) for i in range(k)})
        frames: list[np.ndarray] = []
        stamps: list[float] = []
        last_ms = 0.0
        index = 0
        while wanted and index <= wanted[-1]:
            if not cap.grab():
                break
            last_ms = float(cap.get(cv2.CAP_PROP_POS_MSEC))
            if index in wanted:
                ok, bgr = cap.retrieve()
                if ok and bgr is not None:
                    rgb = cv2.cvtColor(letterbox(bgr, size), cv2.COLOR_BGR2RGB)
                    frames.append(rgb)
                    stamps.append(last_ms)
            index += 1
        if not frames:
            raise MediaError(path, "no decodable video frames")
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        duration = count * 1000.0 / fps if fps > 0 else last_ms
        return Keyframes(np.stack(frames), stamps, duration)
    finally:
        cap.release()
