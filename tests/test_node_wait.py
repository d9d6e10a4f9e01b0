"""An empty fleet is waited for, however long, and said so once a minute (it used to fail after 600 s)."""

from __future__ import annotations

import logging

from edgefed.cloud.grid.fedbuff_loop import NODE_WAIT_LOG_S, wait_for_nodes


class _Fleet:
    """What the loop asks the Grid before the run starts: which nodes are connected. Devices join at `joins_at`
    seconds on the clock the waiting reads."""

    def __init__(self, clock: list[float], joins_at: dict[int, float]) -> None:
        self.clock, self.joins_at = clock, joins_at

    def get_node_ids(self) -> list[int]:
        return [node for node, at in self.joins_at.items() if self.clock[0] >= at]


def test_an_empty_fleet_is_waited_for_for_hours_with_a_line_a_minute(caplog) -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:  # the waiting's own clock: hours pass without this test waiting for them
        now[0] += seconds

    fleet = _Fleet(now, {7: 3 * 3600.0, 8: 3 * 3600.0 + 30, 9: 5 * 3600.0})
    with caplog.at_level(logging.INFO, logger="edgefed.cloud.grid.fedbuff_loop"):
        nodes = wait_for_nodes(fleet, min_clients=2, clock=lambda: now[0], sleep=sleep)
    assert sorted(nodes) == [7, 8] and 3 * 3600 + 30 <= now[0] < 3 * 3600 + 32
    lines = [r.getMessage() for r in caplog.records if "waiting for devices" in r.getMessage()]
    assert len(lines) == int(now[0] // NODE_WAIT_LOG_S)  # one a minute, no more
    assert lines[0].startswith("waiting for devices: 0 of min-clients=2 connected")
    assert lines[-1].startswith("waiting for devices: 1 of min-clients=2 connected")


def test_a_fleet_already_there_is_not_waited_for() -> None:
    now = [0.0]
    assert wait_for_nodes(_Fleet(now, {1: 0.0, 2: 0.0}), min_clients=2, clock=lambda: now[0],
                          sleep=lambda s: None) == [1, 2]
