"""Audio encoder families, one spec each, keyed by config.json `model_type`.

In-memory module names (transformers 5.24, checked on every load): AST has
`attention.{q,k,v,o}_proj`, Whisper's encoder `self_attn.{q,k,v,out}_proj`, wav2vec2 and
HuBERT `attention.{q,k,v,out}_proj` under `encoder.layers`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from transformers import ASTModel, HubertModel, PretrainedConfig, PreTrainedModel, Wav2Vec2Model
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from transformers.modeling_outputs import BaseModelOutputWithPooling

from edgefed.common.encoders.checkpoint import from_pretrained_checked, verify_against_files
from edgefed.common.encoders.frames import vit_layer_on_first
from edgefed.common.encoders.spec import EncoderSpec

AST_PROJECTIONS = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
WHISPER_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
WAV2VEC2_PROJECTIONS = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj")

# Where a Whisper checkpoint keeps its encoder: WhisperModel saves `encoder.*`,
# WhisperForConditionalGeneration `model.encoder.*`.
WHISPER_ENCODER_PREFIXES = ("encoder.", "model.encoder.")


def load_whisper_encoder(path: Path) -> PreTrainedModel:
    """Whisper's encoder alone out of a full Whisper checkpoint (the decoder is never built).

    `WhisperEncoder.from_pretrained(full)` looks for unprefixed keys, finds none and keeps
    random weights; the key mapping strips the encoder prefix, and the result is checked
    against the files tensor by tensor.
    """
    module = from_pretrained_checked(WhisperEncoder, path, key_mapping={r"^(model\.)?encoder\.": ""})
    verify_against_files(module, path, WHISPER_ENCODER_PREFIXES)
    return module


def save_whisper_encoder(module: PreTrainedModel, path: Path) -> None:
    """Whisper's encoder as a WhisperModel checkpoint holds it (`encoder.*`, no decoder): what
    `load_whisper_encoder` reads. Not save_pretrained's original format: converting back through the
    key mapping the encoder was loaded with raises in transformers 5.24 (and Whisper's in-memory
    names are its file names)."""
    state = {f"{WHISPER_ENCODER_PREFIXES[0]}{name}": tensor for name, tensor in module.state_dict().items()}
    module.save_pretrained(path, state_dict=state, save_original_format=False)


def whisper_frame_mask(module: PreTrainedModel, mask: torch.Tensor, length: int) -> torch.Tensor:
    """Mel-frame mask [B, 2*P] -> encoder-frame mask [B, P]: conv2 has stride 2, output j sits on input 2j."""
    return mask[:, ::2][:, :length].bool()


def conv_stack_frame_mask(module: PreTrainedModel, mask: torch.Tensor, length: int) -> torch.Tensor:
    """Sample mask [B, S] (valid samples first, as the feature extractor pads) -> frame mask [B, T]."""
    lengths = module._get_feat_extract_output_lengths(mask.long().sum(-1))
    return torch.arange(length, device=mask.device)[None, :] < lengths[:, None]


def layer_norm_extractor(config: PretrainedConfig) -> bool:
    """wav2vec2/HuBERT take `attention_mask` only with a layer-norm feature extractor ("large"
    checkpoints); the group-norm ones ("base") were trained on zero-padded input without one."""
    return config.feat_extract_norm == "layer"


# After the last layer, as each model's forward (transformers 5.24) does; tests/test_prefix.py checks
# each against the whole forward.
def ast_finish(module: PreTrainedModel, hidden: torch.Tensor) -> BaseModelOutputWithPooling:
    """The final layernorm; the pooler is the mean of CLS and the distillation token (the tiny audio encoder too)."""
    sequence = module.layernorm(hidden)
    return BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=(sequence[:, 0] + sequence[:, 1]) / 2)


def whisper_finish(module: PreTrainedModel, hidden: torch.Tensor) -> BaseModelOutputWithPooling:
    return BaseModelOutputWithPooling(last_hidden_state=module.layer_norm(hidden))


def wav2vec2_finish(module: PreTrainedModel, hidden: torch.Tensor) -> BaseModelOutputWithPooling:
    """wav2vec2 and HuBERT: the encoder's final layernorm only in the stable-layer-norm ("large") layout;
    wav2vec2's adapter when the checkpoint has one."""
    if module.config.do_stable_layer_norm:
        hidden = module.encoder.layer_norm(hidden)
    adapter = getattr(module, "adapter", None)
    return BaseModelOutputWithPooling(last_hidden_state=adapter(hidden) if adapter is not None else hidden)


AST = EncoderSpec(
    name="ast",
    finish=ast_finish,
    read_tokens=2,  # CLS and distillation
    last_layer_on_first=vit_layer_on_first,
    model_types=("audio-spectrogram-transformer",),
    modality="audio",
    input_name="input_values",
    input_shape=lambda c: (int(c.max_length), int(c.num_mel_bins)),  # [frames, mel bins]
    # pooler_output = mean of the CLS and distillation tokens after the final layernorm: exactly
    # what ASTForAudioClassification's head reads (and it has no weights that could be random).
    readout="pooler",
    layer_path="layers.{i}",
    projections=AST_PROJECTIONS,
    preprocessing="ast-fbank",
    load=partial(from_pretrained_checked, ASTModel),
)

WHISPER = EncoderSpec(
    name="whisper",
    finish=whisper_finish,
    model_types=("whisper",),
    modality="audio",
    input_name="input_features",
    # [mel bins, 2 * max_source_positions] (80 x 3000 for 30 s): the encoder refuses any other length.
    input_shape=lambda c: (int(c.num_mel_bins), 2 * int(c.max_source_positions)),
    # Mean over the frames that hold audio: Whisper pads every clip to 30 s and attends over the
    # padding (it has no attention mask), so a plain mean of a 2 s clip would be 93 % padding.
    readout="masked-mean",
    frame_mask=whisper_frame_mask,
    layer_path="layers.{i}",
    projections=WHISPER_PROJECTIONS,
    preprocessing="whisper-logmel",
    hidden_size_key="d_model",
    num_layers_key="encoder_layers",
    load=load_whisper_encoder,
    save=save_whisper_encoder,
)

WAV2VEC2 = EncoderSpec(
    name="wav2vec2",
    finish=wav2vec2_finish,
    model_types=("wav2vec2",),
    modality="audio",
    input_name="input_values",
    input_shape=lambda c: (None,),  # raw 16 kHz samples, any length past the conv stack's receptive field
    # Masked mean over the frames of real samples: wav2vec2 has no CLS token, and this is what
    # Wav2Vec2ForSequenceClassification pools.
    readout="masked-mean",
    frame_mask=conv_stack_frame_mask,
    mask_in_forward=layer_norm_extractor,
    layer_path="encoder.layers.{i}",
    projections=WAV2VEC2_PROJECTIONS,
    preprocessing="raw-waveform",
    load=partial(from_pretrained_checked, Wav2Vec2Model),
)

HUBERT = EncoderSpec(
    name="hubert",
    finish=wav2vec2_finish,
    model_types=("hubert",),
    modality="audio",
    input_name="input_values",
    input_shape=lambda c: (None,),
    readout="masked-mean",  # as wav2vec2 (same architecture, same sequence-classification pooling)
    frame_mask=conv_stack_frame_mask,
    mask_in_forward=layer_norm_extractor,
    layer_path="encoder.layers.{i}",
    projections=WAV2VEC2_PROJECTIONS,
    preprocessing="raw-waveform",
    load=partial(from_pretrained_checked, HubertModel),
)

AUDIO_SPECS = (AST, WHISPER, WAV2VEC2, HUBERT)
