"""Who the model service serves, and how many: signed requests of enrolled devices, many idle watchers.

A real service on 127.0.0.1 with a real device registry file, changed while
it runs the way `edgefed cloud enrol` / `revoke` change it (another
DeviceRegistry on the same file). Watchers are real streams of a grpc.aio
client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefed.cloud.publishing.model_service import ModelServer
from edgefed.cloud.publishing.registry import ModelRegistry
from edgefed.common.keys import DeviceRegistry
from edgefed.common.wire.model_manifest import MANIFEST_FILE, ModelManifest, describe_file, sign_manifest
from edgefed.common.wire.protos import model_service_pb2 as pb
from edgefed.common.wire.protos import model_service_pb2_grpc as pb_grpc
from edgefed.common.wire.request_auth import DeviceSigner, model_service_method

MODEL_BYTES = 1 << 20
DEADLINE_S = 60.0


# --- how the tests build the parts (the constructors' signatures in one place) -------------------
def _server(registry: ModelRegistry, devices: DeviceRegistry, **kw) -> ModelServer:
    return ModelServer(registry, devices=devices, **kw).start()


def _publish(registry: ModelRegistry, key: Ed25519PrivateKey, version: int, root: Path) -> None:
    """A signed model of MODEL_BYTES (the service serves bytes; what they are is the device's business)."""
    staged = root / f"staged-{version}"
    staged.mkdir()
    (staged / "model.onnx").write_bytes(bytes([version]) * MODEL_BYTES)
    manifest = ModelManifest(version, "base", [describe_file(staged / "model.onnx")], [], [], {}, ["a"], "int8", {}, "fleet")
    (staged / MANIFEST_FILE).write_bytes(sign_manifest(manifest, key))
    registry.publish(staged, version)


@dataclasses.dataclass
class Service:
    registry: ModelRegistry
    registry_file: Path  # `<keys>/cloud/registry.json`
    server: ModelServer

    def enrol(self, device_id: str) -> DeviceSigner:
        key = Ed25519PrivateKey.generate()
        DeviceRegistry(self.registry_file).register(device_id, key.public_key())  # as `edgefed cloud enrol` does
        return DeviceSigner(device_id, key)

    def revoke(self, device_id: str) -> None:
        assert DeviceRegistry(self.registry_file).revoke(device_id)


@pytest.fixture()
def service(tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    _publish(registry, Ed25519PrivateKey.generate(), 1, tmp_path)
    registry_file = tmp_path / "keys" / "cloud" / "registry.json"
    DeviceRegistry(registry_file).register("someone-else", Ed25519PrivateKey.generate().public_key())
    server = _server(registry, DeviceRegistry(registry_file), poll_s=0.2)
    yield Service(registry, registry_file, server)
    server.stop()


def _calls(stub: pb_grpc.ModelServiceStub, signer: DeviceSigner | None):
    """The three calls, each signed by `signer` (None: unsigned), returning what the service sent."""
    def meta(name: str, request) -> tuple:
        return signer.metadata(model_service_method(name), request) if signer is not None else ()

    manifest = pb.ManifestRequest(version=1)
    download = pb.DownloadRequest(version=1, file="model.onnx")
    watch = pb.WatchRequest(device_id=signer.device_id if signer else "anyone", have_version=0)
    return {
        "GetManifest": lambda: stub.GetManifest(manifest, timeout=10, metadata=meta("GetManifest", manifest)),
        "Download": lambda: b"".join(c.data for c in stub.Download(download, timeout=10, metadata=meta("Download", download))),
        "WatchModels": lambda: next(stub.WatchModels(watch, timeout=10, metadata=meta("WatchModels", watch))),
    }


def _refused(call) -> grpc.StatusCode | str:
    try:
        got = call()
    except grpc.RpcError as err:
        return err.code()
    return f"served: {str(got)[:60]!r}"


def test_an_unsigned_or_unenrolled_caller_gets_nothing(service):
    with grpc.insecure_channel(service.server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        for name, call in _calls(stub, None).items():
            assert _refused(call) == grpc.StatusCode.UNAUTHENTICATED, name
        stranger = DeviceSigner("stranger", Ed25519PrivateKey.generate())  # signs, but was never enrolled
        for name, call in _calls(stub, stranger).items():
            assert _refused(call) == grpc.StatusCode.PERMISSION_DENIED, name
        impostor = DeviceSigner("someone-else", Ed25519PrivateKey.generate())  # an enrolled id, not its key
        for name, call in _calls(stub, impostor).items():
            assert _refused(call) == grpc.StatusCode.UNAUTHENTICATED, name
        enrolled = service.enrol("device-1")  # while the service runs
        calls = _calls(stub, enrolled)
        assert calls["GetManifest"]().version == 1
        assert calls["Download"]() == bytes([1]) * MODEL_BYTES
        assert calls["WatchModels"]().version == 1


def test_a_signature_is_good_for_one_fresh_call_with_its_own_arguments(service):
    signer = service.enrol("device-1")
    method = model_service_method("Download")
    with grpc.insecure_channel(service.server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)

        def download(request, metadata) -> grpc.StatusCode | str:
            return _refused(lambda: b"".join(c.data for c in stub.Download(request, timeout=10, metadata=metadata)))

        request = pb.DownloadRequest(version=1, file="model.onnx")
        metadata = signer.metadata(method, request)
        assert download(request, metadata).startswith("served")
        assert download(request, metadata) == grpc.StatusCode.UNAUTHENTICATED, "replayed"
        other = pb.DownloadRequest(version=1, file="model.onnx", offset=5)
        assert download(other, signer.metadata(method, request)) == grpc.StatusCode.UNAUTHENTICATED, "other arguments"
        assert download(request, signer.metadata(model_service_method("GetManifest"), request)) == \
            grpc.StatusCode.UNAUTHENTICATED, "signed for another method"
        stale = signer.metadata(method, request, now=time.time() - 3600)
        assert download(request, stale) == grpc.StatusCode.UNAUTHENTICATED, "an hour old"


def _idle_watch(stub, signer):  # noqa: ANN001, ANN202
    """device-1's WatchModels stream, subscribed (version 1 received) and idle; and an event set when it ends."""
    request = pb.WatchRequest(device_id="device-1", have_version=0)
    watch = stub.WatchModels(request, metadata=signer.metadata(model_service_method("WatchModels"), request))
    assert next(watch).version == 1
    ended = threading.Event()
    watch.add_done_callback(lambda _: ended.set())
    return watch, ended


def test_a_revoked_device_is_refused_and_its_open_watch_ends(service):
    signer = service.enrol("device-1")
    with grpc.insecure_channel(service.server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        watch, ended = _idle_watch(stub, signer)
        service.revoke("device-1")  # `edgefed cloud revoke`, from another process
        assert ended.wait(DEADLINE_S), "the revoked device's watch is still open"
        assert watch.code() == grpc.StatusCode.PERMISSION_DENIED
        for name, call in _calls(stub, signer).items():
            assert _refused(call) == grpc.StatusCode.PERMISSION_DENIED, name


def test_a_device_enrolled_again_with_a_new_key_keeps_no_watch_of_the_old_one(service):
    old = service.enrol("device-1")
    with grpc.insecure_channel(service.server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        watch, ended = _idle_watch(stub, old)
        new = service.enrol("device-1")  # the key was rotated (or stolen and replaced)
        assert ended.wait(DEADLINE_S) and watch.code() == grpc.StatusCode.PERMISSION_DENIED
        assert _refused(_calls(stub, old)["GetManifest"]) == grpc.StatusCode.UNAUTHENTICATED
        assert _calls(stub, new)["GetManifest"]().version == 1


def test_a_device_opening_many_watches_ends_its_oldest(service):
    signer = service.enrol("device-1")
    with grpc.insecure_channel(service.server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        request = pb.WatchRequest(device_id="device-1", have_version=0)
        watches = []
        for _ in range(5):
            watches.append(stub.WatchModels(request, metadata=signer.metadata(model_service_method("WatchModels"), request)))
            assert next(watches[-1]).version == 1
        ended = threading.Event()
        watches[0].add_done_callback(lambda _: ended.set())
        assert ended.wait(DEADLINE_S) and watches[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not any(w.done() for w in watches[1:])
        assert service.server.servicer.watchers == 4
        for w in watches:
            w.cancel()


async def _open_watchers(address: str, signers: list[DeviceSigner], channels: int) -> tuple[list, list]:
    """Idle watch streams, each past its first notice; (channels, calls)."""
    opened = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(channels)]
    calls = []
    for i, signer in enumerate(signers):
        request = pb.WatchRequest(device_id=signer.device_id, have_version=0)
        stub = pb_grpc.ModelServiceStub(opened[i % channels])
        calls.append(stub.WatchModels(request, metadata=signer.metadata(model_service_method("WatchModels"), request)))
    notices = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls)), DEADLINE_S)
    assert {n.version for n in notices} == {1}
    return opened, calls


def test_two_hundred_idle_watchers_on_two_reader_threads_leave_downloads_served(tmp_path):
    """Watchers cost no thread: 200 of them on a service with 2 worker threads, and downloads still complete."""
    registry = ModelRegistry(tmp_path / "models")
    _publish(registry, Ed25519PrivateKey.generate(), 1, tmp_path)
    devices = DeviceRegistry(tmp_path / "registry.json")
    signers = []
    for i in range(200):
        key = Ed25519PrivateKey.generate()
        devices.register(f"device-{i}", key.public_key())
        signers.append(DeviceSigner(f"device-{i}", key))
    downloader = signers[0]
    server = _server(registry, devices, workers=2)

    def download() -> bytes:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            manifest = pb.ManifestRequest(version=0)
            reply = stub.GetManifest(manifest, timeout=30, metadata=downloader.metadata(model_service_method("GetManifest"), manifest))
            request = pb.DownloadRequest(version=reply.version, file="model.onnx")
            metadata = downloader.metadata(model_service_method("Download"), request)
            return b"".join(c.data for c in stub.Download(request, timeout=30, metadata=metadata))

    async def scenario() -> None:
        channels, calls = await _open_watchers(server.address, signers, channels=4)
        try:
            threads = [t.name for t in threading.enumerate() if t.name.startswith("model-service")]
            assert len(threads) <= 1 + 2, f"the service runs {threads}"  # its event loop and at most 2 readers
            for _ in range(3):
                assert await asyncio.to_thread(download) == bytes([1]) * MODEL_BYTES
            assert server.servicer.watchers == 200 and not any(c.done() for c in calls), "the watchers are still open"
        finally:
            for c in calls:
                c.cancel()
            for ch in channels:
                await ch.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
