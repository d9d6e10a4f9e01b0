"""Audio input as the extractors take it: a batch of mono float clips at the checkpoint's rate.

Accepted, like the transformers extractors accept them:

- one clip: a 1-D float array (numpy or torch);
- a batch: a 2-D float array [B, T], or a list of 1-D clips of any lengths.

Rejected with PreprocessingError, where transformers would compute something
wrong without a word:

- another sample rate than the checkpoint's: resampling belongs to the decoder
  (`edge.media.audio` asks FFmpeg for mono at the model's rate);
- integer PCM (int16 ...): the extractors expect floats in [-1, 1], and the
  scale of an int array is a guess;
- multichannel clips. Mix to mono upstream (FFmpeg's `layout="mono"` averages
  the channels). A 2-D array is a batch of clips, so [2, T] stereo cannot be
  told from two clips; [T, C] with C <= 8 channels last can, and is refused,
  as is anything with more than two dimensions;
- NaN or infinite samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from edgefed.common.preprocessing.settings import PreprocessingError

Waveforms = np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor]

MAX_CHANNELS_LAST = 8  # a 2-D clip whose last axis is this short is [samples, channels], not a batch


def mono_batch(waveforms: Waveforms, sample_rate: int, expected_rate: int, padding_value: float = 0.0,
               check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips [B, T] float32, padded with `padding_value` to the longest, and each clip's length [B] int64).

    check_finite=False leaves the NaN/inf check to a caller that sums the samples anyway (`finite_or_raise`).
    """
    if sample_rate != expected_rate:
        raise PreprocessingError("waveform", f"sampled at {sample_rate} Hz, the checkpoint expects {expected_rate} Hz "
                                             "(resample when decoding)")
    if isinstance(waveforms, np.ndarray | torch.Tensor):
        clips = _as_float(waveforms)
        if clips.ndim == 1:
            clips = clips[None]
        elif clips.ndim == 2 and clips.shape[1] <= MAX_CHANNELS_LAST < clips.shape[0]:
            raise PreprocessingError("waveform", f"shape {tuple(clips.shape)} looks like [samples, channels]: "
                                                 "mix to mono upstream")
        elif clips.ndim != 2:
            raise PreprocessingError("waveform", f"expected a mono clip [T] or a batch [B, T], got shape "
                                                 f"{tuple(clips.shape)} (mix channels to mono upstream)")
        lengths = torch.full((clips.shape[0],), clips.shape[1], dtype=torch.int64)
    else:
        parts = [_as_float(w) for w in waveforms]
        if not parts:
            raise PreprocessingError("waveform", "empty batch")
        if any(p.ndim != 1 for p in parts):
            raise PreprocessingError("waveform", "a batch given as a list holds 1-D mono clips; got shapes "
                                                 f"{[tuple(p.shape) for p in parts]}")
        lengths = torch.tensor([p.shape[0] for p in parts], dtype=torch.int64)
        clips = torch.full((len(parts), int(lengths.max())), padding_value, dtype=torch.float32)
        for i, p in enumerate(parts):  # one copy per clip: the clips are ragged
            clips[i, : p.shape[0]] = p
    if check_finite:
        finite_or_raise(clips.sum(-1))
    return clips, lengths


def finite_or_raise(sums: torch.Tensor) -> None:
    """PreprocessingError unless these sums over the clips are finite: one NaN or inf sample makes its sum so
    (as do samples so large that their sum overflows), in one reduction instead of isfinite() over every sample."""
    if not bool(torch.isfinite(sums).all()):
        raise PreprocessingError("waveform", "holds NaN or infinite samples")


def _as_float(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(samples)) if isinstance(samples, np.ndarray) else samples
    if not tensor.is_floating_point():
        raise PreprocessingError("waveform", f"samples are {tensor.dtype}: expected floats in [-1, 1] "
                                             "(divide int16 PCM by 32768)")
    return tensor.to(torch.float32)
