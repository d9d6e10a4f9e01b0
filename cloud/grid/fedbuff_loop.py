"""The asynchronous ServerApp loop: FedBuff on Flower's Grid.

Flower has no asynchronous strategy; this loop is ours, on
`Grid.push_messages` / `Grid.pull_messages`:

- keep `concurrency` clients training at all times, each on the newest
  global version (an idle node gets work the moment it is free);
- every reply goes straight into the durable buffer (`FedBuffAggregator.ingest`:
  the acknowledgement), then the aggregator opens what arrived and, when the
  policy says so, publishes version v+1;
- an instruction carries what the node lacks of the global adapter: the
  difference from the adapter it holds (cloud/grid/downlink_views.py), or
  the whole adapter when the cloud knows of none;
- instructions carry a TTL; a node that errors or times out is counted and
  simply gets new work later, nobody waits for it;
- each model published during the run is installed and scored by a sample
  of idle devices (`published-eval-devices`): a `deployed` line in
  metrics.jsonl per version, beside the central accuracy of the version lines;
- stop at `max-versions`, at `target-accuracy`, or when `wall-budget-s` is spent.

State lives in the store named by `state-store`, keyed by the federation name:
restarted against the same Redis, the loop resumes the same federation
where it stopped, with the buffered updates still in the buffer.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from edgefed.cloud.aggregation.fedbuff import FedBuffAggregator, VersionEvent
from edgefed.cloud.grid.deployed_evaluation import combine_deployed, deployed_messages, sample_nodes
from edgefed.cloud.grid.downlink_views import DownlinkViews
from edgefed.cloud.grid.work_sizing import work_for
from edgefed.cloud.metrics.recorder import RoundRecorder
from edgefed.cloud.training.participant import TRAINER_ID
from edgefed.common.config import EdgefedConfig
from edgefed.common.run_dir import RunDir
from edgefed.common.wire.capabilities import BASE_BITS, TOO_SMALL, capabilities_of
from edgefed.common.wire.codec import Adapter, encode
from edgefed.common.wire.downlink import DOWNLINK_MISS, Downlink
from edgefed.common.wire.messages import (
    CONFIG,
    GLOBAL_VERSION,
    METRICS,
    PAYLOAD,
    SERVER_ROUND,
    UPDATE,
    instruction_config,
    plain_meta,
)

log = logging.getLogger(__name__)

POLL_S = 0.05
NODE_WAIT_LOG_S = 60.0  # an empty fleet is waited for; this often it says so


def wait_for_nodes(grid: Grid, min_clients: int, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> list[int]:
    """The connected nodes, once there are `min_clients`. However long that takes: a fleet whose devices are
    asleep, or not enrolled yet, is not an error; it is logged once a minute."""
    started = clock()
    next_log = started + NODE_WAIT_LOG_S
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= min_clients:
            return nodes
        if clock() >= next_log:
            log.info("waiting for devices: %d of min-clients=%d connected (%.0f min so far)", len(nodes), min_clients,
                     (clock() - started) / 60)
            next_log += NODE_WAIT_LOG_S
        sleep(1.0)


@dataclass(frozen=True)
class LoopHooks:
    """What the loop tells the rest of the cloud, and what it asks it (connected in cloud/server_app.py)."""

    on_version: Callable[[int, Adapter], None] | None = None  # each new global version (the exporter); must not block
    announcement: Callable[[], dict[str, object]] | None = None  # entries added to every instruction (newest model)
    live_gauges: Callable[[int, int], None] | None = None  # (clients in flight, buffer depth) as they change
    published: Callable[[], list[int]] | None = None  # versions published since the last call (to be scored)
    model_service: Callable[[], str] | None = None  # where devices fetch published models
    drain_publishing: Callable[[], None] | None = None  # wait for the export in progress (at the end)


@dataclass
class _InFlight:
    node_id: int
    version: int
    sent_at: float
    downlink: Downlink | None = None


@dataclass
class _Scoring:
    """A published version being installed and scored by a sample of devices."""

    version: int
    wanted: int  # devices to score it
    sent: dict[str, int]  # message id -> node, replies outstanding
    replies: list[Message]
    asked: set[int]
    started: float


def run_fedbuff(
    grid: Grid, cfg: EdgefedConfig, initial: dict[str, torch.Tensor], fingerprint: str,
    recorder: RoundRecorder, run: RunDir, hooks: LoopHooks = LoopHooks(),
) -> Adapter:
    """Run the asynchronous federation until a stop condition; returns the final global adapter."""
    aggregator = FedBuffAggregator.from_config(cfg, initial)
    aggregator.resume()
    loop = _AsyncLoop(grid, cfg, aggregator, fingerprint, recorder, run, hooks)
    try:
        loop.run()
    finally:
        aggregator.store.close()
    return aggregator.global_


class _AsyncLoop:
    def __init__(
        self, grid: Grid, cfg: EdgefedConfig, aggregator: FedBuffAggregator, fingerprint: str,
        recorder: RoundRecorder, run: RunDir, hooks: LoopHooks,
    ) -> None:
        self.grid, self.cfg, self.aggregator, self.recorder, self.run_dir = grid, cfg, aggregator, recorder, run
        self.hooks = hooks
        self._live: tuple[int, int] | None = None
        self.base_config = instruction_config(cfg, fingerprint)
        self.rng = random.Random(cfg.seed)
        self.in_flight: dict[str, _InFlight] = {}
        self.tasks = 0
        self.bytes_sent = 0
        self.bytes_down_by_node: Counter = Counter()
        self.served: Counter = Counter()  # node id -> tasks it was given
        self.failures: Counter = Counter()
        self.capabilities: dict[int, dict[str, float]] = {}  # node id -> its latest report
        self.refused: dict[int, str] = {}  # nodes whose memory holds no training plan -> their reason
        self.base_bits: dict[int, int] = {}  # node id -> the precision its plan trains the base at
        self._encoded: tuple[int, bytes] | None = None
        view_bytes = 4 * sum(t.numel() for t in aggregator.global_.values())
        self.downlink = DownlinkViews(cfg.downlink_codec, cfg.downlink_delta_codec,
                                      capacity=max(1, cfg.downlink_views_mb * 2**20 // max(view_bytes, 1)))
        self.bytes_full = 0  # what the same tasks would have cost with the whole adapter each
        self.scoring: list[_Scoring] = []  # at most one started and one waiting for idle devices
        # Central evaluation runs beside the loop so that collecting replies and
        # handing out work never waits for it; each line keeps its version's
        # publication time.
        self.evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="central-eval")
        self.evaluations: list[tuple[int, Future]] = []

    def run(self) -> None:
        try:
            self._run()
        finally:
            for _, future in self.evaluations:
                future.result()
            self.evaluator.shutdown()

    def _run(self) -> None:
        nodes = wait_for_nodes(self.grid, self.cfg.min_clients)
        log.info("async federation: %d nodes, concurrency %s, buffer %d, versions %d..%d",
                 len(nodes), self.cfg.concurrency or "all", self.cfg.buffer_size, self.aggregator.version, self.cfg.max_versions)
        while True:
            self._score_published()
            self._dispatch()
            progressed = self._collect()
            for event in self.aggregator.step(stop_at=self.cfg.max_versions):
                self._dispatch()  # idle clients start on the new version at once
                self._record(event)
                progressed = True
            if self._should_stop():
                self._abandon()
                return
            if self.cfg.wall_budget_s and self.recorder.elapsed() > self.cfg.wall_budget_s:
                log.info("wall budget of %.0f s spent at version %d", self.cfg.wall_budget_s, self.aggregator.version)
                self._abandon()
                return
            self._report_live()
            if not progressed:
                time.sleep(POLL_S)

    # --- downlink ------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Give work on the newest version to idle nodes, up to the concurrency."""
        nodes = list(self.grid.get_node_ids())
        busy = {f.node_id for f in self.in_flight.values()} | self._scoring_nodes()
        if nodes and set(nodes) <= set(self.refused) and not self.in_flight:
            reasons = "; ".join(f"node {n}: {r}" for n, r in list(self.refused.items())[:3])
            raise RuntimeError(f"every connected device refused to train this model ({reasons})")
        idle = [n for n in nodes if n not in busy and n not in self.refused]
        limit = (self.cfg.concurrency or len(nodes)) - len(self.in_flight)
        if limit <= 0 or not idle:
            return
        # Least served first, ties at random: below full concurrency every device gets work before any
        # gets a second task, so a fleet's slow or late joiners are not crowded out by whoever answers first.
        chosen = sorted(idle, key=lambda n: (self.served[n], self.rng.random()))[:limit]
        instructions = [self._instruction(node) for node in chosen]
        for node, (_, downlink), msg_id in zip(chosen, instructions,
                                               self.grid.push_messages([m for m, _ in instructions])):
            self.in_flight[msg_id] = _InFlight(node, self.aggregator.version, time.monotonic(), downlink)

    def _instruction(self, node: int) -> tuple[Message, Downlink]:
        version = self.aggregator.version
        if self._encoded is None or self._encoded[0] != version:
            self._encoded = (version, encode(self.aggregator.global_, self.cfg.downlink_codec))
        self.tasks += 1
        self.served[node] += 1
        config = ConfigRecord(dict(self.base_config))
        downlink = self.downlink.prepare(node, self.aggregator.global_, self._encoded[1])
        config.update(downlink.fields())
        config[GLOBAL_VERSION] = version
        config[SERVER_ROUND] = self.tasks  # distinct per task: seeds the client's shuffling
        if self.hooks.announcement is not None:
            config.update(self.hooks.announcement())
        config.update(work_for(self.cfg, self.capabilities.get(node, {})))
        self.bytes_sent += len(downlink.payload)
        self.bytes_full += len(self._encoded[1])
        self.bytes_down_by_node[node] += len(downlink.payload)
        return Message(content=RecordDict({CONFIG: config}), message_type="train", dst_node_id=node,
                       ttl=self.cfg.message_ttl_s), downlink

    # --- uplink -----------------------------------------------------------------------
    def _collect(self) -> bool:
        """Pull finished replies into the durable buffer; count failures and timeouts."""
        scoring = {m: s for s in self.scoring for m in s.sent}
        if not self.in_flight and not scoring:
            return False
        got = False
        for reply in self.grid.pull_messages([*self.in_flight, *scoring]):
            msg_id = reply.metadata.reply_to_message_id
            if msg_id in scoring:
                got = True
                scoring[msg_id].sent.pop(msg_id, None)
                scoring[msg_id].replies.append(reply)
                continue
            task = self.in_flight.pop(msg_id, None)
            if task is None:
                continue
            got = True
            if reply.has_error():
                self.downlink.forget(task.node_id)  # it may or may not hold what it was sent
                reason = reply.error.reason
                if DOWNLINK_MISS in reason:  # it lost the adapter a delta applied to: the whole one next time
                    self.failures[DOWNLINK_MISS] += 1
                    log.info("node %s did not hold the adapter its delta applied to; it is sent the whole",
                             task.node_id)
                    continue
                if TOO_SMALL in reason:  # it will refuse every task: stop sending it work
                    self.failures["too-small"] += 1
                    self.refused[task.node_id] = reason[reason.index(TOO_SMALL):].rstrip("'>")
                    log.warning("node %s cannot train this model and gets no more work: %s", task.node_id,
                                self.refused[task.node_id])
                    continue
                self.failures["error"] += 1
                log.warning("node %s failed: %s", task.node_id, reason)
                continue
            if task.downlink is not None:
                self.downlink.confirm(task.node_id, task.downlink)  # it trained from it: it holds it
            self._ingest(reply, task)
        overdue = [m for m, f in self.in_flight.items() if time.monotonic() - f.sent_at > self.cfg.message_ttl_s + 30]
        for msg_id in overdue:  # Flower answers an expired message itself; this is the backstop
            self.failures["timeout"] += 1
            self.downlink.forget(self.in_flight.pop(msg_id).node_id)
        return self._finish_scoring() or got

    def _ingest(self, reply: Message, task: _InFlight) -> None:
        content = reply.content
        update = content[UPDATE] if UPDATE in content else ConfigRecord({})
        payload = bytes(update.get(PAYLOAD, b""))
        metrics = dict(content[METRICS]) if METRICS in content else {}
        if capabilities := capabilities_of(metrics):
            self.capabilities[task.node_id] = capabilities
        if isinstance(metrics.get(BASE_BITS), int | float):
            self.base_bits[task.node_id] = int(metrics[BASE_BITS])
        meta = {"node-id": task.node_id, "dispatched-version": task.version, "received_at": time.time(),
                **{k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}}
        meta.update(plain_meta(update))  # plain mode only: the context travels in the clear
        self.aggregator.ingest(payload, meta)

    # --- bookkeeping ------------------------------------------------------------------
    def _record(self, event: VersionEvent) -> None:
        evaluate_now = event.version % self.cfg.eval_every == 0 or event.version >= self.cfg.max_versions
        stats = {
            "version": event.version, "clients": len(event.nodes), "failures": sum(self.failures.values()),
            "rejected": dict(event.rejected), "bytes_received": event.bytes_received, "bytes_sent": self.bytes_sent,
            "train_loss": event.train_loss, "update_norm": event.update_norm,
        }
        extra = {
            "mode": "async",
            "accepted": len(event.nodes),
            "staleness_histogram": event.staleness_histogram,
            "buffer_wait_s": round(event.buffer_wait_s, 3),
            "aggregation_s": round(event.aggregation_s, 4),
            "clients_in_flight": len(self.in_flight),
            "buffer_depth": self.aggregator.store.buffer_depth(),
            "failure_kinds": dict(self.failures),
            "refused_devices": {str(node): reason for node, reason in self.refused.items()},
            "base_bits_by_device": {str(node): bits for node, bits in self.base_bits.items()},
            "trainer_updates": event.nodes.count(TRAINER_ID),
            "devices": event.nodes,
            "bytes_up_by_device": event.bytes_by_device,
            "bytes_down_by_device": self._bytes_down_by_device(),
            "bytes_sent_full_adapter": self.bytes_full,
            "downlink_deltas": self.downlink.deltas,
            "downlink_fulls": self.downlink.fulls,
        }
        self.bytes_sent, self.bytes_full, self.failures = 0, 0, Counter()
        self.downlink.deltas = self.downlink.fulls = 0
        self.run_dir.save_tensors("checkpoint.safetensors", event.adapter)
        self.run_dir.write_json("checkpoint.json", {"version": event.version, "federation": self.cfg.federation})
        future = self.evaluator.submit(self.recorder.record, event.version, event.adapter, stats,
                                       evaluate_now=evaluate_now, extra=extra, wall_s=self.recorder.elapsed())
        self.evaluations.append((event.version, future))
        if self.hooks.on_version is not None:
            self.hooks.on_version(event.version, event.adapter)

    def _bytes_down_by_device(self) -> dict[str, int]:
        """Downlink per device since the last version. A node is named once one of its updates was
        opened (sealed updates name their device inside); until then its bytes wait for the next line."""
        known = {node: n for node, n in self.bytes_down_by_node.items() if node in self.aggregator.node_devices}
        for node in known:
            del self.bytes_down_by_node[node]
        return {self.aggregator.node_devices[node]: n for node, n in known.items()}

    # --- the deployed model, per published version ---------------------------------------------
    def _score_published(self) -> None:
        """Newly published versions are scored by idle devices; only the newest waits for them (an older
        one not yet started is skipped: the fleet has moved on)."""
        if self.hooks.published is None or not self.cfg.published_eval_devices:
            return
        for version in self.hooks.published():
            for skipped in [s for s in self.scoring if not s.asked]:
                self.scoring.remove(skipped)
                self.recorder.record_deployed(skipped.version, {
                    "federated_accuracy": None, "devices": 0, "devices_installed": 0,
                    "skipped": f"v{version} was published before devices were free to score it"})
            self.scoring.append(_Scoring(version, self.cfg.published_eval_devices, {}, [], set(), time.monotonic()))
        connected = list(self.grid.get_node_ids())
        for scoring in self.scoring:
            wanted = scoring.wanted - len(scoring.asked)
            if wanted <= 0:
                continue
            busy = {f.node_id for f in self.in_flight.values()} | self._scoring_nodes()
            idle = [n for n in connected if n not in busy and n not in scoring.asked and n not in self.refused]
            chosen = sample_nodes(idle, wanted, self.cfg.seed, scoring.version)
            if not chosen:
                continue
            assert self.hooks.model_service is not None
            messages = deployed_messages(chosen, scoring.version, self.hooks.model_service(), self.base_config,
                                         self.cfg.message_ttl_s)
            for node, msg_id in zip(chosen, self.grid.push_messages(messages)):
                scoring.sent[msg_id] = node
                scoring.asked.add(node)

    def _scoring_nodes(self) -> set[int]:
        return {node for s in self.scoring for node in s.sent.values()}

    def _finish_scoring(self, force: bool = False) -> bool:
        """Record each version whose devices have all answered (or expired; or, with `force`, the run ends)."""
        finished = False
        for scoring in list(self.scoring):
            expired = time.monotonic() - scoring.started > self.cfg.message_ttl_s + 30
            complete = len(scoring.asked) >= scoring.wanted and not scoring.sent
            if not (complete or expired or (force and scoring.asked)):
                continue
            self.scoring.remove(scoring)
            result = combine_deployed(scoring.replies, scoring.version, len(scoring.asked))
            self.recorder.record_deployed(scoring.version, result)
            finished = True
        return finished

    def _drain_scoring(self) -> None:
        """At the end: wait (up to a TTL) for devices still scoring a published version, then record it."""
        deadline = time.monotonic() + self.cfg.message_ttl_s
        while any(s.sent for s in self.scoring) and time.monotonic() < deadline:
            if not self._collect():
                time.sleep(POLL_S)
        self._finish_scoring(force=True)

    def _report_live(self) -> None:
        live = (len(self.in_flight), self.aggregator.buffered)
        if live == self._live:
            return
        if self._live is None or live[0] != self._live[0]:
            self.aggregator.store.note_in_flight(live[0])  # for the service's endpoint, which outlives this process
        self._live = live
        if self.hooks.live_gauges is not None:
            self.hooks.live_gauges(*live)

    def _should_stop(self) -> bool:
        if self.aggregator.version >= self.cfg.max_versions:  # counted over the federation's life, across restarts
            return True
        if self.cfg.target_accuracy:
            for version, future in self.evaluations:
                if future.done() and float(future.result()["accuracy"]) >= self.cfg.target_accuracy:
                    log.info("target accuracy %.4f reached at version %d", self.cfg.target_accuracy, version)
                    return True
        return False

    def _abandon(self) -> None:
        """Stop: instructions still out will expire; their replies were never acknowledged."""
        if self.in_flight:
            log.info("stopping with %d instructions in flight", len(self.in_flight))
        self.in_flight.clear()
        if self.hooks.drain_publishing is not None:  # every model published during the run gets its line
            self.hooks.drain_publishing()
        self._score_published()
        self._drain_scoring()
