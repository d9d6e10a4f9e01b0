"""Named tensors a device keeps in a file of its state folder (its error-feedback residual, the global adapter
it holds), read once and then kept in memory.

The file keeps their order (safetensors itself sorts names): a held adapter's hash, which the cloud's
deltas name, is over its tensors in the model's order.

Kept in memory only while the file is the one this process last read or wrote: in a simulation one
device's tasks run in whichever Ray actor is free, so another process may have replaced the file since
(each write replaces it atomically, so a new file is a new inode); `changed()` says so, and the holder
reads it again rather than work from a stale copy.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgefed.common.atomic import write_atomically
from edgefed.common.wire.codec import Adapter


ORDER = "edgefed-order"  # the metadata entry naming the tensors in their order, one a line


class TensorFile:
    def __init__(self, path: str | os.PathLike | None) -> None:
        """`path` None: in memory only (nothing to read, nothing written)."""
        self.path = Path(path) if path else None
        self._seen: tuple[int, int, int] | None = None  # the file as last read or written here

    def load(self) -> Adapter | None:
        """The file's tensors; None when there is none, or it is damaged (the caller starts afresh)."""
        if self.path is None:
            return None
        self._seen = _signature(self.path)
        if self._seen is None:
            return None
        try:
            with safe_open(str(self.path), framework="pt") as file:
                names = list(file.keys())
                order = (file.metadata() or {}).get(ORDER)
                if order is not None and sorted(order.split("\n")) == sorted(names):
                    names = order.split("\n")
                return OrderedDict((name, file.get_tensor(name)) for name in names)
        except (SafetensorError, OSError):
            return None

    def save(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.path is None:
            return
        plain = {n: t.to(torch.float32).contiguous() for n, t in tensors.items()}
        order = {ORDER: "\n".join(plain)}
        write_atomically(self.path, lambda tmp: save_file(plain, str(tmp), metadata=order))
        self._seen = _signature(self.path)

    def changed(self) -> bool:
        """Whether the file is no longer the one this process last read or wrote."""
        return self.path is not None and _signature(self.path) != self._seen


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size
