"""Whisper's log-mel spectrogram, as WhisperFeatureExtractor computes it, without the silent tail.

What WhisperFeatureExtractor does (transformers 5, torch path, which it takes
whenever torch is installed):

    pad/cut  each clip to n_samples = chunk_length * sampling_rate (480000)
             with padding_value (0.0)
    STFT     torch.stft: periodic Hann window of n_fft (400), hop 160,
             center=True with reflect padding of n_fft // 2; the last frame
             is dropped, leaving n_samples // hop (3000) frames
    power    |X|^2
    mel      Slaney-scale, Slaney-normalised filters, 0..8000 Hz,
             feature_size (80 or 128) of them
    log      log10(max(mel, 1e-10)), then max(x, max_of_clip - 8), then (x + 4) / 4

Here: the same float32 ops, with one saving that changes no value. A frame
that reads only padding zeros has zero power, so its log-mel is exactly
log10(1e-10) = -10 before the clip-max clamp; only frames that touch the clip
(the first ceil((T + n_fft/2) / hop)) go through the FFT, the rest are filled
with that constant. For 10 s of audio that is a third of the frames. With a
non-zero padding_value every frame is computed. The frames are strided views
(`unfold`) and go through one batched rfft, as torch.stft does inside; the
power is re^2 + im^2 (torch.stft's caller takes |X| then squares it: the two
differ by an ulp).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers.audio_utils import mel_filter_bank

from edgefed.common.preprocessing.clips import Waveforms, mono_batch
from edgefed.common.preprocessing.settings import WhisperLogMel

LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units (80 dB) kept below each clip's maximum


@functools.lru_cache(maxsize=8)
def _tables(n_fft: int, feature_size: int, sampling_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(periodic Hann window [n_fft], mel filters [n_fft // 2 + 1, feature_size]) in float32, the extractor's own."""
    mel = mel_filter_bank(num_frequency_bins=1 + n_fft // 2, num_mel_filters=feature_size, min_frequency=0.0,
                          max_frequency=8000.0, sampling_rate=sampling_rate, norm="slaney", mel_scale="slaney")
    return torch.hann_window(n_fft), torch.from_numpy(mel).to(torch.float32)


def whisper_log_mel(waveforms: Waveforms, settings: WhisperLogMel, sample_rate: int) -> torch.Tensor:
    """input_features [B, feature_size, n_frames (3000)] float32 of mono float clips (one clip gives B = 1)."""
    clips, lengths = mono_batch(waveforms, sample_rate, settings.sampling_rate, settings.padding_value)
    window, mel = _tables(settings.n_fft, settings.feature_size, settings.sampling_rate)
    n_samples, n_frames, hop, half = settings.n_samples, settings.n_frames, settings.hop_length, settings.n_fft // 2
    longest = min(int(lengths.max()), n_samples)
    live = n_frames if settings.padding_value != 0.0 else min(n_frames, -(-(longest + half) // hop))
    reach = hop * (live - 1) + settings.n_fft  # samples of the centred signal the live frames read
    batch = clips.shape[0]
    reaches_end = reach - half + 1 >= n_samples
    chunk = torch.full((batch, n_samples if reaches_end else reach - half + 1), settings.padding_value,
                       dtype=torch.float32)  # the clips padded (or cut) to the chunk, as far as the frames read
    kept = min(longest, chunk.shape[1])
    chunk[:, :kept] = clips[:, :kept]
    if reaches_end:  # reflect both edges, as torch.stft(center=True) does
        centred = F.pad(chunk[:, None], (half, half), mode="reflect")[:, 0]
    else:  # the live frames never reach the right edge: reflect the left one only
        centred = torch.cat([chunk[:, 1: half + 1].flip(-1), chunk], dim=-1)
    frames = centred[:, :reach].unfold(-1, settings.n_fft, hop)  # [B, live, n_fft], a view
    spectrum = torch.view_as_real(torch.fft.rfft(frames * window)).square_()  # [B, live, bins, (re^2, im^2)]
    power = spectrum[..., 0] + spectrum[..., 1]  # [B, live, bins]
    log = (power @ mel).clamp(min=LOG_FLOOR).log10().transpose(1, 2)  # [B, mels, live]
    peak = log.amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
    silent = torch.tensor(LOG_FLOOR, dtype=torch.float32).log10()  # a frame of padding zeros
    if live < n_frames:
        peak = torch.maximum(peak, silent)
    out = torch.empty(batch, settings.feature_size, n_frames, dtype=torch.float32)
    out[:, :, :live] = (torch.maximum(log, peak - DYNAMIC_RANGE) + 4.0) / 4.0
    out[:, :, live:] = (torch.maximum(silent, peak - DYNAMIC_RANGE) + 4.0) / 4.0
    return out
