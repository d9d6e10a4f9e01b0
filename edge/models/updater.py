"""Keeping a device's model current: subscribe, download with resume, hand to the runtime.

    watch ──notice v──► GetManifest(v) ─► Download each file into
    <model-dir>/.incoming/v<v>/NAME.part (resuming from its size) ─► rename
    ─► ModelRuntime.install (signature, hashes, load, smoke test, swap)

A cut download leaves its .part file; the next attempt asks for the bytes
after it. A file that still fails its hash is deleted and fetched whole once
more before the version is given up.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc

from edgefed.common.wire.model_manifest import (
    MANIFEST_FILE,
    FileHashMismatch,
    ModelManifest,
    ModelVerificationError,
    verify_manifest,
)
from edgefed.common.wire.protos import model_service_pb2 as pb
from edgefed.common.wire.protos import model_service_pb2_grpc as pb_grpc
from edgefed.edge.models.runtime import LoadedModel, ModelRejected, ModelRuntime

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ModelServiceUnavailable(ConnectionError):
    """The model service could not be reached or broke off; what was downloaded is kept."""


def channel_for(address: str, ca_cert: str | Path | None = None) -> grpc.Channel:
    """Plaintext, or TLS against the fleet's CA certificate when one is given."""
    if ca_cert:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(ca_cert).read_bytes())
        return grpc.secure_channel(address, creds)
    return grpc.insecure_channel(address)


class ModelUpdater:
    def __init__(self, runtime: ModelRuntime, address: str, device_id: str = "",
                 ca_cert: str | Path | None = None, timeout_s: float = 60.0) -> None:
        self.runtime = runtime
        self.device_id = device_id
        self.timeout_s = timeout_s
        self._channel = channel_for(address, ca_cert)
        self._stub = pb_grpc.ModelServiceStub(self._channel)
        self.incoming = runtime.model_dir / ".incoming"

    def close(self) -> None:
        self._channel.close()

    # --- one version ------------------------------------------------------------------
    def sync(self, version: int = 0) -> LoadedModel | None:
        """Install `version` (0: the newest) unless it is already running; None if nothing is published.

        On a device several processes may sync at once (the agent's watcher and a
        ClientApp told of a new model): one at a time, each seeing the other's install."""
        with _exclusive(self.runtime.model_dir / ".lock"):
            self.runtime.refresh()
            return self._sync(version)

    def _sync(self, version: int) -> LoadedModel | None:
        try:
            reply = self._stub.GetManifest(pb.ManifestRequest(version=version), timeout=self.timeout_s)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND and version == 0:
                return None
            raise ModelServiceUnavailable(f"GetManifest(v{version}): {err.code().name} {err.details()}") from None
        if reply.version == self.runtime.version:
            return self.runtime.active
        try:  # check the signature before downloading anything it names
            manifest = verify_manifest(reply.signed_manifest, self.runtime.trusted_key)
        except ModelVerificationError as err:
            raise ModelRejected(f"refused manifest of v{reply.version}: {err}") from err
        staged = self.incoming / f"v{manifest.version:06d}"
        staged.mkdir(parents=True, exist_ok=True)
        (staged / MANIFEST_FILE).write_bytes(reply.signed_manifest)
        for entry in manifest.files:
            self._fetch_verified(manifest, entry.name, staged)
        return self.runtime.install(staged)  # moves staged into place (or deletes it)

    def _fetch_verified(self, manifest: ModelManifest, name: str, staged: Path) -> None:
        for attempt in (1, 2):
            self.download(manifest.version, name, staged / name)
            try:
                manifest.check_file(staged, name)
                return
            except FileHashMismatch as err:
                (staged / name).unlink(missing_ok=True)
                if attempt == 2:
                    shutil.rmtree(staged, ignore_errors=True)
                    raise ModelRejected(f"v{manifest.version}: {err}") from err
                log.warning("v%d %s failed its hash; fetching it again", manifest.version, name)

    def download(self, version: int, name: str, dest: Path) -> Path:
        """Stream a file into dest, resuming from `dest.part`; returns dest when complete."""
        part = dest.with_name(dest.name + ".part")
        if dest.exists():
            return dest
        offset = part.stat().st_size if part.exists() else 0
        total = None
        try:
            with open(part, "ab") as fh:
                stream = self._stub.Download(pb.DownloadRequest(version=version, file=name, offset=offset),
                                             timeout=self.timeout_s)
                for chunk in stream:
                    if chunk.offset != offset:
                        raise ModelServiceUnavailable(f"{name}: chunk at {chunk.offset}, expected {offset}")
                    fh.write(chunk.data)
                    offset += len(chunk.data)
                    total = chunk.total_size
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.OUT_OF_RANGE:  # a stale .part longer than the file
                part.unlink(missing_ok=True)
            raise ModelServiceUnavailable(f"download of v{version} {name} stopped at byte {offset}: "
                                          f"{err.code().name} {err.details()}") from None
        if total is not None and offset < total:
            raise ModelServiceUnavailable(f"download of v{version} {name} ended at {offset} of {total} bytes")
        part.rename(dest)
        return dest

    # --- push ----------------------------------------------------------------------------
    def watch(self, stop: threading.Event, retry_s: float = 2.0) -> None:
        """Follow WatchModels until `stop`: install each pushed version; reconnect after failures."""
        current: list[grpc.Future] = []  # the open call, for the one thread that cancels it on stop
        canceller = threading.Thread(target=lambda: (stop.wait(), [c.cancel() for c in list(current)]), daemon=True)
        canceller.start()
        while not stop.is_set():
            try:
                call = self._stub.WatchModels(pb.WatchRequest(device_id=self.device_id,
                                                              have_version=self.runtime.version))
                current[:] = [call]
                if stop.is_set():
                    call.cancel()
                for notice in call:
                    if notice.version > self.runtime.version:
                        self._try_sync(notice.version)
            except grpc.RpcError as err:
                if stop.is_set() or err.code() == grpc.StatusCode.CANCELLED:
                    continue
                log.info("model watch lost (%s); retrying in %.0f s", err.code().name, retry_s)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad push
                log.exception("model watch failed; retrying in %.0f s", retry_s)
            stop.wait(retry_s)

    def _try_sync(self, version: int) -> None:
        try:
            self.sync(version)
        except (ModelRejected, ModelServiceUnavailable) as err:
            log.warning("model v%d not installed: %s", version, err)

