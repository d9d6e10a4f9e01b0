"""Downlink deltas: exact reconstruction on the device, error feedback on the cloud, and every miss a full resend."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from edgefed.cloud.grid.downlink_views import DownlinkViews
from edgefed.common.wire.codec import encode
from edgefed.common.wire.downlink import DOWNLINK_MISS, DownlinkError, adapter_hash
from edgefed.common.wire.messages import DOWNLINK_BASE, DOWNLINK_DELTA, DOWNLINK_HASH
from edgefed.edge.held_adapter import HeldAdapter

FULL, DELTA = "fp16", "topk0.1+int8+zstd"


def _adapter(seed: int) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([("a.lora_A", torch.randn(8, 96, generator=g) * 0.02),
                        ("a.lora_B", torch.randn(96, 8, generator=g) * 0.02), ("head.bias", torch.randn(5, generator=g))])


def _step(global_: OrderedDict, seed: int, scale: float = 1e-3) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((n, t + torch.randn(t.shape, generator=g) * scale) for n, t in global_.items())


def _record(downlink) -> dict:
    return downlink.fields()  # what an instruction's config carries


def test_a_device_rebuilds_exactly_the_cloud_view_and_the_view_tracks_the_global_adapter(tmp_path):
    views = DownlinkViews(FULL, DELTA, capacity=8)
    device = HeldAdapter(tmp_path / "held.safetensors")
    global_ = start = _adapter(0)
    sizes, gaps = [], []
    for version in range(40):
        full = encode(global_, FULL)
        downlink = views.prepare(7, global_, full)
        held = device.receive(_record(downlink))
        assert adapter_hash(held) == downlink.result_hash == adapter_hash(downlink.view)  # bit for bit
        views.confirm(7, downlink)
        sizes.append((len(downlink.payload), len(full)))
        gaps.append(max(float((global_[n] - held[n]).abs().max()) for n in global_))
        global_ = _step(global_, version + 1)
    assert views.fulls == 1 and views.deltas == 39
    # Error feedback: what a delta left out goes with a later one, so the gap stays at a few steps (each step
    # moves every value by ~1e-3, a random walk: top-k's worst case) instead of growing with the versions.
    assert max(gaps) < 5e-3 and max(gaps[20:]) < 1.5 * max(gaps[:20]), gaps
    moved = torch.cat([(global_[n] - start[n]).flatten() for n in start]).norm()
    left = torch.cat([(global_[n] - held[n]).flatten() for n in start]).norm()
    assert left < 0.3 * moved  # and the view follows where the global adapter went
    assert all(sent <= 0.2 * full for sent, full in sizes[1:]), sizes


def test_a_restarted_device_keeps_its_view_and_a_lost_one_is_a_miss(tmp_path):
    views = DownlinkViews(FULL, DELTA, capacity=8)
    global_ = _adapter(1)
    first = views.prepare(3, global_, encode(global_, FULL))
    HeldAdapter(tmp_path / "held.safetensors").receive(_record(first))
    views.confirm(3, first)
    global_ = _step(global_, 2)
    delta = views.prepare(3, global_, encode(global_, FULL))
    assert delta.is_delta
    restarted = HeldAdapter(tmp_path / "held.safetensors")  # read back from its file
    assert adapter_hash(restarted.receive(_record(delta))) == delta.result_hash

    (tmp_path / "held.safetensors").write_bytes(b"\x00" * 64)  # damaged on disk
    with pytest.raises(DownlinkError, match=DOWNLINK_MISS):
        HeldAdapter(tmp_path / "held.safetensors").receive(_record(delta))
    with pytest.raises(DownlinkError, match=DOWNLINK_MISS):
        HeldAdapter(None).receive(_record(delta))  # never received anything


def test_a_tampered_delta_or_hash_is_refused(tmp_path):
    views = DownlinkViews(FULL, DELTA, capacity=8)
    global_ = _adapter(2)
    first = views.prepare(1, global_, encode(global_, FULL))
    device = HeldAdapter(tmp_path / "held.safetensors")
    device.receive(_record(first))
    views.confirm(1, first)
    global_ = _step(global_, 3)
    delta = views.prepare(1, global_, encode(global_, FULL))
    flipped = bytearray(delta.payload)
    flipped[-3] ^= 0x40
    for record in ({**_record(delta), DOWNLINK_DELTA: bytes(flipped)},
                   {**_record(delta), DOWNLINK_HASH: "0" * 64},
                   {**_record(delta), DOWNLINK_BASE: "f" * 64}):
        with pytest.raises(ValueError):  # DownlinkError, or the codec's own CodecError for broken bytes
            HeldAdapter(tmp_path / "held.safetensors").receive(record)
    assert adapter_hash(device.receive(_record(delta))) == delta.result_hash  # the genuine one still applies


def test_an_unconfirmed_or_forgotten_node_gets_the_full_adapter_and_the_table_is_bounded():
    views = DownlinkViews(FULL, DELTA, capacity=2)
    global_ = _adapter(4)
    full = encode(global_, FULL)
    for node in (1, 2, 3):
        views.confirm(node, views.prepare(node, global_, full))
    assert not views.prepare(1, global_, full).is_delta  # evicted: the oldest of three in a table of two
    assert views.prepare(3, global_, full).is_delta
    views.forget(3)  # its task failed: it may or may not hold what it was sent
    assert not views.prepare(3, global_, full).is_delta
    off = DownlinkViews(FULL, "", capacity=2)  # deltas off: every task the full adapter, as before
    off.confirm(1, off.prepare(1, global_, full))
    assert off.prepare(1, global_, full).payload == full


def test_a_device_served_by_two_processes_in_turn_applies_each_delta_to_its_newest_copy(tmp_path):
    """A simulated device's tasks run in whichever Ray actor is free, and each actor keeps the devices it
    served in memory: a copy another actor has since replaced on disk is read anew, not applied to (the
    stale copy made every such delta a downlink-miss)."""
    from edgefed.common.lru import Lru

    path = tmp_path / "held.safetensors"
    actors = [Lru(4), Lru(4)]

    def held_in(actor: int) -> HeldAdapter:
        return actors[actor].get("device", lambda: HeldAdapter(path), valid=HeldAdapter.is_current)

    views = DownlinkViews(FULL, DELTA, capacity=8)
    global_ = _adapter(3)
    for version, actor in enumerate([0, 1, 0, 1, 1, 0]):
        downlink = views.prepare(5, global_, encode(global_, FULL))
        assert adapter_hash(held_in(actor).receive(_record(downlink))) == downlink.result_hash, version
        views.confirm(5, downlink)
        global_ = _step(global_, version + 10)
    assert views.fulls == 1 and views.deltas == 5


def test_a_view_read_back_from_its_file_keeps_the_models_tensor_order(tmp_path):
    """safetensors sorts names; a model's adapter is not sorted. The view a restarted device (or any other
    process of it) reads back must hash as the one it received, or every delta after it is a miss."""
    views = DownlinkViews(FULL, DELTA, capacity=8)
    global_ = OrderedDict(reversed(_adapter(4).items()))  # head.bias, a.lora_B, a.lora_A
    first = views.prepare(2, global_, encode(global_, FULL))
    HeldAdapter(tmp_path / "held.safetensors").receive(_record(first))
    views.confirm(2, first)
    global_ = _step(global_, 5)
    delta = views.prepare(2, global_, encode(global_, FULL))
    restarted = HeldAdapter(tmp_path / "held.safetensors")
    assert list(restarted.view) == list(global_)
    assert adapter_hash(restarted.receive(_record(delta))) == delta.result_hash
