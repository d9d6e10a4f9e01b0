"""FedBuff policy and the aggregator's buffer on the in-process store (plain transport)."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from edgefed.cloud.aggregation.fedbuff import FedBuffAggregator
from edgefed.cloud.aggregation.policy import FedBuffPolicy, PendingUpdate, constant, hinge, parse_staleness_weight, polynomial
from edgefed.cloud.aggregation.server_optimizer import SERVER_OPTIMIZERS, FedAdam, ServerSGD, make_server_optimizer
from edgefed.cloud.aggregation.update_opener import UpdateOpener
from edgefed.cloud.aggregation.version_window import StalenessWindow
from edgefed.cloud.state.store import open_state_store
from edgefed.cloud.state.version_mac import VersionMac
from edgefed.common.config import ConfigError, ServerOptimizerName, choices
from edgefed.common.wire.codec import encode
from edgefed.common.wire.envelope import UpdateContext

INITIAL = OrderedDict([("w", torch.zeros(4)), ("b", torch.zeros(2))])


def _aggregator(buffer_size: int = 2, weight=None, optimizer=None, max_staleness: int = 4, store=None,
                resume: bool = True) -> FedBuffAggregator:
    store = store or open_state_store("memory://", "fed")
    window = StalenessWindow(max_staleness, store.is_folded)
    opener = UpdateOpener("fed", None, None, window, max_norm=100.0, clip=False)
    agg = FedBuffAggregator(store, opener, window, FedBuffPolicy(buffer_size, weight or polynomial(0.5)),
                            optimizer or ServerSGD(1.0), "fedavg", INITIAL, VersionMac(b"k" * 32, "fed"))
    if resume:
        agg.resume()
    return agg


def _send(agg: FedBuffAggregator, value: float, base: int, examples: float = 1.0, update_id: str | None = None,
          node: str = "d") -> str:
    delta = OrderedDict([("w", torch.full((4,), value)), ("b", torch.full((2,), value))])
    uid = update_id or UpdateContext.new_update_id()
    agg.ingest(encode(delta, "none"), {"plain-num-examples": examples, "plain-node": node, "plain-base-version": base,
                                        "plain-update-id": uid})
    return uid


def test_staleness_weights() -> None:
    assert polynomial(0.5)(0) == 1.0 and polynomial(0.5)(3) == pytest.approx(0.5)
    assert constant()(100) == 1.0
    assert hinge(10, 4)(4) == 1.0 and hinge(10, 4)(5) == pytest.approx(1 / 11)
    assert parse_staleness_weight("poly1")(1) == pytest.approx(0.5)
    assert parse_staleness_weight("hinge2:1")(3) == pytest.approx(1 / 5)
    for bad in ("poly-1", "exp", "hingex"):
        with pytest.raises(ValueError, match="staleness weight"):
            parse_staleness_weight(bad)


def test_every_configurable_server_optimizer_has_an_implementation() -> None:
    assert set(SERVER_OPTIMIZERS) == set(choices(ServerOptimizerName))
    with pytest.raises(ConfigError, match="server-optimizer must be sgd or fedadam"):
        make_server_optimizer("adagrad", 1.0)


def test_policy_weight_and_trigger() -> None:
    policy = FedBuffPolicy(3, polynomial(0.5))
    update = PendingUpdate("n", base_version=2, num_examples=1, received_at=0)
    assert update.staleness(5) == 3 and update.staleness(1) == 0
    assert policy.weight(update, current_version=5) == pytest.approx(0.5)
    assert not policy.ready([update] * 2) and policy.ready([update] * 3)


def test_buffer_triggers_a_version_every_buffer_size_updates() -> None:
    agg = _aggregator(buffer_size=2)
    _send(agg, 1.0, base=0)
    assert agg.step() == [] and agg.buffered == 1 and agg.version == 0
    _send(agg, 3.0, base=0, examples=3.0)
    (event,) = agg.step()
    assert event.version == 1 and agg.version == 1 and agg.buffered == 0
    # example-weighted mean, no staleness: (1*1 + 3*3) / 4
    assert torch.allclose(agg.global_["w"], torch.full((4,), 2.5))
    assert event.staleness == [0, 0] and event.staleness_histogram == {"0": 2}
    assert agg.store.buffer_depth() == 0 and agg.store.latest_version() == 1


def test_stale_updates_are_discounted() -> None:
    agg = _aggregator(buffer_size=1)
    for _ in range(3):
        _send(agg, 0.0, base=agg.version)
        agg.step()
    assert agg.version == 3
    _send(agg, 1.0, base=0)  # three versions stale
    (event,) = agg.step()
    assert event.staleness == [3]
    assert torch.allclose(agg.global_["w"], torch.full((4,), 1 / math.sqrt(4)))


def test_too_stale_duplicate_and_bad_updates_are_rejected_and_counted() -> None:
    agg = _aggregator(buffer_size=2, max_staleness=1)
    for _ in range(2):
        _send(agg, 0.0, base=agg.version)
        _send(agg, 0.0, base=agg.version)
        agg.step()
    assert agg.version == 2
    _send(agg, 1.0, base=0)  # older than max-staleness
    uid = _send(agg, 1.0, base=2)
    _send(agg, 1.0, base=2, update_id=uid)  # delivered twice
    _send(agg, float("nan"), base=2)
    agg.ingest(b"garbage", {"plain-node": "d", "plain-base-version": 2, "plain-update-id": "x"})
    assert agg.step() == []
    assert agg.buffered == 1
    _send(agg, 1.0, base=2)
    (event,) = agg.step()
    assert dict(event.rejected) == {"too-stale": 1, "replayed": 1, "non-finite": 1, "bad-payload": 1}
    assert agg.store.rejected_counts() == dict(event.rejected)
    _send(agg, 1.0, base=2, update_id=uid)  # a replay of an update already folded (its signed base comes with it)
    _send(agg, 1.0, base=7)  # a version never published
    agg.step()
    assert agg.store.rejected_counts()["replayed"] == 2
    assert agg.store.rejected_counts()["unknown-base-version"] == 1


def test_fedadam_moves_and_checkpoints_its_state() -> None:
    agg = _aggregator(buffer_size=1, optimizer=FedAdam(lr=0.1))
    _send(agg, 1.0, base=0)
    agg.step()
    assert torch.all(agg.global_["w"] > 0)
    restored = FedAdam()
    restored.load_state_bytes(agg.store.load_version(1).optimizer)
    assert torch.allclose(restored.m["w"], agg.optimizer.m["w"]) and torch.allclose(restored.v["b"], agg.optimizer.v["b"])


def test_resume_continues_from_the_latest_version() -> None:
    agg = _aggregator(buffer_size=1)
    _send(agg, 2.0, base=0)
    agg.step()
    again = _aggregator(buffer_size=1, store=agg.store, resume=False)
    assert again.resume() == 1
    assert torch.allclose(again.global_["w"], torch.full((4,), 2.0))
