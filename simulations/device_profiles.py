"""Simulated device heterogeneity: who is slow, who is on a thin link, who drops out.

A profile is a fleet mix of device classes. Every simulated node is given one
class, deterministically from its partition id (nodes are spread over the
classes by their shares, so four nodes on `mobile-skewed` are two flagships, a
mid-range phone and a low-end one), and `device_profile_mod` applies it to each
train instruction on that node:

- compute: the real local training time is stretched to what a device of
  relative speed `speed` would take (time / speed), by sleeping the difference;
- network: the global adapter down and the sealed update up take
  bytes / bandwidth;
- dropout: with probability `dropout` the device vanishes mid-task (the
  instruction ends in an error reply, as a device that went offline would);
- memory: the MB the device offers (`memory_mb`, or the run config's
  `device-memory` for its class) is put in the node's config where an edge
  agent puts its own, so the device plans its training for it
  (edge/training/plan.py: the base precision and batch that fit, or a clear
  refusal). The budget is declared, not enforced: the simulated device plans
  as a real one would, in a process that has this machine's memory.

Sync and async runs see the same devices, so their wall-clock times compare
honestly. Sleeping costs no CPU, so slow devices do not steal the cores the
fast ones train on. The profile is named by the `device-profile` run-config key.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from edgefed.common.config import parse_device_memory
from edgefed.common.wire.capabilities import DEVICE_MEMORY_MB
from edgefed.common.wire.messages import CONFIG, DOWNLINK_DELTA, GLOBAL_ADAPTER, PAYLOAD, UPDATE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceClass:
    name: str
    share: float  # fraction of the fleet
    speed: float  # compute speed relative to this machine (0.25 = four times slower)
    downlink_mbps: float  # 0: not modelled
    uplink_mbps: float
    dropout: float  # probability that a task is lost
    memory_mb: float = 0.0  # memory offered for training; 0: not modelled (the device plans without a budget)


PROFILES: dict[str, tuple[DeviceClass, ...]] = {
    "uniform": (DeviceClass("uniform", 1.0, 1.0, 0.0, 0.0, 0.0),),
    # A long tail: half the fleet are recent phones, a quarter are several
    # times slower on a mediocre link, a quarter are old devices on 3G-like
    # uplinks that also drop out now and then. Memory is what a phone lets a
    # background task hold: ViT-B/16 + AST-base in float32 fits the flagship,
    # not the low-end phone, which plans the int8 base (README, "Training on
    # the device").
    "mobile-skewed": (
        DeviceClass("flagship", 0.50, 1.00, 50.0, 20.0, 0.00, memory_mb=6144.0),
        DeviceClass("mid-range", 0.25, 0.35, 20.0, 5.0, 0.02, memory_mb=3072.0),
        DeviceClass("low-end", 0.25, 0.12, 5.0, 1.0, 0.05, memory_mb=1536.0),
    ),
    # Same speed and links everywhere, no dropout: only memory differs. With ViT-B/16 + AST-base
    # (README, "Training on the device") the workstations hold the float base, the phone only int8,
    # the watch no base at all (it refuses, with its reason, and gets no more work).
    "memory-tiers": (
        DeviceClass("workstation", 0.50, 1.0, 0.0, 0.0, 0.0, memory_mb=8192.0),
        DeviceClass("phone", 0.25, 1.0, 0.0, 0.0, 0.0, memory_mb=1536.0),
        DeviceClass("watch", 0.25, 1.0, 0.0, 0.0, 0.0, memory_mb=1024.0),
    ),
    # Same speed everywhere, but three tasks in ten are lost.
    "flaky": (DeviceClass("flaky", 1.0, 1.0, 0.0, 0.0, 0.30),),
}


class DeviceDropped(RuntimeError):
    """The simulated device went offline before finishing its task."""


def device_class(profile: str, partition_id: int, num_partitions: int) -> DeviceClass:
    """The class of node `partition_id` of `num_partitions` under `profile`."""
    if profile not in PROFILES:
        raise ValueError(f"unknown device profile {profile!r}: one of {', '.join(PROFILES)}")
    classes = PROFILES[profile]
    quantile = (partition_id + 0.5) / max(num_partitions, 1)
    cumulative = 0.0
    for cls in classes:
        cumulative += cls.share
        if quantile < cumulative:
            return cls
    return classes[-1]


def memory_of(cls: DeviceClass, device_memory: str) -> float:
    """The MB a device of `cls` offers: the run config's `device-memory` entry for its class, else the profile's."""
    return parse_device_memory(device_memory).get(cls.name, cls.memory_mb)


def transfer_s(num_bytes: int, mbps: float) -> float:
    return num_bytes * 8 / (mbps * 1e6) if mbps > 0 else 0.0


def device_profile_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Make this node behave like its device class: its memory on every instruction, speed, links and dropout on
    train instructions."""
    if CONFIG not in msg.content:
        return call_next(msg, context)
    record = msg.content[CONFIG]
    profile = str(record.get("device-profile", "uniform"))
    cls = device_class(profile, int(context.node_config.get("partition-id", 0)),
                       int(context.node_config.get("num-partitions", 1)))
    memory = memory_of(cls, str(record.get("device-memory", "")))
    if memory:
        context.node_config[DEVICE_MEMORY_MB] = memory  # where an edge agent reports what it offers
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    if cls.speed == 1.0 and not (cls.downlink_mbps or cls.uplink_mbps or cls.dropout):
        return call_next(msg, context)
    seed = hashlib.sha256(f"{record.get('seed', 0)}|{msg.metadata.message_id}".encode()).digest()
    rng = random.Random(int.from_bytes(seed[:8], "little"))
    sent = record.get(GLOBAL_ADAPTER, record.get(DOWNLINK_DELTA, b""))  # the whole adapter, or what it lacked
    download_s = transfer_s(len(bytes(sent)), cls.downlink_mbps)
    if rng.random() < cls.dropout:
        time.sleep(download_s + rng.uniform(0.0, 2.0))
        raise DeviceDropped(f"{cls.name} device (partition {context.node_config.get('partition-id')}) went offline")
    start = time.perf_counter()
    reply = call_next(msg, context)
    compute_s = time.perf_counter() - start
    upload = 0
    if not reply.has_error() and UPDATE in reply.content:
        upload = len(bytes(reply.content[UPDATE].get(PAYLOAD, b"")))
    time.sleep(compute_s * (1.0 / cls.speed - 1.0) + download_s + transfer_s(upload, cls.uplink_mbps))
    return reply
