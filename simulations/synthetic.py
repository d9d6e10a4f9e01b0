"""Synthetic multimodal clips: real H.264/AAC .mp4 files written with PyAV.

Four classes cross a visual pattern with an audio signature:

    stripes_hum   stripes_chirp   rings_hum   rings_chirp

so a pair that shares the pattern is separable only by sound, and a pair that
shares the sound only by picture: a model needs both to get all four. Each
clip has several shots (hard cuts) with new colours, scale and motion, and a
fraction of clips has no audio track at all, as many device clips do.

Deterministic: the same seed gives the same manifest and the same clip
parameters (the ground truth written beside it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from edgefed.common.data.clip_manifest import ManifestEntry, write_manifest

log = logging.getLogger(__name__)

PATTERNS = ("stripes", "rings")
SOUNDS = ("hum", "chirp")
LABELS = tuple(f"{p}_{s}" for p in PATTERNS for s in SOUNDS)


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Defaults make a small, quick dataset."""

    num_clips: int = 400
    width: int = 160
    height: int = 120
    fps: int = 12
    duration_s: float = 3.0
    shots: int = 3
    no_audio_fraction: float = 0.1
    sample_rate: int = 16000
    video_codec: str = "libx264"
    container: str = "mp4"
    seed: int = 0


@dataclass
class ClipTruth:
    video: str
    label: str
    has_audio: bool
    cut_frames: list[int]  # first frame index of every shot after the first


def generate(
    out_dir: str | Path, spec: SyntheticSpec, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write clips and `metadata.jsonl` into out_dir; returns the manifest path.

    Reuses an existing dataset generated from the identical spec.
    """
    out = Path(out_dir)
    manifest = out / "metadata.jsonl"
    spec_file = out / "dataset.json"
    if manifest.exists() and spec_file.exists():
        try:
            if json.loads(spec_file.read_text())["spec"] == asdict(spec):
                return manifest
        except (json.JSONDecodeError, KeyError):
            pass
    (out / "clips").mkdir(parents=True, exist_ok=True)
    entries: list[ManifestEntry] = []
    truths: list[ClipTruth] = []
    for i in range(spec.num_clips):
        rng = np.random.default_rng([spec.seed, i])
        label = LABELS[i % len(LABELS)]  # balanced classes
        has_audio = rng.random() >= spec.no_audio_fraction
        name = f"clips/clip_{i:05d}.{spec.container}"
        cuts = write_clip(out / name, label, has_audio, spec, rng)
        entries.append(ManifestEntry(name, label, str(out.resolve())))
        truths.append(ClipTruth(name, label, has_audio, cuts))
        if progress:
            progress(i + 1, spec.num_clips)
    write_manifest(manifest, entries)
    spec_file.write_text(
        json.dumps({"spec": asdict(spec), "clips": [asdict(t) for t in truths]}, indent=1)
    )
    return manifest


def write_clip(path: Path, label: str, has_audio: bool, spec: SyntheticSpec, rng: np.random.Generator) -> list[int]:
    """Encode one clip; returns the frame indices where a new shot starts."""
    pattern, sound = label.split("_")
    n_frames = int(round(spec.duration_s * spec.fps))
    bounds = _shot_bounds(n_frames, spec.shots, rng)
    with av.open(str(path), "w", format=spec.container) as container:
        vstream = container.add_stream(spec.video_codec, rate=spec.fps)
        vstream.width, vstream.height = spec.width, spec.height
        vstream.pix_fmt = "yuv420p"
        if spec.video_codec == "libx264":
            # One thread and fixed options keep the encoder output reproducible.
            vstream.options = {"preset": "veryfast", "crf": "20", "threads": "1"}
        astream = None
        if has_audio:
            astream = container.add_stream("aac", rate=spec.sample_rate, layout="mono")
        yy, xx = np.mgrid[0 : spec.height, 0 : spec.width].astype(np.float32)  # float32 keeps rendering cheap
        for start, end in zip(bounds[:-1], bounds[1:]):
            render = _shot_renderer(pattern, spec, rng, xx, yy)
            for f in range(start, end):
                frame = av.VideoFrame.from_ndarray(render(f - start), format="rgb24")
                _encode(container, vstream, frame, f, spec.fps)
        _encode(container, vstream, None)
        if astream is not None:
            wave = _sound(sound, spec.duration_s, spec.sample_rate, rng)
            hop = 1024  # AAC's frame size
            for start in range(0, len(wave), hop):
                chunk = wave[start : start + hop]
                aframe = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
                aframe.sample_rate = spec.sample_rate
                _encode(container, astream, aframe, start, spec.sample_rate)
            _encode(container, astream, None)
    return bounds[1:-1]


def _encode(container, stream, frame, pts: int = 0, rate: int = 1) -> None:  # noqa: ANN001
    """Encode one frame (None flushes the encoder) at pts in units of 1/rate, and mux its packets."""
    if frame is not None:
        frame.pts = pts
        frame.time_base = Fraction(1, rate)
    for packet in stream.encode(frame):
        container.mux(packet)


def _shot_bounds(n_frames: int, shots: int, rng: np.random.Generator) -> list[int]:
    """Shot start indices (plus n_frames), each shot at least a third of an even split."""
    shots = max(1, min(shots, n_frames))
    base = n_frames / shots
    cuts = [int(round(base * i + rng.uniform(-base / 3, base / 3))) for i in range(1, shots)]
    return [0, *sorted(set(cuts)), n_frames]


def _shot_renderer(pattern: str, spec: SyntheticSpec, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray):  # noqa: ANN202
    """A frame function for one shot: new colours, scale, placement and motion."""
    fg = rng.integers(0, 256, 3).astype(np.float32)
    bg = rng.integers(0, 256, 3).astype(np.float32)
    while np.abs(fg - bg).sum() < 200:  # keep the pattern visible
        bg = rng.integers(0, 256, 3).astype(np.float32)
    scale = min(spec.width, spec.height)
    # Fine stripes against coarse rings: shape and scale both tell the pattern.
    period = (rng.uniform(0.06, 0.10) if pattern == "stripes" else rng.uniform(0.16, 0.26)) * scale
    speed = rng.uniform(-0.5, 0.5) * 2 * np.pi / spec.fps
    noise = rng.uniform(2, 10)
    if pattern == "stripes":
        theta = rng.uniform(0, np.pi)
        coord = xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta))
    else:
        cx = rng.uniform(0.3, 0.7) * spec.width
        cy = rng.uniform(0.3, 0.7) * spec.height
        coord = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2, dtype=np.float32)
    phase0 = rng.uniform(0, 2 * np.pi)
    # Static grain per shot: texture like a real sensor's without per-frame
    # noise, which would make every frame expensive to encode and decode.
    grain = np.random.default_rng(rng.integers(1 << 31)).normal(0, noise, (*coord.shape, 3)).astype(np.float32)

    def render(t: int) -> np.ndarray:
        wave = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi / period) * coord + np.float32(phase0 + speed * t))  # [H, W]
        img = bg + (fg - bg) * wave[..., None] + grain
        return np.clip(img, 0, 255).astype(np.uint8)

    return render


def _sound(kind: str, duration_s: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    n = int(duration_s * sr)
    t = np.arange(n, dtype=np.float64) / sr
    if kind == "hum":
        f0 = rng.uniform(110, 220)
        vibrato = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 6) * t)
        phase = 2 * np.pi * f0 * np.cumsum(vibrato) / sr
        wave = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    else:
        f1 = rng.uniform(1500, 2500)
        period = rng.uniform(0.2, 0.35)
        local = np.mod(t, period) / period  # 0..1 within each sweep
        freq = f1 * (1 + local)
        phase = 2 * np.pi * np.cumsum(freq) / sr
        wave = np.sin(phase) * (local < 0.7)
    wave = wave / np.abs(wave).max()
    wave = wave * rng.uniform(0.2, 0.6) + rng.normal(0, 0.01, n)
    return wave.astype(np.float32)
