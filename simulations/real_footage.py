"""Real footage with known cuts, for the shot detector's tests and benchmark.

Two sets, both from the real clips in a folder such as tests/data/real/ (its README says where each
clip comes from and under which license):

- the clips themselves, whose hard cuts were checked by eye (`cuts.json` beside them: `real_clips`);
- clips spliced from their shots (`SPLICES`, written by `write_splice`): each piece is a stretch of one
  real shot, so every boundary between pieces is a hard cut at a frame known by construction, between
  real pictures. They bring what the real clips lack, each in a container and codec of its own: cuts
  between dark, low-contrast shots (the pieces darkened), between shots of one palette, a cut 19 frames
  into an anamorphic 1080p mkv (1440x1080 stored, non-square pixels), variable frame rate with rotation
  metadata, letterboxing in a VP9/Opus webm, fades through black between shots, flashes and fades that
  are no cut, and a clip shorter than `min-shot-frames`.

A fade through black between two pieces is a cut at its first frame that leaves black (as the real
clips' hand-checked cut from black into a dark scene). A fade from black at a clip's start, one to black
at its end, a dip in brightness and a flash inside a piece are not cuts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from edgefed.simulations.media_cases import CaseTruth, _encode_wave, _track

CUTS_FILE = "cuts.json"


@dataclass(frozen=True)
class RealClip:
    path: Path
    cuts: list[int]  # first frame of each shot after the first, checked by eye (a cut matches within 2 frames)
    frames: int


def real_clips(folder: str | Path) -> list[RealClip]:
    """The real clips of `folder` and their hand-checked cuts (its cuts.json)."""
    folder = Path(folder)
    listed = json.loads((folder / CUTS_FILE).read_text())["clips"]
    return [RealClip(folder / name, list(clip["cuts"]), int(clip["frames"])) for name, clip in listed.items()]


@dataclass(frozen=True)
class Piece:
    """Frames [start, start + frames) of one real clip (all inside one of its shots)."""

    source: str
    start: int
    frames: int
    look: str = "as-is"  # as-is | dark (a night version: dim and flat, colours kept) | flat (washed out, low
    # contrast, mid-grey) | grey (no colour)
    fade_in: int = 0  # frames fading from black at the piece's start
    fade_out: int = 0  # frames fading to black at its end
    flashes: tuple[int, ...] = ()  # frames (within the piece) washed out to near white
    dip: tuple[int, int] = (0, 0)  # (first frame, frames): brightness halves and comes back, inside the piece


@dataclass(frozen=True)
class Splice:
    name: str  # file name; its extension picks the container
    pieces: tuple[Piece, ...]
    width: int
    height: int
    fps: int = 25
    codec: str = "libx264"
    audio_codec: str = "aac"
    vfr: bool = False  # frame durations alternate between one and two ticks
    rotation: int = 0  # display rotation (metadata only: the frames are stored unrotated)
    pixel_aspect: Fraction = Fraction(1, 1)  # sample aspect ratio written in the stream
    bars: int = 0  # rows of black above and below the picture (letterboxing), of `height`


def _look(bgr: np.ndarray, look: str) -> np.ndarray:
    if look == "dark":  # a night version: a fifth of the contrast, just above black, hue and saturation kept
        return (bgr.astype(np.float32) * 0.2 + 6).astype(np.uint8)
    if look == "flat":  # washed out: a third of the contrast around mid-grey
        return (bgr.astype(np.float32) * 0.3 + 90).astype(np.uint8)
    if look == "grey":
        return cv2.cvtColor(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return bgr


SPLICES: tuple[Splice, ...] = (
    Splice("dark_low_contrast.mp4", (
        Piece("issue-195-aspect-ratio.mp4", 305, 90, "dark"), Piece("issue-195-aspect-ratio.mp4", 425, 55, "dark"),
        Piece("testvideo.mp4", 250, 75, "dark"), Piece("chaplin.mp4", 20, 90, "dark"),
        Piece("issue-195-aspect-ratio.mp4", 175, 90, "dark")), 640, 360),
    Splice("one_palette_1080p.mkv", (
        Piece("issue-195-aspect-ratio.mp4", 305, 19), Piece("issue-195-aspect-ratio.mp4", 425, 45),
        Piece("issue-195-aspect-ratio.mp4", 75, 40), Piece("issue-195-aspect-ratio.mp4", 5, 40),
        Piece("issue-195-aspect-ratio.mp4", 490, 40)), 1440, 1080, fps=24, pixel_aspect=Fraction(4, 3)),
    Splice("vfr_rotated.mp4", (
        Piece("big_buck_bunny_0_30.webm", 290, 70), Piece("testvideo.mp4", 40, 70),
        Piece("big_buck_bunny_0_30.webm", 380, 70), Piece("testvideo.mp4", 440, 80)), 640, 360, vfr=True,
        rotation=90),
    Splice("letterboxed_vp9_opus.webm", (
        Piece("chaplin.mp4", 0, 80), Piece("testvideo.mp4", 250, 70), Piece("issue-195-aspect-ratio.mp4", 175, 70),
        Piece("big_buck_bunny_0_30.webm", 560, 80)), 640, 480, codec="libvpx-vp9", audio_codec="libopus", bars=60),
    Splice("fades_and_flashes.mp4", (
        Piece("big_buck_bunny_0_30.webm", 40, 110, fade_in=15, flashes=(50, 51), fade_out=12),
        Piece("testvideo.mp4", 440, 120, fade_in=12, dip=(40, 30), flashes=(95,)),
        Piece("issue-195-aspect-ratio.mp4", 175, 90, fade_out=20)), 640, 360),
    Splice("shorter_than_a_shot.mp4", (Piece("testvideo.mp4", 50, 10),), 640, 360),
)


# Stretches of the real clips inside one shot, away from its fades: (first frame, end), by clip; pieces of
# one scene (the same id) are never put next to each other (moviepy_example2 is Big Buck Bunny's first shot).
SHOTS: dict[str, list[tuple[int, int, str]]] = {
    "testvideo.mp4": [(32, 178, "tv-leaf"), (246, 328, "tv-deer"), (426, 678, "tv-rock")],
    "issue-195-aspect-ratio.mp4": [(2, 68, "i195-hands"), (72, 168, "i195-bowl"), (172, 299, "i195-shop"),
                                   (303, 419, "i195-mug"), (423, 482, "i195-board"), (486, 626, "i195-red")],
    "big_buck_bunny_0_30.webm": [(34, 281, "bbb-meadow"), (285, 374, "bbb-stream"), (378, 549, "bbb-bird"),
                                 (553, 718, "bbb-title")],
    "chaplin.mp4": [(0, 240, "chaplin")],
    "moviepy_example2.mp4": [(0, 47, "bbb-meadow")],
}


def random_splices(seed: int, count: int) -> list[Splice]:
    """`count` clips of 3 to 5 pieces of the real shots, drawn with `seed`: any shot, any look, hard cuts or
    fades through black, some flashes, at 640x360 or 960x540 - footage no detector setting was chosen on."""
    rng = np.random.default_rng(seed)
    shots = [(source, start, end, scene) for source, spans in SHOTS.items() for start, end, scene in spans]
    splices = []
    for n in range(count):
        pieces: list[Piece] = []
        scene = None
        for i in range(int(rng.integers(3, 6))):
            source, start, end, scene = _another_scene(rng, shots, scene)
            frames = int(rng.integers(20, min(60, end - start) + 1))
            first = int(rng.integers(start, end - frames + 1))
            fade = bool(i) and rng.random() < 0.2
            if fade:  # through black: the piece before fades out, this one in
                pieces[-1] = replace(pieces[-1], fade_out=min(12, pieces[-1].frames // 3))
            flash = (int(rng.integers(5, frames - 5)),) if rng.random() < 0.15 and frames > 12 else ()
            pieces.append(Piece(source, first, frames, str(rng.choice(["as-is", "as-is", "dark", "flat", "grey"])),
                                fade_in=min(10, frames // 3) if fade else 0, flashes=flash))
        width, height = [(640, 360), (960, 540)][int(rng.integers(0, 2))]
        splices.append(Splice(f"random_{seed}_{n:02d}.mp4", tuple(pieces), width, height))
    return splices


def _another_scene(rng: np.random.Generator, shots: list, scene: str | None) -> tuple:
    while True:
        shot = shots[int(rng.integers(0, len(shots)))]
        if shot[3] != scene:
            return shot


def splice_cuts(splice: Splice) -> list[int]:
    """Where `splice` cuts: each piece after the first starts a shot (at its first frame leaving black
    when it fades in)."""
    cuts, start = [], 0
    for i, piece in enumerate(splice.pieces):
        if i:
            cuts.append(start + (1 if piece.fade_in else 0))  # its first frame is black (scale 0)
        start += piece.frames
    return cuts


def write_splice(source_dir: str | Path, splice: Splice, out_dir: str | Path) -> CaseTruth:
    """Encode `splice` from the real clips in `source_dir` into `out_dir`; its truth (cuts, frames, fps)."""
    path = Path(out_dir) / splice.name
    path.parent.mkdir(parents=True, exist_ok=True)
    truth = CaseTruth(path=path, cuts=splice_cuts(splice), fps=splice.fps, rotation=splice.rotation,
                      has_audio=True)
    tick = Fraction(1, splice.fps * 2) if splice.vfr else Fraction(1, splice.fps)
    with av.open(str(path), "w") as out:
        video = out.add_stream(splice.codec, rate=splice.fps * 2 if splice.vfr else splice.fps)
        video.width, video.height, video.pix_fmt, video.time_base = splice.width, splice.height, "yuv420p", tick
        video.sample_aspect_ratio = splice.pixel_aspect
        if splice.codec == "libx264":
            video.options = {"preset": "veryfast", "crf": "20", "threads": "1"}
        else:
            video.options = {"deadline": "realtime", "cpu-used": "8", "threads": "1", "crf": "32", "b": "0"}
        if splice.rotation:
            video.set_display_rotation(splice.rotation)
        rate = 48000 if splice.audio_codec == "libopus" else 16000
        audio = out.add_stream(splice.audio_codec, rate=rate, layout="mono")
        pts = 0
        for piece in splice.pieces:
            for bgr in _piece_frames(Path(source_dir), piece, splice):
                frame = av.VideoFrame.from_ndarray(bgr, format="bgr24")
                frame.pts, frame.time_base = pts, tick
                for packet in video.encode(frame):
                    out.mux(packet)
                pts += (1 + truth.frames % 2) if splice.vfr else 1
                truth.frames += 1
        for packet in video.encode(None):
            out.mux(packet)
        _encode_wave(out, audio, _track(pts * float(tick), rate, None), rate, audio.codec_context.frame_size or 1024)
    return truth


def _piece_frames(source_dir: Path, piece: Piece, splice: Splice):  # noqa: ANN202
    """The piece's frames as `splice` stores them: fitted inside its picture area (aspect kept, as displayed
    with its pixel aspect), looks and effects applied."""
    inner = splice.height - 2 * splice.bars
    for t, frame in enumerate(_source_frames(source_dir / piece.source, piece.start, piece.frames)):
        image = _look(_fit(frame, splice.width, inner, splice.pixel_aspect), piece.look)
        scale = 1.0
        if piece.fade_in and t < piece.fade_in:
            scale = t / piece.fade_in
        if piece.fade_out and t >= piece.frames - piece.fade_out:
            scale = min(scale, (piece.frames - 1 - t) / piece.fade_out)
        if piece.dip[1] and piece.dip[0] <= t < piece.dip[0] + piece.dip[1]:
            scale *= 1 - 0.5 * np.sin(np.pi * (t - piece.dip[0]) / piece.dip[1])
        if scale != 1.0:
            image = (image.astype(np.float32) * scale).astype(np.uint8)
        if t in piece.flashes:
            image = (255 - (255 - image.astype(np.float32)) * 0.15).astype(np.uint8)
        canvas = np.zeros((splice.height, splice.width, 3), np.uint8)
        canvas[splice.bars: splice.bars + inner] = image
        yield canvas


def _source_frames(path: Path, start: int, frames: int):  # noqa: ANN202
    """Frames [start, start + frames) of a real clip (constant frame rate): decoding starts at the
    keyframe before `start`, found by seeking, and a frame's index is its time x the frame rate (an index
    off by one still lies in the shot: SHOTS and the pieces keep a margin from each cut)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "FRAME"
        rate = float(stream.average_rate or stream.guessed_rate)
        first = stream.start_time or 0
        container.seek(first + int(max(start - 1, 0) / rate / stream.time_base), stream=stream, backward=True)
        taken = 0
        for frame in container.decode(stream):
            index = round((frame.pts - first) * stream.time_base * rate)
            if index < start:
                continue
            yield frame
            taken += 1
            if taken == frames:
                return


def _fit(frame: av.VideoFrame, width: int, height: int, pixel_aspect: Fraction) -> np.ndarray:
    """`frame` scaled into width x height stored pixels (each `pixel_aspect` wide when displayed), its
    displayed aspect kept, centred on black."""
    w, h = frame.width, frame.height
    scale = min(width * float(pixel_aspect) / w, height / h)
    new_w, new_h = max(1, round(w * scale / float(pixel_aspect))), max(1, round(h * scale))
    resized = frame.reformat(width=new_w, height=new_h, format="bgr24", interpolation="AREA").to_ndarray()
    canvas = np.zeros((height, width, 3), np.uint8)
    y, x = (height - new_h) // 2, (width - new_w) // 2
    canvas[y: y + new_h, x: x + new_w] = resized
    return canvas
