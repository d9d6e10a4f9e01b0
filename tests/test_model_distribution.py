"""The model service and the device runtime: tamper, resume, roll back, hot-swap, many devices.

A real gRPC server on 127.0.0.1 serves models published by the real
publisher (a small model config keeps exports quick).
"""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefed.cloud.publishing.model_service import ModelServer, ModelServicer
from edgefed.cloud.publishing.publisher import MODEL_FILE, ModelPublisher
from edgefed.cloud.publishing.registry import ModelRegistry
from edgefed.common.config import EdgefedConfig
from edgefed.common.lora import build_lora_model, get_adapter_state
from edgefed.common.wire.model_manifest import MANIFEST_FILE, ModelManifest, sign_manifest, verify_manifest
from edgefed.common.wire.protos import model_service_pb2 as pb
from edgefed.edge.models.runtime import ModelRejected, ModelRuntime
from edgefed.edge.models.updater import ModelServiceUnavailable, ModelUpdater

# The parity gate is tested on the real model (test_onnx_export.py); this random tiny one has near-ties.
TINY = EdgefedConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, image_size=32,
                     n_mels=32, audio_frames=32, num_keyframes=2, parity_min_agreement=0.9)


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    adapter = get_adapter_state(build_lora_model(TINY))
    return {k: (torch.randn(v.shape, generator=g) * 0.1 if "lora_B" in k else v) for k, v in adapter.items()}


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """A registry with versions 1 and 2 published, the signing key, and a running service."""
    root = tmp_path_factory.mktemp("cloud")
    key = Ed25519PrivateKey.generate()
    registry = ModelRegistry(root / "models")
    publisher = ModelPublisher(TINY, registry, key, None, "base")
    for version in (1, 2):
        assert publisher.publish(version, _adapter(version)).published
    server = ModelServer(registry, chunk_bytes=16 * 1024).start()
    yield registry, key, publisher, server
    server.stop()


def _runtime(path: Path, key: Ed25519PrivateKey) -> ModelRuntime:
    return ModelRuntime(path, key.public_key(), threads=1, feature_config=TINY.feature_config())


def _copy_version(registry: ModelRegistry, version: int, dest: Path) -> Path:
    shutil.copytree(registry.directory(version), dest)
    return dest


# --- verification --------------------------------------------------------------------------
def test_sync_installs_a_verified_model_and_keeps_the_previous(cloud, tmp_path):
    registry, key, _, server = cloud
    runtime = _runtime(tmp_path / "device", key)
    updater = ModelUpdater(runtime, server.address, "d0")
    assert updater.sync(1).version == 1
    assert updater.sync().version == 2  # 0 = newest
    assert (tmp_path / "device" / "current").resolve().name == "v000002"
    assert (tmp_path / "device" / "previous").resolve().name == "v000001"
    assert filecmp.cmp(tmp_path / "device" / "current" / MODEL_FILE, registry.directory(2) / MODEL_FILE, shallow=False)
    # a restarted device comes back with the model it had
    assert _runtime(tmp_path / "device", key).version == 2
    assert runtime.rollback() == 1 and runtime.version == 1
    updater.close()


def test_a_flipped_byte_in_the_model_is_refused(cloud, tmp_path):
    registry, key, _, _ = cloud
    runtime = _runtime(tmp_path / "device", key)
    staged = _copy_version(registry, 1, tmp_path / "staged")
    data = bytearray((staged / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (staged / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelRejected, match="sha256"):
        runtime.install(staged)
    assert runtime.version == 0 and not staged.exists()


def test_a_flipped_byte_in_the_manifest_is_refused(cloud, tmp_path):
    registry, key, _, _ = cloud
    runtime = _runtime(tmp_path / "device", key)
    staged = _copy_version(registry, 1, tmp_path / "staged")
    text = (staged / MANIFEST_FILE).read_text()
    (staged / MANIFEST_FILE).write_text(text.replace('"quantization": "int8"', '"quantization": "int9"'))
    with pytest.raises(ModelRejected, match="signature"):
        runtime.install(staged)


def test_a_manifest_signed_by_another_key_is_refused(cloud, tmp_path):
    registry, key, _, _ = cloud
    runtime = _runtime(tmp_path / "device", key)
    staged = _copy_version(registry, 1, tmp_path / "staged")
    body = json.loads((staged / MANIFEST_FILE).read_text())["manifest"]
    (staged / MANIFEST_FILE).write_bytes(sign_manifest(ModelManifest.from_dict(body), Ed25519PrivateKey.generate()))
    with pytest.raises(ModelRejected, match="pinned cloud key"):
        runtime.install(staged)


def test_a_signed_manifest_whose_hash_does_not_match_is_refused(cloud, tmp_path):
    registry, key, _, _ = cloud
    runtime = _runtime(tmp_path / "device", key)
    staged = _copy_version(registry, 1, tmp_path / "staged")
    manifest = verify_manifest((staged / MANIFEST_FILE).read_bytes(), key.public_key())
    wrong = ModelManifest.from_dict({**manifest.to_dict(),
                                     "files": [{**manifest.files[0].__dict__, "sha256": "0" * 64}]})
    (staged / MANIFEST_FILE).write_bytes(sign_manifest(wrong, key))  # the real key, the wrong hash
    with pytest.raises(ModelRejected, match="sha256"):
        runtime.install(staged)


def test_a_model_for_other_features_is_refused(cloud, tmp_path):
    registry, key, _, _ = cloud
    runtime = ModelRuntime(tmp_path / "device", key.public_key(),
                           feature_config=TINY.replace(n_mels=64).feature_config())
    with pytest.raises(ModelRejected, match="n_mels"):
        runtime.install(_copy_version(registry, 1, tmp_path / "staged"))


# --- roll back and hot swap -----------------------------------------------------------------
def test_a_model_that_fails_to_load_is_rolled_back(cloud, tmp_path):
    registry, key, _, _ = cloud
    runtime = _runtime(tmp_path / "device", key)
    runtime.install(_copy_version(registry, 1, tmp_path / "v1"))
    staged = _copy_version(registry, 2, tmp_path / "v2")
    (staged / MODEL_FILE).write_bytes(b"not an onnx model" * 100)
    manifest = verify_manifest((staged / MANIFEST_FILE).read_bytes(), key.public_key())
    from edgefed.common.wire.model_manifest import describe_file

    broken = ModelManifest.from_dict({**manifest.to_dict(), "files": [describe_file(staged / MODEL_FILE).__dict__]})
    (staged / MANIFEST_FILE).write_bytes(sign_manifest(broken, key))  # signed and hashed, but not loadable
    with pytest.raises(ModelRejected, match="failed to load"):
        runtime.install(staged)
    assert runtime.version == 1
    assert (tmp_path / "device" / "current").resolve().name == "v000001"
    assert not (tmp_path / "device" / "v000002").exists()


def test_hot_swap_does_not_fail_requests_in_flight(cloud, tmp_path):
    from edgefed.cloud.publishing.onnx_export import example_inputs
    from edgefed.common.data.features import FeatureSet

    registry, key, _, _ = cloud
    runtime = _runtime(tmp_path / "device", key)
    runtime.install(_copy_version(registry, 1, tmp_path / "v1"))
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
    runtime.install(_copy_version(registry, 2, tmp_path / "v2"))
    while seen.count(2) < 5:
        pass
    stop.set()
    for w in workers:
        w.join()
    assert not errors and set(seen) == {1, 2}


# --- the service -------------------------------------------------------------------------------
class _DroppingServicer(ModelServicer):
    """Sends a few chunks, then the link drops (as a flaky mobile network does)."""

    def Download(self, request, context):  # noqa: N802
        for i, chunk in enumerate(super().Download(request, context)):
            if i == 3:
                context.abort(grpc.StatusCode.UNAVAILABLE, "link dropped")
            yield chunk


def test_a_cut_download_resumes_from_its_offset_and_is_byte_identical(cloud, tmp_path):
    from concurrent import futures

    from edgefed.common.wire.protos import model_service_pb2_grpc as pb_grpc

    registry, key, _, server = cloud
    flaky = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_ModelServiceServicer_to_server(_DroppingServicer(registry, chunk_bytes=16 * 1024), flaky)
    port = flaky.add_insecure_port("127.0.0.1:0")
    flaky.start()
    try:
        runtime = _runtime(tmp_path / "device", key)
        dest = tmp_path / "dl" / MODEL_FILE
        dest.parent.mkdir()
        cut = ModelUpdater(runtime, f"127.0.0.1:{port}")
        with pytest.raises(ModelServiceUnavailable, match="stopped at byte"):
            cut.download(2, MODEL_FILE, dest)
        part = dest.with_name(MODEL_FILE + ".part")
        kept = part.stat().st_size
        total = (registry.directory(2) / MODEL_FILE).stat().st_size
        assert 0 < kept < total and kept % (16 * 1024) == 0 and not dest.exists()
        resumed = ModelUpdater(runtime, server.address)
        requested = []
        original = resumed._stub.Download
        resumed._stub.Download = lambda req, **kw: (requested.append(req.offset), original(req, **kw))[1]
        resumed.download(2, MODEL_FILE, dest)
        assert requested == [kept], "the second attempt asks only for the missing bytes"
        assert filecmp.cmp(dest, registry.directory(2) / MODEL_FILE, shallow=False)
        cut.close()
        resumed.close()
    finally:
        flaky.stop(0)


def test_unknown_versions_and_files_are_not_found(cloud):
    registry, _, _, server = cloud
    from edgefed.common.wire.protos import model_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetManifest(pb.ManifestRequest(version=99), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Download(pb.DownloadRequest(version=1, file="../../etc/passwd"), timeout=5))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Download(pb.DownloadRequest(version=1, file=MODEL_FILE, offset=10**9), timeout=5))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_twenty_devices_watch_and_download_concurrently(cloud, tmp_path):
    """20 devices subscribe; a new version is pushed to all of them and each installs it."""
    registry, key, publisher, server = cloud
    stop = threading.Event()
    runtimes, threads = [], []
    for i in range(20):
        runtime = _runtime(tmp_path / f"device-{i}", key)
        updater = ModelUpdater(runtime, server.address, f"device-{i}")
        runtimes.append((runtime, updater))
        threads.append(threading.Thread(target=updater.watch, args=(stop,), daemon=True))
    for t in threads:
        t.start()
    newest = registry.latest_version()
    _wait(lambda: all(r.version == newest for r, _ in runtimes), 60)
    assert publisher.publish(newest + 1, _adapter(newest + 1)).published  # the push
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

    registry, key, _, _ = cloud
    write_fleet_certificates(tmp_path / "tls", hosts=["localhost", "127.0.0.1"])
    server = ModelServer(registry, "127.0.0.1:0", tls_dir=tmp_path / "tls").start()
    try:
        runtime = _runtime(tmp_path / "device", key)
        updater = ModelUpdater(runtime, f"localhost:{server.port}", ca_cert=tmp_path / "tls" / "ca.crt")
        assert updater.sync().version == registry.latest_version()
        updater.close()
        plain = ModelUpdater(_runtime(tmp_path / "plain", key), f"localhost:{server.port}", timeout_s=3)
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
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_fleet_rollback_republishes_an_old_model_as_a_newer_version(cloud, tmp_path):
    registry, key, _, _ = cloud
    local = ModelRegistry(tmp_path / "models")  # a copy: the shared registry stays at v1, v2
    for version in (1, 2):
        shutil.copytree(registry.directory(version), local.root / f"v{version:06d}")
    server = ModelServer(local).start()
    runtime = _runtime(tmp_path / "device", key)
    updater = ModelUpdater(runtime, server.address)
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
