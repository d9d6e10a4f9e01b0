"""The frozen base on a device: fetched by its fingerprint, verified, installed, checked again on every use.

    ensure_base(fp) ─► <device>/bases/<fp>/ there? ─► verify_installed_base: manifest signed by the
                     │   pinned cloud key and of fp, every file's size and sha256, nothing unlisted ─► the folder
                     │   refused (BaseIntegrityError: a file changed, went missing or was added)
                     │   ─► logged, removed, fetched again ▼
                     └ GetBaseManifest(fp) ─► verify: signed by the pinned key, fingerprint fp, strict names
                       ─► DownloadBase each file into bases/.incoming/<fp>/<part>/NAME.part (a cut download
                          resumes from its .part; a stream longer than the signed size is cut and refused)
                       ─► size + sha256 of every file, each part's checkpoint fingerprint recomputed
                       ─► one rename to bases/<fp>/ ─► keep the `keep` most recently used bases, remove older

    <device>/bases/<fp>/manifest.json, video/{config.json, model.safetensors, ...}, audio/...
                  /recent.json      fingerprints, most recently used first
                  /.incoming/<fp>/  a download in progress

The base is trusted only if the cloud key the device was enrolled with signed it; the
fingerprint the device is told (the training instruction's `base-fingerprint`) names what
it must run, and a service answering with another base is refused. Because every use
re-reads every file, `ensure_base` is for when a device starts or is told a fingerprint,
not for every batch. Installs are not fsynced: a base cut by a power loss fails that
check and is fetched again.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefed.common.atomic import write_json_atomically
from edgefed.common.encoders import TINY, EncoderCheckpointError, base_fingerprint_of_checkpoint
from edgefed.common.wire.base_manifest import (
    FINGERPRINT,
    BaseManifest,
    check_fingerprint,
    verify_base_manifest,
)
from edgefed.common.wire.model_manifest import (
    MANIFEST_FILE,
    FileHashMismatch,
    InvalidFileName,
    ModelFile,
    ModelVerificationError,
    check_file_entry,
)
from edgefed.common.wire.protos import model_service_pb2 as pb
from edgefed.common.wire.protos import model_service_pb2_grpc as pb_grpc
from edgefed.common.wire.request_auth import DeviceSigner, model_service_method
from edgefed.edge.models.transfer import (
    DownloadRefused,
    ModelServiceUnavailable,
    channel_for,
    download_resumable,
    exclusive_lock,
)

log = logging.getLogger(__name__)

BASES_FOLDER = "bases"
RECENT_FILE = "recent.json"
INCOMING = ".incoming"
DEFAULT_KEEP = 2


class BaseRejected(RuntimeError):
    """A base the service sent failed verification (signature, fingerprint, names, sizes, hashes); nothing was installed."""


class BaseIntegrityError(BaseRejected):
    """An installed base no longer matches its signed manifest: a file changed, went missing or was added."""


def verify_installed_base(folder: Path, trusted: Ed25519PublicKey) -> BaseManifest:
    """The manifest of the base installed in `folder` (named by its fingerprint), after checking that it is
    signed by the pinned cloud key, is of that fingerprint, and that every file has its size and sha256 and
    nothing else is there. Reads every file; BaseIntegrityError otherwise."""
    fingerprint = folder.name
    try:
        data = (folder / MANIFEST_FILE).read_bytes()
    except OSError as err:
        raise BaseIntegrityError(f"installed base {fingerprint[:12]}: {MANIFEST_FILE} unreadable ({err.strerror})") from None
    try:
        manifest = verify_base_manifest(data, trusted)
        if manifest.fingerprint != fingerprint:
            raise ModelVerificationError(f"its manifest is that of base {manifest.fingerprint[:12]}")
        manifest.check_files(folder)
    except ModelVerificationError as err:
        raise BaseIntegrityError(f"installed base {fingerprint[:12]} refused: {err}") from err
    return manifest


class BaseFetcher:
    def __init__(self, device_dir: str | Path, address: str, signer: DeviceSigner, trusted_key: Ed25519PublicKey,
                 ca_cert: str | Path | None = None, timeout_s: float = 60.0, keep: int = DEFAULT_KEEP) -> None:
        """Bases go under `<device_dir>/bases/`; `address`: the model service; `signer`: the device's enrolled
        id and key (signs every call); `trusted_key`: the pinned cloud key; `keep`: bases kept (>= 1)."""
        if keep < 1:
            raise ValueError(f"keep = {keep}: a device keeps at least the base it runs")
        self.root = Path(device_dir) / BASES_FOLDER
        self.signer = signer
        self.trusted_key = trusted_key
        self.timeout_s = timeout_s
        self.keep = keep
        self._channel = channel_for(address, ca_cert)
        self._stub = pb_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BaseFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the one call -------------------------------------------------------------------
    def ensure_base(self, fingerprint: str) -> Path:
        """The folder of base `fingerprint` (`video/`, `audio/` inside; a built-in encoder's part has none),
        verified; installed from the service first if it is not here or fails its check.

        Raises BaseRejected (what the service sent did not verify; nothing installed) or
        ModelServiceUnavailable (not reached, refused this device, or cut: a partial file is kept)."""
        check_fingerprint(fingerprint)
        self.root.mkdir(parents=True, exist_ok=True)
        folder = self.root / fingerprint
        with exclusive_lock(self.root / ".lock"):  # the agent and a ClientApp may ask at once
            if folder.exists():
                try:
                    verify_installed_base(folder, self.trusted_key)
                except BaseIntegrityError as err:
                    log.error("%s; removing it and fetching it again", err)
                    shutil.rmtree(folder)
                else:
                    self._keep_recent(fingerprint)
                    return folder
            self._fetch(fingerprint, folder)
            self._keep_recent(fingerprint)
            return folder

    def installed(self) -> list[str]:
        """Fingerprints of the installed bases, most recently used first (not verified: see ensure_base)."""
        return [f for f in self._recent() if (self.root / f).is_dir()]

    # --- internals ------------------------------------------------------------------------
    def _fetch(self, fingerprint: str, folder: Path) -> None:
        request = pb.BaseManifestRequest(fingerprint=fingerprint)
        try:
            reply = self._stub.GetBaseManifest(request, timeout=self.timeout_s,
                                               metadata=self._signed("GetBaseManifest", request))
        except grpc.RpcError as err:
            raise ModelServiceUnavailable(f"GetBaseManifest({fingerprint[:12]}): {err.code().name} {err.details()}") from None
        try:  # check the manifest before downloading anything it names
            manifest = verify_base_manifest(reply.signed_manifest, self.trusted_key)
        except ModelVerificationError as err:
            raise BaseRejected(f"refused the manifest of base {fingerprint[:12]}: {err}") from err
        if manifest.fingerprint != fingerprint:
            raise BaseRejected(f"asked for base {fingerprint[:12]}, the service answered with the signed manifest "
                               f"of base {manifest.fingerprint[:12]}")
        staged = self.root / INCOMING / fingerprint
        staged.mkdir(parents=True, exist_ok=True)
        for entry in manifest.files:
            self._fetch_verified(manifest, entry, staged)
        try:
            self._check_parts(manifest, staged)
            (staged / MANIFEST_FILE).write_bytes(reply.signed_manifest)
            verify_installed_base(staged, self.trusted_key)  # the check every later use makes
        except BaseRejected:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        staged.rename(folder)
        log.info("installed base %s (%d files)", fingerprint[:12], len(manifest.files))

    def _fetch_verified(self, manifest: BaseManifest, entry: ModelFile, staged: Path) -> None:
        try:
            dest = manifest.path_of(staged, entry.name)
        except InvalidFileName as err:
            shutil.rmtree(staged, ignore_errors=True)
            raise BaseRejected(f"base {manifest.fingerprint[:12]}: {err}") from err
        dest.parent.mkdir(parents=True, exist_ok=True)
        what = f"base {manifest.fingerprint[:12]} {entry.name}"
        for attempt in (1, 2):
            try:
                download_resumable(lambda offset: self._open_download(manifest.fingerprint, entry, offset), entry, dest, what)
                check_file_entry(dest, entry)
                return
            except (FileHashMismatch, DownloadRefused) as err:
                dest.unlink(missing_ok=True)
                if attempt == 2 or isinstance(err, DownloadRefused):
                    shutil.rmtree(staged, ignore_errors=True)
                    raise BaseRejected(f"base {manifest.fingerprint[:12]}: {err}") from err
                log.warning("%s failed its hash; fetching it again", what)

    def _open_download(self, fingerprint: str, entry: ModelFile, offset: int):  # noqa: ANN202 - a grpc server stream
        request = pb.BaseDownloadRequest(fingerprint=fingerprint, file=entry.name, offset=offset)
        return self._stub.DownloadBase(request, timeout=self.timeout_s, metadata=self._signed("DownloadBase", request))

    @staticmethod
    def _check_parts(manifest: BaseManifest, staged: Path) -> None:
        """Each checkpoint part, as downloaded, has the fingerprint the signed manifest gives it."""
        for part, expected in manifest.parts.items():
            if expected == TINY:
                continue
            try:
                got = base_fingerprint_of_checkpoint(staged / part)
            except EncoderCheckpointError as err:
                raise BaseRejected(f"base {manifest.fingerprint[:12]}: the {part} part is not a checkpoint: {err}") from err
            if got != expected:
                raise BaseRejected(f"base {manifest.fingerprint[:12]}: the {part} checkpoint's fingerprint is {got[:12]}, "
                                   f"its manifest says {expected[:12]}")

    def _recent(self) -> list[str]:
        try:
            recent = json.loads((self.root / RECENT_FILE).read_text())
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            log.warning("%s unreadable (%s): the bases in use are counted from scratch", RECENT_FILE, err)
            return []
        return [f for f in recent if isinstance(f, str) and FINGERPRINT.fullmatch(f)] if isinstance(recent, list) else []

    def _keep_recent(self, fingerprint: str) -> None:
        """Record `fingerprint` as the most recently used; remove bases past `keep` and abandoned downloads."""
        kept = [f for f in [fingerprint, *(f for f in self._recent() if f != fingerprint)] if (self.root / f).is_dir()]
        kept = kept[: self.keep]
        write_json_atomically(self.root / RECENT_FILE, kept)
        for path in self.root.iterdir():
            if FINGERPRINT.fullmatch(path.name) and path.name not in kept:
                log.info("removing base %s (keeping the %d most recently used)", path.name[:12], self.keep)
                shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(self.root / INCOMING, ignore_errors=True)  # under the lock: no download is in progress

    def _signed(self, method: str, request: object) -> tuple[tuple[str, str], ...]:
        return self.signer.metadata(model_service_method(method), request)
