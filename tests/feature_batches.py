"""Random clips of the shapes the configured encoders take, with a label cue in the frames (no media decoded)."""

from __future__ import annotations

import torch

from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet
from edgefed.common.model.inputs import model_inputs


def random_features(cfg: EdgefedConfig, n: int = 16, seed: int = 0) -> FeatureSet:
    """`n` clips: random keyframes whose first one's first channel tells the label, random audio, all slots present."""
    shapes = model_inputs(cfg).shapes()
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.num_classes, (n,), generator=g)
    frames = torch.randint(0, 256, (n, *shapes["frames"]), dtype=torch.uint8, generator=g)
    frames[:, :, 0] = (labels[:, None, None, None] * 60).to(torch.uint8)
    audio = (torch.randn(n, *shapes["audio"], generator=g) - 4).half()
    return FeatureSet(frames, torch.ones(n, *shapes["frame_mask"], dtype=torch.bool), audio,
                      torch.ones(n, *shapes["audio_mask"], dtype=torch.bool), labels)
