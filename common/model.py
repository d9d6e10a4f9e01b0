"""The shared multimodal video+audio classifier.

    keyframes [B, K, 3, H, W] uint8 ──► ViT (per frame, patch mean) ──────► masked mean over K ──► video token [B, D]
    log-mel   [B, K, T, M] float    ──► AST-style encoder (per window) ──► masked mean over K ──► audio token [B, D]
                                      cross-modal fusion (a query attends over present modalities)
                                                              └──► head ──► logits [B, C]

Both encoders are transformers models built from configs (no download). A
missing modality is a mask, not a special input: edge clips often have no
audio track, and a stand-alone audio file has no frames.

The encoders are read out by the mean of their patch tokens, not the CLS
token: on a base that is still random (before any warm start) the CLS output
is nearly the same for every input, while the patch mean carries the content.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import ASTConfig, ASTModel, ViTConfig, ViTModel

from edgefed.common.config import EdgefedConfig

# Fixed normalisation of our log-mel features (natural log of mel power);
# chosen so typical speech/music windows land roughly in [-2, 2].
LOGMEL_MEAN = -6.0
LOGMEL_STD = 4.0


class CrossModalFusion(nn.Module):
    """A learned query token attends over [query, video, audio]; absent ones are masked out.

    Each present modality also adds its own projection directly.

    The query is always a key, so a sample with both modalities masked still has
    a defined (if uninformative) output instead of NaN.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality = nn.Parameter(torch.zeros(1, 3, dim))  # query / video / audio
        nn.init.normal_(self.query, std=0.02)
        nn.init.normal_(self.modality, std=0.02)
        self.norm_in = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        # Direct paths from each modality to the output: attention alone routes
        # almost nothing from a modality that does not yet help, so the visual
        # path got no gradient until late (measured: ~10 rounds of plateau;
        # with these paths the video encoder learns in about two epochs).
        self.video_path = nn.Linear(dim, dim)
        self.audio_path = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(
        self, video: torch.Tensor, audio: torch.Tensor, video_present: torch.Tensor, audio_present: torch.Tensor
    ) -> torch.Tensor:
        batch = video.shape[0]
        query = self.query.expand(batch, -1, -1)
        tokens = torch.cat([query, video[:, None], audio[:, None]], dim=1) + self.modality  # [B, 3, D]
        tokens = self.norm_in(tokens)
        always = torch.ones_like(video_present)
        ignore = ~torch.stack([always, video_present, audio_present], dim=1)  # [B, 3], True = ignore
        fused, _ = self.attn(tokens[:, :1], tokens, tokens, key_padding_mask=ignore, need_weights=False)
        fused = (
            fused[:, 0]
            + query[:, 0]
            + self.video_path(tokens[:, 1]) * video_present[:, None]
            + self.audio_path(tokens[:, 2]) * audio_present[:, None]
        )  # [B, D]
        return fused + self.mlp(self.norm_out(fused))


class MultimodalClassifier(nn.Module):
    """Keyframes + log-mel windows -> class logits."""

    def __init__(self, cfg: EdgefedConfig) -> None:
        super().__init__()
        self.num_keyframes = cfg.num_keyframes
        common = dict(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            # Wider than transformers' 0.02: a random base with tiny weights is
            # nearly linear, and LoRA on it learns far slower (measured).
            initializer_range=0.1,
        )
        self.video_encoder = ViTModel(
            ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3, **common),
            add_pooling_layer=False,
        )
        self.audio_encoder = ASTModel(
            ASTConfig(
                num_mel_bins=cfg.n_mels,
                max_length=cfg.audio_frames,
                patch_size=cfg.patch_size,
                frequency_stride=cfg.patch_size,
                time_stride=cfg.patch_size,
                **common,
            )
        )
        self.fusion = CrossModalFusion(cfg.hidden_size, cfg.num_heads)
        self.head = nn.Sequential(nn.LayerNorm(cfg.hidden_size), nn.Linear(cfg.hidden_size, cfg.num_classes))

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        b, k, c, h, w = frames.shape
        pixels = frames.reshape(b * k, c, h, w).float() / 127.5 - 1.0  # uint8 -> [-1, 1]
        tokens = self.video_encoder(pixel_values=pixels).last_hidden_state  # [B*K, 1+P, D]
        per_frame = tokens[:, 1:].mean(dim=1).reshape(b, k, -1)  # patch mean, [B, K, D]
        return masked_mean(per_frame, frame_mask)  # [B, D]

    def encode_audio(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> torch.Tensor:
        b, k, t, m = audio.shape
        values = (audio.reshape(b * k, t, m).float() - LOGMEL_MEAN) / LOGMEL_STD  # [B*K, T, M]
        tokens = self.audio_encoder(input_values=values).last_hidden_state  # [B*K, 2+P, D]
        per_window = tokens[:, 2:].mean(dim=1).reshape(b, k, -1)  # patch mean (skips CLS, distillation)
        return masked_mean(per_window, audio_mask)  # [B, D]

    def forward(
        self,
        frames: torch.Tensor,  # [B, K, 3, H, W] uint8
        frame_mask: torch.Tensor,  # [B, K] bool: which keyframe slots hold a frame
        audio: torch.Tensor,  # [B, K, T, M] log-mel windows, one per keyframe
        audio_mask: torch.Tensor,  # [B, K] bool: window k holds audio
    ) -> torch.Tensor:
        video = self.encode_video(frames, frame_mask)
        audio_tok = self.encode_audio(audio, audio_mask)
        fused = self.fusion(video, audio_tok, frame_mask.any(dim=1), audio_mask.any(dim=1))
        return self.head(fused)  # [B, C]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of [B, K, D] over the K slots where mask [B, K] is set (zeros where none is)."""
    weights = mask.to(values.dtype)[..., None]  # [B, K, 1]
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class BaseCheckpointError(ValueError):
    """The configured base checkpoint is missing or does not fit the model config."""


def build_base_model(cfg: EdgefedConfig) -> MultimodalClassifier:
    """The frozen base every node shares: built from configs with `model_seed`,
    then loaded from `base_checkpoint` when one is set (a warm start; a local file, never a download).

    The RNG is forked so building a model never disturbs the caller's seeds.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.model_seed)
        model = MultimodalClassifier(cfg)
    if cfg.base_checkpoint:
        from safetensors.torch import load_file

        try:
            model.load_state_dict(load_file(cfg.base_checkpoint), strict=True)
        except (OSError, RuntimeError) as err:  # missing file, or names/shapes of another config
            raise BaseCheckpointError(f"base-checkpoint {cfg.base_checkpoint}: {err}") from None
    return model.eval()
