"""LoRA on the shared model, and the adapter state that travels between nodes.

The adapter state is exactly the trainable tensors: LoRA A/B of the attention
projections of both encoders plus the fully trained fusion layer and head.
Everything else is the frozen base, rebuilt identically on every node (from
`model_seed`, or from encoder checkpoints the model service ships), so it
never travels with an adapter.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from edgefed.common.config import EdgefedConfig
from edgefed.common.encoders import TINY, lora_targets
from edgefed.common.model.base_checkpoint import encoder_sources
from edgefed.common.model.classifier import MultimodalClassifier, build_base_model
from edgefed.common.wire.base_manifest import BASE_PARTS, base_fingerprint_of_dirs
from edgefed.common.wire.codec import Adapter

FULLY_TRAINED = ("video_proj", "audio_proj", "fusion", "head")



class AdapterMismatchError(ValueError):
    """An adapter state does not fit the model (names or shapes differ)."""


def build_lora_model(cfg: EdgefedConfig, *, load_head: bool = True) -> PeftModel:
    """Base model with LoRA on the attention projections of both encoders (all layers, or the last
    `lora-layers`); the projections, fusion and head train in full (`load_head`: build_base_model)."""
    base = build_base_model(cfg, load_head=load_head)
    layers = cfg.lora_layers or None
    targets = [name for attribute, loaded in base.encoders.items()
               for name in lora_targets(loaded, layers, prefix=f"{attribute}.", projections=cfg.lora_target_modules)]
    lora_cfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, bias="none")
    # peft's LoRA B starts at zero, A from its own init: seed it so every node
    # starts from the same adapter as the server (which sends its init anyway).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.model_seed + 1)
        model = get_peft_model(base, lora_cfg)
    for name, param in model.named_parameters():
        if _is_fully_trained(name):
            param.requires_grad_(True)
    return model


def classifier_of(model: nn.Module) -> MultimodalClassifier:
    """The MultimodalClassifier inside a LoRA (peft) model, or the model itself (a merged or plain one)."""
    inner = model.base_model.model if isinstance(model, PeftModel) else model
    if not isinstance(inner, MultimodalClassifier):
        raise TypeError(f"expected the multimodal classifier (or its LoRA wrapper), got {type(inner).__name__}")
    return inner


def _is_fully_trained(name: str) -> bool:
    parts = name.split(".")
    # peft prefixes names with base_model.model.
    return any(p in FULLY_TRAINED for p in parts[:4]) and "lora_" not in name


def adapter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_adapter_state(model: nn.Module) -> Adapter:
    """Detached copies of exactly the trainable tensors, in a stable order."""
    return OrderedDict(
        (n, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad
    )


def set_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an adapter state in place; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise AdapterMismatchError(
            f"adapter tensors differ: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(param.shape):
                raise AdapterMismatchError(
                    f"{name}: shape {tuple(value.shape)} != expected {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))


def merge_adapter(model: PeftModel) -> MultimodalClassifier:
    """Fold LoRA into the base weights; returns a plain model (the peft wrapper is consumed)."""
    merged = model.merge_and_unload()
    assert isinstance(merged, MultimodalClassifier)
    return merged.eval()


def base_fingerprint(model: nn.Module) -> str:
    """Hash of the frozen base weights: nodes check they share the server's base."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def checkpoint_dirs(cfg: EdgefedConfig) -> tuple[str | None, str | None]:
    """The (video, audio) checkpoint directories of the base; None for a built-in tiny encoder built from
    `model-seed` (a base checkpoint's parts are directories, trained tiny encoders included)."""
    return tuple(None if source == TINY else source for source in encoder_sources(cfg))


def installed_base_config(cfg: EdgefedConfig, folder: str | Path) -> EdgefedConfig:
    """`cfg` as a device runs it on the base it installed in `folder` (`video/`, `audio/`: a base package,
    edge/models/base_fetcher.py): each checkpoint encoder read from there, and a warm start's
    `base-checkpoint` the folder itself, which has the layout of the cloud's base checkpoint without its
    head file (a device builds with `load_head=False`)."""
    folder = Path(folder)
    video, audio = BASE_PARTS
    local = cfg.replace(video_encoder=TINY if cfg.video_encoder == TINY else str(folder / video),
                        audio_encoder=TINY if cfg.audio_encoder == TINY else str(folder / audio))
    return local.replace(base_checkpoint=str(folder)) if cfg.base_checkpoint else local


def base_identity(cfg: EdgefedConfig, model: nn.Module) -> str:
    """The fingerprint every node's base must match.

    The built-in encoders: the hash of the frozen weights (rebuilt from `model-seed` on every node).
    Checkpoint encoders (a base checkpoint's parts too): the base package's fingerprint, a hash of each
    checkpoint's weight files and configs (common/wire/base_manifest.py), which is what the model service
    ships and a device checks; a tiny part of a mixed base is pinned by the run config every node receives."""
    video, audio = checkpoint_dirs(cfg)
    if video is None and audio is None:
        return base_fingerprint(model)
    return base_fingerprint_of_dirs(video, audio)
