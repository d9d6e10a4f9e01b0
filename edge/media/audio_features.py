"""One audio window -> what the audio encoder takes: the tiny log-mel, or the checkpoint's own features.

The checkpoint kinds are computed by common/preprocessing/ (matched to transformers' feature
extractors); which window each clip gets is common/model/inputs.py's decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgefed.common.model.inputs import AudioInput
from edgefed.common.preprocessing import AstFbank, RawWaveform, WhisperLogMel, ast_fbank, raw_waveform, whisper_log_mel
from edgefed.edge.media.audio import SILENCE, log_mel


@dataclass(frozen=True)
class WindowFeatures:
    audio: AudioInput
    sample_rate: int

    @property
    def window_samples(self) -> int:
        return self.audio.window_samples

    @property
    def shape(self) -> tuple[int, ...]:
        return self.audio.shape

    @property
    def trim(self) -> bool:
        """Whether a window gets only the samples the track has (AST and Whisper pad a short clip
        themselves, after their features, as their extractors do) instead of zero-padded samples."""
        return isinstance(self.audio.preprocessing, AstFbank | WhisperLogMel)

    def silence(self) -> torch.Tensor:
        """A window without audio (masked out by the model; the tiny log-mel's digital silence)."""
        return torch.full(self.shape, SILENCE if self.audio.preprocessing is None else 0.0)

    @property
    def batched(self) -> bool:
        """Whether windows are kept as samples and normalised together by `finish` (the raw waveform: a window's
        features are its samples, so holding them costs nothing, and one call for the clip's K windows is ~4x
        cheaper than K calls of a few microseconds of work each)."""
        return isinstance(self.audio.preprocessing, RawWaveform)

    def __call__(self, samples: np.ndarray) -> torch.Tensor:
        """Mono float32 samples at `sample_rate` -> one window's features [*shape] float32 (its samples, to be
        normalised by `finish`, when `batched`)."""
        settings = self.audio.preprocessing
        if settings is None:
            return log_mel(samples, self.sample_rate, self.shape[1])[: self.shape[0]]
        if isinstance(settings, AstFbank):
            return ast_fbank(samples, settings, self.sample_rate)[0]
        if isinstance(settings, WhisperLogMel):
            return whisper_log_mel(samples, settings, self.sample_rate)[0]
        return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))

    def finish(self, windows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The clip's windows [K, *shape] as the encoder takes them: the windows holding audio normalised in one
        call when `batched` (the silent ones stay silence), else as they are."""
        if self.batched and bool(present.any()):
            windows[present] = raw_waveform(windows[present], self.audio.preprocessing, self.sample_rate).input_values
        return windows
