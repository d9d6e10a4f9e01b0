"""Tiny random checkpoints of every encoder family, written with `save_pretrained` like a real one.

Each checkpoint directory holds config.json, model.safetensors and the preprocessor_config.json
of the family's own feature extractor / image processor class, so later code can read it.
`Checkpoint.encoder` is the saved encoder part (a full CLIP's vision tower, Whisper's encoder,
a classifier's backbone): what a correct loader reproduces tensor for tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    ASTConfig,
    ASTFeatureExtractor,
    ASTModel,
    BertConfig,
    BertModel,
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTImageProcessor,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    HubertConfig,
    HubertModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperModel,
)

IMAGE = 32  # pixels per side
PATCH = 8
MELS = 16
AUDIO_FRAMES = 32  # AST max_length, and Whisper's 2 * max_source_positions
LAYERS = 2
HIDDEN = 32
SMALL = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "intermediate_size": 64}
TEXT = {"hidden_size": HIDDEN, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
# A 2-layer conv stack: 5 * 2 = 10 samples per frame.
CONV = {"conv_dim": (8, 8), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_feat_extract_layers": 2,
        "num_conv_pos_embeddings": 4, "num_conv_pos_embedding_groups": 2}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model_type: str
    modality: str
    encoder: nn.Module  # the saved encoder part, to compare the loaded one against


def _image_processor(kind: type, **kwargs):
    return kind(size={"height": IMAGE, "width": IMAGE}, **kwargs)


def _whisper_config() -> WhisperConfig:
    return WhisperConfig(
        d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=MELS, max_source_positions=AUDIO_FRAMES // 2,
        vocab_size=100, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=3,
    )


def _whisper_extractor() -> WhisperFeatureExtractor:
    # 1 s chunks with a 500-sample hop: 32 mel frames, what the tiny encoder takes.
    return WhisperFeatureExtractor(feature_size=MELS, chunk_length=1, hop_length=500)


# kind -> (model_type, modality, model, encoder part of the model, preprocessor)
def _vit():
    m = ViTModel(ViTConfig(image_size=IMAGE, patch_size=PATCH, **SMALL))
    return "vit", "frames", m, m, _image_processor(ViTImageProcessor)


def _vit_classifier():
    m = ViTForImageClassification(ViTConfig(image_size=IMAGE, patch_size=PATCH, num_labels=3, **SMALL))
    return "vit", "frames", m, m.vit, _image_processor(ViTImageProcessor)


def _deit():
    m = DeiTModel(DeiTConfig(image_size=IMAGE, patch_size=PATCH, **SMALL))
    return "deit", "frames", m, m, DeiTImageProcessor(size={"height": IMAGE, "width": IMAGE},
                                                     crop_size={"height": IMAGE, "width": IMAGE})


def _dinov2():
    m = Dinov2Model(Dinov2Config(image_size=IMAGE, patch_size=PATCH, **SMALL))
    return "dinov2", "frames", m, m, BitImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})


def _clip():
    m = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=dict(image_size=IMAGE, patch_size=PATCH, **SMALL), projection_dim=16))
    return "clip", "frames", m, m.vision_model, CLIPImageProcessor(size={"shortest_edge": IMAGE},
                                                                  crop_size={"height": IMAGE, "width": IMAGE})


def _clip_vision():
    m = CLIPVisionModel(CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, **SMALL))
    return "clip_vision_model", "frames", m, m, CLIPImageProcessor(size={"shortest_edge": IMAGE},
                                                                  crop_size={"height": IMAGE, "width": IMAGE})


def _siglip():
    m = SiglipModel(SiglipConfig(text_config=TEXT, vision_config=dict(image_size=IMAGE, patch_size=PATCH, **SMALL)))
    return "siglip", "frames", m, m.vision_model, _image_processor(SiglipImageProcessor)


def _siglip_vision(**extra):
    m = SiglipVisionModel(SiglipVisionConfig(image_size=IMAGE, patch_size=PATCH, **SMALL, **extra))
    return "siglip_vision_model", "frames", m, m, _image_processor(SiglipImageProcessor)


def _ast():
    m = ASTModel(ASTConfig(num_mel_bins=MELS, max_length=AUDIO_FRAMES, patch_size=PATCH, frequency_stride=PATCH,
                           time_stride=PATCH, **SMALL))
    return "audio-spectrogram-transformer", "audio", m, m, ASTFeatureExtractor(num_mel_bins=MELS, max_length=AUDIO_FRAMES)


def _whisper():
    m = WhisperModel(_whisper_config())
    return "whisper", "audio", m, m.encoder, _whisper_extractor()


def _whisper_generation():
    m = WhisperForConditionalGeneration(_whisper_config())
    return "whisper", "audio", m, m.model.encoder, _whisper_extractor()


def _wav2vec2():
    m = Wav2Vec2Model(Wav2Vec2Config(**CONV, **SMALL))
    return "wav2vec2", "audio", m, m, Wav2Vec2FeatureExtractor(return_attention_mask=False)


def _hubert():
    m = HubertModel(HubertConfig(**CONV, **SMALL))
    return "hubert", "audio", m, m, Wav2Vec2FeatureExtractor(return_attention_mask=False)


def _bert():
    m = BertModel(BertConfig(vocab_size=100, **SMALL))
    return "bert", "text", m, m, None


KINDS: dict[str, Callable[[], tuple]] = {
    "vit": _vit,
    "vit-classifier": _vit_classifier,
    "deit": _deit,
    "dinov2": _dinov2,
    "clip": _clip,
    "clip_vision_model": _clip_vision,
    "siglip": _siglip,
    "siglip_vision_model": _siglip_vision,
    "siglip-headless": lambda: _siglip_vision(vision_use_head=False),
    "ast": _ast,
    "whisper": _whisper,
    "whisper-generation": _whisper_generation,
    "wav2vec2": _wav2vec2,
    "hubert": _hubert,
    "bert": _bert,
}
# One checkpoint per supported model_type (the variants above test one trap each).
FAMILIES = ("vit", "deit", "dinov2", "clip", "clip_vision_model", "siglip", "siglip_vision_model", "ast", "whisper",
            "wav2vec2", "hubert")


def make_checkpoint(kind: str, root: Path, seed: int = 0) -> Checkpoint:
    """A tiny random checkpoint of `kind` saved under `root/kind`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model_type, modality, model, encoder, processor = KINDS[kind]()
    path = root / kind
    model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    return Checkpoint(path=path, model_type=model_type, modality=modality, encoder=encoder.eval())


def rewrite_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite `path/model.safetensors` after `edit` changed its tensors in place (the metadata is kept)."""
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata=metadata)
