"""The global adapter as this device last reconstructed it: what a downlink delta applies to.

Kept in a file in the device's state folder, beside the error-feedback
residual, so that a restarted device still receives deltas. A missing or
damaged file only means the device answers the next delta with
`downlink-miss` and is sent the full adapter (common/wire/downlink.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgefed.common.atomic import write_atomically
from edgefed.common.wire.codec import Adapter, decode
from edgefed.common.wire.downlink import adapter_hash, receive_delta
from edgefed.common.wire.messages import DOWNLINK_BASE, DOWNLINK_DELTA, DOWNLINK_HASH, GLOBAL_ADAPTER


class HeldAdapter:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.view: Adapter | None = None
        self.hash: str | None = None
        if self.path is not None and self.path.exists():
            try:
                view = OrderedDict(load_file(str(self.path)))
            except (SafetensorError, OSError):
                return
            self.view, self.hash = view, adapter_hash(view)

    def receive(self, record: Mapping) -> Adapter:
        """The global adapter a task carries: whole (GLOBAL_ADAPTER) or as a delta from what is held.
        Raises DownlinkError (`downlink-miss`) when a delta does not apply to what this device holds."""
        if DOWNLINK_DELTA in record:
            view = receive_delta(self.view, self.hash, bytes(record[DOWNLINK_DELTA]), str(record[DOWNLINK_BASE]),
                                 str(record[DOWNLINK_HASH]))
        else:
            view = decode(bytes(record[GLOBAL_ADAPTER]))
        self._keep(view)
        return view

    def _keep(self, view: Adapter) -> None:
        self.view, self.hash = view, adapter_hash(view)
        if self.path is not None:
            tensors = {n: t.to(torch.float32).contiguous() for n, t in view.items()}
            write_atomically(self.path, lambda tmp: save_file(tensors, str(tmp)))
