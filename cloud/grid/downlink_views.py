"""The cloud's record of what each node holds of the global adapter (common/wire/downlink.py).

A view is confirmed by the node's successful reply to the task that carried
it (it trained from it, so it holds it); a failed or expired task forgets the
node's view, since the device may or may not have applied it, and its next
task carries the full adapter. The table is bounded (least recently used
evicted): an evicted node costs one full adapter, never an error. It lives in
the ServerApp's memory: a resumed aggregator starts with none and sends each
node the full adapter once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from edgefed.common.lru import Lru
from edgefed.common.wire.codec import CodecSpec
from edgefed.common.wire.downlink import Downlink, delta_downlink, full_downlink


class DownlinkViews:
    def __init__(self, full_codec: str, delta_codec: str, capacity: int) -> None:
        """`delta_codec` "" sends every task the full adapter (today's behaviour)."""
        self.full_codec = CodecSpec.parse(full_codec)
        self.delta_codec = CodecSpec.parse(delta_codec) if delta_codec else None
        self._views: Lru = Lru(capacity)
        self._full: tuple[bytes, Downlink] | None = None  # the full adapter of the newest version, decoded once
        self.deltas = 0
        self.fulls = 0

    def prepare(self, node: int, global_: Mapping[str, torch.Tensor], encoded_full: bytes) -> Downlink:
        """What `node` is sent: a delta from its confirmed view, or the full adapter (`encoded_full`) when that
        is smaller or there is no view."""
        confirmed = self._views.peek(node) if self.delta_codec is not None else None
        if confirmed is not None:
            downlink = delta_downlink(global_, confirmed.view, confirmed.result_hash, self.delta_codec)
            if len(downlink.payload) < len(encoded_full):
                self.deltas += 1
                return downlink
        self.fulls += 1
        if self._full is None or self._full[0] is not encoded_full:
            self._full = (encoded_full, full_downlink(global_, self.full_codec, encoded_full))
        return self._full[1]

    def confirm(self, node: int, downlink: Downlink) -> None:
        if self.delta_codec is not None:
            self._views.put(node, downlink)

    def forget(self, node: int) -> None:
        self._views.pop(node)
