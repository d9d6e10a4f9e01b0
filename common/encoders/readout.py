"""One vector per input out of an encoder's outputs, the way its spec says."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import ModelOutput

from edgefed.common.encoders.spec import EncoderSpec


def readout(spec: EncoderSpec, outputs: ModelOutput, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder's outputs -> [B, D].

    `mask` [B, T] (True = holds signal) is over `last_hidden_state` [B, T, D], not over the
    input (`LoadedEncoder.frame_mask` converts); only a masked-mean readout takes one, and
    without it that readout is the plain mean.
    """
    hidden = outputs.last_hidden_state  # [B, T, D]
    if mask is not None and spec.readout != "masked-mean":
        raise ValueError(f"{spec.name} reads out by {spec.readout}: it takes no mask")
    if spec.readout == "cls":
        return hidden[:, 0]
    if spec.readout == "pooler":
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            raise ValueError(f"{spec.name} reads out by its pooler, but the model returned no pooler_output")
        return pooled
    if spec.readout == "mean":
        return hidden[:, spec.mean_from:].mean(dim=1)
    if mask is None:
        return hidden.mean(dim=1)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"{spec.name}: mask {tuple(mask.shape)} does not cover the hidden states {tuple(hidden.shape[:2])}")
    weights = mask.to(hidden.dtype)[..., None]  # [B, T, 1]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # [B, D]
