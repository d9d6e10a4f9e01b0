"""Frame (image) encoder families, one spec each, keyed by config.json `model_type`.

In-memory module names are those of transformers 5.24 (checked by the loader on every
load, so a renaming in another version is refused, not LoRA-ed into nothing): ViT, DeiT
and DINOv2 have `attention.{q,k,v,o}_proj`; CLIP and SigLIP `self_attn.{q,k,v,out}_proj`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel, DeiTModel, Dinov2Model, PretrainedConfig, PreTrainedModel, SiglipVisionModel, ViTModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from edgefed.common.encoders.checkpoint import from_pretrained_checked
from edgefed.common.encoders.spec import EncoderSpec

VIT_PROJECTIONS = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
CLIP_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def image_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """[C, H, W] from `num_channels` and `image_size` (an int or a pair)."""
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config.num_channels), int(height), int(width))


# After the last layer, as each model's forward (transformers 5.24) does; tests/test_prefix.py checks
# each against the whole forward.
def layernorm_pooler_finish(module: PreTrainedModel, hidden: torch.Tensor) -> BaseModelOutputWithPooling:
    """ViT, DeiT (and the tiny ViT): the final layernorm, then the pooler when one was built."""
    sequence = module.layernorm(hidden)
    pooler = getattr(module, "pooler", None)
    return BaseModelOutputWithPooling(last_hidden_state=sequence,
                                      pooler_output=pooler(sequence) if pooler is not None else None)


def dinov2_finish(module: PreTrainedModel, hidden: torch.Tensor) -> BaseModelOutputWithPooling:
    sequence = module.layernorm(hidden)
    return BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=sequence[:, 0])


def clip_finish(module: PreTrainedModel, hidden: torch.Tensor) -> BaseModelOutputWithPooling:
    """last_hidden_state is not normalised; the pooler is post_layernorm of CLS."""
    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=module.post_layernorm(hidden[:, 0]))


def siglip_finish(module: PreTrainedModel, hidden: torch.Tensor) -> BaseModelOutputWithPooling:
    sequence = module.post_layernorm(hidden)
    return BaseModelOutputWithPooling(last_hidden_state=sequence,
                                      pooler_output=module.head(sequence) if module.use_head else None)


def vit_layer_on_first(layer: torch.nn.Module, hidden: torch.Tensor, n: int) -> torch.Tensor:
    """A ViT-style layer (ViT, DeiT, AST: pre-norm, `attention.{q,k,v,o}_proj`, `mlp`) at its first n tokens,
    as its forward computes them (tests/test_prefix.py compares): keys and values from every token."""
    attention = layer.attention
    x = layer.layernorm_before(hidden)  # [B, T, D]
    batch, tokens = x.shape[:2]
    heads = (batch, -1, attention.num_attention_heads, attention.head_dim)
    query = attention.q_proj(x[:, :n]).view(heads).transpose(1, 2)
    key = attention.k_proj(x).view(heads).transpose(1, 2)
    value = attention.v_proj(x).view(heads).transpose(1, 2)
    dropout = attention.attention_dropout if attention.training else 0.0
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=attention.scaling)
    out = attention.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
    hidden = layer.dropout(out) + hidden[:, :n]
    return layer.dropout(layer.mlp(layer.layernorm_after(hidden))) + hidden


# What every frame family shares: pixel_values of the config's image size, from its image processor.
_frame_spec = partial(EncoderSpec, modality="frames", input_name="pixel_values", input_shape=image_shape,
                      preprocessing="vit-image")

VIT = _frame_spec(
    name="vit",
    finish=layernorm_pooler_finish,
    read_tokens=1,  # CLS
    last_layer_on_first=vit_layer_on_first,
    model_types=("vit",),
    # CLS of the final layernorm: what ViTForImageClassification's head reads. Not the pooler:
    # classification checkpoints have none, so add_pooling_layer=False keeps a random one out.
    readout="cls",
    layer_path="layers.{i}",
    projections=VIT_PROJECTIONS,
    load=partial(from_pretrained_checked, ViTModel, add_pooling_layer=False),
)

DEIT = _frame_spec(
    name="deit",
    finish=layernorm_pooler_finish,
    read_tokens=1,  # CLS
    last_layer_on_first=vit_layer_on_first,
    model_types=("deit",),
    # CLS (token 0): the token DeiT trains on the true labels (token 1, distillation, follows the
    # teacher). No pooler, for the same reason as ViT.
    readout="cls",
    layer_path="layers.{i}",
    projections=VIT_PROJECTIONS,
    load=partial(from_pretrained_checked, DeiTModel, add_pooling_layer=False),
)

DINOV2 = _frame_spec(
    name="dinov2",
    finish=dinov2_finish,
    model_types=("dinov2",),
    # config image_size is the pretraining size (518 on the hub); DINOv2 interpolates its
    # position embeddings, so any multiple of patch_size (224 in its processor) also works.
    # CLS after the final layernorm: DINOv2's self-distillation trains the CLS token as the image
    # summary (its pooler_output is this same token; there is no pooler layer to be random).
    readout="cls",
    layer_path="encoder.layer.{i}",
    projections=VIT_PROJECTIONS,
    load=partial(from_pretrained_checked, Dinov2Model),
)

CLIP = _frame_spec(
    name="clip",
    finish=clip_finish,
    # A full CLIP checkpoint loads its vision tower (the text tower's keys are ignored).
    model_types=("clip", "clip_vision_model"),
    # pooler_output = post_layernorm(CLS): the vector CLIP's visual projection was trained on;
    # last_hidden_state is not post-layernormed, so its token 0 is not the same thing.
    readout="pooler",
    layer_path="encoder.layers.{i}",
    projections=CLIP_PROJECTIONS,
    load=partial(from_pretrained_checked, CLIPVisionModel),
)

SIGLIP = _frame_spec(
    name="siglip",
    finish=siglip_finish,
    model_types=("siglip", "siglip_vision_model"),
    # pooler_output = the attention-pooling head (a probe query over all tokens; SigLIP has no CLS):
    # the vector its contrastive loss was trained on. The head's nn.MultiheadAttention stays
    # frozen: its out_proj is a Linear that LoRA can wrap but the MHA forward never calls, so the
    # projections are named in full and the target check refuses anything inside it. Without the
    # head (vision_use_head=false) the readout is the token mean.
    readout="pooler",
    pooler_switch="vision_use_head",
    layer_path="encoder.layers.{i}",
    projections=CLIP_PROJECTIONS,
    load=partial(from_pretrained_checked, SiglipVisionModel),
)

FRAME_SPECS = (VIT, DEIT, DINOV2, CLIP, SIGLIP)
