"""The built-in encoders: a small ViT and an AST built from configs with random weights (no checkpoint).

They are the default base (`video-encoder`, `audio-encoder` = tiny). Built under the caller's
RNG: build the frame encoder, then the audio one, after seeding with `model_seed`, and the
weights are those of the base every node rebuilds identically.

Once trained (`edgefed cloud train`) a tiny encoder is saved as a checkpoint directory whose
config.json carries `"edgefed_encoder": "tiny"` (TINY_MARKER). Its model_type is "vit" or
"audio-spectrogram-transformer", but it is not one of those families: it is read out by the
patch-token mean and fed letterboxed frames and the project's own log-mel, so the marker makes
`load_encoder` load it as tiny (`load_tiny_checkpoint`), never through the ViT/AST specs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from transformers import ASTConfig, ASTModel, PretrainedConfig, PreTrainedModel, ViTConfig, ViTModel

from edgefed.common.config import EdgefedConfig
from edgefed.common.encoders.audio import AST_PROJECTIONS, ast_finish
from edgefed.common.encoders.checkpoint import from_pretrained_checked
from edgefed.common.encoders.frames import VIT_PROJECTIONS, image_shape, layernorm_pooler_finish
from edgefed.common.encoders.spec import EncoderCheckpointError, EncoderSpec, Modality

TINY_MARKER = "edgefed_encoder"  # config.json key of a saved tiny encoder; its value is "tiny"


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


def tiny_vit_config(cfg: EdgefedConfig) -> ViTConfig:
    return ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3, **_layer_settings(cfg))


def tiny_ast_config(cfg: EdgefedConfig) -> ASTConfig:
    return ASTConfig(
        num_mel_bins=cfg.n_mels,
        max_length=cfg.audio_frames,
        patch_size=cfg.patch_size,
        frequency_stride=cfg.patch_size,
        time_stride=cfg.patch_size,
        **_layer_settings(cfg),
    )


def build_tiny_vit(cfg: EdgefedConfig) -> PreTrainedModel:
    return ViTModel(tiny_vit_config(cfg), add_pooling_layer=False).eval()


def build_tiny_ast(cfg: EdgefedConfig) -> PreTrainedModel:
    return ASTModel(tiny_ast_config(cfg)).eval()


@dataclass(frozen=True)
class _SavedTiny:
    """How a saved tiny encoder of one modality is recognised, checked and loaded."""

    model_type: str  # what save_pretrained writes for it
    config: Callable[[EdgefedConfig], PretrainedConfig]  # what the run config builds
    load: Callable[[Path], PreTrainedModel]
    shape_keys: dict[str, str]  # config.json keys that fix its shape -> the run-config key that sets each


_LAYER_KEYS = {"hidden_size": "hidden-size", "num_hidden_layers": "num-layers", "num_attention_heads": "num-heads",
               "intermediate_size": "intermediate-size"}
_SAVED_TINY: dict[str, _SavedTiny] = {
    "frames": _SavedTiny("vit", tiny_vit_config, partial(from_pretrained_checked, ViTModel, add_pooling_layer=False),
                         {"image_size": "image-size", "patch_size": "patch-size", "num_channels": "3, fixed",
                          **_LAYER_KEYS}),
    "audio": _SavedTiny("audio-spectrogram-transformer", tiny_ast_config, partial(from_pretrained_checked, ASTModel),
                        {"num_mel_bins": "n-mels", "max_length": "audio-frames", "patch_size": "patch-size",
                         "frequency_stride": "patch-size", "time_stride": "patch-size", **_LAYER_KEYS}),
}


def is_tiny_checkpoint(config: dict[str, Any], path: Path) -> bool:
    """Whether a checkpoint's config.json (as a dict) is that of a saved tiny encoder."""
    marker = config.get(TINY_MARKER)
    if marker is None:
        return False
    if marker != "tiny":
        raise EncoderCheckpointError(path, f"config.json has {TINY_MARKER} = {marker!r}; the only value is 'tiny'")
    return True


def load_tiny_checkpoint(path: Path, config: dict[str, Any], modality: Modality, cfg: EdgefedConfig) -> PreTrainedModel:
    """A saved tiny encoder, every weight loaded; refused when it is of the other modality or its shape is
    not the one the run config builds (the model around it, and its inputs, are built from the run config)."""
    saved = _SAVED_TINY[modality]
    if config["model_type"] != saved.model_type:
        raise EncoderCheckpointError(path, f"a tiny {config['model_type']!r} encoder cannot be the {modality} encoder "
                                           f"(the tiny {modality} encoder is {saved.model_type!r})")
    expected = saved.config(cfg)
    differ = [f"{key} {config.get(key)!r}, the run config gives {getattr(expected, key)!r} ({setting})"
              for key, setting in saved.shape_keys.items() if config.get(key) != getattr(expected, key)]
    if differ:
        raise EncoderCheckpointError(path, f"this tiny {modality} encoder has another shape than the run config: "
                                           f"{'; '.join(differ)}. Run with the settings it was trained with")
    return saved.load(path)


def mark_tiny_checkpoint(path: Path) -> None:
    """Add TINY_MARKER to the config.json that save_pretrained wrote for a tiny encoder."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config[TINY_MARKER] = "tiny"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# Read out by the mean of the patch tokens, not CLS: on a base that is still random the CLS
# output is nearly the same for every input, while the patch mean carries the content.
TINY_FRAMES = EncoderSpec(
    name="tiny",
    finish=layernorm_pooler_finish,
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
    finish=ast_finish,
    model_types=(),
    modality="audio",
    input_name="input_values",
    input_shape=lambda c: (int(c.max_length), int(c.num_mel_bins)),
    readout="mean",
    mean_from=2,  # skips CLS and distillation
    layer_path="layers.{i}",
    projections=AST_PROJECTIONS,
    preprocessing="tiny-logmel",  # natural-log mel power, fixed normalisation of common/model/classifier.py
    build=build_tiny_ast,
)

TINY_SPECS = {"frames": TINY_FRAMES, "audio": TINY_AUDIO}
