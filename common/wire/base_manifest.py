"""The signed manifest of a base package: the frozen encoder checkpoints every device must run.

    <bases>/<fingerprint>/manifest.json     {"manifest": {...}, "signature": ...} (model_manifest.sign_body)
                         /video/config.json, preprocessor_config.json, model.safetensors, ...
                         /audio/...

A base is identified by its fingerprint, `base_fingerprint(parts)`:

    sha256("video:" + fp_video + "\\naudio:" + fp_audio)

where each part's fp is `base_fingerprint_of_checkpoint` of that checkpoint directory, or
"tiny" for a built-in encoder (which has no files). The cloud computes it when it
publishes a base and the device when it checks one, with this one function.

The manifest lists every file as `<part>/<plain name>` with its size and sha256, and is
signed with the cloud's key through the same path as a model manifest; the two are told
apart by their fields (`kind = "base"` here). A file name is checked when a manifest is
parsed and again before anything is written under it (`check_base_file_name`): one part
folder, then a plain model-file name, so a signed manifest cannot reach outside its base
folder.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefed.common.encoders import TINY, base_fingerprint_of_checkpoint
from edgefed.common.wire.model_manifest import (
    MANIFEST_FILE,
    FileHashMismatch,
    InvalidFileName,
    ModelFile,
    ModelVerificationError,
    check_file_entry,
    check_file_name,
    file_entry,
    sign_body,
    verified_body,
)

BASE_KIND = "base"
BASE_FORMAT = 1
BASE_PARTS = ("video", "audio")  # the order the fingerprint hashes them in, and their folder names
FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def base_fingerprint(parts: Mapping[str, str]) -> str:
    """The fingerprint of a base whose parts have these checkpoint fingerprints ("tiny": a built-in encoder)."""
    if set(parts) != set(BASE_PARTS):
        raise ValueError(f"a base has the parts {list(BASE_PARTS)}, not {sorted(map(str, parts))}")
    for part in BASE_PARTS:
        value = parts[part]
        if value != TINY and not (isinstance(value, str) and FINGERPRINT.fullmatch(value)):
            raise ValueError(f"base part {part!r}: {str(value)[:40]!r} is neither a checkpoint fingerprint nor {TINY!r}")
    text = "\n".join(f"{part}:{parts[part]}" for part in BASE_PARTS)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_parts(video: str | Path | None, audio: str | Path | None) -> dict[str, str]:
    """Each part's checkpoint fingerprint (hashing the directory's files), or "tiny" for None."""
    return {part: TINY if path is None else base_fingerprint_of_checkpoint(path)
            for part, path in zip(BASE_PARTS, (video, audio), strict=True)}


def base_fingerprint_of_dirs(video: str | Path | None, audio: str | Path | None) -> str:
    """The fingerprint of the base made of these checkpoint directories (None: the built-in encoder)."""
    return base_fingerprint(checkpoint_parts(video, audio))


def check_fingerprint(value: object) -> str:
    """`value` if it is a fingerprint (64 lowercase hex digits: also safe as a folder name), else ValueError."""
    if not isinstance(value, str) or not FINGERPRINT.fullmatch(value):
        shown = repr(value[:40] + "...") if isinstance(value, str) and len(value) > 40 else repr(value)
        raise ValueError(f"{shown} is not a base fingerprint (64 lowercase hex digits)")
    return value


def check_base_file_name(name: object) -> str:
    """`name` if it names a file of a base folder (`video/<plain name>` or `audio/<plain name>`), else InvalidFileName."""
    part, _, leaf = name.partition("/") if isinstance(name, str) else ("", "", "")
    if part not in BASE_PARTS:
        shown = repr(name[:40] + "...") if isinstance(name, str) and len(name) > 40 else repr(name)
        raise InvalidFileName(f"invalid file name {shown}: a base file is <part>/<plain name>, part one of {list(BASE_PARTS)}")
    check_file_name(leaf)  # no further "/", no "..", not hidden, not manifest.json or a .part
    return name


@dataclass(frozen=True)
class BaseManifest:
    fingerprint: str  # base_fingerprint(parts)
    parts: dict[str, str]  # "video"/"audio" -> checkpoint fingerprint, or "tiny"
    files: list[ModelFile]  # names "<part>/<plain name>"
    created_at: float = field(default_factory=time.time)
    kind: str = BASE_KIND
    format: int = BASE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BaseManifest:
        """A parsed base manifest; ModelVerificationError unless every field and file entry is well formed
        and the fingerprint is the one its parts give."""
        if raw.get("kind") != BASE_KIND:
            raise ModelVerificationError(f"manifest kind {raw.get('kind')!r} is not {BASE_KIND!r}")
        if raw.get("format") != BASE_FORMAT:
            raise ModelVerificationError(f"base manifest format {raw.get('format')!r} is not {BASE_FORMAT}")
        try:
            manifest = cls(
                fingerprint=check_fingerprint(raw["fingerprint"]), parts=dict(raw["parts"]),
                files=[file_entry(f, check_base_file_name) for f in raw["files"]],
                created_at=float(raw["created_at"]), kind=str(raw["kind"]), format=int(raw["format"]),
            )
            expected = base_fingerprint(manifest.parts)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ModelVerificationError):
                raise
            raise ModelVerificationError(f"malformed base manifest: {err!r}") from None
        if manifest.fingerprint != expected:
            raise ModelVerificationError("base manifest: its fingerprint is not the one its parts give")
        names = [f.name for f in manifest.files]
        if len(set(names)) != len(names):
            raise ModelVerificationError("base manifest names a file twice")
        for part in BASE_PARTS:
            has_files = any(n.startswith(f"{part}/") for n in names)
            if has_files == (manifest.parts[part] == TINY):
                raise ModelVerificationError(f"base manifest: part {part!r} is {manifest.parts[part][:12]!r} "
                                             f"but lists {'files' if has_files else 'no file'}")
        return manifest

    def path_of(self, directory: str | Path, name: str) -> Path:
        """Where the file `name` of this base lives under `directory` (the name checked again first)."""
        return Path(directory).joinpath(*check_base_file_name(name).split("/"))

    def check_files(self, directory: str | Path) -> None:
        """Raise FileHashMismatch unless every listed file under `directory` has its size and sha256,
        and nothing else is there (besides manifest.json): an added weight file would change what loads."""
        for entry in self.files:
            check_file_entry(self.path_of(directory, entry.name), entry)
        root = Path(directory)
        listed = {f.name for f in self.files} | {MANIFEST_FILE}
        parts = {part for part in BASE_PARTS if self.parts[part] != TINY}
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root).as_posix()
            if (path.is_dir() and not path.is_symlink() and relative in parts) or relative in listed:
                continue
            raise FileHashMismatch(f"{relative[:60]!r}: not in the base manifest")


def sign_base_manifest(manifest: BaseManifest, key: Ed25519PrivateKey) -> bytes:
    """The bytes of a base's manifest.json: the manifest and its signature."""
    return sign_body(manifest.to_dict(), key)


def verify_base_manifest(data: bytes, trusted: Ed25519PublicKey) -> BaseManifest:
    """Parse a base's manifest.json bytes and check the signature against the pinned cloud key."""
    return BaseManifest.from_dict(verified_body(data, trusted))
