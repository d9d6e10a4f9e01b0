"""The built-in encoders: a small ViT and an AST built from configs with random weights (no checkpoint).

They are the default base (`base-checkpoint` empty). Built under the caller's RNG: build the
frame encoder, then the audio one, after seeding with `model_seed`, and the weights are those
of the base every node rebuilds identically.
"""

from __future__ import annotations

from typing import Any

from transformers import ASTConfig, ASTModel, PreTrainedModel, ViTConfig, ViTModel

from edgefed.common.config import EdgefedConfig
from edgefed.common.encoders.audio import AST_PROJECTIONS
from edgefed.common.encoders.frames import VIT_PROJECTIONS, image_shape
from edgefed.common.encoders.spec import EncoderSpec


def _layer_settings(cfg: EdgefedConfig) -> dict[str, Any]:
    return {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        # Wider than transformers' 0.02: a random base with tiny weights is nearly linear, and
        # LoRA on it learns far slower (measured).
        "initializer_range": 0.1,
    }


def build_tiny_vit(cfg: EdgefedConfig) -> PreTrainedModel:
    config = ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3, **_layer_settings(cfg))
    return ViTModel(config, add_pooling_layer=False).eval()


def build_tiny_ast(cfg: EdgefedConfig) -> PreTrainedModel:
    config = ASTConfig(
        num_mel_bins=cfg.n_mels,
        max_length=cfg.audio_frames,
        patch_size=cfg.patch_size,
        frequency_stride=cfg.patch_size,
        time_stride=cfg.patch_size,
        **_layer_settings(cfg),
    )
    return ASTModel(config).eval()


# Read out by the mean of the patch tokens, not CLS: on a base that is still random the CLS
# output is nearly the same for every input, while the patch mean carries the content.
TINY_FRAMES = EncoderSpec(
    name="tiny",
    model_types=(),
    modality="frames",
    input_name="pixel_values",
    input_shape=image_shape,
    readout="mean",
    mean_from=1,  # skips CLS
    layer_path="layers.{i}",
    projections=VIT_PROJECTIONS,
    preprocessing="tiny-image",  # uint8 -> [-1, 1]
    build=build_tiny_vit,
)

TINY_AUDIO = EncoderSpec(
    name="tiny",
    model_types=(),
    modality="audio",
    input_name="input_values",
    input_shape=lambda c: (int(c.max_length), int(c.num_mel_bins)),
    readout="mean",
    mean_from=2,  # skips CLS and distillation
    layer_path="layers.{i}",
    projections=AST_PROJECTIONS,
    preprocessing="tiny-logmel",  # natural-log mel power, fixed normalisation of common/model.py
    build=build_tiny_ast,
)

TINY_SPECS = {"frames": TINY_FRAMES, "audio": TINY_AUDIO}
