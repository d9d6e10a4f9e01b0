"""Shared fixtures: a small synthetic dataset generated once per test session."""

from __future__ import annotations

import functools
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


# The tests run on two xdist workers. Those that start Ray (a simulation through Flower's engine, found by
# what their module calls) run one at a time, in order, on one worker: a `ray start` cluster
# (tests/test_ray_cluster.py) is the one every `ray.init()` on this machine joins while it lives, and its
# `ray stop` ends every Ray process of the machine. Every other test goes to whichever worker is free.
STARTS_RAY = ("run_federation", "simulate_on_two_ray_nodes", '"simulate"')


@functools.cache
def _starts_ray(module: Path) -> bool:
    source = module.read_text(encoding="utf-8")
    return any(marker in source for marker in STARTS_RAY)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _starts_ray(Path(item.fspath)):
            item.add_marker(pytest.mark.xdist_group("ray"))


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
