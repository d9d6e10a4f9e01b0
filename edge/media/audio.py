"""Audio track decoding (PyAV) and log-mel features (torch.stft + transformers' filterbank)."""

from __future__ import annotations

import functools

import av
import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

from edge.media.errors import MediaError

WINDOW_MS = 25.0
HOP_MS = 10.0


def decode_audio(path: str, sample_rate: int) -> np.ndarray | None:
    """Mono float32 samples at `sample_rate`, or None when the file has no audio track."""
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as err:
        raise MediaError(path, f"cannot open container ({err})") from None
    with container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as err:
            raise MediaError(path, f"audio decode failed ({err})") from None
    if not chunks:
        return None
    return np.concatenate(chunks).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=8)
def _mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    bank = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=20.0,
        max_frequency=sample_rate / 2,
        sampling_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(bank.astype(np.float32))  # [F, M]


def log_mel(samples: np.ndarray, sample_rate: int, n_mels: int) -> torch.Tensor:
    """[T, M] natural-log mel power, 25 ms Hann window, 10 ms hop."""
    win = int(round(sample_rate * WINDOW_MS / 1000))
    hop = int(round(sample_rate * HOP_MS / 1000))
    n_fft = 1 << (win - 1).bit_length()
    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    spec = torch.stft(
        wave, n_fft=n_fft, hop_length=hop, win_length=win,
        window=torch.hann_window(win), center=True, return_complex=True,
    )  # [F, T]
    power = spec.real.square() + spec.imag.square()
    mel = power.T @ _mel_filters(sample_rate, n_fft, n_mels)  # [T, M]
    return torch.log(mel + 1e-6)


def window(features: torch.Tensor, centre: int, length: int) -> torch.Tensor:
    """`length` frames of [T, M] centred on frame `centre`, zero-padded at the edges."""
    start = centre - length // 2
    out = torch.full((length, features.shape[1]), float(np.log(1e-6)), dtype=features.dtype)
    lo, hi = max(0, start), min(features.shape[0], start + length)
    if hi > lo:
        out[lo - start : hi - start] = features[lo:hi]
    return out
