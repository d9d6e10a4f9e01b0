"""The global adapter as this device last reconstructed it: what a downlink delta applies to.

Kept in a file in the device's state folder, beside the error-feedback
residual, so that a restarted device still receives deltas. A missing or
damaged file only means the device answers the next delta with
`downlink-miss` and is sent the full adapter (common/wire/downlink.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from edgefed.common.wire.codec import Adapter, decode
from edgefed.common.wire.downlink import adapter_hash, receive_delta
from edgefed.common.wire.messages import DOWNLINK_BASE, DOWNLINK_DELTA, DOWNLINK_HASH, GLOBAL_ADAPTER
from edgefed.edge.tensor_file import TensorFile


class HeldAdapter:
    def __init__(self, path: str | Path | None = None) -> None:
        """`path`: the held adapter's file (None: in memory only)."""
        self._file = TensorFile(path)
        self.path = self._file.path
        self.view: Adapter | None = self._file.load()
        self.hash: str | None = adapter_hash(self.view) if self.view is not None else None

    def is_current(self) -> bool:
        """False once another process of this device replaced the held adapter's file (read it anew)."""
        return not self._file.changed()

    def receive(self, record: Mapping) -> Adapter:
        """The global adapter a task carries: whole (GLOBAL_ADAPTER) or as a delta from what is held.
        Raises DownlinkError (`downlink-miss`) when a delta does not apply to what this device holds."""
        if DOWNLINK_DELTA in record:
            view = receive_delta(self.view, self.hash, bytes(record[DOWNLINK_DELTA]), str(record[DOWNLINK_BASE]),
                                 str(record[DOWNLINK_HASH]))
        else:
            view = decode(bytes(record[GLOBAL_ADAPTER]))
        self.view, self.hash = view, adapter_hash(view)
        self._file.save(view)
        return view
