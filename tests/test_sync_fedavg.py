"""The synchronous strategy with real Flower Messages: bad updates are counted, good ones aggregated."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from edgefed.cloud.aggregation.update_opener import UpdateOpener
from edgefed.cloud.aggregation.version_window import IssuedVersions
from edgefed.cloud.grid.sealed_fedavg import SealedFedAvg
from edgefed.common.keys import DeviceRegistry
from edgefed.common.wire.codec import encode
from edgefed.common.wire.envelope import UpdateContext, seal
from edgefed.common.wire.messages import METRICS, PAYLOAD, UPDATE, adapter_to_record


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps messages with the running task's identity; outside a run, give it one."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


GLOBAL = OrderedDict(w=torch.zeros(4, 3), b=torch.ones(3))
AGG = X25519PrivateKey.generate()
DEVICES = {f"d{i}": Ed25519PrivateKey.generate() for i in range(3)}


def _strategy(versions: IssuedVersions | None = None) -> SealedFedAvg:
    registry = DeviceRegistry(None)
    for name, key in DEVICES.items():
        registry.register(name, key.public_key())
    versions = versions or IssuedVersions()
    strategy = SealedFedAvg(UpdateOpener("fed", AGG, registry, versions, max_norm=10.0, clip=False), versions, "fp16")
    strategy._encode(adapter_to_record(GLOBAL))  # what configure_train does: version 0 issued
    return strategy


def _reply(payload: bytes, examples: int = 10) -> Message:
    instruction = Message(RecordDict({}), dst_node_id=1, message_type=MessageType.TRAIN)
    content = RecordDict({UPDATE: ConfigRecord({PAYLOAD: payload}), METRICS: MetricRecord({"num-examples": examples})})
    return Message(content, reply_to=instruction)


def _sealed(device: str, delta: OrderedDict, base: int = 0, update_id: str | None = None,
            examples: float = 10.0) -> bytes:
    context = UpdateContext("fed", device, base, update_id or UpdateContext.new_update_id(), examples)
    return seal(encode(delta, "none"), context, AGG.public_key(), DEVICES[device])


def test_round_with_bad_updates_counts_them_and_averages_the_good():
    strategy = _strategy()
    good_a = OrderedDict(w=torch.full((4, 3), 0.1), b=torch.zeros(3))
    good_b = OrderedDict(w=torch.full((4, 3), 0.3), b=torch.zeros(3))
    first = _sealed("d0", good_a, update_id="x" * 32)
    tampered = bytearray(_sealed("d2", good_b))
    tampered[-70] ^= 0x01
    nan = OrderedDict(w=torch.full((4, 3), float("nan")), b=torch.zeros(3))
    replies = [
        _reply(first, examples=10),
        # the reply's metrics are not signed: the weight is the one sealed inside (30), not this claim
        _reply(_sealed("d1", good_b, examples=30), examples=10**9),
        _reply(first),  # replay of d0's update
        _reply(bytes(tampered)),
        _reply(_sealed("d2", good_b, base=5)),  # a version never issued
        _reply(_sealed("d2", nan)),
        _reply(b"garbage"),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    stats = strategy.round_stats
    assert stats["clients"] == 2
    assert dict(stats["rejected"]) == {
        "replayed": 1, "bad-signature": 1, "unknown-base-version": 1, "non-finite": 1, "malformed": 1,
    }
    new = arrays.to_torch_state_dict()
    assert torch.allclose(new["w"], torch.full((4, 3), 0.25))  # (0.1*10 + 0.3*30) / 40
    assert torch.equal(new["b"], GLOBAL["b"])
    assert strategy.version == 1


@pytest.mark.parametrize("examples", [1e9, -99.999, float("nan"), float("inf"), 0.0])
def test_a_signed_but_absurd_weight_is_rejected_and_counted(examples):
    strategy = _strategy()
    good = OrderedDict(w=torch.full((4, 3), 0.1), b=torch.zeros(3))
    arrays, _ = strategy.aggregate_train(1, [_reply(_sealed("d0", good)), _reply(_sealed("d1", good, examples=examples))])
    assert dict(strategy.round_stats["rejected"]) == {"bad-weight": 1}
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((4, 3), 0.1))


def test_a_replay_from_before_a_restart_is_still_refused(tmp_path):
    """A restarted sync run issues version 0 again: the update ids it took before must still count."""
    log = tmp_path / "taken.txt"
    good = OrderedDict(w=torch.full((4, 3), 0.1), b=torch.zeros(3))
    first_run = _strategy(IssuedVersions(log))
    sealed = _sealed("d0", good)
    first_run.aggregate_train(1, [_reply(sealed)])
    restarted = _strategy(IssuedVersions(log))
    arrays, _ = restarted.aggregate_train(1, [_reply(sealed)])
    assert arrays is None and dict(restarted.round_stats["rejected"]) == {"replayed": 1}


def test_round_with_no_good_update_keeps_the_global():
    strategy = _strategy()
    arrays, metrics = strategy.aggregate_train(1, [_reply(b"junk")])
    assert arrays is None and metrics is None and strategy.version == 0
