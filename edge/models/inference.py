"""Per-shot predictions of the installed model on a device's own media (`edgefed infer`).

Each detected shot becomes one model input: its keyframes (up to K) and the
audio windows centred on them, extracted exactly as for training (the
manifest's feature config). A stand-alone audio file is one segment spanning
the whole file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet
from edgefed.common.model.inputs import model_inputs
from edgefed.common.onnx_inference import onnx_logits
from edgefed.edge.dataset import audio_only_centres, sample_features
from edgefed.edge.media.errors import MediaError
from edgefed.edge.media.frames import frame_shaper
from edgefed.edge.media.keyframes import extract_keyframes, spread
from edgefed.edge.media.probe import probe
from edgefed.edge.models.runtime import ModelRuntime


@dataclass
class ShotPrediction:
    path: str
    shot: int
    start_s: float
    end_s: float
    label: str
    confidence: float
    keyframes: int
    model_version: int


@dataclass
class FileFailure:
    path: str
    reason: str


def shot_inputs(path: str, cfg: EdgefedConfig) -> list[tuple[int, float, float, int, FeatureSet]]:
    """(shot, start ms, end ms, keyframes used, model input) for every shot of a video."""
    info = probe(path)
    if not info.has_video:
        centres = audio_only_centres(info.duration_s, cfg.num_keyframes)
        return [(0, 0.0, info.duration_s * 1000, 0, sample_features(path, cfg, [], info.has_audio, -1, centres))]
    video = extract_keyframes(path, cfg.features, shape=frame_shaper(model_inputs(cfg).frames))
    starts = list(video.shot_starts_ms)
    ends = starts[1:] + [video.duration_ms]
    shots = []
    for shot, (start, end) in enumerate(zip(starts, ends)):
        inside = [kf for kf in video.keyframes if start <= kf.pts_ms < end]
        if not inside:
            continue  # a shot too short to yield a keyframe
        chosen = spread(inside, cfg.num_keyframes)
        shots.append((shot, start, end, len(chosen), sample_features(path, cfg, chosen, info.has_audio, -1)))
    return shots


def predict_files(paths: list[Path], runtime: ModelRuntime, cfg: EdgefedConfig
                  ) -> tuple[list[ShotPrediction], list[FileFailure]]:
    """Predictions for every shot of every file; a file that cannot be read is reported, not fatal."""
    model = runtime.current()  # one model for the whole call, even if a new one is installed meanwhile
    predictions, failures = [], []
    for path in paths:
        try:
            shots = shot_inputs(str(path), cfg)
        except MediaError as err:
            failures.append(FileFailure(str(path), err.reason))
            continue
        if not shots:
            failures.append(FileFailure(str(path), "no keyframes"))
            continue
        batch = FeatureSet.concat([s[4] for s in shots])
        probs = torch.softmax(onnx_logits(model.session, batch, batch_size=16), dim=1)
        for (shot, start, end, used, _), p in zip(shots, probs):
            best = int(p.argmax())
            predictions.append(ShotPrediction(str(path), shot, round(start / 1000, 3), round(end / 1000, 3),
                                              model.manifest.labels[best], round(float(p[best]), 4), used,
                                              model.version))
    return predictions, failures


def as_json(predictions: list[ShotPrediction], failures: list[FileFailure]) -> dict:
    return {"predictions": [asdict(p) for p in predictions], "failures": [asdict(f) for f in failures]}
