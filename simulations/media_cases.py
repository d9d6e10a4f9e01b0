"""Generated videos with known structure, for media tests and benchmarks.

Each writer returns the ground truth it built in: cut frame indices, a beep's
time, the rotation it set. Flat colour shots with a moving bar keep encoding
fast at any size while giving the shot detector real motion to ignore.

The hostile files at the end are what tests/test_media_limits.py feeds the
extractor: media names on files that are not media, and real media past the
limits a device sets (MediaLimits).
"""

from __future__ import annotations

import functools
import struct
import zlib
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
    audio_codec: str = "aac",
    flashes: tuple[int, ...] = (),
    fade_ends: int = 0,
) -> CaseTruth:
    """Shots of the given lengths with hard cuts (or fades through black of `fade_frames`).

    flashes: frames washed out to near white (a camera flash; no cut).
    fade_ends: frames of fade from black at the video's start and to black at its end (no cut).
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
        elif codec.startswith("libvpx"):
            vs.options = {"deadline": "realtime", "cpu-used": "8", "threads": "1"}
        if rotation:
            vs.set_display_rotation(rotation)
        if audio_codec == "libopus":
            sample_rate = 48000  # the only rate Opus encodes
        astream = out.add_stream(audio_codec, rate=sample_rate, layout="mono") if audio else None
        pts = int(round(start_ms / 1000 / tick))
        index, total = 0, sum(shot_lengths)
        for shot, length in enumerate(shot_lengths):
            if shot:
                truth.cuts.append(index)
            for t in range(length):
                img = _shot_frame(height, width, shot, t, fps)
                if fade_frames and shot < len(shot_lengths) - 1 and t >= length - fade_frames:
                    img = (img * ((length - t - 1) / fade_frames)).astype(np.uint8)  # fade out to black
                if fade_frames and shot > 0 and t < fade_frames:
                    img = (img * (t / fade_frames)).astype(np.uint8)  # fade in from black
                if fade_ends and min(index, total - 1 - index) < fade_ends:
                    img = (img * (min(index, total - 1 - index) / fade_ends)).astype(np.uint8)
                if index in flashes:
                    img = (255 - (255 - img.astype(np.float32)) * 0.15).astype(np.uint8)
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
            _encode_wave(out, astream, _track(pts * float(tick), sample_rate, beep_ms), sample_rate,
                         astream.codec_context.frame_size or 1024)
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


def write_audio(path: str | Path, duration_s: float, sample_rate: int = 16000, codec: str | None = None,
                cover: tuple[int, int] | None = None) -> Path:
    """A stand-alone audio file (format from the extension: wav, flac, mp3, ogg, opus, m4a).

    cover: (width, height) of a PNG cover picture, stored as an attached-picture video stream (mp3).
    """
    path = Path(path)
    codec = codec or {".wav": "pcm_s16le", ".flac": "flac", ".mp3": "libmp3lame", ".ogg": "libopus",
                      ".opus": "libopus", ".m4a": "aac"}[path.suffix]
    rate = 48000 if codec == "libopus" else sample_rate
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        if cover is not None:
            picture = out.add_stream("png", rate=1)
            picture.width, picture.height = cover
            picture.pix_fmt, picture.disposition = "rgb24", av.stream.Disposition.attached_pic
            packet = av.Packet(png_frame(*cover))
            packet.stream, packet.pts, packet.dts, packet.time_base = picture, 0, 0, Fraction(1, 1)
            out.mux(packet)
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


# --- hostile files: what a device's inbox may receive -------------------------------------------------------


def write_concat_script(path: str | Path, target: str | Path, repeats: int) -> Path:
    """An FFmpeg concat script under a media name: FFmpeg's probing picks the concat demuxer, which opens
    `target` (a name relative to the script's folder) `repeats` times and decodes it as one long video."""
    path = Path(path)
    path.write_text("ffconcat version 1.0\n" + f"file '{Path(target).name}'\n" * repeats)
    return path


def write_self_concat(path: str | Path) -> Path:
    """A concat script that names itself: each open opens it again, until file descriptors run out."""
    path = Path(path)
    path.write_text(f"ffconcat version 1.0\nfile '{path.name}'\n")
    return path


@functools.lru_cache(maxsize=2)
def png_frame(width: int, height: int) -> bytes:
    """A black RGB PNG of any size, built in blocks of rows: a 12000x12000 frame is ~420 KB, and its
    432 MB of pixels are never in memory (compressing them takes a few seconds, so it is kept)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(6)
    rows = (b"\x00" + bytes(3 * width)) * max(1, (1 << 20) // (3 * width + 1))  # about 1 MB of filtered rows
    per_block = len(rows) // (3 * width + 1)
    parts = [compressor.compress(rows) for _ in range(height // per_block)]
    parts.append(compressor.compress(rows[: (height % per_block) * (3 * width + 1)]))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def write_png_mov(path: str | Path, width: int, height: int, frames: int = 1,
                  header_size: tuple[int, int] | None = None) -> Path:
    """A .mov of PNG frames (a real container, a real codec) whose frames decode to width x height RGB.

    header_size: what the stream header claims instead (a header that lies; the frames stay width x height).
    """
    path = Path(path)
    data = png_frame(width, height)
    with av.open(str(path), "w", format="mov") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height = header_size or (width, height)
        stream.pix_fmt = "rgb24"
        stream.time_base = Fraction(1, 1)
        for i in range(frames):
            packet = av.Packet(data)
            packet.stream, packet.pts, packet.dts, packet.duration = stream, i, i, 1
            packet.time_base = Fraction(1, 1)
            out.mux(packet)
    return path


def falsify_mkv_duration(path: str | Path, seconds: float) -> Path:
    """Rewrite a Matroska file's Segment Duration (EBML 0x4489) to `seconds`: a header that lies about length."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    at = data.find(b"\x44\x89")
    if at < 0:
        raise ValueError(f"{path}: no Matroska Duration element")
    size = data[at + 2] & 0x7F  # a one-byte EBML size: 0x84 (float32) or 0x88 (float64)
    scale_ms = seconds * 1000.0  # Duration is in TimecodeScale units, 1 ms by default
    data[at + 3 : at + 3 + size] = struct.pack(">f" if size == 4 else ">d", scale_ms)
    path.write_bytes(bytes(data))
    return path
