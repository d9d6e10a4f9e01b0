"""Manifest -> aligned model inputs, with an on-disk feature cache.

A clip becomes K shot-aware keyframes (shaped for the video encoder) and
audio windows for the audio encoder (K log-mel windows for the tiny one), each
centred on its keyframe's timestamp so picture and sound describe the same
moment (common/model/inputs.py says what each encoder takes). A stand-alone audio file becomes K windows spread over it, with
the video slots masked off. Features are cached per file, keyed by the file's content hash and the
extractor config, so later rounds never decode again and a config change
never reads stale features.

Every file is decoded within the run config's media limits (`max-media-*`,
one MediaBudget per file: edge/media/limits.py); a file past one fails alone.
Given an ExtractionSandbox, cache misses are decoded in its child process
(memory- and time-limited) and come back as safetensors bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from edgefed.common.config import EdgefedConfig
from edgefed.common.data.clip_manifest import ManifestEntry
from edgefed.common.data.features import FeatureFileError, FeatureSet, load_features, save_features
from edgefed.common.model.inputs import model_inputs
from edgefed.edge.media.audio import audio_windows
from edgefed.edge.media.audio_features import WindowFeatures
from edgefed.edge.media.errors import MediaError
from edgefed.edge.media.frames import frame_shaper
from edgefed.edge.media.keyframes import extract_keyframes, spread
from edgefed.edge.media.limits import MediaBudget
from edgefed.edge.media.probe import probe
from edgefed.edge.media.sandbox import ExtractionSandbox
from edgefed.edge.media.selectors import Keyframe

log = logging.getLogger(__name__)

EXTRACTOR_VERSION = "shots-2"  # shots-2: the cuts detector; keyframes as displayed (square pixels, no bars)


@dataclass
class FileError:
    path: str
    reason: str


def audio_only_centres(duration_s: float, k: int) -> list[float]:
    """Window centres (ms) spread evenly over an audio file."""
    duration_ms = max(duration_s, 0.01) * 1000
    return [duration_ms * (i + 0.5) / k for i in range(k)]


def clip_features(path: str, cfg: EdgefedConfig, label: int) -> FeatureSet:
    """One model input for a video or audio file (see module docstring).

    Probe, keyframes and audio share one MediaBudget: `max-media-seconds` is the wall time of the whole file.
    """
    budget = MediaBudget.start(cfg.media_limits)
    info = probe(path, budget)
    if info.has_video:
        video = extract_keyframes(path, cfg.features, budget, frame_shaper(model_inputs(cfg).frames))
        return sample_features(path, cfg, spread(video.keyframes, cfg.num_keyframes), info.has_audio, label,
                               budget=budget)
    # a stand-alone audio file: windows spread over its duration
    return sample_features(path, cfg, [], info.has_audio, label,
                           centres_ms=audio_only_centres(info.duration_s, cfg.num_keyframes), budget=budget)


def sample_features(path: str, cfg: EdgefedConfig, keyframes: list[Keyframe], has_audio: bool, label: int,
                    centres_ms: list[float] | None = None, budget: MediaBudget | None = None) -> FeatureSet:
    """One model input from up to K keyframes and the audio windows centred on them (or on `centres_ms`).

    With one audio window per clip (the AST and Whisper encoders: common/model/inputs.py), it is
    centred between the first and the last of those times."""
    inputs = model_inputs(cfg)
    k = cfg.num_keyframes
    frames = np.zeros((k, inputs.frames.height, inputs.frames.width, 3), dtype=np.uint8)
    frame_mask = torch.zeros(k, dtype=torch.bool)
    chosen = keyframes[:k]
    for i, keyframe in enumerate(chosen):
        frames[i] = keyframe.image
    frame_mask[: len(chosen)] = True
    if centres_ms is None:
        centres_ms = [kf.pts_ms for kf in chosen] or [0.0]
        # slots without a keyframe (very short videos, short shots) reuse the last time
        centres_ms += [centres_ms[-1]] * (k - len(centres_ms))
    features = WindowFeatures(inputs.audio, cfg.sample_rate)
    if inputs.audio.windows == 1:
        centres_ms = [(min(centres_ms) + max(centres_ms)) / 2]
    audio = features.silence().expand(len(centres_ms), *features.shape)
    audio_mask = torch.zeros(len(centres_ms), dtype=torch.bool)
    windows = (audio_windows(path, centres_ms, features, budget or MediaBudget.start(cfg.media_limits))
               if has_audio else None)
    if windows is not None:
        audio, audio_mask = windows
        if chosen and inputs.audio.windows == k:  # a window whose keyframe slot is empty is masked with it
            audio_mask &= frame_mask
    return FeatureSet(
        frames=torch.from_numpy(frames).permute(0, 3, 1, 2)[None].contiguous(),
        frame_mask=frame_mask[None],
        audio=audio.to(torch.float16)[None],
        audio_mask=audio_mask[None],
        labels=torch.tensor([label], dtype=torch.long),
    )


def clip_feature_bytes(path: str, cfg: EdgefedConfig, label: int) -> bytes:
    """`clip_features` as safetensors bytes: what an ExtractionSandbox child sends back."""
    return save_tensors(clip_features(path, cfg, label).to_tensors())


def features_from_bytes(path: str, data: bytes, cfg: EdgefedConfig) -> FeatureSet:
    """A FeatureSet from `clip_feature_bytes` output, checked against the shapes `cfg` gives one clip.

    No pickle, and nothing taken on trust: the bytes come from a process that decoded an untrusted file."""
    dtypes = {"frames": torch.uint8, "frame_mask": torch.bool, "audio": torch.float16, "audio_mask": torch.bool}
    expected = {name: ((1, *shape), dtypes[name]) for name, shape in model_inputs(cfg).shapes().items()}
    expected["labels"] = ((1,), torch.int64)
    try:
        tensors = load_tensors(data)
    except SafetensorError as err:
        raise MediaError(path, f"the extraction process sent unreadable features ({err})") from None
    if {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()} != expected:
        raise MediaError(path, "the extraction process sent features of the wrong shapes")
    return FeatureSet(**tensors)


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
    entries: list[ManifestEntry], cfg: EdgefedConfig, cache_dir: str | Path | None,
    sandbox: ExtractionSandbox | None = None,
) -> tuple[FeatureSet | None, list[FileError]]:
    """Features of every readable entry (in manifest order) and an error per failed one.

    With a `sandbox`, files not yet cached are decoded in its child process, not in this one."""
    label_index = {name: i for i, name in enumerate(cfg.label_names)}
    parts: list[FeatureSet] = []
    errors: list[FileError] = []
    for entry in entries:
        path = entry.path
        if entry.label not in label_index:
            errors.append(FileError(str(path), f"label {entry.label!r} is not one of {cfg.label_names}"))
            continue
        try:
            parts.append(_cached_clip(path, cfg, label_index[entry.label], cache_dir, sandbox))
        except MediaError as err:
            errors.append(FileError(str(path), err.reason))
        except OSError as err:
            errors.append(FileError(str(path), f"unreadable ({err.strerror or err})"))
    for err in errors:
        log.warning("skipped %s: %s", err.path, err.reason)
    return (FeatureSet.concat(parts) if parts else None), errors


def cached_features(entry: ManifestEntry, cfg: EdgefedConfig, cache_dir: str | Path) -> FeatureSet | None:
    """The entry's features if the cache holds them, else None: nothing is decoded."""
    if not entry.path.is_file():
        return None
    try:
        features = load_features(_cache_file(entry.path, cfg, cache_dir))
    except FeatureFileError:
        return None
    if entry.label in cfg.label_names:
        features.labels[:] = cfg.label_names.index(entry.label)
    return features


def _cache_file(path: Path, cfg: EdgefedConfig, cache_dir: str | Path) -> Path:
    key = cache_key(path, cfg)
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


def _cached_clip(path: Path, cfg: EdgefedConfig, label: int, cache_dir: str | Path | None,
                 sandbox: ExtractionSandbox | None) -> FeatureSet:
    if not path.is_file():
        raise MediaError(str(path), "no such file")
    if cache_dir is None:
        return _extract(path, cfg, label, sandbox)
    entry = _cache_file(path, cfg, cache_dir)
    if entry.exists():
        try:
            cached = load_features(entry)
            cached.labels[:] = label  # the label belongs to the manifest, not the file
            return cached
        except FeatureFileError as err:
            log.warning("rebuilding bad cache entry %s: %s", entry, err)
    features = _extract(path, cfg, label, sandbox)
    save_features(features, entry)
    return features


def _extract(path: Path, cfg: EdgefedConfig, label: int, sandbox: ExtractionSandbox | None) -> FeatureSet:
    if sandbox is None:
        return clip_features(str(path), cfg, label)
    data = sandbox.call(str(path), cfg.max_media_seconds, clip_feature_bytes, str(path), cfg, label)
    return features_from_bytes(str(path), data, cfg)
