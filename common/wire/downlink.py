"""Downlink deltas: a device is sent what it lacks of the global adapter, not the whole of it.

The cloud keeps, per node, the adapter that node holds (its *view*): exactly the
float32 tensors the device reconstructed from what it was last sent. A task
carries `delta-codec(global - view)`, the hash of the view it applies to and the
hash of the result; device and cloud apply it with the same function
(`apply_delta`, float32 additions: bit-identical on every IEEE machine), and
the device checks the result against the hash before it trains. What the lossy
delta codec leaves out stays in `global - view` and goes with the node's next
task: error feedback on the downlink (as DoubleSqueeze, Tang et al. 2019, does
for the broadcast), so a view stays within a few versions' rounding of the
global adapter instead of drifting from it.

A node the cloud holds no confirmed view for (its first task, a resumed
aggregator, a view evicted from the bounded table, a task that failed so that
the device may or may not hold what it was sent) gets the full adapter in the
downlink codec; the decoded values become its view. A device whose stored view
is not the one a delta names answers `DOWNLINK_MISS`, and the cloud sends it
the full adapter next time.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from edgefed.common.wire.codec import Adapter, CodecSpec, decode, encode
from edgefed.common.wire.messages import DOWNLINK_BASE, DOWNLINK_DELTA, DOWNLINK_HASH, GLOBAL_ADAPTER

DOWNLINK_MISS = "downlink-miss"  # in a device's error reply: it does not hold the view a delta applies to


class DownlinkError(ValueError):
    """A delta that does not apply to what this device holds, or whose result is not the announced one."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{DOWNLINK_MISS}: {message}")


def adapter_hash(adapter: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in adapter.items():
        values = tensor.detach().to(torch.float32).contiguous()
        digest.update(f"{name}|{tuple(values.shape)}|".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def apply_delta(view: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> Adapter:
    """view + delta in float32, the one function both sides run."""
    if list(view) != list(delta) or any(view[n].shape != delta[n].shape for n in view):
        raise DownlinkError("the delta names other tensors or shapes than the view")
    return OrderedDict((n, (view[n].to(torch.float32) + delta[n].to(torch.float32)).contiguous()) for n in view)


@dataclass(frozen=True)
class Downlink:
    """What one task carries: the full adapter, or a delta from `base_hash`; and the view it leaves."""

    payload: bytes
    is_delta: bool
    base_hash: str  # the view a delta applies to ("" for the full adapter)
    result_hash: str  # the view the device holds after applying it
    view: Adapter

    def fields(self) -> dict[str, object]:
        """The instruction's config entries that carry it (edge/held_adapter.py reads them)."""
        if self.is_delta:
            return {DOWNLINK_DELTA: self.payload, DOWNLINK_BASE: self.base_hash, DOWNLINK_HASH: self.result_hash}
        return {GLOBAL_ADAPTER: self.payload}


def full_downlink(global_: Mapping[str, torch.Tensor], codec: CodecSpec | str,
                  encoded: bytes | None = None) -> Downlink:
    """The whole adapter (`encoded`: its encoding, when the caller has it already)."""
    payload = encode(dict(global_), codec) if encoded is None else encoded
    view = decode(payload)
    return Downlink(payload, False, "", adapter_hash(view), view)


def delta_downlink(global_: Mapping[str, torch.Tensor], view: Mapping[str, torch.Tensor], base_hash: str,
                   codec: CodecSpec | str) -> Downlink:
    delta = OrderedDict((n, global_[n].to(torch.float32) - view[n]) for n in global_)
    payload = encode(delta, codec)
    result = apply_delta(view, decode(payload))
    return Downlink(payload, True, base_hash, adapter_hash(result), result)


def receive_delta(view: Mapping[str, torch.Tensor] | None, view_hash: str | None, payload: bytes, base_hash: str,
                  result_hash: str) -> Adapter:
    """The device's side: its stored view plus the delta, checked against both hashes."""
    if view is None or view_hash != base_hash:
        raise DownlinkError(f"this device holds view {str(view_hash)[:12]}, the delta applies to {base_hash[:12]}")
    expect = {n: tuple(t.shape) for n, t in view.items()}
    result = apply_delta(view, decode(payload, expect=expect))
    if adapter_hash(result) != result_hash:
        raise DownlinkError("the reconstructed adapter does not match the announced hash")
    return result
