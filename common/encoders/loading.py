"""`load_encoder`: the built-in tiny encoders or a local checkpoint, behind one `LoadedEncoder`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import get_args

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from edgefed.common.config import EdgefedConfig
from edgefed.common.encoders.checkpoint import read_config
from edgefed.common.encoders.readout import readout
from edgefed.common.encoders.registry import spec_for
from edgefed.common.encoders.spec import EncoderCheckpointError, EncoderSpec, Modality
from edgefed.common.encoders.tiny import TINY_SPECS, is_tiny_checkpoint, load_tiny_checkpoint

TINY = "tiny"


@dataclass(frozen=True)
class LoadedEncoder:
    """A bare encoder with the spec that says how to feed it, read it out and where LoRA goes."""

    spec: EncoderSpec
    module: PreTrainedModel  # the encoder itself (peft's get_peft_model on it injects LoRA in place)
    checkpoint_path: Path | None  # None for the built-in tiny encoders built from the run config
    config: PretrainedConfig  # the encoder's own config (a full CLIP's vision_config, say)

    @property
    def source(self) -> str:
        """The checkpoint directory, or "tiny": how error messages name this encoder."""
        return TINY if self.checkpoint_path is None else str(self.checkpoint_path)

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size(self.config)

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers(self.config)

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """Shape of one input sample (no batch axis); None where any length goes."""
        return self.spec.input_shape(self.config)

    def frame_mask(self, input_mask: torch.Tensor, length: int) -> torch.Tensor:
        """Input mask [B, T_in] -> mask [B, length] over the last hidden state (masked-mean readouts only)."""
        if self.spec.frame_mask is None:
            raise ValueError(f"{self.spec.name} reads out by {self.spec.readout}: it has no frame mask")
        return self.spec.frame_mask(self.module, input_mask, length)

    def encode(self, inputs: torch.Tensor, input_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, *input_shape] -> one vector per input [B, hidden_size].

        `input_mask` [B, T_in] marks the input positions that hold signal (mel frames for
        Whisper, samples for wav2vec2/HuBERT); the fixed-size inputs of the other
        families need none, and it is ignored there.
        """
        kwargs = {self.spec.input_name: inputs}
        uses_mask = input_mask is not None and self.spec.readout == "masked-mean"
        if uses_mask and self.spec.mask_in_forward is not None and self.spec.mask_in_forward(self.config):
            kwargs["attention_mask"] = input_mask.long()
        outputs = self.module(**kwargs)
        mask = self.frame_mask(input_mask, outputs.last_hidden_state.shape[1]) if uses_mask else None
        return readout(self.spec, outputs, mask)  # [B, D]


def load_encoder(source: str | Path, modality: Modality, cfg: EdgefedConfig | None = None) -> LoadedEncoder:
    """The `modality` encoder from `source`: "tiny" (built from `cfg`, random) or a local checkpoint directory.

    A checkpoint is read from local files only, and refused (`EncoderCheckpointError`) when it
    has no config.json, its model_type is not supported or is of the other modality, an encoder
    weight is missing or has the wrong shape, or its modules are not laid out as the spec says.
    A checkpoint of a trained tiny encoder (tiny.py's marker in its config.json) loads as tiny,
    and is refused unless `cfg` builds a tiny encoder of its shape.
    The tiny encoders are built under the caller's RNG (seed it for a reproducible base).
    """
    if modality not in get_args(Modality):
        raise ValueError(f"modality must be one of {get_args(Modality)}, got {modality!r}")
    if str(source) == TINY:
        if cfg is None:
            raise ValueError("the tiny encoders are built from the run config: pass cfg")
        spec, path = TINY_SPECS[modality], None
        module = spec.build(cfg)
    else:
        path = Path(source)
        saved = read_config(path)
        if is_tiny_checkpoint(saved, path):
            if cfg is None:
                raise ValueError(f"{path} is a trained tiny encoder, checked against the run config: pass cfg")
            spec, module = TINY_SPECS[modality], load_tiny_checkpoint(path, saved, modality, cfg)
        else:
            spec = spec_for(saved["model_type"], modality, path)
            module = spec.load(path)
    config = module.config
    if spec.pooler_switch is not None and not getattr(config, spec.pooler_switch):
        spec = replace(spec, readout="mean", pooler_switch=None)
    loaded = LoadedEncoder(spec=spec, module=module, checkpoint_path=path, config=config)
    _check_layout(loaded)
    return loaded


def _check_layout(loaded: LoadedEncoder) -> None:
    """The layers and their projections are where the spec says: a renaming in transformers is refused here."""
    spec, module = loaded.spec, loaded.module
    try:
        container = module.get_submodule(spec.layer_container)
        projections = [module.get_submodule(f"{layer}.{p}") for layer in spec.layer_names(loaded.config)
                       for p in spec.projections]
    except AttributeError as err:
        raise EncoderCheckpointError(loaded.source, f"{spec.name} encoder is not laid out as expected: {err}") from None
    held = len(container) if isinstance(container, nn.ModuleList) else type(container).__name__
    if held != loaded.num_layers:
        raise EncoderCheckpointError(loaded.source, f"{spec.layer_container} should hold {loaded.num_layers} layers, holds {held}")
    odd = [type(p).__name__ for p in projections if not isinstance(p, nn.Linear)]
    if odd:
        raise EncoderCheckpointError(loaded.source, f"{spec.name} attention projections are not Linear: {odd[:3]}")
