"""The simulation's message delivery (simulations/engine_delivery.py) against Flower's own, on Flower's real
in-memory link state and grid: the same messages reach the same nodes, each once, marked delivered."""

from __future__ import annotations

import threading
from queue import Empty, Queue

import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from edgefed.simulations import engine_delivery

NODES = 40


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid stamps messages with the process's task identity, which Flower's run_simulation sets."""
    for name, value in (("_task_id", 3), ("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _fleet() -> tuple[object, InMemoryGrid, dict[int, int]]:
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = vce_api._register_nodes(num_nodes=NODES, state_factory=factory)
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.federation_id, run.primary_task_id = NOOP_FEDERATION_ID, 3
    state.run_ids[run.run_id] = RunRecord(run=run)  # registered as Flower's run_simulation does
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, mapping


def _delivered(deliver, state, mapping: dict[int, int], expected: int) -> list[Message]:
    """Run a delivery loop until `expected` messages arrived (or a generous deadline), then stop it."""
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    loop = threading.Thread(target=deliver, args=(state, queue, mapping, stop), daemon=True)
    loop.start()
    got = []
    try:
        for _ in range(expected):
            got.append(queue.get(timeout=60))
    finally:
        stop.set()
        loop.join(timeout=60)
    with pytest.raises(Empty):
        queue.get_nowait()  # nothing delivered twice (the loop has stopped; anything extra is in the queue)
    return got


@pytest.mark.parametrize("deliver", [engine_delivery.deliver_pending, engine_delivery.FLOWERS_LOOP],
                         ids=["edgefed", "flower"])
def test_every_pushed_message_reaches_its_node_once_and_is_marked_delivered(deliver) -> None:
    state, grid, mapping = _fleet()
    nodes = sorted(mapping)
    targets = [nodes[0], nodes[0], nodes[5], nodes[17], nodes[-1]]  # one node with two waiting messages
    ids = list(grid.push_messages([Message(content=RecordDict(), message_type="train", dst_node_id=n, ttl=600)
                                   for n in targets]))
    got = _delivered(deliver, state, mapping, len(targets))
    assert sorted(m.metadata.message_id for m in got) == sorted(ids)
    assert sorted(m.metadata.dst_node_id for m in got) == sorted(targets)
    assert all(state.message_ins_store[i].metadata.delivered_at != "" for i in ids)


def test_a_node_outside_the_engines_mapping_is_not_served() -> None:
    state, grid, mapping = _fleet()
    outside, *inside = sorted(mapping)
    [kept] = grid.push_messages([Message(content=RecordDict(), message_type="train", dst_node_id=outside, ttl=600)])
    [sent] = grid.push_messages([Message(content=RecordDict(), message_type="train", dst_node_id=inside[0], ttl=600)])
    got = _delivered(engine_delivery.deliver_pending, state, {n: mapping[n] for n in inside}, 1)
    assert [m.metadata.message_id for m in got] == [sent]
    assert state.message_ins_store[kept].metadata.delivered_at == ""  # still there for whoever serves that node


def test_install_replaces_flowers_loop_in_the_engine() -> None:
    original = vce_api.add_messages_to_queue
    try:
        engine_delivery.install()
        assert vce_api.add_messages_to_queue is engine_delivery.deliver_pending
    finally:
        vce_api.add_messages_to_queue = original
