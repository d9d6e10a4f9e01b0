"""Shared fixtures: a small synthetic dataset generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import EdgefedConfig
from simulations.synthetic import SyntheticSpec, generate

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
