"""Shared fixtures: a small synthetic dataset generated once per test session."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch

from edgefed.common.config import EdgefedConfig
from edgefed.simulations.synthetic import SyntheticSpec, generate

SMALL_SPEC = SyntheticSpec(num_clips=24, width=96, height=72, fps=8, duration_s=2.0, shots=2, seed=7)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest path of 24 short clips (balanced labels, some without audio)."""
    return generate(tmp_path_factory.mktemp("synthetic"), SMALL_SPEC)


@pytest.fixture()
def cfg() -> EdgefedConfig:
    return EdgefedConfig()


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server (AOF on) on a free loopback port; yields its URL."""
    from tests.servers import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


# Tests that spend most of their time waiting on processes of their own (a whole fleet over a real SuperLink):
# they run on one xdist worker while every other test runs, one at a time and in order, on the other. Only
# one test at a time may use Ray (a `ray start` cluster is the one every `ray.init()` on this machine joins,
# and `ray stop` ends them all), and these use none.
ALONGSIDE = {"tests/test_fleet_deployment.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = "alongside" if item.nodeid.split("::")[0] in ALONGSIDE else "in-order"
        item.add_marker(pytest.mark.xdist_group(group))


_EXIT_STATUS: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Do not hang CI on threads a crashed simulation left behind.

    If Ray fails to start, Flower's simulation engine dies but the ServerApp
    thread it started keeps waiting for replies (up to the round timeout):
    the interpreter would wait for it at exit. The results are already
    reported; name the threads and exit with pytest's status.
    """
    lingering = [t.name for t in threading.enumerate()
                 if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if lingering and _EXIT_STATUS:
        sys.stderr.write(f"exiting without waiting for non-daemon threads: {', '.join(lingering)}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(_EXIT_STATUS[0])
