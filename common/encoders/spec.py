"""What the rest of edgefed needs to know about one encoder family, and the error every refusal raises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

if TYPE_CHECKING:
    from edgefed.common.config import EdgefedConfig

Modality = Literal["frames", "audio"]
# cls: token 0 of the last hidden state; pooler: the model's own pooler_output;
# mean: mean of the last hidden state from token `mean_from` on; masked-mean: mean over the
# positions the input mask says hold signal (a plain mean when no mask is given).
Readout = Literal["cls", "pooler", "mean", "masked-mean"]
# Which preprocessing the encoder expects (built in common/preprocessing/, not here). For the
# checkpoint kinds its parameters come from the checkpoint's preprocessor_config.json.
Preprocessing = Literal["tiny-image", "tiny-logmel", "vit-image", "ast-fbank", "whisper-logmel", "raw-waveform"]

# An input mask at the input's resolution [B, T_in] -> the mask over the last hidden state [B, T_out].
FrameMask = Callable[[PreTrainedModel, torch.Tensor, int], torch.Tensor]
# What the encoder's forward does after its last layer: hidden [B, T, D] -> the outputs `readout` reads
# (last_hidden_state, pooler_output). common/encoders/prefix.py runs the layers from a cached state, then this.
Finish = Callable[[PreTrainedModel, torch.Tensor], BaseModelOutputWithPooling]
# One layer's output at the first n tokens only: (layer, hidden [B, T, D], n) -> [B, n, D]. Its keys and values
# still come from all T tokens; the queries, the output projection and the MLP run on n.
LayerOnFirst = Callable[[torch.nn.Module, torch.Tensor, int], torch.Tensor]


class EncoderCheckpointError(ValueError):
    """An encoder cannot be used as asked: `path` is the checkpoint (or "tiny"), `problem` says what is wrong."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"encoder checkpoint {path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder family: how to load it, feed it, read it out and where LoRA goes.

    Exactly one of `load` (a checkpoint directory -> the bare encoder, every weight verified)
    and `build` (the run config -> a random encoder from a transformers config) is set.
    """

    name: str  # the family, e.g. "vit"; "tiny" for the built-in encoders
    model_types: tuple[str, ...]  # config.json `model_type` values this spec loads (none for tiny)
    modality: Modality
    input_name: str  # keyword of the encoder's forward: pixel_values / input_values / input_features
    input_shape: Callable[[PretrainedConfig], tuple[int | None, ...]]  # per sample; None: any length
    readout: Readout
    layer_path: str  # one transformer layer relative to the encoder, with "{i}": "encoder.layers.{i}"
    projections: tuple[str, ...]  # LoRA targets inside each layer: "self_attn.q_proj", ...
    preprocessing: Preprocessing
    hidden_size_key: str = "hidden_size"
    num_layers_key: str = "num_hidden_layers"
    mean_from: int = 0  # "mean" readout: first token averaged (skips CLS / distillation tokens)
    load: Callable[[Path], PreTrainedModel] | None = None
    build: Callable[[EdgefedConfig], PreTrainedModel] | None = None
    # Writes the encoder as a checkpoint directory `load` reads back; None: save_pretrained in the
    # family's original format (what transformers' own checkpoints of it hold).
    save: Callable[[PreTrainedModel, Path], None] | None = None
    frame_mask: FrameMask | None = None  # needed by "masked-mean"
    # Whether the forward itself takes the input mask as `attention_mask` (a function of the config).
    mask_in_forward: Callable[[PretrainedConfig], bool] | None = None
    # A config flag that, when false, builds the model without its pooler: read out the token mean then.
    pooler_switch: str | None = None
    # After the last layer (final norm, pooler); None: the family has no frozen-prefix path.
    finish: Finish | None = None
    # The readout reads only the first `read_tokens` tokens of the last hidden state (CLS; AST's CLS and
    # distillation token); 0: it reads them all. With `last_layer_on_first` the last layer then runs its
    # queries and MLP on those tokens alone when training from a split (common/encoders/prefix.py).
    read_tokens: int = 0
    last_layer_on_first: LayerOnFirst | None = None

    def __post_init__(self) -> None:
        if (self.load is None) == (self.build is None):
            raise ValueError(f"encoder spec {self.name}: set exactly one of load and build")
        if self.readout == "masked-mean" and self.frame_mask is None:
            raise ValueError(f"encoder spec {self.name}: a masked-mean readout needs frame_mask")
        if not self.layer_path.endswith(".{i}"):
            raise ValueError(f"encoder spec {self.name}: layer_path must end with '.{{i}}', got {self.layer_path!r}")
        if not self.projections:
            raise ValueError(f"encoder spec {self.name}: no LoRA projections")
        if (self.read_tokens > 0) != (self.last_layer_on_first is not None):
            raise ValueError(f"encoder spec {self.name}: set read_tokens and last_layer_on_first together")

    def hidden_size(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.hidden_size_key))

    def num_layers(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.num_layers_key))

    def layer_names(self, config: PretrainedConfig) -> list[str]:
        """Module names of the transformer layers, first to last."""
        return [self.layer_path.format(i=i) for i in range(self.num_layers(config))]

    @property
    def layer_container(self) -> str:
        """The ModuleList that holds the layers ("encoder.layers")."""
        return self.layer_path.removesuffix(".{i}")
