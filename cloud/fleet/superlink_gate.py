"""`flower-superlink` with a loopback gate: only the Fleet API answers callers from elsewhere.

    python -m edgefed.cloud.fleet.superlink_gate <flower-superlink's own arguments>

Flower 1.42 serves three APIs from one uvicorn HTTPS app on `--host:--port`:
the Fleet API the SuperNodes use (`/v1/fleet/*`, each call signed with the
node's enrolled key), the Control API the `flwr` CLI uses (`/v1/control/*`:
register nodes, submit ServerApps, list runs and their configs) and the
Runtime API the SuperExec and the ServerApp use (`/v1/runtime/*`). Without
Flower's OIDC plugin the Control API accepts everyone who can reach the port,
and TLS proves the cloud to its callers, not the callers to the cloud. So
anyone holding `ca.crt` could enrol their own node key, run code of their
choosing next to the cloud's keys, and read every run's config.

`LoopbackGate` sits in front of all of Flower's middleware and routes. A
request from a local caller goes through untouched; from anyone else only
the twelve Fleet routes a SuperNode calls (`POST`, exact path) and the empty
health check pass, everything else gets the same 404 an unknown path gets,
and a websocket is closed. Local means the client's IP is:

- 127.0.0.1 or ::1 (also as ::ffff:127.0.0.1 on a dual-stack socket): this
  host's own loopback, where the operator's `flwr` calls (`edgefed cloud
  serve`, `status`, `enrol`, `revoke`) and, with `--host 0.0.0.0`, the
  SuperExec and the ServerApp connect from. Not the rest of
  127.0.0.0/8: a caller from 127.0.0.2 is remote, which is how the tests play
  a remote device while staying on loopback;
- the server socket's own address: a process on this host dialling the
  `--host` IP itself. With a specific `--host`, Flower's SuperExec and
  ServerApp connect to that address, and for the address of a network
  interface the kernel makes it their source address too.

Whatever forwards into that loopback is trusted as the operator: `docker
exec`, `kubectl exec` and `port-forward`, and also a proxy on the same host
or pod that connects from 127.0.0.1 without X-Forwarded-For (uvicorn
believes that header from 127.0.0.1 alone: see UNSAFE_ENV).

`GET`/`HEAD /health` are allowed from anywhere: Flower answers them with an
empty 200 (no version, no state), which tells a caller nothing the Fleet
routes' 401 does not, and HTTP health checks (a cloud load balancer, a
kubelet `httpGet` probe, both from a node's address) need them.

Why a gate inside the process: a reverse proxy in front would add a second
TLS hop, with its own buffering and timeouts, to every device's message and
object transfers, and every caller would reach Flower as 127.0.0.1, i.e. as
local; a firewall sees only ports, and all three APIs share the one TLS port. The gate uses the only
place Flower lets outside code add middleware: `flwr/superlink/main.py`
puts `flwr.superlink.extensions.get_middleware()` outermost, which imports
`flwr.ee.superlink.extensions` (Flower's private SuperGrid hook) if present.
`install_gate()` registers that leaf module (not a `flwr.ee` package, whose
absence Flower's other `from flwr.ee import ...` fall-backs rely on) and
checks that Flower really puts the gate outermost, so a Flower release that
moved the hook stops the SuperLink at start-up instead of serving it open.
pyproject pins `flwr>=1.42,<1.43`; tests/test_fleet_exposure.py runs the gate
on the installed Flower's real app and on a running SuperLink.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import sys
import types
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Exactly what a SuperNode calls (flwr/supernode/fleet_http_client.py), all POST.
FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received"))
# What anyone may call: (method, exact path). ASGI's path is already percent-decoded, so
# `/v1/fleet/..%2fcontrol/list-runs` or `/v1/fleet/get-run/` match nothing here.
PUBLIC_ROUTES = frozenset({("POST", path) for path in FLEET_PATHS} | {("GET", "/health"), ("HEAD", "/health")})
LOOPBACK = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})

EXTENSION_MODULE = "flwr.ee.superlink.extensions"
# Flower's own 404 for an unknown path: a gated route looks like one that does not exist.
NOT_FOUND = json.dumps({"detail": "Not Found"}, separators=(",", ":")).encode()
# Environment that would undo the gate: uvicorn trusts X-Forwarded-For from the peers listed in
# FORWARDED_ALLOW_IPS (a `*` there lets anyone claim to be 127.0.0.1); the FLWR_INTERNAL_GRPC_*
# switches start Flower's legacy gRPC Control and Fleet servers on ports of their own, ungated.
UNSAFE_ENV = ("FORWARDED_ALLOW_IPS", "FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


class GateError(RuntimeError):
    """The installed Flower no longer runs the gate in front of its APIs: refuse to start."""


def _ip(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(str(host))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local(scope: Scope) -> bool:
    """Whether the caller is this host: loopback 127.0.0.1 / ::1, or the server socket's own address."""
    client, server = scope.get("client"), scope.get("server")
    peer = _ip(client[0]) if client else None  # no peer address (a unix socket): not local
    if peer is None:
        return False
    return peer in LOOPBACK or (bool(server) and peer == _ip(server[0]))


class LoopbackGate:
    """Pure ASGI middleware: callers that are not local reach only `PUBLIC_ROUTES`; the rest is a 404."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket" and not is_local(scope):
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind == "http" and (scope["method"], scope["path"]) not in PUBLIC_ROUTES and not is_local(scope):
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(NOT_FOUND)).encode())]})
            await send({"type": "http.response.body", "body": NOT_FOUND})
            return
        await self.app(scope, receive, send)


def install_gate() -> None:
    """Make Flower's SuperLink app put `LoopbackGate` outermost; raise GateError if it would not."""
    from starlette.middleware import Middleware

    if EXTENSION_MODULE not in sys.modules and importlib.util.find_spec("flwr.ee") is not None:
        raise GateError("flwr.ee (Flower's SuperGrid extensions) is installed: the gate would replace its hooks")
    extension = types.ModuleType(EXTENSION_MODULE, "edgefed: LoopbackGate in front of the SuperLink's APIs")
    extension.get_middleware = lambda: (Middleware(LoopbackGate),)
    # import_module() returns a module found in sys.modules without importing its parents:
    # `flwr.ee` itself stays absent, so Flower's other `from flwr.ee import ...` still fall back.
    sys.modules[EXTENSION_MODULE] = extension

    from flwr.superlink import main as superlink_main

    outermost = superlink_main._get_middleware()[0]
    if outermost.cls is not LoopbackGate:
        raise GateError(f"flwr {_flwr_version()}: the SuperLink's outermost middleware is {outermost.cls!r}, "
                        "not the gate (Flower's extension hook changed; see cloud/fleet/superlink_gate.py)")


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def main() -> None:
    """`flower-superlink` (same arguments), gated."""
    for name in UNSAFE_ENV:
        os.environ.pop(name, None)
    install_gate()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
