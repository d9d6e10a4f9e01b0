"""`edgefed extract`: keyframes, audio windows and errors of media files, for people to inspect.

Per video it writes `<out>/<name>/keyframe_<i>.jpg`, `index.json` (shots,
keyframes with timestamps, audio windows, errors) and optionally
`contact_sheet.png`; a top-level `report.json` lists every file's outcome.
Files are decoded within the run config's media limits (`--set max-media-...`),
as on a device: a file past one, or not a media container, fails with its reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edgefed.common.atomic import write_bytes_atomically
from edgefed.common.config import EdgefedConfig
from edgefed.common.model.inputs import model_inputs
from edgefed.edge.dataset import audio_only_centres
from edgefed.edge.media.audio import audio_windows
from edgefed.edge.media.audio_features import WindowFeatures
from edgefed.edge.media.errors import MediaError
from edgefed.edge.media.frames import frame_shaper
from edgefed.edge.media.keyframes import extract_keyframes
from edgefed.edge.media.limits import MediaBudget
from edgefed.edge.media.probe import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS, probe


@dataclass
class FileOutcome:
    path: str
    ok: bool
    reason: str = ""
    keyframes: int = 0
    shots: int = 0
    out_dir: str = ""
    warnings: list[str] = field(default_factory=list)


def find_media(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and media files (by extension) under folders, sorted."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS | AUDIO_EXTENSIONS)
        else:
            found.append(p)  # a missing path fails later with a clear reason
    return found


def extract_one(path: Path, out_root: Path, cfg: EdgefedConfig, contact_sheet: bool) -> FileOutcome:
    target = out_root / _safe_name(path)
    budget = MediaBudget.start(cfg.media_limits)  # the same limits a device's extraction has
    try:
        info = probe(path, budget)
        inputs = model_inputs(cfg)
        video = extract_keyframes(path, cfg.features, budget, frame_shaper(inputs.frames)) if info.has_video else None
        if video is not None:
            centres = video.timestamps_ms
        else:  # a stand-alone audio file: windows spread over it, as for training
            centres = audio_only_centres(info.duration_s, cfg.num_keyframes)
        if inputs.audio.windows == 1:  # one long window per clip (common/model/inputs.py)
            centres = [(min(centres) + max(centres)) / 2]
        windows = (audio_windows(str(path), centres, WindowFeatures(inputs.audio, cfg.sample_rate), budget)
                   if info.has_audio else None)
    except MediaError as err:
        return FileOutcome(str(path), False, err.reason)
    target.mkdir(parents=True, exist_ok=True)
    half_ms = inputs.audio.window_samples / cfg.sample_rate * 1000 / 2
    index: dict = {"file": str(path), "has_video": info.has_video, "has_audio": info.has_audio,
                   "extractor": cfg.feature_config()}
    index["audio_windows"] = [
        {"centre_ms": round(c, 1), "start_ms": round(c - half_ms, 1), "end_ms": round(c + half_ms, 1),
         "audio": bool(windows[1][i]) if windows is not None else False}
        for i, c in enumerate(centres)
    ]
    keyframes: list[dict] = []
    if video is not None:
        for i, kf in enumerate(video.keyframes):
            name = f"keyframe_{i:03d}.jpg"
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(kf.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            if ok:
                write_bytes_atomically(target / name, jpg.tobytes())
            keyframes.append({"file": name, "frame": kf.index, "pts_ms": round(kf.pts_ms, 3),
                              "sharpness": round(kf.sharpness, 2), "audio_window": i})
        bounds = video.shot_starts_ms + [video.duration_ms]
        index.update(
            frames=video.frames, fps=round(video.fps, 3), duration_ms=round(video.duration_ms, 1),
            width=video.width, height=video.height, rotation=video.rotation,
            shots=[{"start_ms": round(a, 1), "end_ms": round(b, 1)} for a, b in zip(bounds[:-1], bounds[1:])],
            cut_frames=video.cuts, errors=video.errors,
        )
    else:
        index.update(duration_ms=round(info.duration_s * 1000, 1), shots=[], errors=[])
    index["keyframes"] = keyframes
    write_bytes_atomically(target / "index.json", json.dumps(index, indent=1).encode())
    if contact_sheet and video is not None:
        write_bytes_atomically(target / "contact_sheet.png", _contact_sheet(video.images, keyframes))
    return FileOutcome(str(path), True, keyframes=len(keyframes), shots=len(index["shots"]), out_dir=str(target),
                       warnings=index["errors"])


def extract_all(
    paths: list[Path], out_root: Path, cfg: EdgefedConfig, contact_sheet: bool,
    progress: Callable[[int, int, FileOutcome], None] | None = None,
) -> list[FileOutcome]:
    outcomes = []
    for i, path in enumerate(paths):
        outcome = extract_one(path, out_root, cfg, contact_sheet)
        outcomes.append(outcome)
        if progress:
            progress(i + 1, len(paths), outcome)
    out_root.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(out_root / "report.json", json.dumps([asdict(o) for o in outcomes], indent=1).encode())
    return outcomes


def _contact_sheet(images: np.ndarray, keyframes: list[dict], columns: int = 4) -> bytes:
    """A grid of the keyframes, each labelled with its timestamp."""
    n, size = len(images), images.shape[1]
    rows = (n + columns - 1) // columns
    sheet = np.full((rows * (size + 18), columns * size, 3), 32, dtype=np.uint8)
    for i, (img, kf) in enumerate(zip(images, keyframes)):
        r, c = divmod(i, columns)
        y, x = r * (size + 18), c * size
        sheet[y : y + size, x : x + size] = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        cv2.putText(sheet, f"{kf['pts_ms'] / 1000:.2f}s", (x + 4, y + size + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (230, 230, 230), 1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", sheet)
    return png.tobytes() if ok else b""


def _safe_name(path: Path) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.name)
