"""Only the Fleet API answers callers from other hosts; the Control and Runtime APIs answer this host alone.

Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTPS port, and
without OIDC its Control API accepts anyone: holding only `ca.crt`, a caller
could register its own node key, submit a ServerApp and read every run's
config. Each test below makes those calls as a remote caller and expects the
404 an unknown path gets; the operator's `flwr` calls from 127.0.0.1 still work.

- on Flower's own app (`flwr.superlink.main.create_app`) with the gate
  installed the way the SuperLink process installs it, in a TestClient that
  plays a remote peer (203.0.113.9) and the loopback;
- on a SuperLink started as `edgefed cloud serve` starts it (TLS from the
  fleet's certificates, SuperNode authentication on) on a free 127.0.0.1
  port, called over HTTPS from source address 127.0.0.2: another address on
  loopback, so the test stays on this host, but not the service's own
  127.0.0.1, so the gate treats it as remote.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest, RegisterNodeRequest, StartRunRequest
from flwr.proto.fab_pb2 import GetFabRequest
from flwr.proto.run_pb2 import GetRunRequest
from flwr.proto.runtime_pb2 import AcquireTaskRequest, GetNodesRequest
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from edgefed.cloud.fleet.certificates import write_fleet_certificates
from edgefed.cloud.fleet.superlink import FlowerControl, SuperLinkProcess
from edgefed.cloud.fleet.superlink_gate import EXTENSION_MODULE, FLEET_PATHS, LoopbackGate, install_gate, is_local
from edgefed.common.keys import NODE_AUTH_KEY, init_keys
from tests.servers import free_port

PROTOBUF = {"content-type": "application/protobuf"}
REMOTE_PEER = ("203.0.113.9", 40000)  # TEST-NET-3: an address of no host here
NOT_FOUND = b'{"detail":"Not Found"}'


def _intruder_key() -> bytes:
    return public_key_to_bytes(ec.generate_private_key(ec.SECP384R1()).public_key())


# What an intruder holding ca.crt would call: (path, protobuf body). Each must be refused.
def _attacks() -> list[tuple[str, Message]]:
    return [
        ("/v1/control/register-node", RegisterNodeRequest(public_key=_intruder_key(), name="intruder")),
        ("/v1/control/list-runs", ListRunsRequest()),
        ("/v1/control/list-nodes", ListNodesRequest()),
        ("/v1/control/start-run", StartRunRequest()),
        ("/v1/runtime/get-nodes", GetNodesRequest()),
        ("/v1/runtime/acquire-task", AcquireTaskRequest()),
    ]


@pytest.fixture()
def gated_app() -> Iterator[object]:
    """Flower's real SuperLink app, built after the gate is installed as the SuperLink process installs it."""
    from flwr.superlink.main import create_app

    install_gate()
    try:
        app = create_app()
        app.state.enable_supernode_auth = True
        yield app
    finally:
        sys.modules.pop(EXTENSION_MODULE, None)


def test_gate_on_flowers_app_refuses_remote_control_and_runtime(gated_app) -> None:
    remote = TestClient(gated_app, client=REMOTE_PEER, follow_redirects=False)
    for path, body in _attacks():
        reply = remote.post(path, content=body.SerializeToString(), headers=PROTOBUF)
        assert (reply.status_code, reply.content) == (404, NOT_FOUND), f"remote {path} answered {reply.status_code}"
    for path in ("/docs", "/openapi.json", "/v1/control/list-runs", "/v1/fleet/get-run"):
        assert remote.get(path).status_code == 404, f"remote GET {path}"
    # not a prefix match: a trailing slash (Starlette would redirect it) or an encoded `..` reach nothing
    for path in ("/v1/fleet/get-run/", "/v1/fleet/..%2fcontrol/list-runs", "/v1/fleet/../control/list-runs",
                 "/v1/fleet/", "/v1/fleetx/get-run"):
        reply = remote.post(path, content=ListRunsRequest().SerializeToString(), headers=PROTOBUF)
        assert reply.status_code == 404, f"remote POST {path} answered {reply.status_code}"
    # a remote SuperNode gets through the gate to Flower's node authentication
    reply = remote.post("/v1/fleet/get-run", content=GetRunRequest(run_id=1).SerializeToString(), headers=PROTOBUF)
    assert reply.status_code == 401, reply.content
    assert remote.get("/health").status_code == 200 and remote.head("/health").status_code == 200

    local = TestClient(gated_app, client=("127.0.0.1", 40000))
    assert local.post("/v1/control/list-runs", content=b"", headers=PROTOBUF).status_code == 200
    assert local.get("/openapi.json").status_code == 200


def test_gate_passes_exactly_the_routes_a_supernode_uses(gated_app) -> None:
    from fastapi.routing import iter_route_contexts
    from flwr.superlink import main as superlink_main

    assert superlink_main._get_middleware()[0].cls is LoopbackGate, "the gate is the outermost middleware"
    fleet = {ctx.route.path for ctx in iter_route_contexts(gated_app.routes)
             if getattr(ctx.route, "path", "").startswith("/v1/fleet/")}
    assert fleet == FLEET_PATHS, "Flower's Fleet API changed: update FLEET_PATHS (and check what the new routes do)"


def test_who_is_local() -> None:
    def scope(client: tuple[str, int] | None, server: tuple[str, int] | None = ("10.0.0.5", 9093)) -> dict:
        return {"type": "http", "client": client, "server": server}

    for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "10.0.0.5"):  # loopback, or this host dialling its own IP
        assert is_local(scope((host, 1))), host
    for host in ("127.0.0.2", "127.1.2.3", "10.0.0.6", "::ffff:10.0.0.6", "203.0.113.9", "testclient", ""):
        assert not is_local(scope((host, 1))), host
    assert not is_local(scope(None)) and not is_local(scope(("10.0.0.5", 1), None))


def test_remote_websockets_are_closed() -> None:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    app = LoopbackGate(Starlette(routes=[WebSocketRoute("/ws", echo)]))
    with TestClient(app, client=("127.0.0.1", 1)).websocket_connect("/ws") as ws:
        ws.send_text("hi")
        assert ws.receive_text() == "hi"
    with pytest.raises(WebSocketDisconnect) as closed, TestClient(app, client=REMOTE_PEER).websocket_connect("/ws"):
        pass
    assert closed.value.code == 1008


# --- a running SuperLink -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SuperLinkProcess, Path]]:
    """A SuperLink as `edgefed cloud serve` starts it: TLS, node auth, on a free 127.0.0.1 port.

    FORWARDED_ALLOW_IPS=* in its environment would make uvicorn take any caller's
    X-Forwarded-For as its address; the gated SuperLink must ignore it."""
    root = tmp_path_factory.mktemp("exposure")
    write_fleet_certificates(root / "tls", ["127.0.0.1", "127.0.0.3"])
    link = SuperLinkProcess(f"127.0.0.1:{free_port()}", root / "link", root / "tls", node_auth=True)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FORWARDED_ALLOW_IPS", "*")
        link.start()
    try:
        yield link, root
    finally:
        link.stop()


def _client(address: str, tls: Path, source: str) -> httpx.Client:
    """HTTPS to `address` from source IP `source`, verifying the fleet CA like a device does."""
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    transport = httpx.HTTPTransport(local_address=source, verify=context)
    return httpx.Client(base_url=f"https://{address}", transport=transport, trust_env=False, timeout=30.0)


def test_running_superlink_answers_only_the_fleet_api_to_other_hosts(superlink) -> None:
    link, root = superlink
    control = FlowerControl(link.address, root / "flwr-home", root / "tls" / "ca.crt")
    with _client(link.address, root / "tls", source="127.0.0.2") as remote:
        for path, body in [*_attacks(), ("/v1/runtime/get-nodes", GetNodesRequest())]:
            for headers in (PROTOBUF, {**PROTOBUF, "x-forwarded-for": "127.0.0.1"}):
                reply = remote.post(path, content=body.SerializeToString(), headers=headers)
                assert (reply.status_code, reply.content) == (404, NOT_FOUND), \
                    f"from 127.0.0.2 ({headers}), {path} answered {reply.status_code}: {reply.content[:200]!r}"
        assert remote.get("/docs").status_code == 404 and remote.get("/openapi.json").status_code == 404
        # a device's calls reach Flower, which refuses this unsigned one at node authentication
        reply = remote.post("/v1/fleet/get-fab", content=GetFabRequest(hash_str="0" * 64).SerializeToString(),
                            headers=PROTOBUF)
        assert reply.status_code == 401, reply.content
        assert remote.get("/health").status_code == 200
    assert not [n for n in control.nodes() if "intruder" in str(n)], "the remote register-node call enrolled a key"

    # the operator's `flwr` from 127.0.0.1 still enrols and lists nodes
    keys = root / "device-keys"
    init_keys("edge", keys)
    node_id = control.register_node(keys / f"{NODE_AUTH_KEY}.pub", "device-0")
    assert node_id in [int(n["node-id"]) for n in control.nodes()]
    with _client(link.address, root / "tls", source="127.0.0.1") as local:
        assert local.post("/v1/control/list-nodes", content=b"", headers=PROTOBUF).status_code == 200


def test_this_host_dialling_the_superlinks_own_address_is_local(tmp_path: Path) -> None:
    """With a specific --host, Flower's SuperExec and ServerApp call the Runtime API at that address, from it."""
    write_fleet_certificates(tmp_path / "tls", ["127.0.0.3"])
    link = SuperLinkProcess(f"127.0.0.3:{free_port()}", tmp_path / "link", tmp_path / "tls", node_auth=True)
    link.start()
    try:
        body = ListRunsRequest().SerializeToString()
        with _client(link.address, tmp_path / "tls", source="127.0.0.3") as own:
            assert own.post("/v1/control/list-runs", content=body, headers=PROTOBUF).status_code == 200
        with _client(link.address, tmp_path / "tls", source="127.0.0.2") as other:
            assert other.post("/v1/control/list-runs", content=body, headers=PROTOBUF).status_code == 404
    finally:
        link.stop()
