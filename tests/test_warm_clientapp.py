"""The warm ClientApp process: the SuperNode's `flwr-clientapp` forks from it, or starts cold without it.

Everything here runs the real launcher script and Flower's real `flwr-clientapp`
entry point; the tests wait for processes and lines, never for a time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from edgefed.edge.agent.warm_clientapp import WarmStarter, _at_socket

DEADLINE_S = 120.0


def _wait(predicate, what: str, deadline_s: float = DEADLINE_S):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """One warm process for the module (it takes seconds to import its libraries)."""
    deep = tmp_path_factory.mktemp("warm") / ("a-device-folder-deeper-than-a-unix-socket-address-can-hold-" * 2)
    starter = WarmStarter(deep / "state", dict(os.environ))
    env = starter.supernode_env()
    starter.ensure_running()
    _wait(lambda: starter.log_path.exists() and "ready" in starter.log_path.read_text(), "the warm process")
    yield starter, env
    starter.stop()


@pytest.fixture
def cold(tmp_path: Path):
    starter = WarmStarter(tmp_path / "state", dict(os.environ))
    return starter.supernode_env()


def _run_launcher(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr-clientapp", *args], check=False, env=env, capture_output=True, text=True, timeout=DEADLINE_S)


def test_a_clientapp_forks_from_the_warm_process_with_the_launchers_streams_and_status(warm) -> None:
    starter, env = warm
    done = _run_launcher(env, "--help")
    assert done.returncode == 0, done.stderr
    assert "Run a Flower ClientApp" in done.stdout  # printed by the forked child on the launcher's stdout
    assert "no warm ClientApp process" not in done.stderr
    bad = _run_launcher(env, "--no-such-flag")
    assert bad.returncode == 2 and "flwr-clientapp: error" in bad.stderr  # argparse's status, passed on
    assert starter.process.poll() is None  # still serving


def test_a_sigterm_to_the_launcher_reaches_the_forked_clientapp(warm) -> None:
    starter, env = warm
    with socket.socket() as s:  # a Runtime API address where nothing listens: the ClientApp keeps retrying
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = subprocess.Popen(["flwr-clientapp", "--insecure", "--runtime-api-address", f"127.0.0.1:{port}",
                                 "--token", "x"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    warm_process = psutil.Process(starter.process.pid)
    child = _wait(lambda: next(iter(warm_process.children()), None), "a forked ClientApp")
    output = ""
    while "Connection attempt failed" not in output:  # Flower's retry loop: its signal handlers are in place
        line = launcher.stdout.readline().decode()
        assert line, f"the launcher's output ended early:\n{output}"
        output += line
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=DEADLINE_S)
    _wait(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, "the ClientApp to stop")
    output += launcher.stdout.read().decode()
    assert "Task stopped" in output  # Flower's own handler ran in the child, on the launcher's stdout


def test_without_the_warm_process_the_launcher_starts_a_cold_clientapp(cold) -> None:
    done = _run_launcher(cold, "--help")
    assert done.returncode == 0 and "Run a Flower ClientApp" in done.stdout
    assert "no warm ClientApp process" in done.stderr


def test_hostile_requests_are_refused_and_the_warm_process_goes_on(warm) -> None:
    starter, env = warm
    path = str(starter.socket_path)
    assert len(path) > 108  # longer than a Unix socket address
    attacks = [b"\xff" * 64, struct.pack("!I", 10_000) + b"{}", struct.pack("!I", 2) + b"{}"]
    for payload in attacks:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            _at_socket(conn.connect, starter.socket_path)
            socket.send_fds(conn, [payload], [0, 1, 2])
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(16) == b""  # closed, nothing forked
    body = json.dumps({"argv": ["--help"], "cwd": "/", "env": {}}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:  # a well-formed request without its streams
        _at_socket(conn.connect, starter.socket_path)
        conn.sendall(struct.pack("!I", len(body)) + body)
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(16) == b""
    log = starter.log_path.read_text()
    assert log.count("request refused") == len(attacks) + 1
    assert not psutil.Process(starter.process.pid).children()
    done = _run_launcher(env, "--help")
    assert done.returncode == 0 and "no warm ClientApp process" not in done.stderr
    assert os.stat(path).st_mode & 0o077 == 0  # only the device's user can connect


def test_a_warm_process_that_keeps_dying_is_restarted_after_a_growing_pause(tmp_path: Path) -> None:
    starter = WarmStarter(tmp_path / "state", dict(os.environ))
    (starter.socket_path / "in-the-way").mkdir(parents=True)  # a folder where its socket goes: it exits, every time
    try:
        starter.ensure_running()
        starter.process.wait(timeout=DEADLINE_S)
        starter.ensure_running()  # noticed: paused, not started again at once
        assert starter.process is None and starter.starts == 1 and starter._pause == 4.0
    finally:
        starter.stop()
