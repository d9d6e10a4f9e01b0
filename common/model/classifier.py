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

from dataclasses import dataclass

import torch
from torch import nn

from edgefed.common.config import EdgefedConfig
from edgefed.common.encoders import LoadedEncoder, load_encoder
from edgefed.common.encoders.prefix import check_split, encode_from, hidden_before
from edgefed.common.model.base_checkpoint import check_base_checkpoint, encoder_sources, load_head_file
from edgefed.common.model.inputs import model_inputs
from edgefed.common.preprocessing import PixelNormalizer, WhisperLogMel

# Fixed normalisation of our log-mel features (natural log of mel power);
# chosen so typical speech/music windows land roughly in [-2, 2].
LOGMEL_MEAN = -6.0
LOGMEL_STD = 4.0


@dataclass
class PrefixStates:
    """Per clip, what each encoder's frozen prefix gives: the hidden states entering its split layer."""

    video: torch.Tensor  # [B, K, T, D] per keyframe slot
    audio: torch.Tensor  # [B, A, T', D'] per audio window
    sounding: torch.Tensor | None  # [B, A, T_in] bool: Whisper's frames that hold sound (its readout mask)


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
    """Keyframes + audio windows -> class logits, on the configured encoders (`video-encoder`, `audio-encoder`,
    or the parts of `base-checkpoint` when one is set: base_checkpoint.encoder_sources).

    Each encoder's vector is projected to the fusion width (`hidden-size`) when its own width differs;
    the built-in tiny encoders have that width, so the default model has no projection.
    """

    def __init__(self, cfg: EdgefedConfig) -> None:
        super().__init__()
        inputs = model_inputs(cfg)
        self.num_keyframes = cfg.num_keyframes
        video_source, audio_source = encoder_sources(cfg)
        video, audio = load_encoder(video_source, "frames", cfg), load_encoder(audio_source, "audio", cfg)
        self.video_encoder, self.audio_encoder = video.module, audio.module
        # The specs say how to call and read out each encoder; plain objects, not modules (the
        # modules are the attributes above, where peft finds and replaces their layers in place).
        self._video, self._audio = video, audio
        self.pixels = PixelNormalizer(inputs.frames.normalization)
        self.tiny_logmel = inputs.audio.preprocessing is None
        self.mask_padding = isinstance(inputs.audio.preprocessing, WhisperLogMel)
        self.video_proj = _projection(video.hidden_size, cfg.hidden_size)
        self.audio_proj = _projection(audio.hidden_size, cfg.hidden_size)
        self.fusion = CrossModalFusion(cfg.hidden_size, cfg.num_heads)
        self.head = nn.Sequential(nn.LayerNorm(cfg.hidden_size), nn.Linear(cfg.hidden_size, cfg.num_classes))

    @property
    def encoders(self) -> dict[str, LoadedEncoder]:
        """The encoders by attribute name, with their specs (what LoRA targets are built from)."""
        return {"video_encoder": self._video, "audio_encoder": self._audio}

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        per_frame = self._video.encode(self._pixel_values(frames))  # [B*K, hidden]
        return self._pool(self.video_proj, per_frame, frame_mask)  # [B, D]

    def encode_audio(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> torch.Tensor:
        values = self._audio_values(audio)  # [B*A, *window]
        per_window = self._audio.encode(values, self._sounding(values))
        return self._pool(self.audio_proj, per_window, audio_mask)  # [B, D]

    def _pixel_values(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, K, 3, H, W] uint8 -> the encoder's pixel_values [B*K, 3, H, W]."""
        return self.pixels(frames.reshape(-1, *frames.shape[2:]))

    def _audio_values(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, A, *window] -> the encoder's input [B*A, *window] float."""
        values = audio.reshape(-1, *audio.shape[2:]).float()
        return (values - LOGMEL_MEAN) / LOGMEL_STD if self.tiny_logmel else values

    def _sounding(self, values: torch.Tensor) -> torch.Tensor | None:
        return _sounding_frames(values) if self.mask_padding else None

    @staticmethod
    def _pool(projection: nn.Module, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B*K, hidden] per frame or window -> projected, masked mean over the K slots [B, D]."""
        return masked_mean(projection(vectors).reshape(*mask.shape, -1), mask)

    def _classify(self, video: torch.Tensor, audio: torch.Tensor, frame_mask: torch.Tensor,
                  audio_mask: torch.Tensor) -> torch.Tensor:
        fused = self.fusion(video, audio, frame_mask.any(dim=1), audio_mask.any(dim=1))
        return self.head(fused)  # [B, C]

    # --- the frozen prefix (common/encoders/prefix.py): with LoRA on the last N layers only ---------
    def prefix_starts(self, lora_layers: int) -> tuple[int, int]:
        """(video, audio) layer where each encoder's trainable part begins: L - N, or 0 with LoRA on all."""
        return tuple(max(e.num_layers - lora_layers, 0) if lora_layers else 0 for e in (self._video, self._audio))

    def prefix_states(self, frames: torch.Tensor, audio: torch.Tensor, starts: tuple[int, int]) -> PrefixStates:
        """The hidden states entering each encoder's layer `starts[i]` for these inputs: frozen, so cacheable."""
        for loaded, start in zip((self._video, self._audio), starts):
            check_split(loaded, start)
        b, k, a = frames.shape[0], frames.shape[1], audio.shape[1]
        video = hidden_before(self._video, self._pixel_values(frames), starts[0])
        values = self._audio_values(audio)
        sounding = self._sounding(values)
        sound = hidden_before(self._audio, values, starts[1])
        return PrefixStates(video=video.reshape(b, k, *video.shape[1:]), audio=sound.reshape(b, a, *sound.shape[1:]),
                            sounding=None if sounding is None else sounding.reshape(b, a, -1))

    def forward_split(self, frames: torch.Tensor, frame_mask: torch.Tensor, audio: torch.Tensor,
                      audio_mask: torch.Tensor, starts: tuple[int, int]) -> torch.Tensor:
        """`forward`'s logits, through the split: the frozen prefix without autograd, then the trainable top
        (whose last layer runs on the read tokens alone where the readout allows: common/encoders/prefix.py).
        What a device without the prefix cache trains with; the cache saves it the prefix."""
        return self.forward_from_prefix(self.prefix_states(frames, audio, starts), frame_mask, audio_mask, starts)

    def forward_from_prefix(self, states: PrefixStates, frame_mask: torch.Tensor, audio_mask: torch.Tensor,
                            starts: tuple[int, int]) -> torch.Tensor:
        """The logits `forward` gives, from `prefix_states` of the same inputs (stored in any float dtype)."""
        per_frame = encode_from(self._video, states.video.flatten(0, 1).float(), starts[0])
        sounding = None if states.sounding is None else states.sounding.flatten(0, 1)
        per_window = encode_from(self._audio, states.audio.flatten(0, 1).float(), starts[1], sounding)
        video = self._pool(self.video_proj, per_frame, frame_mask)
        return self._classify(video, self._pool(self.audio_proj, per_window, audio_mask), frame_mask, audio_mask)

    def forward(
        self,
        frames: torch.Tensor,  # [B, K, 3, H, W] uint8
        frame_mask: torch.Tensor,  # [B, K] bool: which keyframe slots hold a frame
        audio: torch.Tensor,  # [B, A, *window] audio windows (model_inputs says which)
        audio_mask: torch.Tensor,  # [B, A] bool: window a holds audio
    ) -> torch.Tensor:
        return self._classify(self.encode_video(frames, frame_mask), self.encode_audio(audio, audio_mask),
                              frame_mask, audio_mask)


def _sounding_frames(log_mel: torch.Tensor) -> torch.Tensor:
    """[N, M, T] Whisper log-mel -> [N, T] True where a frame holds sound.

    Whisper pads every input to 30 s with zero samples, whose frames all sit at the floor of its
    log-mel (the max - 8 clamp); so does digital silence. A frame with any bin above that floor
    holds sound: the encoder's mean is taken over those (a 2 s clip is otherwise 93 % padding)."""
    floor = log_mel.amin(dim=(1, 2), keepdim=True)  # [N, 1, 1]
    return (log_mel > floor + 1e-4).any(dim=1)


def _projection(width: int, fusion_width: int) -> nn.Module:
    return nn.Identity() if width == fusion_width else nn.Linear(width, fusion_width)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of [B, K, D] over the K slots where mask [B, K] is set (zeros where none is)."""
    weights = mask.to(values.dtype)[..., None]  # [B, K, 1]
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def build_base_model(cfg: EdgefedConfig, *, load_head: bool = True) -> MultimodalClassifier:
    """The frozen base every node shares: built from configs with `model_seed`, or, when `base_checkpoint`
    is set (a warm start from `edgefed cloud train`: a local directory, never a download), with both
    encoders from its parts and the projections, fusion and head from its head file
    (common/model/base_checkpoint.py). `load_head=False` leaves those at their seeded init: for a
    device, whose installed base has no head file and which sets them from the global adapter.

    The RNG is forked so building a model never disturbs the caller's seeds.
    """
    if cfg.base_checkpoint:
        check_base_checkpoint(cfg, head=load_head)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.model_seed)
        model = MultimodalClassifier(cfg)
    if cfg.base_checkpoint and load_head:
        load_head_file(model, cfg.base_checkpoint)
    return model.eval()
