"""The asynchronous aggregator's mechanics: durable buffer -> opened updates -> versions.

    ingest()  sealed bytes -> state store (the acknowledgement: durable from here)
    step()    read buffered entries, verify/open/check each (rejects are counted
              and dropped atomically), hold the accepted ones; when the policy
              says the buffer is ready, fold them with staleness weights and the
              LoRA aggregation mode, apply the server optimizer, and commit the
              new version in one atomic store operation that also retires the
              folded entries and records their update ids.

A crash between reading and committing loses nothing: the entries are still
in the store's buffer and the restarted aggregator (`resume`) reads them again.
An update id already folded (a duplicate delivery, or a replay) is rejected,
so every update counts exactly once. Which updates weigh how much, and when
to aggregate, is the policy's business (cloud/aggregation/policy.py).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgefed.cloud.aggregation.lora_aggregation import WeightedDelta, aggregate
from edgefed.cloud.aggregation.policy import AggregationPolicy, FedBuffPolicy, PendingUpdate, parse_staleness_weight
from edgefed.cloud.aggregation.server_optimizer import ServerOptimizer, make_server_optimizer
from edgefed.cloud.aggregation.update_opener import OpenedUpdate, RejectedUpdate, UpdateOpener, opener_for, plain_context
from edgefed.cloud.aggregation.version_window import StalenessWindow
from edgefed.cloud.state.store import BufferedUpdate, FoldedUpdate, StateStore, StateStoreError, VersionRecord, store_for
from edgefed.cloud.state.version_mac import VersionMac
from edgefed.common.config import ConfigError, EdgefedConfig, LoraAggregationMode
from edgefed.common.keys import load_state_mac_key
from edgefed.common.wire.capabilities import capabilities_of
from edgefed.common.wire.codec import Adapter, decode, encode, flat_values, views_of

log = logging.getLogger(__name__)

MAX_OPEN_ATTEMPTS = 3  # an entry whose opening killed the process this often is quarantined



@dataclass
class VersionEvent:
    """What happened in one aggregation (one metrics line)."""

    version: int
    adapter: Adapter
    staleness: list[int]
    nodes: list[str]
    buffer_wait_s: float  # first buffered update's arrival -> the version
    aggregation_s: float  # fold + optimizer + commit
    update_norm: float
    train_loss: float
    rejected: Counter = field(default_factory=Counter)  # since the previous version
    bytes_received: int = 0  # since the previous version
    bytes_by_device: dict[str, int] = field(default_factory=dict)  # encoded bytes of the folded updates

    @property
    def staleness_histogram(self) -> dict[str, int]:
        return {str(k): v for k, v in sorted(Counter(self.staleness).items())}


@dataclass
class _Held:
    entry: BufferedUpdate
    opened: OpenedUpdate
    info: PendingUpdate


class FedBuffAggregator:
    def __init__(
        self,
        store: StateStore,
        opener: UpdateOpener,
        window: StalenessWindow,
        policy: AggregationPolicy,
        optimizer: ServerOptimizer,
        lora_aggregation: LoraAggregationMode,
        initial: dict[str, torch.Tensor],
        mac: VersionMac,
    ) -> None:
        """`opener` checks updates against `window`, which this aggregator advances as it publishes;
        `mac` signs every committed version and verifies every version read back."""
        self.store, self.opener, self.window, self.policy, self.optimizer = store, opener, window, policy, optimizer
        self.lora_aggregation, self.mac = lora_aggregation, mac
        # one buffer, the tensors views of it: the fold, the optimizer and the finiteness check are whole-array
        self.global_: Adapter = views_of(flat_values(initial).detach().clone(), initial)
        self._recent: dict[int, Adapter] = {}  # kept versions, the bases of stale updates (svd)
        self._held: list[_Held] = []
        self._just_opened: str | None = None  # opened without incident; its attempt count not cleared yet
        self._rejected: Counter = Counter()
        self._bytes = 0
        self.node_devices: dict[int, str] = {}  # Flower node id -> device id, learned from opened updates

    @classmethod
    def from_config(cls, cfg: EdgefedConfig, initial: dict[str, torch.Tensor]) -> FedBuffAggregator:
        """The aggregator a run config describes, on the state store it names."""
        settings = cfg.fedbuff
        try:
            staleness_weight = parse_staleness_weight(settings.staleness_weight)
        except ValueError as err:
            raise ConfigError(f"staleness-weight: {err}") from None
        store = store_for(cfg)
        window = StalenessWindow(settings.max_staleness, store.is_folded)
        if settings.state_store.startswith("memory://"):  # dies with this process: nobody else can write it
            mac_key = secrets.token_bytes(32)
        else:
            mac_key = load_state_mac_key(Path(cfg.keys_root) / "cloud")
        return cls(
            store, opener_for(cfg, window), window, FedBuffPolicy(settings.buffer_size, staleness_weight),
            make_server_optimizer(settings.server_optimizer, settings.server_learning_rate),
            settings.lora_aggregation, initial, VersionMac(mac_key, cfg.federation),
        )

    @property
    def version(self) -> int:
        """The newest published global version (-1 before `resume`)."""
        return self.window.current

    # --- lifecycle -------------------------------------------------------------
    def resume(self) -> int:
        """Continue the federation from the store's latest version (or start it at 0)."""
        latest = self.store.latest_version()
        if latest is None:
            self._commit(VersionRecord(0, encode(self.global_, "none"), self.optimizer.state_bytes(),
                                       {"created_at": time.time(), "update_ids": []}), [], [])
            self.window.advance(0)
            log.info("federation %r: new, version 0 published", self.store.federation)
        else:
            loaded = self._load(latest)
            if loaded is None:
                raise StateStoreError(f"the store says version {latest} is the latest but does not hold it")
            record, self.global_ = loaded
            self.optimizer.load_state_bytes(record.optimizer)
            self.window.advance(latest)
            log.info("federation %r: resumed at version %d, %d updates buffered",
                     self.store.federation, latest, self.store.buffer_depth())
        self._recent = {self.version: self.global_}
        return self.version

    def ingest(self, payload: bytes, meta: dict) -> str:
        """Durably buffer a received update. Returning is the acknowledgement."""
        return self.store.append_update(payload, {**meta, "received_at": meta.get("received_at", time.time())})

    # --- the work ------------------------------------------------------------------
    def step(self, block_ms: int = 0, batch: int = 64, stop_at: int | None = None) -> list[VersionEvent]:
        """Open what has arrived; aggregate whenever the policy says so.

        With `stop_at`, entries after the one that completes that version are left
        unopened in the store (a later aggregator process reads them)."""
        events = []
        for entry in self.store.read_updates(batch, block_ms):
            if stop_at is not None and self.version >= stop_at:
                break
            self._bytes += len(entry.payload)
            opened = self._open(entry)
            if opened is None:
                continue
            node_id = _number(entry.meta, "node-id")
            if node_id is not None:  # which Flower node speaks for which device (for per-device accounting)
                self.node_devices[int(node_id)] = opened.context.node
            info = PendingUpdate(node=opened.context.node, base_version=opened.context.base_version,
                                 num_examples=opened.context.num_examples,  # signed, checked by the opener
                                 received_at=_number(entry.meta, "received_at") or time.time())
            self._held.append(_Held(entry, opened, info))
            if self.policy.ready([h.info for h in self._held]):
                self._forget_attempts()
                event = self._aggregate()
                if event is not None:
                    events.append(event)
        self._forget_attempts()
        return events

    def _forget_attempts(self) -> None:
        """The attempts of the entry opened last: forgotten with the next entry's `begin_open`, or here."""
        if self._just_opened is not None:
            self.store.opened(self._just_opened)
            self._just_opened = None

    def _open(self, entry: BufferedUpdate) -> OpenedUpdate | None:
        """The entry opened and checked, or None once it is rejected or quarantined (never retried).

        Only a redelivered entry (left by a process that died) has its attempt written before it is opened: a
        fresh entry that kills this process comes back redelivered, and its first, unwritten attempt is
        counted then. The store write is paid after a crash, not once an update."""
        if entry.redelivered:
            attempts = self.store.begin_open(entry.entry_id, opened=self._just_opened) + 1
            self._just_opened = None
            if attempts > MAX_OPEN_ATTEMPTS:  # opening it ended the aggregator process every time
                self._quarantine(entry, "crashed-opening", f"opening it was begun {attempts - 1} times and never ended")
                return None
        try:
            opened = self.opener.open(entry.payload, self.global_, plain_context(entry.meta))
        except RejectedUpdate as rejected:
            self.store.reject(entry.entry_id, rejected.reason)
            self._rejected[rejected.reason] += 1
            log.warning("rejected update from %s: %s", rejected.node, rejected)
            return None
        except Exception as err:  # noqa: BLE001 - a gap in the gate's checks must not crash-loop the aggregator
            log.exception("update entry %s could not be opened; quarantined", entry.entry_id)
            self._quarantine(entry, "unopenable", f"{type(err).__name__}: {err}")
            return None
        if entry.redelivered:
            self._just_opened = entry.entry_id  # its attempts go with the next store write
        return opened

    def _quarantine(self, entry: BufferedUpdate, reason: str, detail: str) -> None:
        self.store.quarantine(entry.entry_id, reason, detail)
        self._rejected["quarantined"] += 1
        log.error("update entry %s quarantined (%s: %s); it is kept for inspection", entry.entry_id, reason, detail)

    @property
    def buffered(self) -> int:
        """Opened updates waiting for the next version."""
        return len(self._held)

    def _aggregate(self) -> VersionEvent | None:
        """Fold the held updates into the next version and commit it; None if the result is not finite."""
        start = time.perf_counter()
        held, self._held = self._held, []
        total = sum(h.info.num_examples for h in held) or 1.0
        updates = [
            WeightedDelta(h.opened.delta, self.policy.weight(h.info, self.version) * h.info.num_examples / total,
                          self._base(h.info.base_version))
            for h in held
        ]
        new_global = self.optimizer.step(self.global_, aggregate(self.global_, updates, self.lora_aggregation))
        if not np.isfinite(flat_values(new_global).numpy()).all():
            # Each update was finite and bounded, so this is a bug or a corrupted base: never commit it.
            for h in held:
                self.store.reject(h.entry.entry_id, "non-finite-aggregate")
            self._rejected["non-finite-aggregate"] += len(held)
            log.error("the aggregate of %d updates is not finite: version %d not committed, the updates dropped",
                      len(held), self.version + 1)
            return None
        staleness = [h.info.staleness(self.version) for h in held]
        update_ids = [h.opened.context.update_id for h in held]
        nodes = [h.info.node for h in held]
        version = self.version + 1
        record = VersionRecord(version, encode(new_global, "none"), self.optimizer.state_bytes(), {
            "created_at": time.time(), "update_ids": update_ids, "nodes": nodes, "staleness": staleness,
            "weights": [round(u.weight, 6) for u in updates],
        })
        self._commit(record, [h.entry.entry_id for h in held],
                     [FoldedUpdate(h.info.base_version, h.opened.context.update_id) for h in held])
        self.window.advance(version, folded=update_ids)
        self.global_ = new_global
        self._recent[version] = new_global
        for old in [v for v in self._recent if v < self.window.oldest]:
            del self._recent[old]
        self.store.note_devices({h.info.node: {"last_update_at": h.info.received_at, "last_version": version,
                                               **capabilities_of(h.entry.meta)} for h in held})
        losses = [float(h.entry.meta["train-loss"]) for h in held if "train-loss" in h.entry.meta]
        event = VersionEvent(
            version=version, adapter=new_global, staleness=staleness, nodes=nodes,
            buffer_wait_s=max(time.time() - min(h.info.received_at for h in held), 0.0),
            aggregation_s=time.perf_counter() - start,
            update_norm=sum(h.opened.norm for h in held) / len(held),
            train_loss=sum(losses) / len(losses) if losses else math.nan,
            rejected=self._rejected, bytes_received=self._bytes,
            bytes_by_device=dict(sum((Counter({h.info.node: len(h.entry.payload)}) for h in held), Counter())),
        )
        self._rejected, self._bytes = Counter(), 0
        return event

    def _base(self, version: int) -> Adapter:
        """The global adapter of a kept version (after a restart, loaded back from the store)."""
        if version not in self._recent:
            loaded = self._load(version)
            self._recent[version] = loaded[1] if loaded is not None else self.global_
        return self._recent[version]

    def _load(self, version: int) -> tuple[VersionRecord, Adapter] | None:
        """A stored version and its adapter (None if not kept), only if this cloud wrote it
        (its MAC verifies) and it is finite; anything else raises StateStoreError."""
        record = self.store.load_version(version)
        if record is None:
            return None
        self.mac.verify(record)
        adapter = decode(record.adapter)
        if not all(torch.isfinite(t).all() for t in adapter.values()):
            raise StateStoreError(f"version {version} in the state store is not finite; refusing to use it")
        return record, adapter

    def _commit(self, record: VersionRecord, entry_ids: list[str], folded: list[FoldedUpdate]) -> None:
        record.mac = self.mac.sign(record)
        self.store.commit_version(record, entry_ids, folded, keep=self.window.max_staleness + 1)


def _number(meta: dict, key: str) -> float | None:
    """A numeric field of an entry's (unauthenticated) transport metadata, None if absent or not a number."""
    value = meta.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) else None
