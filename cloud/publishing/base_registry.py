"""Published bases on disk, one folder per fingerprint, beside the models the service serves.

    <run>/models/bases/<fingerprint>/manifest.json     signed (common/wire/base_manifest.py)
                                    /video/config.json, preprocessor_config.json, model.safetensors, ...
                                    /audio/...

`publish` copies the two checkpoint directories into a staging folder, hashes the copies
(and checks they still have the fingerprint the sources had: a checkpoint rewritten while
it was copied is refused), signs the manifest and moves the folder into place with one
rename, so the service serves a whole base or none. A base is published once per
fingerprint: publishing the same checkpoints again returns the manifest already there.

What a part ships: every regular file at the top of its checkpoint directory (the weights
and configs the fingerprint covers, and the rest a loader may read: a sharded checkpoint's
index, a generation config). Hidden files and subfolders are not shipped.

Errors name fingerprints and files, never the folder: their text reaches devices.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefed.cloud.publishing.registry import ModelRegistry
from edgefed.common.encoders import base_fingerprint_of_checkpoint
from edgefed.common.wire.base_manifest import (
    BASE_PARTS,
    FINGERPRINT,
    BaseManifest,
    base_fingerprint,
    check_base_file_name,
    checkpoint_parts,
    sign_base_manifest,
    verify_base_manifest,
)
from edgefed.common.wire.model_manifest import (
    MANIFEST_FILE,
    InvalidFileName,
    ModelFile,
    ModelVerificationError,
    check_file_name,
    describe_file,
)

log = logging.getLogger(__name__)

BASES_FOLDER = "bases"


class UnknownBaseError(LookupError):
    """No published base has that fingerprint, or it has no such file."""


class BaseRegistry:
    def __init__(self, root: str | Path) -> None:
        """`root`: the folder of published bases (created by the first publish)."""
        self.root = Path(root)

    # --- reading ----------------------------------------------------------------------
    def fingerprints(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if FINGERPRINT.fullmatch(p.name) and (p / MANIFEST_FILE).is_file())

    def directory(self, fingerprint: str) -> Path:
        path = self.root / fingerprint
        if not FINGERPRINT.fullmatch(fingerprint) or not (path / MANIFEST_FILE).is_file():
            raise UnknownBaseError(f"no published base {fingerprint[:64]!r}")
        return path

    def manifest_bytes(self, fingerprint: str) -> bytes:
        try:
            return (self.directory(fingerprint) / MANIFEST_FILE).read_bytes()
        except FileNotFoundError:  # replaced between the check and the read
            raise UnknownBaseError(f"no published base {fingerprint[:64]!r}") from None

    def file_path(self, fingerprint: str, name: str) -> Path:
        """A file of a published base; only `<part>/<plain name>` (check_base_file_name) that exist."""
        try:
            check_base_file_name(name)
        except InvalidFileName as err:
            raise UnknownBaseError(str(err)) from None
        path = self.directory(fingerprint).joinpath(*name.split("/"))
        if not path.is_file():
            raise UnknownBaseError(f"base {fingerprint[:12]} has no file {name!r}")
        return path

    # --- publishing ---------------------------------------------------------------------
    def publish(self, video: str | Path | None, audio: str | Path | None, signing_key: Ed25519PrivateKey) -> BaseManifest:
        """Publish the base made of these checkpoint directories (None: that part is the built-in
        encoder) signed with the cloud key; returns its manifest. Once per fingerprint."""
        sources = dict(zip(BASE_PARTS, (video, audio), strict=True))
        parts = checkpoint_parts(video, audio)
        fingerprint = base_fingerprint(parts)
        existing = self._published(fingerprint, signing_key)
        if existing is not None:
            return existing
        self.root.mkdir(parents=True, exist_ok=True)
        staged = self.root / f".staging-{fingerprint[:16]}-{secrets.token_hex(4)}"
        try:
            files = []
            for part, source in sources.items():
                if source is not None:
                    files += self._stage_part(part, Path(source), staged / part, parts[part])
            staged.mkdir(exist_ok=True)
            manifest = BaseManifest(fingerprint, parts, files)
            data = sign_base_manifest(manifest, signing_key)
            verify_base_manifest(data, signing_key.public_key()).check_files(staged)  # what every device checks
            (staged / MANIFEST_FILE).write_bytes(data)
            self._move_into_place(staged, fingerprint)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        log.info("published base %s (video %s, audio %s, %d files)", fingerprint[:12], parts["video"][:12],
                 parts["audio"][:12], len(files))
        return self._published(fingerprint, signing_key) or manifest

    def _stage_part(self, part: str, source: Path, dest: Path, fingerprint: str) -> list[ModelFile]:
        dest.mkdir(parents=True)
        files = []
        for path in sorted(source.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                log.info("base %s: not shipping %s of the %s checkpoint (hidden or not a file)", part, path.name, part)
                continue
            try:
                check_file_name(path.name)
            except InvalidFileName as err:
                raise ValueError(f"the {part} checkpoint cannot be shipped: {err}") from None
            shutil.copyfile(path, dest / path.name)  # follows symlinks (a hub cache's snapshot folder)
            files.append(describe_file(dest / path.name, f"{part}/{path.name}"))
        copied = base_fingerprint_of_checkpoint(dest)
        if copied != fingerprint:
            raise ValueError(f"the {part} checkpoint changed while it was being published "
                             f"(fingerprint {fingerprint[:12]}, copy {copied[:12]})")
        return files

    def _published(self, fingerprint: str, signing_key: Ed25519PrivateKey) -> BaseManifest | None:
        """The manifest of this base if it is published and signed by `signing_key`, else None."""
        try:
            manifest = verify_base_manifest(self.manifest_bytes(fingerprint), signing_key.public_key())
        except UnknownBaseError:
            return None
        except ModelVerificationError as err:  # another cloud key, or a damaged manifest: publish it again
            log.warning("base %s is published but its manifest is refused (%s): publishing it again", fingerprint[:12], err)
            return None
        return manifest if manifest.fingerprint == fingerprint else None

    def _move_into_place(self, staged: Path, fingerprint: str) -> None:
        target = self.root / fingerprint
        if target.exists():  # refused by _published: set aside first, so the rename stays one step
            aside = self.root / f".replaced-{fingerprint[:16]}-{secrets.token_hex(4)}"
            target.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            staged.rename(target)
        except OSError:  # another process published the same base meanwhile: keep theirs
            if not (target / MANIFEST_FILE).is_file():
                raise


def bases_of(registry: ModelRegistry) -> BaseRegistry:
    """The bases published beside a model registry (`<run>/models/bases/`): what its service serves."""
    return BaseRegistry(registry.root / BASES_FOLDER)

