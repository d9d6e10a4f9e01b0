"""Error feedback for lossy update codecs (Seide et al. 2014; Karimireddy et al. 2019).

What a lossy codec drops from one update is not lost: the device keeps it as a
residual and adds it to its next delta, so over rounds the sum of what was
sent tracks the sum of the true deltas. The residual lives in a file on the
device so it survives restarts.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgefed.common.atomic import write_atomically
from edgefed.common.wire.codec import Adapter


class ErrorFeedback:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.residual: Adapter = OrderedDict()
        if self.path is not None and self.path.exists():
            try:
                self.residual = OrderedDict(load_file(str(self.path)))
            except (SafetensorError, OSError):
                self.residual = OrderedDict()  # a damaged residual costs one round's precision, nothing more

    def compensate(self, delta: dict[str, torch.Tensor]) -> Adapter:
        """delta + residual (where names and shapes match the residual)."""
        out = OrderedDict()
        for name, value in delta.items():
            carried = self.residual.get(name)
            out[name] = value + carried if carried is not None and carried.shape == value.shape else value.clone()
        return out

    def update(self, intended: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> None:
        """Keep what the codec dropped: residual = intended - sent."""
        self.residual = OrderedDict((n, (intended[n] - sent[n]).contiguous()) for n in intended)
        if self.path is not None:
            tensors = dict(self.residual)
            write_atomically(self.path, lambda tmp: save_file(tensors, str(tmp)))
