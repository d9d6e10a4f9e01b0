"""The signed manifest of a published model: what a device checks before it runs anything.

    manifest.json = {"manifest": {...}, "signature": hex(Ed25519(canonical JSON of manifest))}

The manifest names every file with its sha256 and size, the model's inputs
and outputs, the exact feature-extraction config the device must use, the
held-out metrics, the versions it came from and when it was made. It is
signed with the cloud's Ed25519 key; devices trust only the cloud public key
pinned on them, never a key that arrives with the model.

A file name is a plain name (`FILE_NAME`: no folder, no `..`, no leading dot),
checked when a manifest is parsed and again before anything is written under
it: a signed manifest must still not reach outside its model folder.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST_FORMAT = 1
MANIFEST_FILE = "manifest.json"
PART_SUFFIX = ".part"  # a download in progress (edge/models/transfer.py)
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class ModelVerificationError(ValueError):
    """A model or its manifest fails verification; the reason says which check."""


class ManifestSignatureError(ModelVerificationError):
    """The manifest is not signed by the pinned cloud key (or was altered after signing)."""


class FileHashMismatch(ModelVerificationError):
    """A model file's size or sha256 differs from its manifest entry."""


class InvalidFileName(ModelVerificationError):
    """A file name that is not a plain name of a model folder (a path, `..`, hidden, too long)."""


def check_file_name(name: object) -> str:
    """`name` if it may name a file of a model folder, else InvalidFileName (a long name is shown cut).

    Besides FILE_NAME: no `..` anywhere, and neither the manifest's own name nor a download's `.part` name."""
    plain = isinstance(name, str) and FILE_NAME.fullmatch(name) is not None and ".." not in name
    if not plain or name == MANIFEST_FILE or name.endswith(PART_SUFFIX):
        shown = repr(name[:40] + "...") if isinstance(name, str) and len(name) > 40 else repr(name)
        raise InvalidFileName(f"invalid file name {shown}: a model file is a plain name matching {FILE_NAME.pattern}")
    return name


@dataclass(frozen=True)
class ModelFile:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]  # str: a symbolic dimension such as "batch"


@dataclass(frozen=True)
class ModelManifest:
    version: int  # the global model version this export is of
    base_version: str  # fingerprint of the frozen base the adapter was merged into
    files: list[ModelFile]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    feature_config: dict[str, Any]  # must equal the device's extractor settings
    labels: list[str]
    quantization: str
    metrics: dict[str, float]  # held-out metrics measured on the cloud before publishing
    federation: str
    created_at: float = field(default_factory=time.time)
    format: int = MANIFEST_FORMAT

    @property
    def model_file(self) -> ModelFile:
        return next(f for f in self.files if f.name.endswith(".onnx"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelManifest:
        """A parsed manifest; ModelVerificationError unless every field, and every file entry, is well formed."""
        try:
            if raw.get("format") != MANIFEST_FORMAT:
                raise ModelVerificationError(f"manifest format {raw.get('format')!r} is not {MANIFEST_FORMAT}")
            manifest = cls(
                version=int(raw["version"]), base_version=str(raw["base_version"]),
                files=[file_entry(f) for f in raw["files"]],
                inputs=[TensorSpec(**t) for t in raw["inputs"]], outputs=[TensorSpec(**t) for t in raw["outputs"]],
                feature_config=dict(raw["feature_config"]), labels=list(raw["labels"]),
                quantization=str(raw["quantization"]), metrics=dict(raw["metrics"]),
                federation=str(raw["federation"]), created_at=float(raw["created_at"]), format=int(raw["format"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ModelVerificationError):
                raise
            raise ModelVerificationError(f"malformed manifest: {err!r}") from None
        if manifest.version < 1:
            raise ModelVerificationError(f"manifest version {manifest.version} is not a published version (>= 1)")
        names = [f.name for f in manifest.files]
        if len(set(names)) != len(names):
            raise ModelVerificationError("manifest names a file twice")
        return manifest

    def check_files(self, directory: str | Path) -> None:
        """Raise FileHashMismatch unless every listed file in `directory` has its size and sha256."""
        for entry in self.files:
            self.check_file(directory, entry.name)

    def check_file(self, directory: str | Path, name: str) -> None:
        entry = next((f for f in self.files if f.name == name), None)
        if entry is None:
            raise FileHashMismatch(f"{name}: not in the manifest")
        check_file_entry(Path(directory) / check_file_name(name), entry)


def check_file_entry(path: Path, entry: ModelFile) -> None:
    """Raise FileHashMismatch unless `path` is a file with `entry`'s size and sha256 (the name is the caller's to check)."""
    if not path.is_file():
        raise FileHashMismatch(f"{entry.name}: missing")
    size = path.stat().st_size
    if size != entry.size:
        raise FileHashMismatch(f"{entry.name}: {size} bytes, manifest says {entry.size}")
    if sha256_file(path) != entry.sha256:
        raise FileHashMismatch(f"{entry.name}: sha256 differs from the manifest")


def file_entry(raw: dict[str, Any], check_name: Callable[[object], str] = check_file_name) -> ModelFile:
    """A file entry of a manifest, its name checked by `check_name`; ModelVerificationError if malformed."""
    entry = ModelFile(check_name(raw["name"]), str(raw["sha256"]), int(raw["size"]))
    if not _SHA256.fullmatch(entry.sha256):
        raise ModelVerificationError(f"{entry.name}: sha256 is not 64 hex digits")
    if entry.size < 0:
        raise ModelVerificationError(f"{entry.name}: negative size {entry.size}")
    return entry


def _canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def sign_body(body: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """The bytes of a manifest.json: `body` and the signature of its canonical JSON.

    The one signing path of what the cloud publishes: model manifests and base manifests
    (common/wire/base_manifest.py), told apart by their fields."""
    signature = key.sign(_canonical(body)).hex()
    return (json.dumps({"manifest": body, "signature": signature}, indent=1, sort_keys=True) + "\n").encode()


def verified_body(data: bytes, trusted: Ed25519PublicKey) -> dict[str, Any]:
    """The manifest body of manifest.json bytes whose signature verifies with the pinned cloud key."""
    try:
        outer = json.loads(data)
        body, signature = outer["manifest"], bytes.fromhex(outer["signature"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise ModelVerificationError("manifest.json is not a signed manifest") from None
    if not isinstance(body, dict):
        raise ModelVerificationError("manifest.json is not a signed manifest")
    try:
        trusted.verify(signature, _canonical(body))
    except InvalidSignature:
        raise ManifestSignatureError("manifest signature does not verify with the pinned cloud key") from None
    return body


def sign_manifest(manifest: ModelManifest, key: Ed25519PrivateKey) -> bytes:
    """The bytes of manifest.json: the manifest and its signature."""
    return sign_body(manifest.to_dict(), key)


def verify_manifest(data: bytes, trusted: Ed25519PublicKey) -> ModelManifest:
    """Parse manifest.json bytes and check the signature against the pinned cloud key."""
    return ModelManifest.from_dict(verified_body(data, trusted))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(path: str | Path, name: str | None = None) -> ModelFile:
    """The entry of the file at `path`, listed as `name` (default: the file's own name)."""
    path = Path(path)
    return ModelFile(name or path.name, sha256_file(path), path.stat().st_size)
