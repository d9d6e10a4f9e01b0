"""The gRPC model distribution service (common/wire/protos/model_service.proto).

WatchModels is the push: each subscribed device holds one server stream and
gets a notice the moment a version is published. Download streams a file
from any offset, so a device that lost its link resumes where it stopped.
GetBaseManifest and DownloadBase do the same for the frozen base a model
builds on (the encoder checkpoints, `<models>/bases/<fingerprint>/`,
cloud/publishing/base_registry.py), named by its fingerprint.
The service only serves what the registries hold; devices trust the signed
manifest, not the channel (TLS is for privacy and for the fleet's own
hygiene).

Only enrolled devices are served: every call is signed with the device's
Ed25519 key (common/wire/request_auth.py) and checked against the cloud's
device registry, which is re-read when it changes, so an enrolment or a
revocation counts from the next call. A revoked device's open watch streams
are ended within `poll_s`.

    caller threads ──ModelServer.start/stop──► event loop thread (grpc.aio server)
                                                 ├ one coroutine per open call
                                                 ├ the follower: newest version, revocations (every poll_s)
                                                 └ file reads ──► `workers` reader threads

A watcher is a suspended coroutine waiting on its own event, not a thread:
10,000 idle watchers cost memory, not threads, and downloads keep being
served beside them.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from edgefed.cloud.publishing.base_registry import BaseRegistry, UnknownBaseError, bases_of
from edgefed.cloud.publishing.registry import ModelRegistry, UnknownModelError
from edgefed.common.config import EdgefedConfig
from edgefed.common.keys import REGISTRY, DeviceRegistry, KeyMaterialError, public_hex
from edgefed.common.wire.protos import model_service_pb2 as pb
from edgefed.common.wire.protos import model_service_pb2_grpc as pb_grpc
from edgefed.common.wire.request_auth import RequestAuthError, SignedRequest, model_service_method

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
DEFAULT_WORKERS = 4  # threads reading model files; watchers need none
MAX_CLOCK_SKEW_S = 120.0  # how far a device's request time may be from the service's clock
MAX_WATCHES_PER_DEVICE = 4  # a device opening more ends its oldest watch
MAX_STREAMS_PER_CONNECTION = 2000  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: a device needs two or three
# Calls that arrived but have no coroutine yet. gRPC's default (1000, cancelling more and more calls
# up to 3000) would cancel most of a fleet reconnecting at once, after a restart of the service.
MAX_PENDING_CALLS = 20_000
SERVER_OPTIONS = [
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
    # Ping idle connections: a device that vanished without closing its watch is dropped within ~80 s.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.so_reuseport", 0),  # a second service on the same port fails to start instead of sharing it
]

WATCH = model_service_method("WatchModels")
GET_MANIFEST = model_service_method("GetManifest")
DOWNLOAD = model_service_method("Download")
GET_BASE_MANIFEST = model_service_method("GetBaseManifest")
DOWNLOAD_BASE = model_service_method("DownloadBase")

T = TypeVar("T")


class DeviceNotEnrolled(LookupError):
    """The device a request names is not in the device registry (never enrolled, or revoked)."""


def enrolled_devices(cfg: EdgefedConfig) -> DeviceRegistry:
    """The cloud's device registry (`<keys>/cloud/registry.json`): who may use the model service."""
    return DeviceRegistry(Path(cfg.keys_root) / "cloud" / REGISTRY)


class DeviceGate:
    """Admits a call if it is signed by an enrolled device, fresh, and not a replay.

    Used from the service's event loop only."""

    def __init__(self, devices: DeviceRegistry, max_skew_s: float = MAX_CLOCK_SKEW_S) -> None:
        self.devices = devices
        self.max_skew_s = max_skew_s
        self._nonces: set[str] = set()
        self._expiry: list[tuple[float, str]] = []  # heap: when a nonce could no longer be replayed anyway
        self._stamp: tuple[int, int, int] | None = None

    def admit(self, method: str, request: Message, metadata: object) -> tuple[str, str]:
        """(device id, its registered public key in hex); RequestAuthError or DeviceNotEnrolled otherwise."""
        signed = SignedRequest.from_metadata(metadata)
        key = self.devices.get(signed.device_id)
        if key is None:
            raise DeviceNotEnrolled(f"device {signed.device_id!r} is not enrolled (or was revoked)")
        now = time.time()
        signed.verify(method, request, key, now, self.max_skew_s)
        while self._expiry and self._expiry[0][0] < now:
            self._nonces.discard(heapq.heappop(self._expiry)[1])
        if signed.nonce in self._nonces:
            raise RequestAuthError("replayed request: this nonce was already used")
        self._nonces.add(signed.nonce)
        heapq.heappush(self._expiry, (signed.time_ms / 1000 + self.max_skew_s, signed.nonce))
        return signed.device_id, public_hex(key)

    def enrolled_key(self, device_id: str) -> str | None:
        key = self.devices.get(device_id)
        return public_hex(key) if key is not None else None

    def registry_changed(self) -> bool:
        """Whether the registry file changed since the last call (always True for an in-memory registry)."""
        if self.devices.path is None:
            return True
        try:
            st = self.devices.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        changed, self._stamp = stamp != self._stamp, stamp
        return changed


@dataclass(eq=False)
class _Watch:
    device_id: str
    key: str  # the public key the watch was opened with: a re-enrolled device's old watches end too
    have: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ended: tuple[grpc.StatusCode, str] | None = None

    def end(self, code: grpc.StatusCode, why: str) -> None:
        self.ended = (code, why)
        self.wake.set()


class ModelServicer(pb_grpc.ModelServiceServicer):
    """The calls, as coroutines on the service's event loop; file reads go to `reader`."""

    def __init__(self, registry: ModelRegistry, gate: DeviceGate, reader: ThreadPoolExecutor,
                 chunk_bytes: int = CHUNK_BYTES, poll_s: float = 1.0,
                 max_watches_per_device: int = MAX_WATCHES_PER_DEVICE, bases: BaseRegistry | None = None) -> None:
        """`bases`: the published bases (default: those beside `registry`, `bases_of(registry)`)."""
        self.registry = registry
        self.bases = bases if bases is not None else bases_of(registry)
        self.gate = gate
        self.reader = reader
        self.chunk_bytes = chunk_bytes
        self.poll_s = poll_s  # how often the newest version and the device registry are looked at
        self.max_watches_per_device = max_watches_per_device
        self._watches: dict[str, list[_Watch]] = {}
        self._latest = (0, "")  # (newest version, sha256 of its manifest)
        self._closing = False
        self._wake: asyncio.Event | None = None
        self._follower: asyncio.Task | None = None

    # --- lifecycle (on the event loop) ---------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self.gate.registry_changed()
        await self._refresh_latest()
        self._follower = asyncio.create_task(self._follow(), name="model-service-follower")

    async def close(self) -> None:
        """End every watch (they return normally: the service is going away) and the follower."""
        self._closing = True
        for watches in self._watches.values():
            for watch in watches:
                watch.wake.set()
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)

    def wake(self) -> None:
        """Look at the registry now (a publish in this process); call on the event loop."""
        if self._wake is not None:
            self._wake.set()

    @property
    def watchers(self) -> int:
        return sum(len(w) for w in self._watches.values())

    # --- the calls ------------------------------------------------------------------------
    async def WatchModels(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext):  # noqa: N802 - gRPC names
        device_id, key = await self._admit(WATCH, request, context)
        watch = self._open_watch(device_id, key, request.have_version)
        log.debug("watch from %s (has v%d)", device_id, request.have_version)
        try:
            while True:
                if watch.ended is not None:
                    await context.abort(*watch.ended)
                if self._closing:
                    return
                version, digest = self._latest
                if version > watch.have:
                    yield pb.ModelNotice(version=version, manifest_sha256=digest)
                    watch.have = version
                    continue
                await watch.wake.wait()
                watch.wake.clear()
        finally:  # also when the device hangs up: grpc cancels this coroutine
            self._close_watch(watch)

    async def GetManifest(self, request: pb.ManifestRequest, context: grpc.aio.ServicerContext) -> pb.ManifestReply:  # noqa: N802
        await self._admit(GET_MANIFEST, request, context)
        version = request.version or await self._read(self.registry.latest_version)
        try:
            data = await self._read(self.registry.manifest_bytes, version)
        except UnknownModelError as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        return pb.ManifestReply(version=version, signed_manifest=data)

    async def Download(self, request: pb.DownloadRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        await self._admit(DOWNLOAD, request, context)
        async for chunk in self._stream_file(context, f"version {request.version}", request.offset,
                                             self.registry.file_path, request.version, request.file):
            yield chunk

    async def GetBaseManifest(self, request: pb.BaseManifestRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> pb.BaseManifestReply:
        await self._admit(GET_BASE_MANIFEST, request, context)
        try:
            data = await self._read(self.bases.manifest_bytes, request.fingerprint)
        except UnknownBaseError as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        return pb.BaseManifestReply(fingerprint=request.fingerprint, signed_manifest=data)

    async def DownloadBase(self, request: pb.BaseDownloadRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        await self._admit(DOWNLOAD_BASE, request, context)
        async for chunk in self._stream_file(context, f"base {request.fingerprint[:12]}", request.offset,
                                             self.bases.file_path, request.fingerprint, request.file):
            yield chunk

    # --- internals ------------------------------------------------------------------------
    async def _stream_file(self, context: grpc.aio.ServicerContext, owner: str, offset: int,
                           locate: Callable[[Any, str], Path], key: Any, name: str) -> AsyncIterator[pb.Chunk]:
        """Chunks of the file `locate(key, name)` from `offset`; NOT_FOUND for what the registry does not hold.

        `owner` ("version 3", "base 1a2b...") names the file's model or base in what the device is told."""
        try:
            path = await self._read(locate, key, name)
            fd = await self._read(os.open, path, os.O_RDONLY)
        except (UnknownModelError, UnknownBaseError) as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        except OSError as err:  # pruned meanwhile, or unreadable: the details (with the path) stay in our log
            log.warning("download of %s %r failed: %s", owner, name, err)
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{owner} has no readable file {name!r}")
        try:
            total = os.fstat(fd).st_size
            if not 0 <= offset <= total:
                await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {offset} outside 0..{total}")
            while data := await self._read(os.pread, fd, self.chunk_bytes, offset):
                yield pb.Chunk(offset=offset, data=data, total_size=total)
                offset += len(data)
        finally:
            os.close(fd)

    async def _admit(self, method: str, request: Message, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        try:
            return self.gate.admit(method, request, context.invocation_metadata())
        except DeviceNotEnrolled as err:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        except RequestAuthError as err:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
        except KeyMaterialError as err:  # names the registry file: ours to read, not the caller's
            log.error("device registry unreadable: %s", err)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the device registry cannot be read; try again later")

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.reader, fn, *args)

    def _open_watch(self, device_id: str, key: str, have: int) -> _Watch:
        watch = _Watch(device_id, key, have)
        watches = self._watches.setdefault(device_id, [])
        while len(watches) >= self.max_watches_per_device:
            watches.pop(0).end(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"more than {self.max_watches_per_device} watches of device {device_id}: the oldest ends")
        watches.append(watch)
        return watch

    def _close_watch(self, watch: _Watch) -> None:
        watches = self._watches.get(watch.device_id, [])
        if watch in watches:
            watches.remove(watch)
        if not watches:
            self._watches.pop(watch.device_id, None)

    async def _follow(self) -> None:
        """Every poll_s (or at once after a publish here): push a new version, end revoked devices' watches."""
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._refresh_latest()
                self._end_revoked()
            except (OSError, KeyMaterialError) as err:  # a full disk, a half-edited registry: try again next round
                log.warning("model service: %s", err)
            except Exception:  # noqa: BLE001 - pushes and revocations must outlive one bad round
                log.exception("model service: following the registries failed; trying again")

    async def _refresh_latest(self) -> None:
        latest = await self._read(self.registry.latest_version)
        if latest == self._latest[0]:
            return
        try:
            digest = await self._read(self.registry.manifest_digest, latest) if latest else ""
        except UnknownModelError:  # pruned or replaced meanwhile: next round
            return
        self._latest = (latest, digest)
        for watches in self._watches.values():
            for watch in watches:
                if latest > watch.have:
                    watch.wake.set()

    def _end_revoked(self) -> None:
        if not self.gate.registry_changed():
            return
        for device_id, watches in list(self._watches.items()):
            key = self.gate.enrolled_key(device_id)
            for watch in list(watches):
                if watch.key != key:
                    why = "was revoked" if key is None else "was enrolled again with another key"
                    watch.end(grpc.StatusCode.PERMISSION_DENIED, f"device {device_id!r} {why}")


class ModelServer:
    """The service on a grpc.aio server, its event loop in a thread of its own; `port` is the bound port (useful with port 0).

    Callers stay synchronous: the constructor binds, `start` serves, `stop` ends every call and the loop."""

    def __init__(self, registry: ModelRegistry, address: str = "127.0.0.1:0", tls_dir: str | Path | None = None,
                 workers: int = DEFAULT_WORKERS, chunk_bytes: int = CHUNK_BYTES, *, devices: DeviceRegistry,
                 max_clock_skew_s: float = MAX_CLOCK_SKEW_S, poll_s: float = 1.0,
                 max_watches_per_device: int = MAX_WATCHES_PER_DEVICE, bases: BaseRegistry | None = None) -> None:
        """`devices`: who may call (`enrolled_devices(cfg)`); `workers`: threads reading model and base files;
        `bases`: the published bases it serves (default: `bases_of(registry)`, `<models>/bases/`)."""
        self.registry = registry
        self.host = address.rsplit(":", 1)[0]
        self.tls = bool(tls_dir)
        credentials = server_credentials(tls_dir) if tls_dir else None
        self._reader = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model-service-read")
        self.servicer = ModelServicer(registry, DeviceGate(devices, max_clock_skew_s), self._reader, chunk_bytes,
                                      poll_s, max_watches_per_device, bases)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="model-service", daemon=True)
        self._thread.start()
        self._started = self._stopped = False
        try:
            self.port = self._call(self._bind(address, credentials))
        except BaseException:
            self._end_loop()
            raise

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> ModelServer:
        self._call(self._start())
        self._started = True
        self.registry.add_listener(self._on_publish)
        log.info("model service on %s (%s)", self.address, "TLS" if self.tls else "plaintext")
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.registry.remove_listener(self._on_publish)
        try:
            self._call(self._stop(grace))
        finally:
            self._end_loop()

    # --- on the event loop --------------------------------------------------------------
    async def _bind(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        self._server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_ModelServiceServicer_to_server(self.servicer, self._server)
        try:
            port = (self._server.add_secure_port(address, credentials) if credentials is not None
                    else self._server.add_insecure_port(address))
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"model service: cannot bind {address}")
        return port

    async def _start(self) -> None:
        await self.servicer.start()
        await self._server.start()

    async def _stop(self, grace: float) -> None:
        await self.servicer.close()
        await self._server.stop(grace)

    # --- internals ------------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _on_publish(self) -> None:
        self._loop.call_soon_threadsafe(self.servicer.wake)

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._reader.shutdown(wait=False, cancel_futures=True)


def server_credentials(tls_dir: str | Path) -> grpc.ServerCredentials:
    """TLS from `<tls_dir>/server.crt` and `server.key` (PEM)."""
    folder = Path(tls_dir)
    try:
        key, cert = (folder / "server.key").read_bytes(), (folder / "server.crt").read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model service TLS: {err.filename} missing") from None
    return grpc.ssl_server_credentials([(key, cert)])
