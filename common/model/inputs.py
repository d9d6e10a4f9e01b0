"""What the model takes for one clip, and how a device must make it, for the configured encoders.

    frames      [K, 3, H, W] uint8   keyframes after the encoder's geometry (tiny: letterboxed to image-size;
                                     a checkpoint: its image processor's resize + crop); normalised in the model
    frame_mask  [K] bool
    audio       [A, *window] float16 A audio windows, each already what the audio encoder's own feature
                                     extractor gives (tiny: raw log-mel, normalised in the model)
    audio_mask  [A] bool             window a holds audio

How the audio windows map onto the clip depends on the encoder's input:

- tiny and wav2vec2/HuBERT take any length: one window of `audio-frames` x 10 ms centred on each keyframe
  (A = K), as the built-in model always has; the model averages the windows that hold audio.
- AST (1024 frames, 10.24 s) and Whisper (exactly 30 s) take one long fixed-length input whose position
  embeddings are fixed: one window per clip (A = 1), centred between the first and the last keyframe. K
  windows of 10-30 s each would cost K encoder passes over mostly the same audio; a clip shorter than the
  window is padded exactly as the checkpoint's feature extractor pads it (its attention sees the padding,
  as in pretraining; the readout averages only the frames that hold sound).

The feature config (`feature_config()`) keys the feature cache and is named by every published model; for a
checkpoint it includes the fingerprint of the checkpoint's preprocessing, never its path (a device installs
the same base elsewhere).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from edgefed.common.config import ConfigError, EdgefedConfig
from edgefed.common.encoders import TINY
from edgefed.common.preprocessing import (
    AstFbank,
    FrameGeometry,
    ImagePreprocessing,
    PixelNormalization,
    RawWaveform,
    WhisperLogMel,
    read_preprocessing,
)

HOP_MS = 10.0  # the log-mel hop of the tiny audio features (and the unit of `audio-frames`)
# The tiny encoder's pixels: uint8 -> [-1, 1], i.e. x / 127.5 - 1.
TINY_PIXELS = PixelNormalization(rescale_factor=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

AudioPreprocessing = AstFbank | WhisperLogMel | RawWaveform


@dataclass(frozen=True)
class FrameInput:
    geometry: FrameGeometry | None  # None: the tiny encoder's letterbox to `image-size`
    normalization: PixelNormalization
    height: int
    width: int

    @classmethod
    def letterboxed(cls, size: int) -> FrameInput:
        """The tiny encoder's frames: letterboxed into size x size, pixels in [-1, 1]."""
        return cls(None, TINY_PIXELS, size, size)


@dataclass(frozen=True)
class AudioInput:
    preprocessing: AudioPreprocessing | None  # None: the tiny encoder's log-mel
    windows: int  # per clip
    window_samples: int  # samples of audio (at `sample-rate`) each window covers
    shape: tuple[int, ...]  # one window's features

    @property
    def kind(self) -> str:
        if self.preprocessing is None:
            return "tiny-logmel"
        return {AstFbank: "ast-fbank", WhisperLogMel: "whisper-logmel", RawWaveform: "raw-waveform"}[
            type(self.preprocessing)]


@dataclass(frozen=True)
class ModelInputs:
    frames: FrameInput
    audio: AudioInput
    num_keyframes: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-clip tensor shapes (no batch axis) of a FeatureSet row."""
        k, a = self.num_keyframes, self.audio.windows
        return {"frames": (k, 3, self.frames.height, self.frames.width), "frame_mask": (k,),
                "audio": (a, *self.audio.shape), "audio_mask": (a,)}

    def feature_config(self) -> dict[str, str]:
        """What the encoders add to the feature config: nothing for tiny (its features are the run config's)."""
        extra = {}
        if self.frames.geometry is not None:
            extra["frame_preprocessing"] = self.frames.geometry.fingerprint()
        if self.audio.preprocessing is not None:
            extra["audio_preprocessing"] = self.audio.preprocessing.fingerprint()
        return extra


def model_inputs(cfg: EdgefedConfig) -> ModelInputs:
    """The inputs the configured encoders take (reads each checkpoint's preprocessor_config.json once)."""
    return _model_inputs(cfg.video_encoder, cfg.audio_encoder, cfg.num_keyframes, cfg.image_size,
                         cfg.sample_rate, cfg.n_mels, cfg.audio_frames)


@functools.lru_cache(maxsize=16)
def _model_inputs(video: str, audio: str, k: int, image_size: int, sample_rate: int, n_mels: int,
                  audio_frames: int) -> ModelInputs:
    window = int(round(audio_frames * HOP_MS / 1000 * sample_rate))
    return ModelInputs(frames=_frame_input(video, image_size), audio=_audio_input(audio, k, sample_rate, n_mels,
                                                                                  audio_frames, window),
                       num_keyframes=k)


def _frame_input(source: str, image_size: int) -> FrameInput:
    if source == TINY:
        return FrameInput.letterboxed(image_size)
    settings = read_preprocessing(Path(source))
    if not isinstance(settings, ImagePreprocessing):
        raise ConfigError(f"video-encoder {source}: its preprocessor_config.json is for audio "
                          f"({type(settings).__name__}), not frames")
    height, width = settings.geometry.crop or settings.geometry.resize or (0, 0)
    if not height:
        raise ConfigError(f"video-encoder {source}: its image processor gives no fixed frame size "
                          "(neither a crop nor a fixed resize)")
    return FrameInput(settings.geometry, settings.normalization, height, width)


def _audio_input(source: str, k: int, sample_rate: int, n_mels: int, audio_frames: int, window: int) -> AudioInput:
    if source == TINY:
        return AudioInput(None, k, window, (audio_frames, n_mels))
    settings = read_preprocessing(Path(source))
    if isinstance(settings, ImagePreprocessing):
        raise ConfigError(f"audio-encoder {source}: its preprocessor_config.json is for images, not audio")
    if settings.sampling_rate != sample_rate:
        raise ConfigError(f"audio-encoder {source} was trained on {settings.sampling_rate} Hz audio: "
                          f"set sample-rate = {settings.sampling_rate} (it is {sample_rate})")
    if isinstance(settings, AstFbank):  # (frames - 1) hops + one 25 ms frame
        samples = (settings.max_length - 1) * sample_rate // 100 + sample_rate * 25 // 1000
        return AudioInput(settings, 1, samples, (settings.max_length, settings.num_mel_bins))
    if isinstance(settings, WhisperLogMel):
        return AudioInput(settings, 1, settings.n_samples, (settings.feature_size, settings.n_frames))
    return AudioInput(settings, k, window, (window,))
