"""Keeping a device's model current: subscribe, download with resume, hand to the runtime.

    watch ──notice v──► GetManifest(v) ─► verify: signed, version v, this federation,
    newer than what is installed ─► Download each file into
    <model-dir>/.incoming/v<v>/NAME.part (resuming from its size) ─► rename
    ─► ModelRuntime.install (signature, hashes, load, smoke test, swap)

Nothing is downloaded before the manifest passed those checks, nothing is
written under a name the manifest may not use (model_manifest.FILE_NAME), and
a download never grows past its manifest entry's size: a service that sends
more is cut off and the file refused. A cut download leaves its .part file;
the next attempt asks for the bytes after it. A file that still fails its
hash is deleted and fetched whole once more before the version is given up.

Every call is signed with the device key (common/wire/request_auth.py); a
device the cloud does not know (not enrolled, revoked) gets nothing.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import grpc

from edgefed.common.wire.model_manifest import (
    MANIFEST_FILE,
    FileHashMismatch,
    ModelFile,
    ModelManifest,
    ModelVerificationError,
    check_file_name,
    verify_manifest,
)
from edgefed.common.wire.protos import model_service_pb2 as pb
from edgefed.common.wire.protos import model_service_pb2_grpc as pb_grpc
from edgefed.common.wire.request_auth import DeviceSigner, model_service_method
from edgefed.edge.models.runtime import LoadedModel, ModelRejected, ModelRuntime
from edgefed.edge.models.transfer import (
    DownloadRefused,
    ModelServiceUnavailable,
    channel_for,
    download_resumable,
    exclusive_lock,
)

log = logging.getLogger(__name__)

# The service's answers to a device it does not admit: not enrolled, revoked, or its clock is off.
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class ModelUpdater:
    def __init__(self, runtime: ModelRuntime, address: str, signer: DeviceSigner,
                 ca_cert: str | Path | None = None, timeout_s: float = 60.0) -> None:
        """`signer`: the device's enrolled id and key, which sign every call to the service."""
        self.runtime = runtime
        self.signer = signer
        self.timeout_s = timeout_s
        self._channel = channel_for(address, ca_cert)
        self._stub = pb_grpc.ModelServiceStub(self._channel)
        self.incoming = runtime.model_dir / ".incoming"

    @property
    def device_id(self) -> str:
        return self.signer.device_id

    def close(self) -> None:
        self._channel.close()

    # --- one version ------------------------------------------------------------------
    def sync(self, version: int = 0) -> LoadedModel | None:
        """Install `version` (0: the newest) unless it is already running; None if nothing is published.

        On a device several processes may sync at once (the agent's watcher and a
        ClientApp told of a new model): one at a time, each seeing the other's install."""
        with exclusive_lock(self.runtime.model_dir / ".lock"):
            self.runtime.refresh()
            return self._sync(version)

    def _sync(self, version: int) -> LoadedModel | None:
        request = pb.ManifestRequest(version=version)
        try:
            reply = self._stub.GetManifest(request, timeout=self.timeout_s, metadata=self._signed("GetManifest", request))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND and version == 0:
                return None
            raise ModelServiceUnavailable(f"GetManifest(v{version}): {err.code().name} {err.details()}") from None
        try:  # check the manifest before downloading anything it names
            manifest = verify_manifest(reply.signed_manifest, self.runtime.trusted_key)
        except ModelVerificationError as err:
            raise ModelRejected(f"refused manifest of v{reply.version}: {err}") from err
        if version and reply.version != version:
            raise ModelRejected(f"asked for v{version}, the service answered v{reply.version}")
        if manifest.version != reply.version:
            raise ModelRejected(f"the service answered v{reply.version} with the signed manifest of v{manifest.version}")
        active = self.runtime.active
        if active is not None and (active.version, active.manifest.federation) == (manifest.version, manifest.federation):
            return active
        self.runtime.check_installable(manifest)
        staged = self.incoming / f"v{manifest.version:06d}"
        staged.mkdir(parents=True, exist_ok=True)
        (staged / MANIFEST_FILE).write_bytes(reply.signed_manifest)
        for entry in manifest.files:
            self._fetch_verified(manifest, entry, staged)
        return self.runtime.install(staged)  # moves staged into place (or deletes it)

    def _fetch_verified(self, manifest: ModelManifest, entry: ModelFile, staged: Path) -> None:
        for attempt in (1, 2):
            try:
                self.download(manifest.version, entry, staged / check_file_name(entry.name))
                manifest.check_file(staged, entry.name)
                return
            except (FileHashMismatch, ModelRejected) as err:
                (staged / entry.name).unlink(missing_ok=True)
                if attempt == 2 or isinstance(err, ModelRejected):
                    shutil.rmtree(staged, ignore_errors=True)
                    raise ModelRejected(f"v{manifest.version}: {err}") from err
                log.warning("v%d %s failed its hash; fetching it again", manifest.version, entry.name)

    def download(self, version: int, entry: ModelFile, dest: Path) -> Path:
        """Stream a file into dest, resuming from `dest.part`; returns dest when complete.

        The file may not grow past `entry.size`: a stream that would is cut,
        its .part deleted, and ModelRejected raised."""
        def open_stream(offset: int):  # noqa: ANN202 - a grpc server stream
            request = pb.DownloadRequest(version=version, file=entry.name, offset=offset)
            return self._stub.Download(request, timeout=self.timeout_s, metadata=self._signed("Download", request))

        try:
            return download_resumable(open_stream, entry, dest, f"v{version} {entry.name}")
        except DownloadRefused as err:
            raise ModelRejected(str(err)) from None

    # --- push ----------------------------------------------------------------------------
    def watch(self, stop: threading.Event, retry_s: float = 2.0) -> None:
        """Follow WatchModels until `stop`: install each pushed version; reconnect after failures."""
        current: list[grpc.Future] = []  # the open call, for the one thread that cancels it on stop
        canceller = threading.Thread(target=lambda: (stop.wait(), [c.cancel() for c in list(current)]), daemon=True)
        canceller.start()
        while not stop.is_set():
            try:
                request = pb.WatchRequest(device_id=self.device_id, have_version=self.runtime.newest_installed)
                call = self._stub.WatchModels(request, metadata=self._signed("WatchModels", request))
                current[:] = [call]
                if stop.is_set():
                    call.cancel()
                for notice in call:
                    if notice.version > self.runtime.newest_installed:
                        self._try_sync(notice.version)
            except grpc.RpcError as err:
                if stop.is_set() or err.code() == grpc.StatusCode.CANCELLED:
                    continue
                if err.code() in _REFUSALS:
                    log.error("the model service refused device %s (%s: %s): is it enrolled? retrying in %.0f s",
                              self.device_id, err.code().name, err.details(), retry_s)
                else:
                    log.info("model watch lost (%s); retrying in %.0f s", err.code().name, retry_s)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad push
                log.exception("model watch failed; retrying in %.0f s", retry_s)
            stop.wait(retry_s)

    def _try_sync(self, version: int) -> None:
        try:
            self.sync(version)
        except (ModelRejected, ModelServiceUnavailable) as err:
            log.warning("model v%d not installed: %s", version, err)

    def _signed(self, method: str, request: object) -> tuple[tuple[str, str], ...]:
        return self.signer.metadata(model_service_method(method), request)
