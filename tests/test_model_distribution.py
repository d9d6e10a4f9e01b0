"""The model service and the device runtime: tamper, replay, resume, roll back, hot-swap, many devices.

A real gRPC server on 127.0.0.1 serves models published by the real
publisher (a small model config keeps exports quick). What a rogue or stale
service could send a device is sent by a real server of the test's own
(`_RogueService`): the device must refuse it whatever the channel says.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefed.cloud.publishing.model_service import ModelServer
from edgefed.cloud.publishing.publisher import MODEL_FILE, ModelPublisher
from edgefed.cloud.publishing.registry import ModelRegistry
from edgefed.common.config import EdgefedConfig
from edgefed.common.keys import DeviceRegistry, public_hex
from edgefed.common.model.lora import build_lora_model, get_adapter_state
from edgefed.common.wire.model_manifest import (
    MANIFEST_FILE,
    ModelFile,
    ModelManifest,
    ModelVerificationError,
    sha256_file,
    sign_manifest,
    verify_manifest,
)
from edgefed.common.wire.protos import model_service_pb2 as pb
from edgefed.common.wire.protos import model_service_pb2_grpc as pb_grpc
from edgefed.common.wire.request_auth import DeviceSigner, model_service_method
from edgefed.edge.identity import NodeIdentity
from edgefed.edge.models.runtime import ModelRejected, ModelRuntime
from edgefed.edge.models.updater import ModelServiceUnavailable, ModelUpdater

# The parity gate is tested on the real model (test_onnx_export.py); this random tiny one has near-ties.
TINY = EdgefedConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, image_size=32,
                     n_mels=32, audio_frames=32, num_keyframes=2, parity_min_agreement=0.9)
CHUNK = 16 * 1024


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    adapter = get_adapter_state(build_lora_model(TINY))
    return {k: (torch.randn(v.shape, generator=g) * 0.1 if "lora_B" in k else v) for k, v in adapter.items()}


class Cloud(NamedTuple):
    registry: ModelRegistry
    key: Ed25519PrivateKey  # the cloud's model-signing key
    publisher: ModelPublisher
    server: ModelServer
    devices: DeviceRegistry  # who may use the service


# --- how the tests build the parts (the constructors' signatures in one place) -------------------
def _server(registry: ModelRegistry, devices: DeviceRegistry, **kw) -> ModelServer:
    return ModelServer(registry, devices=devices, **kw).start()


def _updater(runtime: ModelRuntime, address: str, signer: DeviceSigner, **kw) -> ModelUpdater:
    return ModelUpdater(runtime, address, signer, **kw)


def _runtime(path: Path, key: Ed25519PrivateKey, federation: str | None = TINY.federation) -> ModelRuntime:
    return ModelRuntime(path, key.public_key(), threads=1, feature_config=TINY.feature_config(), federation=federation)


def _enrolled(devices: DeviceRegistry, device_id: str) -> DeviceSigner:
    """A new device whose key the cloud registered (`edgefed cloud enrol`)."""
    key = Ed25519PrivateKey.generate()
    devices.register(device_id, key.public_key())
    return DeviceSigner(device_id, key)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """A registry with versions 1 and 2 published, the signing key, and a running service."""
    root = tmp_path_factory.mktemp("cloud")
    key = Ed25519PrivateKey.generate()
    registry = ModelRegistry(root / "models")
    publisher = ModelPublisher(TINY, registry, key, None, "base")
    for version in (1, 2):
        assert publisher.publish(version, _adapter(version)).published
    devices = DeviceRegistry(root / "keys" / "registry.json")
    server = _server(registry, devices, chunk_bytes=CHUNK)
    yield Cloud(registry, key, publisher, server, devices)
    server.stop()


@pytest.fixture(scope="module")
def other_federation(cloud, tmp_path_factory):
    """v3 of another federation, signed by the same cloud key (one cloud, two federations)."""
    registry = ModelRegistry(tmp_path_factory.mktemp("other") / "models")
    assert ModelPublisher(TINY.replace(federation="other"), registry, cloud.key, None, "base").publish(3, _adapter(3)).published
    return registry


def _copy_version(registry: ModelRegistry, version: int, dest: Path) -> Path:
    shutil.copytree(registry.directory(version), dest)
    return dest


# --- verification --------------------------------------------------------------------------
def test_sync_installs_a_verified_model_and_keeps_the_previous(cloud, tmp_path):
    runtime = _runtime(tmp_path / "device", cloud.key)
    updater = _updater(runtime, cloud.server.address, _enrolled(cloud.devices, "d0"))
    assert updater.sync(1).version == 1
    assert updater.sync().version == 2  # 0 = newest
    assert (tmp_path / "device" / "current").resolve().name == "v000002"
    assert (tmp_path / "device" / "previous").resolve().name == "v000001"
    assert filecmp.cmp(tmp_path / "device" / "current" / MODEL_FILE, cloud.registry.directory(2) / MODEL_FILE, shallow=False)
    # a restarted device comes back with the model it had
    assert _runtime(tmp_path / "device", cloud.key).version == 2
    assert runtime.rollback() == 1 and runtime.version == 1
    updater.close()


def test_a_flipped_byte_in_the_model_is_refused(cloud, tmp_path):
    runtime = _runtime(tmp_path / "device", cloud.key)
    staged = _copy_version(cloud.registry, 1, tmp_path / "staged")
    data = bytearray((staged / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (staged / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelRejected, match="sha256"):
        runtime.install(staged)
    assert runtime.version == 0 and not staged.exists()


def test_a_flipped_byte_in_the_manifest_is_refused(cloud, tmp_path):
    runtime = _runtime(tmp_path / "device", cloud.key)
    staged = _copy_version(cloud.registry, 1, tmp_path / "staged")
    text = (staged / MANIFEST_FILE).read_text()
    (staged / MANIFEST_FILE).write_text(text.replace('"quantization": "int8"', '"quantization": "int9"'))
    with pytest.raises(ModelRejected, match="signature"):
        runtime.install(staged)


def test_a_manifest_signed_by_another_key_is_refused(cloud, tmp_path):
    runtime = _runtime(tmp_path / "device", cloud.key)
    staged = _copy_version(cloud.registry, 1, tmp_path / "staged")
    body = json.loads((staged / MANIFEST_FILE).read_text())["manifest"]
    (staged / MANIFEST_FILE).write_bytes(sign_manifest(ModelManifest.from_dict(body), Ed25519PrivateKey.generate()))
    with pytest.raises(ModelRejected, match="pinned cloud key"):
        runtime.install(staged)


def test_a_signed_manifest_whose_hash_does_not_match_is_refused(cloud, tmp_path):
    runtime = _runtime(tmp_path / "device", cloud.key)
    staged = _copy_version(cloud.registry, 1, tmp_path / "staged")
    manifest = verify_manifest((staged / MANIFEST_FILE).read_bytes(), cloud.key.public_key())
    wrong = ModelManifest.from_dict({**manifest.to_dict(),
                                     "files": [{**manifest.files[0].__dict__, "sha256": "0" * 64}]})
    (staged / MANIFEST_FILE).write_bytes(sign_manifest(wrong, cloud.key))  # the real key, the wrong hash
    with pytest.raises(ModelRejected, match="sha256"):
        runtime.install(staged)


def test_a_model_for_other_features_is_refused(cloud, tmp_path):
    runtime = ModelRuntime(tmp_path / "device", cloud.key.public_key(),
                           feature_config=TINY.replace(n_mels=64).feature_config())
    with pytest.raises(ModelRejected, match="n_mels"):
        runtime.install(_copy_version(cloud.registry, 1, tmp_path / "staged"))


# --- what a device installs: its federation, the version it asked for, only forward -----------
def test_an_older_validly_signed_model_never_replaces_a_newer_one(cloud, tmp_path):
    runtime = _runtime(tmp_path / "device", cloud.key)
    updater = _updater(runtime, cloud.server.address, _enrolled(cloud.devices, "forward"))
    try:
        assert updater.sync(2).version == 2
        with pytest.raises(ModelRejected, match="not newer"):
            updater.sync(1)  # a stale announcement, or a replayed one: the service really serves v1
        assert runtime.version == 2 and not (runtime.model_dir / ".incoming" / "v000001").exists(), \
            "refused before anything was downloaded"
        with pytest.raises(ModelRejected, match="not newer"):  # also handed to the runtime directly
            runtime.install(_copy_version(cloud.registry, 1, tmp_path / "v1"))
        assert runtime.version == 2 and _runtime(tmp_path / "device", cloud.key).version == 2
    finally:
        updater.close()


def test_a_local_rollback_stays_until_a_newer_version_arrives(cloud, tmp_path):
    runtime = _runtime(tmp_path / "device", cloud.key)
    runtime.install(_copy_version(cloud.registry, 1, tmp_path / "v1"))
    runtime.install(_copy_version(cloud.registry, 2, tmp_path / "v2"))
    assert runtime.rollback() == 1  # `edgefed edge rollback`: the operator's explicit step back
    assert runtime.newest_installed == 2
    with pytest.raises(ModelRejected, match="not newer"):  # v2 is what the operator stepped back from
        runtime.install(_copy_version(cloud.registry, 2, tmp_path / "v2-again"))
    assert runtime.version == 1


def test_a_model_of_another_federation_is_refused(cloud, other_federation, tmp_path):
    """The ClientApp's runtime knows the run's federation; the agent's pins the one it first installed."""
    (tmp_path / "cloud_ed25519.pub").write_text(public_hex(cloud.key.public_key()) + "\n")
    identity = NodeIdentity("client-0", tmp_path / "keys", tmp_path, tmp_path / "state", tmp_path / "cloud_ed25519.pub")
    client_runtime = identity.model_runtime(TINY)  # TINY's federation is "edgefed"
    with pytest.raises(ModelRejected, match="federation"):
        client_runtime.install(_copy_version(other_federation, 3, tmp_path / "other-v3"))
    assert client_runtime.version == 0

    agent_runtime = ModelRuntime(tmp_path / "agent", cloud.key.public_key(), feature_config=TINY.feature_config())
    agent_runtime.install(_copy_version(cloud.registry, 1, tmp_path / "v1"))
    with pytest.raises(ModelRejected, match="federation"):
        agent_runtime.install(_copy_version(other_federation, 3, tmp_path / "other-v3-again"))
    assert agent_runtime.version == 1


class _RogueService(pb_grpc.ModelServiceServicer):
    """A model service that is not the cloud: answers every GetManifest with one signed manifest.

    Serves `files` (name -> bytes); with `flood`, Download streams that many bytes
    whatever the file is, claiming `claimed_size` as its total, and records how
    large the device's .part file got meanwhile."""

    def __init__(self, manifest: bytes, reply_version: int, files: dict[str, bytes], flood: int = 0,
                 claimed_size: int = 0, watch_part: Path | None = None) -> None:
        self.manifest, self.reply_version, self.files = manifest, reply_version, files
        self.flood, self.claimed_size, self.watch_part = flood, claimed_size, watch_part
        self.downloads: list[str] = []
        self.sent = 0
        self.largest_part = 0

    def GetManifest(self, request, context):  # noqa: N802
        return pb.ManifestReply(version=self.reply_version, signed_manifest=self.manifest)

    def Download(self, request, context):  # noqa: N802
        self.downloads.append(request.file)
        if self.flood:
            chunk = b"\0" * (1 << 20)
            for offset in range(0, self.flood, len(chunk)):
                if self.watch_part is not None and self.watch_part.exists():
                    self.largest_part = max(self.largest_part, self.watch_part.stat().st_size)
                if not context.is_active():
                    return
                self.sent += len(chunk)
                yield pb.Chunk(offset=offset, data=chunk, total_size=self.claimed_size)
            return
        data = self.files[request.file][request.offset:]
        yield pb.Chunk(offset=request.offset, data=data, total_size=len(self.files[request.file]))


class _Rogue:
    def __init__(self, servicer: _RogueService) -> None:
        self.servicer = servicer
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_ModelServiceServicer_to_server(servicer, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> _Rogue:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0)


def _signed_variant(cloud: Cloud, version: int, **changes) -> tuple[ModelManifest, bytes]:
    """The manifest of a published version with `changes`, signed with the real cloud key."""
    manifest = verify_manifest(cloud.registry.manifest_bytes(version), cloud.key.public_key())
    # the dataclass itself checks nothing: what a compromised export step (or a bug) could sign
    changed = ModelManifest(**{**{f: getattr(manifest, f) for f in manifest.__dataclass_fields__}, **changes})
    return changed, sign_manifest(changed, cloud.key)


@pytest.mark.parametrize("reply_version", [12, 2], ids=["claims-v12", "says-v2"])
def test_a_service_answering_another_version_than_asked_is_refused(cloud, tmp_path, reply_version):
    """Asked for v12, a rogue or stale service answers with v2's valid manifest (newer than the device's v1)."""
    runtime = _runtime(tmp_path / "device", cloud.key)
    runtime.install(_copy_version(cloud.registry, 1, tmp_path / "v1"))
    files = {MODEL_FILE: (cloud.registry.directory(2) / MODEL_FILE).read_bytes()}
    with _Rogue(_RogueService(cloud.registry.manifest_bytes(2), reply_version, files)) as rogue:
        updater = _updater(runtime, rogue.address, _enrolled(cloud.devices, f"asks-v12-{reply_version}"))
        with pytest.raises(ModelRejected, match="v12"):
            updater.sync(12)
        updater.close()
        assert runtime.version == 1 and rogue.servicer.downloads == []


BAD_NAMES = ["../escaped.txt", "../../../escaped.txt", "sub/model.onnx", "/etc/passwd", "..", ".hidden",
             "a\\b.onnx", "x" * 200, "", "manifest.json", "model.onnx.part", "mod\nel.onnx", "model.onnx\n"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n[:20]))
def test_a_signed_manifest_with_a_file_name_that_is_not_a_plain_name_does_not_parse(cloud, name):
    manifest = verify_manifest(cloud.registry.manifest_bytes(1), cloud.key.public_key())
    _, data = _signed_variant(cloud, 1, files=[*manifest.files, ModelFile(name, "0" * 64, 3)])
    with pytest.raises(ModelVerificationError, match="file name"):
        verify_manifest(data, cloud.key.public_key())


def test_a_signed_file_name_never_writes_outside_the_model_folder(cloud, tmp_path):
    payload = b"written by the manifest\n"
    (tmp_path / "payload").write_bytes(payload)
    manifest = verify_manifest(cloud.registry.manifest_bytes(2), cloud.key.public_key())
    escaping = ModelFile("../../../escaped.txt", sha256_file(tmp_path / "payload"), len(payload))
    _, data = _signed_variant(cloud, 2, files=[escaping, *manifest.files])
    files = {escaping.name: payload, MODEL_FILE: (cloud.registry.directory(2) / MODEL_FILE).read_bytes()}
    runtime = _runtime(tmp_path / "a" / "device", cloud.key)
    with _Rogue(_RogueService(data, 2, files)) as rogue:
        updater = _updater(runtime, rogue.address, _enrolled(cloud.devices, "escape"))
        with pytest.raises(ModelRejected, match="file name"):
            updater.sync(2)
        updater.close()
    assert not [p for p in tmp_path.rglob("escaped.txt")], "nothing is written under a name with a path in it"
    assert runtime.version == 0


def test_a_download_longer_than_its_manifest_entry_is_cut_and_refused(cloud, tmp_path):
    """The signed entry says 83 bytes; the service streams 64 MiB (claiming 83): the device stops at once."""
    content = b"m" * 83
    (tmp_path / "small").write_bytes(content)
    _, data = _signed_variant(cloud, 2, files=[ModelFile(MODEL_FILE, sha256_file(tmp_path / "small"), 83)])
    runtime = _runtime(tmp_path / "device", cloud.key)
    part = runtime.model_dir / ".incoming" / "v000002" / f"{MODEL_FILE}.part"
    flood = _RogueService(data, 2, {}, flood=64 << 20, claimed_size=83, watch_part=part)
    with _Rogue(flood) as rogue:
        updater = _updater(runtime, rogue.address, _enrolled(cloud.devices, "flooded"))
        with pytest.raises(ModelRejected):
            updater.sync(2)
        updater.close()
    assert flood.largest_part <= 83, f"the .part file grew to {flood.largest_part} bytes"
    assert flood.sent < 16 << 20, f"the device kept reading: {flood.sent} bytes sent"
    assert not part.exists() and runtime.version == 0


# --- roll back and hot swap -----------------------------------------------------------------
def test_a_model_that_fails_to_load_is_rolled_back(cloud, tmp_path):
    from edgefed.common.wire.model_manifest import describe_file

    runtime = _runtime(tmp_path / "device", cloud.key)
    runtime.install(_copy_version(cloud.registry, 1, tmp_path / "v1"))
    staged = _copy_version(cloud.registry, 2, tmp_path / "v2")
    (staged / MODEL_FILE).write_bytes(b"not an onnx model" * 100)
    manifest = verify_manifest((staged / MANIFEST_FILE).read_bytes(), cloud.key.public_key())
    broken = ModelManifest.from_dict({**manifest.to_dict(), "files": [describe_file(staged / MODEL_FILE).__dict__]})
    (staged / MANIFEST_FILE).write_bytes(sign_manifest(broken, cloud.key))  # signed and hashed, but not loadable
    with pytest.raises(ModelRejected, match="failed to load"):
        runtime.install(staged)
    assert runtime.version == 1
    assert (tmp_path / "device" / "current").resolve().name == "v000001"
    assert not (tmp_path / "device" / "v000002").exists()


def test_hot_swap_does_not_fail_requests_in_flight(cloud, tmp_path):
    from edgefed.cloud.publishing.onnx_export import example_inputs
    from edgefed.common.data.features import FeatureSet

    runtime = _runtime(tmp_path / "device", cloud.key)
    runtime.install(_copy_version(cloud.registry, 1, tmp_path / "v1"))
    frames, frame_mask, audio, audio_mask = example_inputs(TINY, 4)
    data = FeatureSet(frames, frame_mask, audio.half(), audio_mask, torch.zeros(4, dtype=torch.long))
    seen, errors, stop = [], [], threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                seen.append(runtime.logits(data)[0])
            except Exception as err:  # noqa: BLE001 - any failure is the test's finding
                errors.append(err)

    workers = [threading.Thread(target=serve) for _ in range(3)]
    for w in workers:
        w.start()
    runtime.install(_copy_version(cloud.registry, 2, tmp_path / "v2"))
    _wait(lambda: seen.count(2) >= 5, 60)
    stop.set()
    for w in workers:
        w.join()
    assert not errors and set(seen) == {1, 2}


# --- the service -------------------------------------------------------------------------------
class _CuttingProxy:
    """A TCP relay to the service that drops the link after `cut_after` bytes towards the device
    (as a flaky mobile network does); later connections pass untouched."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            host, port = self.upstream.rsplit(":", 1)
            server = socket.create_connection((host, int(port)))
            limit = self.cut_after if self.connections == 0 else None
            self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, limit), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        passed = 0
        try:
            while data := src.recv(4096):
                if limit is not None and passed + len(data) > limit:
                    break
                dst.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_a_cut_download_resumes_from_its_offset_and_is_byte_identical(cloud, tmp_path):
    registry = cloud.registry
    total = (registry.directory(2) / MODEL_FILE).stat().st_size
    proxy = _CuttingProxy(cloud.server.address, cut_after=total // 3)
    signer = _enrolled(cloud.devices, "flaky")
    entry = verify_manifest(registry.manifest_bytes(2), cloud.key.public_key()).model_file
    try:
        runtime = _runtime(tmp_path / "device", cloud.key)
        dest = tmp_path / "dl" / MODEL_FILE
        dest.parent.mkdir()
        cut = _updater(runtime, proxy.address, signer)
        with pytest.raises(ModelServiceUnavailable, match="stopped at byte"):
            cut.download(2, entry, dest)
        part = dest.with_name(MODEL_FILE + ".part")
        kept = part.stat().st_size
        assert 0 < kept < total and kept % CHUNK == 0 and not dest.exists()
        resumed = _updater(runtime, cloud.server.address, signer)
        requested = []
        original = resumed._stub.Download
        resumed._stub.Download = lambda req, **kw: (requested.append(req.offset), original(req, **kw))[1]
        resumed.download(2, entry, dest)
        assert requested == [kept], "the second attempt asks only for the missing bytes"
        assert filecmp.cmp(dest, registry.directory(2) / MODEL_FILE, shallow=False)
        cut.close()
        resumed.close()
    finally:
        proxy.close()


def test_unknown_versions_and_files_are_not_found(cloud):
    signer = _enrolled(cloud.devices, "asks-for-nothing")

    def signed(name: str, request) -> tuple:
        return signer.metadata(model_service_method(name), request)

    with grpc.insecure_channel(cloud.server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            request = pb.ManifestRequest(version=99)
            stub.GetManifest(request, timeout=5, metadata=signed("GetManifest", request))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        for name in ("../../etc/passwd", "x" * 300, "missing.onnx", MANIFEST_FILE):
            request = pb.DownloadRequest(version=1, file=name)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Download(request, timeout=5, metadata=signed("Download", request)))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, name
            # the device learns nothing about the server's disk
            assert str(cloud.registry.root) not in err.value.details() and "/tmp" not in err.value.details(), name
        request = pb.DownloadRequest(version=1, file=MODEL_FILE, offset=10**9)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Download(request, timeout=5, metadata=signed("Download", request)))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_twenty_devices_watch_and_download_concurrently(cloud, tmp_path):
    """20 devices subscribe; a new version is pushed to all of them and each installs it."""
    registry = cloud.registry
    stop = threading.Event()
    runtimes, threads = [], []
    for i in range(20):
        runtime = _runtime(tmp_path / f"device-{i}", cloud.key)
        updater = _updater(runtime, cloud.server.address, _enrolled(cloud.devices, f"device-{i}"))
        runtimes.append((runtime, updater))
        threads.append(threading.Thread(target=updater.watch, args=(stop,), daemon=True))
    for t in threads:
        t.start()
    newest = registry.latest_version()
    _wait(lambda: all(r.version == newest for r, _ in runtimes), 60)
    assert cloud.publisher.publish(newest + 1, _adapter(newest + 1)).published  # the push
    _wait(lambda: all(r.version == newest + 1 for r, _ in runtimes), 60)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    for runtime, updater in runtimes:
        assert filecmp.cmp(runtime.model_dir / "current" / MODEL_FILE,
                           registry.directory(newest + 1) / MODEL_FILE, shallow=False)
        updater.close()


def test_tls_service(cloud, tmp_path):
    from edgefed.cloud.fleet.certificates import write_fleet_certificates

    write_fleet_certificates(tmp_path / "tls", hosts=["localhost", "127.0.0.1"])
    server = ModelServer(cloud.registry, "127.0.0.1:0", tls_dir=tmp_path / "tls", devices=cloud.devices).start()
    signer = _enrolled(cloud.devices, "tls-device")
    try:
        runtime = _runtime(tmp_path / "device", cloud.key)
        updater = _updater(runtime, f"localhost:{server.port}", signer, ca_cert=tmp_path / "tls" / "ca.crt")
        assert updater.sync().version == cloud.registry.latest_version()
        updater.close()
        plain = _updater(_runtime(tmp_path / "plain", cloud.key), f"localhost:{server.port}", signer, timeout_s=3)
        with pytest.raises(ModelServiceUnavailable):
            plain.sync()
        plain.close()
    finally:
        server.stop()


def test_generated_stubs_are_current(tmp_path):
    pytest.importorskip("grpc_tools")
    from edgefed.common.wire.protos import generate

    subprocess.run([sys.executable, "-m", "edgefed.common.wire.protos.generate", str(tmp_path)], check=True,
                   cwd=Path(__file__).resolve().parents[1], capture_output=True)
    for name in generate.STUBS:
        assert (tmp_path / name).read_bytes() == (generate.HERE / name).read_bytes(), name


def _wait(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_fleet_rollback_republishes_an_old_model_as_a_newer_version(cloud, tmp_path):
    registry, key = cloud.registry, cloud.key
    local = ModelRegistry(tmp_path / "models")  # a copy: the shared registry stays as it is
    for version in (1, 2):
        shutil.copytree(registry.directory(version), local.root / f"v{version:06d}")
    server = _server(local, cloud.devices)
    runtime = _runtime(tmp_path / "device", key)
    updater = _updater(runtime, server.address, _enrolled(cloud.devices, "rolled-back"))
    try:
        assert updater.sync().version == 2
        assert local.republish(1, key) == 3
        installed = updater.sync()  # devices only move forward: the old model arrives as v3
        assert installed.version == 3 and installed.manifest.metrics["rollback_of"] == 1.0
        assert filecmp.cmp(local.directory(1) / MODEL_FILE, local.directory(3) / MODEL_FILE, shallow=False)
        with pytest.raises(ValueError, match="not newer"):
            local.republish(1, key, new_version=3)
        other = Ed25519PrivateKey.generate()
        with pytest.raises(Exception, match="signature"):  # only the cloud's own key re-signs
            local.republish(2, other)
        assert runtime.rollback() == 2  # a single device's rollback: back to what it ran before
    finally:
        updater.close()
        server.stop()
