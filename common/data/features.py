"""The feature tensors both sides agree on, and their file format.

Devices turn clips into these; the cloud reads the same format for central
evaluation and its own training, so neither side imports the other's media
code. Files are safetensors (no pickle: a feature file from elsewhere cannot
run code).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgefed.common.atomic import write_atomically


class FeatureFileError(ValueError):
    """A feature file is missing, corrupt, or has inconsistent tensors."""


@dataclass
class FeatureSet:
    """N aligned clips. Shapes are checked on construction."""

    frames: torch.Tensor  # [N, K, 3, H, W] uint8 RGB keyframes, shaped for the video encoder
    frame_mask: torch.Tensor  # [N, K] bool: slot k holds a real frame
    # [N, A, *window] float16 audio windows (the tiny encoder: A = K log-mel windows [T, M] centred on
    # each keyframe; common/model/inputs.py says what each encoder takes)
    audio: torch.Tensor
    audio_mask: torch.Tensor  # [N, A] bool: window a holds real audio
    labels: torch.Tensor  # [N] int64, -1 when unknown

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        shapes_ok = (
            self.frames.ndim == 5 and self.frames.shape[0] == n and self.frames.shape[2] == 3
            and self.frame_mask.shape == self.frames.shape[:2]
            and self.audio.ndim >= 3 and self.audio.shape[0] == n
            and self.audio_mask.shape == self.audio.shape[:2] and self.labels.ndim == 1
        )
        if not shapes_ok:
            raise FeatureFileError(
                "inconsistent feature shapes: "
                f"frames {tuple(self.frames.shape)}, frame_mask {tuple(self.frame_mask.shape)}, "
                f"audio {tuple(self.audio.shape)}, audio_mask {tuple(self.audio_mask.shape)}, "
                f"labels {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | list[int]) -> FeatureSet:
        idx = torch.as_tensor(index, dtype=torch.long)
        return FeatureSet(
            self.frames[idx], self.frame_mask[idx], self.audio[idx], self.audio_mask[idx], self.labels[idx]
        )

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[FeatureSet]:
        """Consecutive batches; shuffled when a generator is given."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.subset(order[start : start + batch_size])

    def masked(self, *, video: bool = True, audio: bool = True) -> FeatureSet:
        """A view with one modality switched off (for single-modality evaluation)."""
        return FeatureSet(
            self.frames,
            self.frame_mask if video else torch.zeros_like(self.frame_mask),
            self.audio,
            self.audio_mask if audio else torch.zeros_like(self.audio_mask),
            self.labels,
        )

    @staticmethod
    def concat(parts: list[FeatureSet]) -> FeatureSet:
        if not parts:
            raise FeatureFileError("no feature sets to concatenate")
        return FeatureSet(
            torch.cat([p.frames for p in parts]),
            torch.cat([p.frame_mask for p in parts]),
            torch.cat([p.audio for p in parts]),
            torch.cat([p.audio_mask for p in parts]),
            torch.cat([p.labels for p in parts]),
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "frames": self.frames.contiguous(),
            "frame_mask": self.frame_mask.contiguous(),
            "audio": self.audio.contiguous(),
            "audio_mask": self.audio_mask.contiguous(),
            "labels": self.labels.contiguous(),
        }


def save_features(features: FeatureSet, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never half."""
    write_atomically(Path(path), lambda tmp: save_file(features.to_tensors(), str(tmp), metadata=metadata))


def load_features(path: str | Path) -> FeatureSet:
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise FeatureFileError(f"{path}: no such feature file") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise FeatureFileError(f"{path}: unreadable feature file ({err})") from None
    try:
        return FeatureSet(**{k: tensors[k] for k in ("frames", "frame_mask", "audio", "audio_mask", "labels")})
    except KeyError as err:
        raise FeatureFileError(f"{path}: missing tensor {err}") from None
