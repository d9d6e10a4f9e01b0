"""An encoder split at a layer: the frozen prefix's output, and the rest of the forward from it.

    inputs ──► embeddings ──► layers[:start] ──► hidden [B, T, D]        hidden_before(loaded, inputs, start)
                                                   │  (the frozen prefix: computed once per clip and cached)
                                                   └──► layers[start:] ──► spec.finish ──► readout ──► [B, D]
                                                                                     encode_from(loaded, hidden, start)

With LoRA only on the last N layers (`lora-layers`) nothing before layer L - N trains, so the
hidden states entering it depend on the clip and the frozen base alone (TinyTL's observation).
`hidden_before` runs the encoder's own forward and stops it where layer `start` is called (a
forward pre-hook), so whatever the family does before its layers (patch and position embeddings,
wav2vec2's convolutions and positional convolution, Whisper's convolutions) is its own code. The
layers after the split are called one by one, then the family's `finish` (final norm, pooler):
`encode_from(hidden_before(x, s), s) == encode(x)` is checked for every family in
tests/test_prefix.py. A family whose readout reads only the first tokens (ViT's and DeiT's CLS, AST's CLS
and distillation token) runs its last layer on those tokens alone (keys and values still from all):
the same numbers for a sixth of that layer's work.

The prefix is computed in eval mode: the training-only randomness before the split (wav2vec2's
time masking and LayerDrop, any dropout) is not applied to a cached state, as to any frozen
feature extractor. A layer that receives anything but its hidden states (an attention mask:
wav2vec2/HuBERT "large" checkpoints with a padding mask) cannot be replayed from the hidden
states alone and is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgefed.common.encoders.loading import LoadedEncoder
from edgefed.common.encoders.readout import readout


class PrefixUnsupportedError(ValueError):
    """This encoder cannot be split at the asked layer (says which and why)."""


class _Reached(Exception):  # noqa: N818 - control flow, never escapes hidden_before
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def check_split(loaded: LoadedEncoder, start: int) -> None:
    """Refuse a split with anything trainable before layer `start` (the prefix would not be frozen)."""
    if not 0 <= start < loaded.num_layers:
        raise PrefixUnsupportedError(f"{loaded.source}: split at layer {start}, the encoder has {loaded.num_layers}")
    later = tuple(f"{name}." for name in loaded.spec.layer_names(loaded.config)[start:])
    trainable = [name for name, p in loaded.module.named_parameters() if p.requires_grad and not name.startswith(later)]
    if trainable:
        raise PrefixUnsupportedError(f"{loaded.source}: {trainable[0]} trains but sits before layer {start}: "
                                     "the prefix is not frozen")
    if loaded.spec.finish is None:
        raise PrefixUnsupportedError(f"{loaded.source}: the {loaded.spec.name} family has no frozen-prefix path")


def _layers(loaded: LoadedEncoder) -> nn.ModuleList:
    return loaded.module.get_submodule(loaded.spec.layer_container)


@torch.no_grad()
def hidden_before(loaded: LoadedEncoder, inputs: torch.Tensor, start: int) -> torch.Tensor:
    """The hidden states [B, T, D] entering layer `start`, in eval mode, without running that layer or any after."""
    layer = _layers(loaded)[start]

    def stop(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        # flags (Whisper's use_cache) do not change an encoder layer's output; a tensor (a mask) would
        extra = [a for a in (*args[1:], *(v for k, v in kwargs.items() if k != "hidden_states"))
                 if isinstance(a, torch.Tensor)]
        if extra or not isinstance(hidden, torch.Tensor):
            raise PrefixUnsupportedError(f"{loaded.source}: layer {start} receives more than its hidden states "
                                         "(an attention mask): it cannot be replayed from a cached state")
        raise _Reached(hidden)

    handle = layer.register_forward_pre_hook(stop, with_kwargs=True)
    was_training = loaded.module.training
    loaded.module.eval()
    try:
        loaded.module(**{loaded.spec.input_name: inputs})
    except _Reached as reached:
        return reached.hidden.detach()
    finally:
        handle.remove()
        loaded.module.train(was_training)
    raise PrefixUnsupportedError(f"{loaded.source}: the forward never called layer {start}")


def encode_from(loaded: LoadedEncoder, hidden: torch.Tensor, start: int,
                input_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Layers `start`.. on `hidden` [B, T, D], the family's finish and readout: [B, hidden_size], as `encode`.

    When the readout reads only the first tokens (spec.read_tokens: CLS), the last layer runs its queries,
    output projection and MLP on those alone: nothing else of it is ever read."""
    spec, layers = loaded.spec, _layers(loaded)[start:]
    short = spec.read_tokens > 0 and len(layers) > 0
    for layer in layers[:-1] if short else layers:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    if short:
        hidden = spec.last_layer_on_first(layers[-1], hidden, spec.read_tokens)
    outputs = spec.finish(loaded.module, hidden)
    uses_mask = input_mask is not None and loaded.spec.readout == "masked-mean"
    mask = loaded.frame_mask(input_mask, outputs.last_hidden_state.shape[1]) if uses_mask else None
    return readout(loaded.spec, outputs, mask)
