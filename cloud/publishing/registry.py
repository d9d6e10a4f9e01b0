"""Published models on disk, newest first, with a wake-up for watchers.

    <root>/v000012/model.onnx
                  /manifest.json     signed (common/wire/model_manifest.py)

A version directory appears by one rename of a fully written staging
folder, so a reader sees a whole model or none. The registry is rebuilt
from the folders on start, so a restarted cloud serves what it published.
A publish in this process calls the registered listeners at once; another
process publishing into the same folder (the ServerApp under `edgefed cloud
serve`) is seen by whoever looks at `latest_version()` next.

Errors name versions and files, never the folder: their text reaches devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefed.common.wire.model_manifest import (
    MANIFEST_FILE,
    InvalidFileName,
    check_file_name,
    sign_manifest,
    verify_manifest,
)

_VERSION_DIR = re.compile(r"^v(\d{6,})$")


class UnknownModelError(LookupError):
    """No published model has that version, or it has no such file."""


class ModelRegistry:
    def __init__(self, root: str | Path, keep: int = 5) -> None:
        """`keep`: how many published versions stay on disk (older ones are removed)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    # --- reading -------------------------------------------------------------
    def versions(self) -> list[int]:
        found = (_VERSION_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest_version(self) -> int:
        """Newest published version, 0 when nothing is published."""
        versions = self.versions()
        return versions[-1] if versions else 0

    def directory(self, version: int) -> Path:
        path = self.root / f"v{version:06d}"
        if version <= 0 or not (path / MANIFEST_FILE).is_file():
            raise UnknownModelError(f"no published model version {version}")
        return path

    def manifest_bytes(self, version: int) -> bytes:
        try:
            return (self.directory(version) / MANIFEST_FILE).read_bytes()
        except FileNotFoundError:  # pruned between the check and the read
            raise UnknownModelError(f"no published model version {version}") from None

    def manifest_digest(self, version: int) -> str:
        return hashlib.sha256(self.manifest_bytes(version)).hexdigest()

    def file_path(self, version: int, name: str) -> Path:
        """A file of a published version; only plain names (common/wire/model_manifest.py FILE_NAME) that exist."""
        try:
            check_file_name(name)
        except InvalidFileName as err:
            raise UnknownModelError(str(err)) from None
        path = self.directory(version) / name
        if not path.is_file():
            raise UnknownModelError(f"version {version} has no file {name!r}")
        return path

    # --- publishing ------------------------------------------------------------
    def publish(self, staged: str | Path, version: int) -> Path:
        """Move a staged folder (with manifest.json) into place and wake the watchers."""
        staged = Path(staged)
        if not (staged / MANIFEST_FILE).is_file():
            raise ValueError(f"{staged}: no {MANIFEST_FILE}")
        target = self.root / f"v{version:06d}"
        if target.exists():  # a re-export of the same version (after a restart) replaces it
            shutil.rmtree(target)
        staged.rename(target)
        self._prune()
        self._notify()
        return target

    def republish(self, version: int, signing_key: Ed25519PrivateKey, new_version: int = 0) -> int:
        """Roll the fleet back: publish the files of `version` again under a newer number.

        Devices only move forward (a lower number is never installed), so the old
        model comes back as `new_version` (default: newest + 1), re-signed, with
        `rollback_of` in its metrics. Returns the new version."""
        source = self.directory(version)
        manifest = verify_manifest((source / MANIFEST_FILE).read_bytes(), signing_key.public_key())
        new_version = new_version or self.latest_version() + 1
        if new_version <= self.latest_version():
            raise ValueError(f"v{new_version} is not newer than the published v{self.latest_version()}")
        staged = self.root / f".rollback-v{new_version:06d}"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(source, staged)
        again = dataclasses.replace(manifest, version=new_version, created_at=time.time(),
                                    metrics={**manifest.metrics, "rollback_of": float(version)})
        (staged / MANIFEST_FILE).write_bytes(sign_manifest(again, signing_key))
        self.publish(staged, new_version)
        return new_version

    def _prune(self) -> None:
        for version in self.versions()[: -self.keep]:
            shutil.rmtree(self.root / f"v{version:06d}", ignore_errors=True)

    # --- watching ----------------------------------------------------------------
    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after each publish in this process (from the publishing thread: keep it short)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()
