"""Manifest -> aligned model inputs, with an on-disk feature cache.

A clip becomes K letterboxed keyframes plus one log-mel window centred on the
clip. Features are cached per file, keyed by the file's content hash and the
extractor config, so later rounds never decode again and a config change
never reads stale features.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import EdgefedConfig
from common.features import FeatureFileError, FeatureSet, load_features, save_features
from common.manifest import ManifestEntry
from edge.media.audio import HOP_MS, decode_audio, log_mel, window
from edge.media.errors import MediaError
from edge.media.keyframes import extract_keyframes

log = logging.getLogger(__name__)

EXTRACTOR_VERSION = "spine-1"


@dataclass
class FileError:
    path: str
    reason: str


def clip_features(path: str, cfg: EdgefedConfig, label: int) -> FeatureSet:
    """One clip as a FeatureSet of length 1."""
    k, size = cfg.num_keyframes, cfg.image_size
    keyframes = extract_keyframes(path, k, size)
    n = len(keyframes.frames)
    frames = np.zeros((k, size, size, 3), dtype=np.uint8)
    frames[:n] = keyframes.frames
    frame_mask = torch.zeros(k, dtype=torch.bool)
    frame_mask[:n] = True

    samples = decode_audio(path, cfg.sample_rate)
    if samples is None or samples.size < cfg.sample_rate // 100:
        audio = torch.zeros(cfg.audio_frames, cfg.n_mels)
        has_audio = False
    else:
        mel = log_mel(samples, cfg.sample_rate, cfg.n_mels)
        centre = int(keyframes.duration_ms / 2 / HOP_MS)
        audio = window(mel, centre, cfg.audio_frames)
        has_audio = True
    return FeatureSet(
        frames=torch.from_numpy(frames).permute(0, 3, 1, 2)[None].contiguous(),
        frame_mask=frame_mask[None],
        audio=audio.to(torch.float16)[None],
        audio_mask=torch.tensor([has_audio]),
        labels=torch.tensor([label], dtype=torch.long),
    )


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(path: Path, cfg: EdgefedConfig) -> str:
    spec = json.dumps({"v": EXTRACTOR_VERSION, **cfg.feature_config()}, sort_keys=True)
    return hashlib.sha256(f"{file_digest(path)}|{spec}".encode()).hexdigest()


def build_features(
    entries: list[ManifestEntry], cfg: EdgefedConfig, cache_dir: str | Path | None
) -> tuple[FeatureSet | None, list[FileError]]:
    """Features of every readable entry (in manifest order) and an error per failed one."""
    label_index = {name: i for i, name in enumerate(cfg.label_names)}
    parts: list[FeatureSet] = []
    errors: list[FileError] = []
    for entry in entries:
        path = entry.path
        if entry.label not in label_index:
            errors.append(FileError(str(path), f"label {entry.label!r} is not one of {cfg.label_names}"))
            continue
        try:
            parts.append(_cached_clip(path, cfg, label_index[entry.label], cache_dir))
        except MediaError as err:
            errors.append(FileError(str(path), err.reason))
        except OSError as err:
            errors.append(FileError(str(path), f"unreadable ({err.strerror or err})"))
    for err in errors:
        log.warning("skipped %s: %s", err.path, err.reason)
    return (FeatureSet.concat(parts) if parts else None), errors


def _cached_clip(path: Path, cfg: EdgefedConfig, label: int, cache_dir: str | Path | None) -> FeatureSet:
    if not path.is_file():
        raise MediaError(str(path), "no such file")
    if cache_dir is None:
        return clip_features(str(path), cfg, label)
    key = cache_key(path, cfg)
    entry = Path(cache_dir) / key[:2] / f"{key}.safetensors"
    if entry.exists():
        try:
            cached = load_features(entry)
            cached.labels[:] = label  # the label belongs to the manifest, not the file
            return cached
        except FeatureFileError as err:
            log.warning("rebuilding bad cache entry %s: %s", entry, err)
    features = clip_features(str(path), cfg, label)
    save_features(features, entry)
    return features
