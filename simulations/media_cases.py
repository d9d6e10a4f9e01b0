"""Generated videos with known structure, for media tests and benchmarks.

Each writer returns the ground truth it built in: cut frame indices, a beep's
time, the rotation it set. Flat colour shots with a moving bar keep encoding
fast at any size while giving the shot detector real motion to ignore.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

PALETTE = np.array(
    [[230, 60, 60], [60, 200, 90], [70, 90, 230], [240, 220, 70], [200, 80, 220], [60, 210, 220], [250, 150, 50],
     [120, 120, 120], [250, 250, 250], [30, 90, 40]],
    dtype=np.uint8,
)


@dataclass
class CaseTruth:
    path: Path
    cuts: list[int] = field(default_factory=list)  # first frame of each shot after the first
    frames: int = 0
    fps: float = 0.0
    beep_ms: float | None = None
    rotation: int = 0
    has_audio: bool = False


@functools.lru_cache(maxsize=4)
def _shot_background(height: int, width: int, shot: int) -> np.ndarray:
    """A flat colour with a static block texture (so frames have detail); one per shot."""
    colour = PALETTE[shot % len(PALETTE)]
    rng = np.random.default_rng(shot)
    blocks = rng.integers(-40, 40, (8, 8, 1))
    tex = np.kron(blocks, np.ones((height // 8 + 1, width // 8 + 1, 1)))[:height, :width]
    return np.clip(colour.astype(np.int16) + tex, 0, 255).astype(np.uint8)


def _shot_frame(height: int, width: int, shot: int, t: int, fps: float) -> np.ndarray:
    """The shot's background with a bright bar moving back and forth."""
    colour = PALETTE[shot % len(PALETTE)]
    img = _shot_background(height, width, shot).copy()
    bar_w = max(2, width // 20)
    span = max(1, width - bar_w)
    travel = int(t * width / (2 * fps)) % (2 * span)
    x = travel if travel < span else 2 * span - travel  # back and forth, no jumps
    img[:, x : x + bar_w] = 255 - colour
    return img


def write_video(
    path: str | Path,
    shot_lengths: list[int],
    width: int = 320,
    height: int = 240,
    fps: int = 25,
    codec: str = "libx264",
    container: str | None = None,
    fade_frames: int = 0,
    rotation: int = 0,
    beep_ms: float | None = None,
    audio: bool = True,
    sample_rate: int = 16000,
    vfr: bool = False,
    start_ms: float = 0.0,
    gop: int | None = None,
) -> CaseTruth:
    """Shots of the given lengths with hard cuts (or fades through black of `fade_frames`).

    vfr: frame durations alternate between 1 and 2 ticks (timestamps, not index/fps, are the truth).
    start_ms: the first video frame is presented late by this much (audio starts at 0).
    beep_ms: a 1 kHz beep of 100 ms at that time in an otherwise quiet track.
    """
    path = Path(path)
    truth = CaseTruth(path=path, fps=fps, rotation=rotation, beep_ms=beep_ms, has_audio=audio)
    with av.open(str(path), "w", format=container) as out:
        vs = out.add_stream(codec, rate=fps * 2 if vfr else fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        tick = Fraction(1, fps * 2) if vfr else Fraction(1, fps)
        vs.time_base = tick
        if codec == "libx264":
            vs.options = {"preset": "ultrafast", "threads": "1", "bf": "0", **({"g": str(gop)} if gop else {})}
        if rotation:
            vs.set_display_rotation(rotation)
        astream = out.add_stream("aac", rate=sample_rate, layout="mono") if audio else None
        pts = int(round(start_ms / 1000 / tick))
        index = 0
        for shot, length in enumerate(shot_lengths):
            if shot:
                truth.cuts.append(index)
            for t in range(length):
                img = _shot_frame(height, width, shot, t, fps)
                if fade_frames and shot < len(shot_lengths) - 1 and t >= length - fade_frames:
                    img = (img * ((length - t - 1) / fade_frames)).astype(np.uint8)  # fade out to black
                if fade_frames and shot > 0 and t < fade_frames:
                    img = (img * (t / fade_frames)).astype(np.uint8)  # fade in from black
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = pts, tick
                for packet in vs.encode(frame):
                    out.mux(packet)
                pts += (1 + index % 2) if vfr else 1
                index += 1
        for packet in vs.encode(None):
            out.mux(packet)
        truth.frames = index
        if astream is not None:
            _encode_wave(out, astream, _track(pts * float(tick), sample_rate, beep_ms), sample_rate, 1024)
    return truth


def _track(duration_s: float, sample_rate: int, beep_ms: float | None) -> np.ndarray:
    n = int(duration_s * sample_rate)
    rng = np.random.default_rng(0)
    wave = rng.normal(0, 0.003, n)
    if beep_ms is not None:
        a = int(beep_ms / 1000 * sample_rate)
        b = min(n, a + sample_rate // 10)
        t = np.arange(b - a) / sample_rate
        wave[a:b] += 0.5 * np.sin(2 * np.pi * 1000 * t)
    return wave.astype(np.float32)


def write_audio(path: str | Path, duration_s: float, sample_rate: int = 16000, codec: str | None = None) -> Path:
    """A stand-alone audio file (format from the extension: wav, flac, mp3, ogg)."""
    path = Path(path)
    codec = codec or {".wav": "pcm_s16le", ".flac": "flac", ".mp3": "libmp3lame", ".ogg": "libopus"}[path.suffix]
    rate = 48000 if codec == "libopus" else sample_rate
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        t = np.arange(int(duration_s * rate)) / rate
        wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        _encode_wave(out, stream, wave, rate, stream.codec_context.frame_size or 1024)
    return path


def _encode_wave(out, stream, wave: np.ndarray, rate: int, size: int) -> None:  # noqa: ANN001
    """Encode a mono float32 wave in codec-sized frames, flush, and mux."""
    for start in range(0, len(wave), size):
        frame = av.AudioFrame.from_ndarray(wave[None, start : start + size], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
