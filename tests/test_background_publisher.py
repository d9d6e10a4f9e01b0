"""BackgroundPublisher: one export at a time, the newest pending version wins, drain waits for all."""

from __future__ import annotations

import threading

import torch

from edgefed.cloud.publishing.publisher import BackgroundPublisher, PublishOutcome


class _SlowPublisher:
    """Stands in for the exporter's timing only: blocks until released, records what it was given.

    The waits are events with generous deadlines: a release that never comes fails the export (no outcome)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.versions: list[int] = []
        self.values: list[float] = []

    def publish(self, version: int, adapter: dict) -> PublishOutcome:
        self.started.set()
        if not self.release.wait(120):
            raise RuntimeError("never released")
        self.versions.append(version)
        self.values.append(float(adapter["w"].sum()) if "w" in adapter else 0.0)
        return PublishOutcome(version, True, "", "int8")


def test_newest_pending_version_wins_and_drain_waits():
    publisher = _SlowPublisher()
    outcomes: list[PublishOutcome] = []
    background = BackgroundPublisher(publisher, outcomes.append)
    adapter = {"w": torch.zeros(2)}
    background.submit(10, adapter)
    assert publisher.started.wait(120)  # v10 is being exported
    for version in (20, 30, 40):  # arrive while it runs: only the newest is kept
        background.submit(version, adapter)
    adapter["w"] += 1  # the caller's tensors may change after submit: a copy was taken
    publisher.release.set()
    background.drain()
    assert publisher.versions == [10, 40] and [o.version for o in outcomes] == [10, 40]
    assert publisher.values == [0.0, 0.0]
    background.close()


def test_an_exception_in_an_export_does_not_stop_later_ones():
    class Failing(_SlowPublisher):
        def publish(self, version: int, adapter: dict) -> PublishOutcome:
            if version == 1:
                raise RuntimeError("exporter bug")
            return super().publish(version, adapter)

    publisher = Failing()
    publisher.release.set()
    outcomes: list[PublishOutcome] = []
    background = BackgroundPublisher(publisher, outcomes.append)
    background.submit(1, {})
    background.drain()
    background.submit(2, {})
    background.close()
    assert [o.version for o in outcomes] == [2]
