"""Local training of the adapter: a plain PyTorch loop over cached features."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from edgefed.common.config import EdgefedConfig
from edgefed.common.data.features import FeatureSet


@dataclass
class TrainResult:
    loss: float  # mean training loss over the last epoch
    examples: int
    steps: int
    seconds: float


def train_adapter(model: nn.Module, data: FeatureSet, cfg: EdgefedConfig, seed: int) -> TrainResult:
    """Train the model's trainable tensors (LoRA, fusion, head) for `cfg.local_epochs`.

    With `lora-aggregation = ffa` LoRA's A matrices stay at their shared
    initialisation (only B is trained), which makes averaging B exact."""
    frozen_a = cfg.lora_aggregation == "ffa"
    params = [p for n, p in model.named_parameters() if p.requires_grad and not (frozen_a and ".lora_A." in n)]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    steps, epoch_loss, seen = 0, 0.0, 0
    for _ in range(cfg.local_epochs):
        epoch_loss, seen = 0.0, 0
        for batch in data.batches(cfg.batch_size, generator):
            logits = model(batch.frames, batch.frame_mask, batch.audio, batch.audio_mask)
            loss = F.cross_entropy(logits, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            epoch_loss += loss.item() * len(batch)
            seen += len(batch)
    model.eval()
    return TrainResult(
        loss=epoch_loss / max(seen, 1), examples=len(data), steps=steps, seconds=time.perf_counter() - start
    )
