"""Audio track decoding (PyAV) and log-mel features (torch.stft + transformers' filterbank)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

import av
import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

from edgefed.common.model.inputs import HOP_MS
from edgefed.edge.media.container import open_container
from edgefed.edge.media.errors import MediaError, ffmpeg_reason
from edgefed.edge.media.limits import MediaBudget

if TYPE_CHECKING:
    from edgefed.edge.media.audio_features import WindowFeatures

WINDOW_MS = 25.0

SILENCE = float(np.log(1e-6))  # log-mel of digital silence


def decode_audio(path: str, sample_rate: int, budget: MediaBudget | None = None) -> np.ndarray | None:
    """The whole track as mono float32 at `sample_rate`, or None when there is no audio track.

    For short clips and tests; `audio_windows` streams instead.
    """
    chunks = [chunk for _, chunk in _resampled(path, sample_rate, budget or MediaBudget.start())]
    if not chunks:
        return None
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _resampled(path: str, sample_rate: int, budget: MediaBudget) -> Iterator[tuple[float, np.ndarray]]:
    """(time of the chunk's first sample in seconds, mono float32 samples), in order, within `budget`."""
    container = open_container(path, budget)
    with container:
        if not container.streams.audio:
            return
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        start: float | None = None
        produced = 0
        try:
            for frame in container.decode(stream):
                if start is None:
                    # Timeline of the first decoded sample: encoder priming has
                    # already been trimmed by the demuxer's edit list.
                    start = float(frame.time) if frame.time is not None else 0.0
                budget.check_audio_frame(path, produced / sample_rate)
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    yield start + produced / sample_rate, samples
                    produced += samples.size
            for out in resampler.resample(None):
                samples = out.to_ndarray().reshape(-1)
                yield (start or 0.0) + produced / sample_rate, samples
                produced += samples.size
        except av.error.FFmpegError as err:
            if produced == 0:
                raise MediaError(path, f"audio decode failed ({ffmpeg_reason(err)})") from None
            # a damaged tail: windows beyond it are silent (masked), the rest stands


def audio_windows(
    path: str, centres_ms: list[float], features: WindowFeatures, budget: MediaBudget | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The audio encoder's input for a window centred on each time [K, *window], and which hold audio [K].

    Streams the track: memory holds about one window of samples, whatever the
    file's length. Returns None when the file has no audio track.
    """
    sample_rate, length = features.sample_rate, features.window_samples
    order = sorted(range(len(centres_ms)), key=lambda i: centres_ms[i])
    out = features.silence().expand(len(centres_ms), *features.shape).clone()
    present = torch.zeros(len(centres_ms), dtype=torch.bool)
    buffer = np.zeros(0, dtype=np.float32)
    buffer_start = None  # sample index (on the track's timeline) of buffer[0]
    origin = None  # seconds at sample index 0

    def start_of(i: int) -> int:
        lo = int(round((centres_ms[i] / 1000 - (origin or 0.0)) * sample_rate)) - length // 2
        # a window the encoder pads itself starts no earlier than the track: the clip's opening
        # is what it would have been given, padded at the end as its feature extractor pads
        return max(lo, 0) if features.trim else lo

    pending = list(order)
    saw_track = False
    for chunk_time, chunk in _resampled(path, sample_rate, budget or MediaBudget.start()):
        saw_track = True
        if origin is None:
            origin = chunk_time
            buffer_start = 0
        buffer = np.concatenate([buffer, chunk])
        buffer_end = buffer_start + buffer.size
        while pending:
            i = pending[0]
            lo = start_of(i)
            if lo + length > buffer_end:
                break
            out[i], present[i] = _window_from(buffer, buffer_start, lo, features)
            pending.pop(0)
        if not pending:
            break  # every window is cut: no need to decode the rest
        # keep only what the next window can still need
        drop = max(0, min(buffer_end, start_of(pending[0])) - buffer_start)
        if drop:
            buffer = buffer[drop:]
            buffer_start += drop
    if not saw_track:
        return None
    for i in pending:  # windows reaching past the end of the track: padded
        out[i], present[i] = _window_from(buffer, buffer_start or 0, start_of(i), features)
    return features.finish(out, present), present


def _window_from(buffer: np.ndarray, buffer_start: int, lo: int, features: WindowFeatures) -> tuple[torch.Tensor, bool]:
    length = features.window_samples
    a, b = max(lo, buffer_start), min(lo + length, buffer_start + buffer.size)
    if b <= a:
        return features.silence(), False
    if features.trim:  # only the samples the track has: the encoder's extractor pads
        return features(buffer[a - buffer_start : b - buffer_start]), True
    segment = np.zeros(length, dtype=np.float32)
    segment[a - lo : b - lo] = buffer[a - buffer_start : b - buffer_start]
    return features(segment), True


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
    return torch.log(mel + 1e-6)  # SILENCE where there is no sound
