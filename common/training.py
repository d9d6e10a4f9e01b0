"""Adapter training: the one loop every trainer of the adapter runs.

A device trains `local-epochs` shuffled passes over its own split
(`train_local_epochs`); the cloud trainer beside the aggregator trains a fixed
number of randomly drawn batches of the cloud's clips
(cloud/training/participant.py). Both are this loop, plain PyTorch: AdamW on
the model's trainable tensors (LoRA, fusion, head), cross-entropy on the
class logits.

With `lora-aggregation = ffa` LoRA's A matrices stay at their shared
initialisation and only B is trained: that is what makes averaging B exact
(cloud/aggregation/lora_aggregation.py), so every trainer must honour it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from edgefed.common.config import EdgefedConfig, LocalTrainingSettings
from edgefed.common.data.features import FeatureSet


@dataclass
class TrainResult:
    loss: float  # example-weighted mean training loss over the last epoch
    examples: int  # clips seen in the last epoch
    steps: int
    seconds: float


# A batch -> its logits [B, C]; the model's own forward unless a trainer reads cached prefix states.
Forward = Callable[[FeatureSet], torch.Tensor]


def train_adapter(model: nn.Module, epochs: Iterable[Iterable[FeatureSet]], training: LocalTrainingSettings,
                  freeze_lora_a: bool = False, forward: Forward | None = None) -> TrainResult:
    """One AdamW step per batch of each epoch on the model's trainable tensors; LoRA A untouched if frozen.

    `forward` replaces the model's forward (edge/training/prefix_cache.py: from each clip's cached frozen prefix)."""
    forward = forward or (lambda batch: model(batch.frames, batch.frame_mask, batch.audio, batch.audio_mask))
    params = [p for n, p in model.named_parameters() if p.requires_grad and not (freeze_lora_a and ".lora_A." in n)]
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    model.train()
    start = time.perf_counter()
    steps, epoch_loss, seen = 0, 0.0, 0
    for batches in epochs:
        epoch_loss, seen = 0.0, 0
        for batch in batches:
            logits = forward(batch)  # [B, C]
            loss = F.cross_entropy(logits, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            epoch_loss += loss.item() * len(batch)
            seen += len(batch)
    model.eval()
    return TrainResult(loss=epoch_loss / max(seen, 1), examples=seen, steps=steps, seconds=time.perf_counter() - start)


def train_local_epochs(model: nn.Module, data: FeatureSet, cfg: EdgefedConfig, seed: int,
                       forward: Forward | None = None) -> TrainResult:
    """A device's share of a round: `local-epochs` passes over `data`, shuffled with `seed`."""
    training = cfg.training
    generator = torch.Generator().manual_seed(seed)
    epochs = (data.batches(training.batch_size, generator) for _ in range(training.local_epochs))
    return train_adapter(model, epochs, training, freeze_lora_a=cfg.lora_aggregation == "ffa", forward=forward)


def sampled_batches(data: FeatureSet, steps: int, batch_size: int, seed: int) -> Iterator[FeatureSet]:
    """`steps` batches of `batch_size` clips drawn with replacement (one epoch of a step-counted trainer)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield data.subset(torch.randint(0, len(data), (batch_size,), generator=generator))
