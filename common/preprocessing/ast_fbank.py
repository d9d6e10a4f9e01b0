"""AST's Kaldi-compatible log-mel fbank, as ASTFeatureExtractor computes it, batched in torch.

What ASTFeatureExtractor does (transformers 5, `feature_extraction_audio_
spectrogram_transformer.py`) when torchaudio is absent - its numpy path, one
Python loop iteration per frame (`audio_utils.spectrogram`); with torchaudio
it calls `torchaudio.compliance.kaldi.fbank`, which computes the same:

    frames   400 samples (25 ms), hop 160 (10 ms), no centring, only whole
             frames: 1 + (T - 400) // 160 of them, none if T < 400
    per frame: subtract the frame's mean (DC), pre-emphasis 0.97
             (y[0] = 0.03 x[0], y[n] = x[n] - 0.97 x[n-1]), symmetric Hann
             window (`window_function(400, "hann", periodic=False)`, what
             Kaldi calls "hanning"), zero-pad to 512, |rfft|^2
    mel      128 Kaldi mel filters, 20 Hz .. Nyquist, triangular in mel space
    log      natural log of max(mel, 1.1920928955078125e-07) (float32 eps)
    length   zero rows appended up to max_length (1024) frames, or cut there
    scale    (x - mean) / (2 * std) with AudioSet mean -4.2677393, std 4.5689974

Here: all clips at once. float64 up to the power spectrum (a float32 FFT of
the DC-removed frames is ~2e-4 off in the output), float32 from the mel
matmul on (the reference keeps its spectrum in complex64 too). The frames are
strided views of the clips (`unfold`); pre-emphasis is applied once to the
whole clip and the frame mean folded in afterwards
(x[n] - m - 0.97 (x[n-1] - m) = e[n] - 0.03 m), so no per-frame Python work
remains; the mel bank is one matmul. Samples beyond max_length frames are
never framed. A clip shorter than one frame has no frames: its output is all
padding rows (transformers gives the same for 240..399 samples and raises
below 240).
"""

from __future__ import annotations

import functools
import warnings

import torch
from transformers.audio_utils import mel_filter_bank, window_function

from edgefed.common.preprocessing.clips import Waveforms, mono_batch
from edgefed.common.preprocessing.settings import AstFbank

FRAME = 400  # samples: 25 ms at 16 kHz (transformers uses 400 at any rate)
HOP = 160
FFT = 512
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07


@functools.lru_cache(maxsize=8)
def _tables(num_mel_bins: int, sampling_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(window [400] float64, mel bank [257, num_mel_bins] float32), the extractor's own."""
    with warnings.catch_warnings():  # 128 Kaldi bins on 257 FFT bins leave filter 3 empty, in AST too
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        mel = mel_filter_bank(num_frequency_bins=FFT // 2 + 1, num_mel_filters=num_mel_bins, min_frequency=20,
                              max_frequency=sampling_rate // 2, sampling_rate=sampling_rate, norm=None,
                              mel_scale="kaldi", triangularize_in_mel_space=True)
    return torch.from_numpy(window_function(FRAME, "hann", periodic=False)), torch.from_numpy(mel).to(torch.float32)


def ast_fbank(waveforms: Waveforms, settings: AstFbank, sample_rate: int) -> torch.Tensor:
    """input_values [B, max_length, num_mel_bins] float32 of mono float clips (one clip gives B = 1)."""
    clips, lengths = mono_batch(waveforms, sample_rate, settings.sampling_rate)
    window, mel = _tables(settings.num_mel_bins, settings.sampling_rate)
    frames_of = torch.where(lengths >= FRAME, (lengths - FRAME).clamp(min=0) // HOP + 1, 0).clamp(max=settings.max_length)
    n = int(frames_of.max())
    batch = clips.shape[0]
    out = torch.zeros(batch, settings.max_length, settings.num_mel_bins, dtype=torch.float32)
    if n > 0:
        x = clips[:, : FRAME + HOP * (n - 1)].to(torch.float64)  # only the samples the kept frames read
        frames = x.unfold(-1, FRAME, HOP)  # [B, n, 400], a view
        mean = frames.mean(-1, keepdim=True)  # [B, n, 1]
        emphasised = x[:, 1:] - PREEMPHASIS * x[:, :-1]  # e[t] = x[t+1] - 0.97 x[t]
        y = torch.zeros(batch, n, FFT, dtype=torch.float64)  # the FFT buffer: 400 samples, zero-padded to 512
        body = y[..., 1:FRAME]
        body.copy_(emphasised.unfold(-1, FRAME - 1, HOP)[:, :n]).sub_((1 - PREEMPHASIS) * mean)
        y[..., :1] = (1 - PREEMPHASIS) * (frames[..., :1] - mean)
        y[..., :FRAME].mul_(window)
        spectrum = torch.view_as_real(torch.fft.rfft(y)).square_()  # [B, n, 257, (re^2, im^2)]
        power = (spectrum[..., 0] + spectrum[..., 1]).to(torch.float32)  # [B, n, 257]
        logmel = (power @ mel).clamp(min=MEL_FLOOR).log()  # [B, n, mels]
        kept = torch.arange(n)[None, :] < frames_of[:, None]  # [B, n]: frames a shorter clip really has
        out[:, :n] = logmel * kept[..., None]
    if settings.do_normalize:
        out = (out - settings.mean) / (settings.std * 2)
    return out
