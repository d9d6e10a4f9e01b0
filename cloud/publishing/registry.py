"""Published models on disk, newest first, with a wake-up for watchers.

    <root>/v000012/model.onnx
                  /manifest.json     signed (common/wire/model_manifest.py)

A version directory appears by one rename of a fully written staging
folder, so a reader sees a whole model or none. The registry is rebuilt
from the folders on start, so a restarted cloud serves what it published.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefed.common.wire.model_manifest import MANIFEST_FILE, sign_manifest, verify_manifest

_VERSION_DIR = re.compile(r"^v(\d{6,})$")


class UnknownModelError(LookupError):
    """No published model has that version, or it has no such file."""


class ModelRegistry:
    def __init__(self, root: str | Path, keep: int = 5) -> None:
        """`keep`: how many published versions stay on disk (older ones are removed)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._changed = threading.Condition()
        self._closed = False

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
        return (self.directory(version) / MANIFEST_FILE).read_bytes()

    def manifest_digest(self, version: int) -> str:
        return hashlib.sha256(self.manifest_bytes(version)).hexdigest()

    def file_path(self, version: int, name: str) -> Path:
        """A file of a published version; only plain names that exist (no paths, no traversal)."""
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise UnknownModelError(f"invalid file name {name!r}")
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
        with self._changed:
            self._changed.notify_all()
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
    def wait_for_newer(self, version: int, timeout: float) -> int:
        """The newest version if it is above `version`, waiting up to `timeout` s; else 0."""
        with self._changed:
            self._changed.wait_for(lambda: self._closed or self.latest_version() > version, timeout=timeout)
        latest = self.latest_version()
        return latest if latest > version else 0

    def close(self) -> None:
        """Wake every watcher (the service is stopping)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
