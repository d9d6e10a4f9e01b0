"""Held-out evaluation of the shared model (used by devices and by the cloud)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from edgefed.common.data.features import FeatureSet


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    examples: int


@torch.no_grad()
def evaluate(model: nn.Module, data: FeatureSet, batch_size: int) -> EvalResult:
    """Mean cross-entropy and accuracy over `data` (labels must be known)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for batch in data.batches(batch_size):
        logits = model(batch.frames, batch.frame_mask, batch.audio, batch.audio_mask)
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == batch.labels).sum())
    model.train(was_training)
    n = len(data)
    return EvalResult(loss=loss_sum / max(n, 1), accuracy=correct / max(n, 1), examples=n)
