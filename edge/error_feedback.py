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

from edgefed.common.wire.codec import Adapter
from edgefed.edge.tensor_file import TensorFile


class ErrorFeedback:
    def __init__(self, path: str | Path | None = None) -> None:
        """`path`: the residual's file (None: in memory only). A damaged file costs one round's precision."""
        self._file = TensorFile(path)
        self.path = self._file.path
        self.residual: Adapter = self._file.load() or OrderedDict()

    def is_current(self) -> bool:
        """False once another process of this device replaced the residual's file (read it anew)."""
        return not self._file.changed()

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
        self._file.save(self.residual)
