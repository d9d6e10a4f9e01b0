"""The video decode loop, written once.

PyAV decodes every frame (with FFmpeg's frame threading; measured here it
keeps pace with OpenCV's `grab()` loop, and unlike OpenCV it hands over the
decoded planes without any conversion). Only every `stride`-th frame is
looked at, as a small strided view of its luma plane: shot detection and
sharpness run on that. A colour frame is converted only when a keyframe
selector asks for the current one, which is rare; the image work after that
is OpenCV's.

Timestamps are the frames' presentation times (pts x time base, in
milliseconds on the container's timeline, the same timeline the audio
decoder uses), so variable frame rate and a late first frame are handled; the
colour frame is the picture as displayed: square pixels (the stream's sample
aspect ratio applied), upright (its rotation, from the display matrix), and
without letterbox or pillarbox bars (black borders cropped).

The file is opened through edge/media/container.py (allowed containers, plain
files, header limits) and every decoded frame is checked against its
MediaBudget: frame count, time since the first frame, wall time. The decoder
itself refuses a frame over max-media-pixels before allocating it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import av
import cv2
import numpy as np

from edgefed.edge.media.container import decoder_options, open_container, video_streams
from edgefed.edge.media.errors import MediaError, ffmpeg_reason
from edgefed.edge.media.limits import MediaBudget

_PLANAR_YUV = ("yuv", "yuvj", "nv12", "nv21")


@dataclass
class SampledFrame:
    index: int  # decode order, 0-based
    pts_ms: float  # presentation time
    luma: np.ndarray  # [h, w] uint8 thumbnail of the luma plane
    chroma: tuple[np.ndarray, np.ndarray] | None = None  # U, V thumbnails when the frame is planar YUV


class VideoReader:
    """Iterate over a video's sampled frames; `colour()` converts the current one."""

    def __init__(self, path: str | os.PathLike, stride: int = 2, thumb_width: int = 64,
                 budget: MediaBudget | None = None) -> None:
        self.path = str(path)
        self.budget = budget or MediaBudget.start()
        self.stride = max(1, stride)
        self.thumb_width = thumb_width
        self._container = open_container(self.path, self.budget)
        streams = video_streams(self._container)
        if not streams:
            self._container.close()
            raise MediaError(self.path, "no video stream")
        self._stream = streams[0]
        if self._stream.codec_context is None:
            self._container.close()
            raise MediaError(self.path, "unsupported video codec (no decoder in this FFmpeg build)")
        # The decoder refuses, before allocating it, a frame larger than the limit (whatever the header said).
        self._stream.codec_context.options = decoder_options(self.budget)
        # Frame threading with one thread per core keeps pace with OpenCV's
        # grab() here; slice/auto threading measured ~10% slower.
        self._stream.thread_type = "FRAME"
        self._stream.codec_context.thread_count = os.cpu_count() or 1
        ctx = self._stream.codec_context
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self.width, self.height = int(ctx.width), int(ctx.height)
        sar = self._stream.sample_aspect_ratio or ctx.sample_aspect_ratio
        # pixels as wide as this when displayed (1: square; a corrupt header's absurd value is ignored)
        self.pixel_aspect = float(sar) if sar and 0.1 <= float(sar) <= 10 else 1.0
        self.rotation = 0
        self.frames_read = 0
        self.last_pts_ms = 0.0
        self.warnings: list[str] = []
        self._current: av.VideoFrame | None = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def __iter__(self) -> Iterator[SampledFrame]:
        index = 0
        last_ms = first_ms = None
        try:
            for frame in self._container.decode(self._stream):
                pts_ms = frame.time * 1000.0 if frame.time is not None else (last_ms or 0.0)
                if first_ms is None:
                    first_ms = pts_ms
                self.budget.check_video_frame(self.path, index + 1, (pts_ms - first_ms) / 1000.0)
                last_ms = pts_ms
                self.frames_read = index + 1
                self.last_pts_ms = pts_ms
                if index % self.stride == 0:
                    self._current = frame
                    self.rotation = int(frame.rotation or 0) % 360
                    luma, chroma = _planes(frame)
                    half = self.thumb_width // 2
                    yield SampledFrame(
                        index, pts_ms, _thumb(luma, self.thumb_width),
                        None if chroma is None else (_thumb(chroma[0], half), _thumb(chroma[1], half)),
                    )
                index += 1
        except av.error.FFmpegError as err:
            if index == 0:
                raise MediaError(self.path, f"video decode failed ({ffmpeg_reason(err)})") from None
            # A damaged tail: keep what decoded, say where it stopped.
            self.warnings.append(f"decode stopped at frame {index}: {ffmpeg_reason(err)}")
        if index == 0:
            raise MediaError(self.path, "no decodable video frames (truncated or corrupt stream)")

    def hold(self) -> HeldFrame:
        """Keep the current sampled frame, unconverted, for a later `bgr()`.

        Holding a decoded frame costs its buffer (about 1.4 MB at 720p) and no
        conversion; selectors hold a few candidates per shot and convert only
        the ones they finally choose.
        """
        if self._current is None:
            raise MediaError(self.path, "hold() called before the first frame")
        return HeldFrame(self._current, self.rotation, self.pixel_aspect)


class HeldFrame:
    def __init__(self, frame: av.VideoFrame, rotation: int, pixel_aspect: float = 1.0) -> None:
        self._frame = frame
        self._rotation = rotation
        self._pixel_aspect = pixel_aspect

    def bgr(self) -> np.ndarray:
        """The frame as BGR, as displayed: bars cropped, square pixels, upright (one colour conversion)."""
        image = without_bars(self._frame.to_ndarray(format="bgr24"))
        if abs(self._pixel_aspect - 1.0) > 0.01:
            h, w = image.shape[:2]
            image = cv2.resize(image, (max(1, round(w * self._pixel_aspect)), h), interpolation=cv2.INTER_AREA
                               if self._pixel_aspect < 1 else cv2.INTER_LINEAR)
        return _upright(image, self._rotation)


BAR_LEVEL = 20  # a border row or column is a bar while nearly all of it is at most this dark (8-bit BGR, black 0)
MAX_BARS = 0.4  # of the width or height on each side: more is no bar but a dark picture


def without_bars(bgr: np.ndarray) -> np.ndarray:
    """`bgr` without the black bars around the picture (letterbox above and below, pillarbox left and
    right): rows and columns at its edges in which at most 1 % of the pixels are brighter than
    BAR_LEVEL. A picture that is dark all over, or whose bars would take more than MAX_BARS of a side,
    is left whole. Looked for on every second row and column (a bar's edge is found within 2 pixels)."""
    sample = bgr[::2, ::2]
    bright = np.maximum(np.maximum(sample[..., 0], sample[..., 1]), sample[..., 2]) > BAR_LEVEL
    rows = np.flatnonzero(np.count_nonzero(bright, axis=1) > 0.01 * bright.shape[1]) * 2
    cols = np.flatnonzero(np.count_nonzero(bright, axis=0) > 0.01 * bright.shape[0]) * 2
    if not len(rows) or not len(cols):
        return bgr
    h, w = bgr.shape[:2]
    first_row, last_row, first_col, last_col = rows[0], min(rows[-1] + 2, h), cols[0], min(cols[-1] + 2, w)
    if max(first_row, h - last_row) > MAX_BARS * h or max(first_col, w - last_col) > MAX_BARS * w:
        return bgr
    return bgr[first_row:last_row, first_col:last_col]


def _planes(frame: av.VideoFrame) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Y (and U, V when planar) as uint8 views, without conversion where the format allows."""
    name = frame.format.name
    if name.startswith(("yuv", "yuvj")) and "p10" not in name and "p12" not in name and len(frame.planes) >= 3:
        y, u, v = (_view(frame.planes[i]) for i in range(3))
        return y, (u, v)
    if name.startswith(("nv12", "nv21")):
        return _view(frame.planes[0]), None
    return frame.to_ndarray(format="gray"), None


def _view(plane: av.video.plane.VideoPlane) -> np.ndarray:
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]


def _thumb(plane: np.ndarray, width: int) -> np.ndarray:
    """A strided sample about `width` pixels wide: the view is free, the copy is small."""
    step = max(1, plane.shape[1] // width)
    return np.ascontiguousarray(plane[::step, ::step])


def _upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a display rotation (degrees counter-clockwise, FFmpeg's convention)."""
    if rotation == 90:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    if rotation == 180:
        return cv2.rotate(image, cv2.ROTATE_180)
    if rotation == 270:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    return image
