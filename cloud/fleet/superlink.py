"""Flower's Deployment Engine from the cloud's side: the SuperLink process and its Control API.

`SuperLinkProcess` runs `flower-superlink` (Fleet, Control and Runtime APIs on
one HTTPS port, SuperNode authentication on, runs and node registrations in a
SQLite file so a restart keeps them) behind the loopback gate of
`superlink_gate.py`: callers from other hosts reach only the Fleet API, the
Control and Runtime APIs answer this host alone. `FlowerControl` speaks to
any SuperLink through Flower's own CLI (`flwr`), the documented interface: it
owns a private FLWR_HOME whose config.toml names the connection, so an
operator's own ~/.flwr is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgefed.common.atomic import write_bytes_atomically
from edgefed.common.processes import die_with_parent, stop_process

log = logging.getLogger(__name__)

CONNECTION = "edgefed"


class SuperLinkError(RuntimeError):
    """The SuperLink did not start, or refused a Control API call."""


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def wait_for_port(address: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Until something accepts TCP connections at `address` (0.0.0.0 is probed on loopback)."""
    host, port = split_address(address)
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SuperLinkError(f"the process serving {address} exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise SuperLinkError(f"nothing listens at {address} after {timeout_s:.0f} s")


def flower_env(flwr_home: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0"}


@dataclass
class SuperLinkProcess:
    """Flower's SuperLink, gated (`superlink_gate.py`), as a child process; its log goes to `<state_dir>/superlink.log`."""

    address: str
    state_dir: Path
    tls_dir: Path | None
    node_auth: bool
    proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        host, port = split_address(self.address)
        # `flower-superlink` itself, with only the Fleet API open to other hosts
        cmd = [sys.executable, "-m", "edgefed.cloud.fleet.superlink_gate", "--host", host, "--port", str(port),
               "--database", str(self.state_dir / "superlink.db"),
               # the edgefed image already holds every dependency; never `uv sync` at run time
               "--disable-runtime-dependency-installation"]
        if self.tls_dir is None:
            if self.node_auth:
                raise SuperLinkError("node authentication needs TLS: set tls-dir (see `edgefed certs`)")
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(self.tls_dir / "ca.crt"), "--ssl-certfile", str(self.tls_dir / "server.crt"),
                    "--ssl-keyfile", str(self.tls_dir / "server.key")]
        if self.node_auth:
            cmd.append("--enable-supernode-auth")
        return cmd

    def start(self, timeout_s: float = 60.0) -> SuperLinkProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.tls_dir is not None:
            missing = [n for n in ("ca.crt", "server.crt", "server.key") if not (self.tls_dir / n).exists()]
            if missing:
                raise SuperLinkError(f"{self.tls_dir}: missing {', '.join(missing)} (make them with `edgefed certs`)")
        log_file = open(self.state_dir / "superlink.log", "ab")  # noqa: SIM115 - the child keeps it
        # The ServerApp runs in a `flwr-serverapp` child of the SuperLink: it installs the app into this FLWR_HOME.
        self.proc = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT,
                                     env=flower_env(self.state_dir / "flwr-home"), start_new_session=True,
                                     preexec_fn=die_with_parent)
        log_file.close()
        wait_for_port(self.address, timeout_s, self.proc)
        log.info("SuperLink up at %s (pid %d, TLS %s, node auth %s)", self.address, self.proc.pid,
                 "on" if self.tls_dir else "off", "on" if self.node_auth else "off")
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        stop_process(self.proc, timeout_s, group=True)  # the SuperLink and the ServerApp it started


class FlowerControl:
    """The SuperLink's Control API through `flwr` (register nodes, submit and watch runs)."""

    def __init__(self, address: str, flwr_home: Path, ca_cert: Path | None) -> None:
        self.address, self.flwr_home = address, flwr_home
        host, port = split_address(address)
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{connect_host}:{port}"']
        lines.append(f'root-certificates = "{ca_cert.resolve()}"' if ca_cert else "insecure = true")
        text = ("\n".join(lines) + "\n").encode()
        config = flwr_home / "config.toml"
        # `cloud status` (a health check) and the service share this folder: never a half-written file
        if not config.exists() or config.read_bytes() != text:
            write_bytes_atomically(config, text)

    def _call(self, args: Sequence[str], timeout_s: float = 120.0) -> dict:
        cmd = ["flwr", *args, "--format", "json"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=flower_env(self.flwr_home))
        except subprocess.TimeoutExpired:
            raise SuperLinkError(f"`{' '.join(cmd)}` timed out after {timeout_s:.0f} s") from None
        start = done.stdout.find("{")
        try:
            reply = json.loads(done.stdout[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success", False):
            detail = reply.get("error-message") or (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SuperLinkError(f"`flwr {args[0]} {args[1] if len(args) > 1 else ''}` failed: {detail}")
        return reply

    def register_node(self, public_key: Path, name: str) -> int:
        """Enrol a SuperNode's OpenSSH EC public key; returns the node id it will get."""
        return int(self._call(["supernode", "register", str(public_key), CONNECTION, "--name", name])["node-id"])

    def unregister_node(self, node_id: int) -> None:
        self._call(["supernode", "unregister", str(node_id), CONNECTION])

    def nodes(self) -> list[dict]:
        return list(self._call(["supernode", "list", CONNECTION]).get("nodes", []))

    def submit_run(self, app_dir: Path, run_config: Path) -> int:
        reply = self._call(["run", str(app_dir), CONNECTION, "--run-config", str(run_config)], timeout_s=300)
        return int(reply["run-id"])

    def run_status(self, run_id: int) -> str:
        """Flower's status text: pending, starting, running, finished:completed|failed|stopped."""
        runs = self._call(["ls", CONNECTION, "--run-id", str(run_id)]).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"

    def stop_run(self, run_id: int) -> None:
        self._call(["stop", str(run_id), CONNECTION])

    def log_stream(self, run_id: int, path: Path) -> subprocess.Popen:
        """`flwr log --stream` into `path` (the ServerApp's log, as the SuperLink collects it)."""
        out = open(path, "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(["flwr", "log", str(run_id), CONNECTION, "--stream"], stdout=out,
                                stderr=subprocess.STDOUT, env=flower_env(self.flwr_home))
        out.close()
        return proc
