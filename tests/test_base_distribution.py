"""The same frozen base on every device: publish, serve, fetch, resume, tamper, refuse.

A real model service on 127.0.0.1 serves a base made of two tiny random checkpoints
(`save_pretrained` layout, tests/checkpoints.py) published by the cloud's BaseRegistry;
devices fetch it with the real BaseFetcher. What a rogue or stale service could send is
sent by a real server of the test's own (`_RogueBases`): the device must refuse it
whatever the channel says.
"""

from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import json
import logging
import shutil
from concurrent import futures
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefed.cloud.publishing.base_registry import BaseRegistry, bases_of
from edgefed.cloud.publishing.model_service import ModelServer
from edgefed.cloud.publishing.registry import ModelRegistry
from edgefed.common.config import EdgefedConfig
from edgefed.common.encoders import EncoderCheckpointError, base_fingerprint_of_checkpoint, load_encoder
from edgefed.common.keys import DeviceRegistry, init_keys, load_cloud_signing_key, load_device_key
from edgefed.common.wire.base_manifest import (
    BaseManifest,
    base_fingerprint,
    sign_base_manifest,
    verify_base_manifest,
)
from edgefed.common.wire.model_manifest import (
    MANIFEST_FILE,
    ModelFile,
    ModelManifest,
    ModelVerificationError,
    describe_file,
    sign_manifest,
    verify_manifest,
)
from edgefed.common.wire.protos import model_service_pb2 as pb
from edgefed.common.wire.protos import model_service_pb2_grpc as pb_grpc
from edgefed.common.wire.request_auth import DeviceSigner, model_service_method
from edgefed.edge.identity import NodeIdentity
from edgefed.edge.models.base_fetcher import (
    BaseFetcher,
    BaseIntegrityError,
    BaseRejected,
    verify_installed_base,
)
from edgefed.edge.models.transfer import ModelServiceUnavailable
from tests.checkpoints import Checkpoint, make_checkpoint

CHUNK = 16 * 1024  # the service's chunk size here: a 100 KB safetensors file is several chunks
WEIGHTS = "video/model.safetensors"


class Cloud(NamedTuple):
    key: Ed25519PrivateKey  # the cloud's signing key, pinned on the devices
    models: ModelRegistry
    bases: BaseRegistry  # bases_of(models): what the server serves
    devices: DeviceRegistry
    server: ModelServer
    video: Checkpoint
    audio: Checkpoint
    fingerprint: str  # of the base (video, audio), published


# --- how the tests build the parts (the constructors' signatures in one place) -------------------
def _server(models: ModelRegistry, devices: DeviceRegistry, **kw) -> ModelServer:
    return ModelServer(models, devices=devices, chunk_bytes=CHUNK, **kw).start()


def _fetcher(device_dir: Path, address: str, signer: DeviceSigner, cloud_key: Ed25519PrivateKey, **kw) -> BaseFetcher:
    return BaseFetcher(device_dir, address, signer, cloud_key.public_key(), **kw)


def _enrolled(devices: DeviceRegistry, device_id: str) -> DeviceSigner:
    """A new device whose key the cloud registered (`edgefed cloud enrol`)."""
    key = Ed25519PrivateKey.generate()
    devices.register(device_id, key.public_key())
    return DeviceSigner(device_id, key)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    root = tmp_path_factory.mktemp("cloud")
    video = make_checkpoint("vit", root / "checkpoints", seed=1)
    audio = make_checkpoint("ast", root / "checkpoints", seed=2)
    key = Ed25519PrivateKey.generate()
    models = ModelRegistry(root / "run" / "models")
    bases = bases_of(models)
    manifest = bases.publish(video.path, audio.path, key)
    devices = DeviceRegistry(root / "keys" / "registry.json")
    server = _server(models, devices)
    yield Cloud(key, models, bases, devices, server, video, audio, manifest.fingerprint)
    server.stop()


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _assert_same_files(installed: Path, cloud: Cloud) -> None:
    for part, checkpoint in (("video", cloud.video), ("audio", cloud.audio)):
        names = sorted(p.name for p in checkpoint.path.iterdir())
        assert sorted(p.name for p in (installed / part).iterdir()) == names
        for name in names:
            assert filecmp.cmp(installed / part / name, checkpoint.path / name, shallow=False), f"{part}/{name}"


def _record_downloads(fetcher: BaseFetcher) -> list[tuple[str, int]]:
    """(file, offset) of every DownloadBase the fetcher makes from now on."""
    asked: list[tuple[str, int]] = []
    original = fetcher._stub.DownloadBase
    fetcher._stub.DownloadBase = lambda req, **kw: (asked.append((req.file, req.offset)), original(req, **kw))[1]
    return asked


# --- the fingerprint and the package --------------------------------------------------------
def test_the_base_fingerprint_hashes_the_two_checkpoint_fingerprints_in_a_fixed_order(cloud):
    fp_video, fp_audio = (base_fingerprint_of_checkpoint(c.path) for c in (cloud.video, cloud.audio))
    expected = hashlib.sha256(f"video:{fp_video}\naudio:{fp_audio}".encode()).hexdigest()
    assert cloud.fingerprint == expected == base_fingerprint({"audio": fp_audio, "video": fp_video})
    assert base_fingerprint({"video": fp_audio, "audio": fp_video}) != expected, "the parts are not interchangeable"
    assert base_fingerprint({"video": fp_video, "audio": "tiny"}) != expected


def test_a_base_is_published_once_per_fingerprint_as_one_folder(cloud):
    again = cloud.bases.publish(cloud.video.path, cloud.audio.path, cloud.key)
    assert again.fingerprint == cloud.fingerprint
    assert again.created_at == verify_base_manifest(cloud.bases.manifest_bytes(cloud.fingerprint),
                                                    cloud.key.public_key()).created_at, "not published a second time"
    assert cloud.bases.fingerprints() == [cloud.fingerprint]
    assert [p.name for p in cloud.bases.root.iterdir()] == [cloud.fingerprint], "no staging folder is left behind"
    assert sorted(f.name for f in again.files) == sorted(
        f"{part}/{p.name}" for part, c in (("video", cloud.video), ("audio", cloud.audio)) for p in c.path.iterdir())


def test_a_directory_that_is_not_a_checkpoint_is_not_published(cloud, tmp_path):
    (tmp_path / "empty").mkdir()
    bases = BaseRegistry(tmp_path / "bases")
    with pytest.raises(EncoderCheckpointError, match="config.json"):
        bases.publish(cloud.video.path, tmp_path / "empty", cloud.key)
    assert bases.fingerprints() == [] and not (tmp_path / "bases").exists()


def test_a_base_manifest_and_a_model_manifest_are_not_mistaken_for_each_other(cloud):
    base_bytes = cloud.bases.manifest_bytes(cloud.fingerprint)
    with pytest.raises(ModelVerificationError):
        verify_manifest(base_bytes, cloud.key.public_key())
    model = ModelManifest(1, cloud.fingerprint, [ModelFile("model.onnx", "0" * 64, 1)], [], [], {}, ["a"], "int8", {}, "f")
    with pytest.raises(ModelVerificationError, match="kind"):
        verify_base_manifest(sign_manifest(model, cloud.key), cloud.key.public_key())


# --- a device fetches it ----------------------------------------------------------------------
def test_a_device_installs_the_published_base_byte_for_byte_and_loads_it(cloud, tmp_path):
    with _fetcher(tmp_path / "device", cloud.server.address, _enrolled(cloud.devices, "d0"), cloud.key) as fetcher:
        folder = fetcher.ensure_base(cloud.fingerprint)
    assert folder == tmp_path / "device" / "bases" / cloud.fingerprint
    _assert_same_files(folder, cloud)
    assert [p.name for p in (tmp_path / "device" / "bases").iterdir() if p.is_dir()] == [cloud.fingerprint], \
        "the download folder is gone"
    loaded = load_encoder(folder / "video", "frames")  # the identical frozen base, tensor for tensor
    saved = cloud.video.encoder.state_dict()
    assert all(torch.equal(t, saved[name]) for name, t in loaded.module.state_dict().items())
    # a restarted device with the service out of reach still has its (verified) base
    with _fetcher(tmp_path / "device", "127.0.0.1:1", _enrolled(cloud.devices, "d0-offline"), cloud.key,
                  timeout_s=2) as offline:
        assert offline.ensure_base(cloud.fingerprint) == folder


class _HangsUp:
    """A DownloadBase call the device drops after `chunks` chunks (its app killed, its link lost): the
    stream ends in a grpc error, as the device's own code sees it."""

    def __init__(self, call, chunks: int) -> None:  # noqa: ANN001 - a grpc server stream
        self.call, self.chunks = call, chunks

    def __iter__(self):  # noqa: ANN204
        for _ in range(self.chunks):
            yield next(self.call)
        self.call.cancel()
        yield from self.call  # raises grpc.RpcError (CANCELLED)

    def cancel(self) -> bool:
        return self.call.cancel()


def test_a_node_fetches_with_its_own_key_files_and_the_pinned_cloud_key(cloud, tmp_path):
    """The wiring a ClientApp or the agent uses: NodeIdentity's device key signs, its pinned cloud key verifies."""
    keys = tmp_path / "keys"
    init_keys("cloud", keys / "cloud")
    init_keys("edge", keys / "devices" / "node-1")
    models = ModelRegistry(tmp_path / "run" / "models")
    fingerprint = bases_of(models).publish(cloud.video.path, cloud.audio.path, load_cloud_signing_key(keys / "cloud")).fingerprint
    devices = DeviceRegistry(keys / "cloud" / "registry.json")
    devices.register("node-1", load_device_key(keys / "devices" / "node-1").public_key())
    identity = NodeIdentity("node-1", keys / "devices" / "node-1", keys / "cloud", tmp_path / "state", keys / "cloud")
    server = _server(models, devices)
    try:
        with identity.base_fetcher(EdgefedConfig(), server.address) as fetcher:
            folder = fetcher.ensure_base(fingerprint)
    finally:
        server.stop()
    assert folder == tmp_path / "state" / "bases" / fingerprint
    _assert_same_files(folder, cloud)
    with pytest.raises(BaseIntegrityError, match="pinned cloud key"):  # not the module cloud's key
        verify_installed_base(folder, cloud.key.public_key())


def test_a_cut_download_resumes_from_its_part_file(cloud, tmp_path):
    size = (cloud.video.path / "model.safetensors").stat().st_size
    assert size > 3 * CHUNK
    with _fetcher(tmp_path / "device", cloud.server.address, _enrolled(cloud.devices, "flaky"), cloud.key) as fetcher:
        original = fetcher._stub.DownloadBase
        fetcher._stub.DownloadBase = lambda req, **kw: (_HangsUp(original(req, **kw), 2) if req.file == WEIGHTS
                                                        else original(req, **kw))
        with pytest.raises(ModelServiceUnavailable, match="stopped at byte"):
            fetcher.ensure_base(cloud.fingerprint)
        staged = tmp_path / "device" / "bases" / ".incoming" / cloud.fingerprint
        assert (staged / "video" / "config.json").is_file(), "what came whole before the cut is kept"
        assert (staged / "video" / "model.safetensors.part").stat().st_size == 2 * CHUNK
        assert not (tmp_path / "device" / "bases" / cloud.fingerprint).exists(), "nothing half-installed"
        fetcher._stub.DownloadBase = original
        asked = _record_downloads(fetcher)
        folder = fetcher.ensure_base(cloud.fingerprint)
    assert asked[0] == (WEIGHTS, 2 * CHUNK), "the second attempt starts with the missing bytes of the cut file"
    assert ("video/config.json", 0) not in asked, "a file that arrived whole is not asked for again"
    _assert_same_files(folder, cloud)


def test_a_device_keeps_the_two_most_recently_used_bases(cloud, tmp_path):
    """Three bases: (vit, ast), (vit, tiny), (tiny, ast): a tiny part ships no files."""
    others = [cloud.bases.publish(cloud.video.path, None, cloud.key).fingerprint,
              cloud.bases.publish(None, cloud.audio.path, cloud.key).fingerprint]
    a, b, c = cloud.fingerprint, *others
    bases = tmp_path / "device" / "bases"
    try:
        with _fetcher(tmp_path / "device", cloud.server.address, _enrolled(cloud.devices, "keeper"), cloud.key) as fetcher:
            for fp in (a, b, c):
                fetcher.ensure_base(fp)
            assert fetcher.installed() == [c, b] and not (bases / a).exists()
            assert sorted(p.name for p in (bases / c).iterdir()) == ["audio", MANIFEST_FILE]
            fetcher.ensure_base(b)  # used again: now the most recent
            fetcher.ensure_base(a)
            assert fetcher.installed() == [a, b] and not (bases / c).exists()
    finally:
        for fp in (b, c):
            shutil.rmtree(cloud.bases.root / fp)  # the module's cloud holds one base again


# --- attacks on the device's copy ------------------------------------------------------------
TAMPERINGS = {
    "a flipped byte": (lambda base: _flip_a_byte(base / WEIGHTS), "sha256"),
    "an added weight file": (lambda base: (base / "video" / "extra.safetensors").write_bytes(b"x"), "not in the base manifest"),
    "a removed file": (lambda base: (base / "audio" / "preprocessor_config.json").unlink(), "missing"),
    "an edited manifest": (lambda base: (base / MANIFEST_FILE).write_text(
        (base / MANIFEST_FILE).read_text().replace('"format": 1', '"format": 2')), "signature"),
}


@pytest.mark.parametrize("tamper", TAMPERINGS, ids=str)
def test_a_tampered_installed_base_is_refused_then_fetched_again(cloud, tmp_path, caplog, tamper):
    change, reason = TAMPERINGS[tamper]
    signer = _enrolled(cloud.devices, "tampered")
    with _fetcher(tmp_path / "device", cloud.server.address, signer, cloud.key) as fetcher:
        folder = fetcher.ensure_base(cloud.fingerprint)
    change(folder)
    with pytest.raises(BaseIntegrityError, match=reason):
        verify_installed_base(folder, cloud.key.public_key())
    with _fetcher(tmp_path / "device", cloud.server.address, signer, cloud.key) as restarted, \
            caplog.at_level(logging.ERROR, logger="edgefed.edge.models.base_fetcher"):
        asked = _record_downloads(restarted)
        assert restarted.ensure_base(cloud.fingerprint) == folder
    assert any("refused" in r.getMessage() and reason in r.getMessage() for r in caplog.records), caplog.text
    assert len(asked) == len(verify_installed_base(folder, cloud.key.public_key()).files), "fetched whole again"
    _assert_same_files(folder, cloud)


# --- attacks through the service ---------------------------------------------------------------
def test_a_file_tampered_on_the_server_is_refused_by_its_hash(cloud, tmp_path):
    models = ModelRegistry(tmp_path / "cloud" / "models")
    shutil.copytree(cloud.bases.root, bases_of(models).root)
    _flip_a_byte(bases_of(models).directory(cloud.fingerprint) / WEIGHTS)  # after signing: a disk fault or an intruder
    server = _server(models, cloud.devices)
    try:
        with _fetcher(tmp_path / "device", server.address, _enrolled(cloud.devices, "served-bad"), cloud.key) as fetcher:
            with pytest.raises(BaseRejected, match="sha256"):
                fetcher.ensure_base(cloud.fingerprint)
            assert fetcher.installed() == []
    finally:
        server.stop()
    bases = tmp_path / "device" / "bases"
    assert not (bases / cloud.fingerprint).exists() and not (bases / ".incoming" / cloud.fingerprint).exists()


def test_an_unsigned_or_unenrolled_device_gets_nothing(cloud, tmp_path):
    manifest = pb.BaseManifestRequest(fingerprint=cloud.fingerprint)
    download = pb.BaseDownloadRequest(fingerprint=cloud.fingerprint, file=WEIGHTS)

    def calls(signer: DeviceSigner | None) -> dict:
        def meta(name: str, request) -> tuple:
            return signer.metadata(model_service_method(name), request) if signer is not None else ()
        return {
            "GetBaseManifest": lambda: stub.GetBaseManifest(manifest, timeout=10, metadata=meta("GetBaseManifest", manifest)),
            "DownloadBase": lambda: b"".join(c.data for c in stub.DownloadBase(download, timeout=10,
                                                                             metadata=meta("DownloadBase", download))),
        }

    def refused(call) -> grpc.StatusCode | str:
        try:
            return f"served {len(str(call()))} characters"
        except grpc.RpcError as err:
            return err.code()

    stranger = DeviceSigner("stranger", Ed25519PrivateKey.generate())  # signs, but was never enrolled
    with grpc.insecure_channel(cloud.server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        for name, call in calls(None).items():
            assert refused(call) == grpc.StatusCode.UNAUTHENTICATED, name
        for name, call in calls(stranger).items():
            assert refused(call) == grpc.StatusCode.PERMISSION_DENIED, name
        enrolled = calls(_enrolled(cloud.devices, "member"))
        assert enrolled["DownloadBase"]() == (cloud.video.path / "model.safetensors").read_bytes()
    with _fetcher(tmp_path / "device", cloud.server.address, stranger, cloud.key) as fetcher, \
            pytest.raises(ModelServiceUnavailable, match="PERMISSION_DENIED"):
        fetcher.ensure_base(cloud.fingerprint)
    assert not (tmp_path / "device" / "bases" / cloud.fingerprint).exists()


def test_the_service_serves_only_the_files_of_published_bases(cloud):
    signer = _enrolled(cloud.devices, "prober")
    with grpc.insecure_channel(cloud.server.address) as channel:
        stub = pb_grpc.ModelServiceStub(channel)

        def download(fingerprint: str, name: str, offset: int = 0) -> grpc.StatusCode | None:
            request = pb.BaseDownloadRequest(fingerprint=fingerprint, file=name, offset=offset)
            try:
                list(stub.DownloadBase(request, timeout=5, metadata=signer.metadata(model_service_method("DownloadBase"), request)))
            except grpc.RpcError as err:
                assert str(cloud.models.root) not in err.details() and "/tmp" not in err.details(), name
                return err.code()
            return None

        # from <run>/models/bases/<fingerprint>/: four folders up is where the cloud keeps keys/registry.json
        for name in ("../../../../keys/registry.json", "video/../../../../../keys/registry.json", MANIFEST_FILE, "video",
                     "video/missing.safetensors", "model.safetensors", "/etc/passwd", "other/config.json"):
            assert download(cloud.fingerprint, name) == grpc.StatusCode.NOT_FOUND, name
        for fingerprint in ("..", "../bases", "0" * 64, cloud.fingerprint.upper(), ""):
            assert download(fingerprint, WEIGHTS) == grpc.StatusCode.NOT_FOUND, fingerprint
            request = pb.BaseManifestRequest(fingerprint=fingerprint)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetBaseManifest(request, timeout=5, metadata=signer.metadata(model_service_method("GetBaseManifest"), request))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, fingerprint
        assert download(cloud.fingerprint, WEIGHTS, offset=10**9) == grpc.StatusCode.OUT_OF_RANGE


class _RogueBases(pb_grpc.ModelServiceServicer):
    """A model service that is not the cloud: answers every GetBaseManifest with one signed manifest and
    serves `files` (name -> bytes); with `flood`, DownloadBase streams that many bytes claiming `claimed_size`."""

    def __init__(self, manifest: bytes, files: dict[str, bytes], flood: int = 0, claimed_size: int = 0) -> None:
        self.manifest, self.files, self.flood, self.claimed_size = manifest, files, flood, claimed_size
        self.downloads: list[str] = []
        self.sent = 0

    def GetBaseManifest(self, request, context):  # noqa: N802
        return pb.BaseManifestReply(fingerprint=request.fingerprint, signed_manifest=self.manifest)

    def DownloadBase(self, request, context):  # noqa: N802
        self.downloads.append(request.file)
        if self.flood:
            chunk = b"\0" * (1 << 20)
            for offset in range(0, self.flood, len(chunk)):
                if not context.is_active():
                    return
                self.sent += len(chunk)
                yield pb.Chunk(offset=offset, data=chunk, total_size=self.claimed_size)
            return
        data = self.files[request.file]
        yield pb.Chunk(offset=request.offset, data=data[request.offset:], total_size=len(data))


class _Rogue:
    def __init__(self, servicer: _RogueBases) -> None:
        self.servicer = servicer
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_ModelServiceServicer_to_server(servicer, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self) -> _Rogue:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0)


def _published(cloud: Cloud) -> tuple[BaseManifest, dict[str, bytes]]:
    """The cloud's base manifest and the bytes of each of its files."""
    manifest = verify_base_manifest(cloud.bases.manifest_bytes(cloud.fingerprint), cloud.key.public_key())
    return manifest, {f.name: cloud.bases.file_path(cloud.fingerprint, f.name).read_bytes() for f in manifest.files}


def _fetch_from(rogue: _RogueBases, cloud: Cloud, device_dir: Path, fingerprint: str) -> Path:
    with _Rogue(rogue) as server, _fetcher(device_dir, server.address, _enrolled(cloud.devices, "misled"), cloud.key) as fetcher:
        return fetcher.ensure_base(fingerprint)


def test_a_manifest_signed_by_another_key_is_refused(cloud, tmp_path):
    manifest, files = _published(cloud)
    rogue = _RogueBases(sign_base_manifest(manifest, Ed25519PrivateKey.generate()), files)  # the real files, hashes
    with pytest.raises(BaseRejected, match="pinned cloud key"):
        _fetch_from(rogue, cloud, tmp_path / "device", cloud.fingerprint)
    assert rogue.downloads == [], "nothing is downloaded before the manifest verifies"
    assert not (tmp_path / "device" / "bases" / cloud.fingerprint).exists()


def test_a_service_answering_with_another_base_is_refused(cloud, tmp_path):
    asked = base_fingerprint({"video": "tiny", "audio": "tiny"})  # what the device was told to run
    _, files = _published(cloud)
    rogue = _RogueBases(cloud.bases.manifest_bytes(cloud.fingerprint), files)  # validly signed, another base
    with pytest.raises(BaseRejected, match="answered"):
        _fetch_from(rogue, cloud, tmp_path / "device", asked)
    assert rogue.downloads == []


BAD_NAMES = ["video/../../../escaped.txt", "../escaped.txt", "video/sub/escaped.txt", "/etc/passwd", "video/..",
             "video/.hidden", "other/escaped.txt", "video/", "video//escaped.txt", "video\\..\\escaped.txt",
             MANIFEST_FILE, "video/manifest.json", "video/model.safetensors.part", "escaped.txt", ""]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_a_signed_base_manifest_with_a_name_outside_its_part_folders_does_not_parse(cloud, name):
    manifest, _ = _published(cloud)
    bad = dataclasses.replace(manifest, files=[*manifest.files, ModelFile(name, "0" * 64, 3)])
    with pytest.raises(ModelVerificationError, match="file name"):
        verify_base_manifest(sign_base_manifest(bad, cloud.key), cloud.key.public_key())  # the real key


def test_a_signed_file_name_never_writes_outside_the_base_folder(cloud, tmp_path):
    payload = b"written by the manifest\n"
    (tmp_path / "payload").write_bytes(payload)
    manifest, files = _published(cloud)
    escaping = describe_file(tmp_path / "payload", "video/../../../../escaped.txt")
    signed = sign_base_manifest(dataclasses.replace(manifest, files=[escaping, *manifest.files]), cloud.key)
    rogue = _RogueBases(signed, {**files, escaping.name: payload})
    with pytest.raises(BaseRejected, match="file name"):
        _fetch_from(rogue, cloud, tmp_path / "a" / "b" / "device", cloud.fingerprint)
    assert not list(tmp_path.rglob("escaped.txt")), "nothing is written under a name that leaves its folder"
    assert rogue.downloads == []


def test_a_stream_longer_than_its_signed_size_is_cut_and_refused(cloud, tmp_path):
    manifest, files = _published(cloud)
    rogue = _RogueBases(cloud.bases.manifest_bytes(cloud.fingerprint), files, flood=64 << 20,
                        claimed_size=len(files[manifest.files[0].name]))
    with pytest.raises(BaseRejected, match="more than the manifest"):
        _fetch_from(rogue, cloud, tmp_path / "device", cloud.fingerprint)
    assert rogue.sent < 16 << 20, f"the device kept reading: {rogue.sent} bytes sent"
    assert not (tmp_path / "device" / "bases" / ".incoming").exists() or \
        not any(p.is_file() for p in (tmp_path / "device" / "bases" / ".incoming").rglob("*"))


def test_signed_files_that_do_not_make_the_signed_checkpoint_fingerprint_are_refused(cloud, tmp_path):
    """What a bug in the cloud's publishing could sign: right hashes, but parts that say another checkpoint."""
    manifest, files = _published(cloud)
    parts = {**manifest.parts, "audio": hashlib.sha256(b"another audio checkpoint").hexdigest()}
    wrong = dataclasses.replace(manifest, parts=parts, fingerprint=base_fingerprint(parts))
    rogue = _RogueBases(sign_base_manifest(wrong, cloud.key), files)
    with pytest.raises(BaseRejected, match="audio checkpoint's fingerprint"):
        _fetch_from(rogue, cloud, tmp_path / "device", wrong.fingerprint)
    assert not (tmp_path / "device" / "bases" / wrong.fingerprint).exists()


def test_the_manifest_names_each_part_and_its_fingerprint(cloud):
    raw = json.loads(cloud.bases.manifest_bytes(cloud.fingerprint))["manifest"]
    assert raw["kind"] == "base" and raw["fingerprint"] == cloud.fingerprint
    assert raw["parts"] == {"video": base_fingerprint_of_checkpoint(cloud.video.path),
                            "audio": base_fingerprint_of_checkpoint(cloud.audio.path)}
    sizes = {f["name"]: f["size"] for f in raw["files"]}
    assert sizes[WEIGHTS] == (cloud.video.path / "model.safetensors").stat().st_size
