"""The gRPC model distribution service (common/wire/protos/model_service.proto).

WatchModels is the push: each subscribed device holds one server stream and
gets a notice the moment a version is published. Download streams a file
from any offset, so a device that lost its link resumes where it stopped.
The service only serves what the registry holds; devices trust the signed
manifest, not the channel (TLS is for privacy and for the fleet's own
hygiene).
"""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc

from edgefed.cloud.publishing.registry import ModelRegistry, UnknownModelError
from edgefed.common.wire.protos import model_service_pb2 as pb
from edgefed.common.wire.protos import model_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
# Watch streams hold a thread each (sync gRPC server): size the pool for the
# fleet that watches at once, plus downloads.
DEFAULT_WORKERS = 128


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry, chunk_bytes: int = CHUNK_BYTES, poll_s: float = 1.0) -> None:
        self.registry = registry
        self.chunk_bytes = chunk_bytes
        self.poll_s = poll_s  # how often an idle watch checks that its device is still there

    def WatchModels(self, request: pb.WatchRequest, context: grpc.ServicerContext):  # noqa: N802 - gRPC names
        have = request.have_version
        log.debug("watch from %s (has v%d)", request.device_id or "?", have)
        while context.is_active() and not self.registry.closed:
            version = self.registry.wait_for_newer(have, timeout=self.poll_s)
            if version:
                yield pb.ModelNotice(version=version, manifest_sha256=self.registry.manifest_digest(version))
                have = version

    def GetManifest(self, request: pb.ManifestRequest, context: grpc.ServicerContext) -> pb.ManifestReply:  # noqa: N802
        version = request.version or self.registry.latest_version()
        try:
            return pb.ManifestReply(version=version, signed_manifest=self.registry.manifest_bytes(version))
        except UnknownModelError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))

    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext):  # noqa: N802
        try:
            path = self.registry.file_path(request.version, request.file)
        except UnknownModelError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        total = path.stat().st_size
        if not 0 <= request.offset <= total:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside 0..{total}")
        with open(path, "rb") as fh:
            fh.seek(request.offset)
            offset = request.offset
            while context.is_active() and (data := fh.read(self.chunk_bytes)):
                yield pb.Chunk(offset=offset, data=data, total_size=total)
                offset += len(data)


class ModelServer:
    """The service on a gRPC server; `port` is the bound port (useful with port 0)."""

    def __init__(self, registry: ModelRegistry, address: str = "127.0.0.1:0", tls_dir: str | Path | None = None,
                 workers: int = DEFAULT_WORKERS, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.registry = registry
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model-service"))
        pb_grpc.add_ModelServiceServicer_to_server(ModelServicer(registry, chunk_bytes), self._server)
        if tls_dir:
            self.port = self._server.add_secure_port(address, server_credentials(tls_dir))
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"model service: cannot bind {address}")
        self.host = address.rsplit(":", 1)[0]
        self.tls = bool(tls_dir)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> ModelServer:
        self._server.start()
        log.info("model service on %s (%s)", self.address, "TLS" if self.tls else "plaintext")
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.registry.close()
        self._server.stop(grace).wait()


def server_credentials(tls_dir: str | Path) -> grpc.ServerCredentials:
    """TLS from `<tls_dir>/server.crt` and `server.key` (PEM)."""
    folder = Path(tls_dir)
    try:
        key, cert = (folder / "server.key").read_bytes(), (folder / "server.crt").read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model service TLS: {err.filename} missing") from None
    return grpc.ssl_server_credentials([(key, cert)])
