"""Key material on disk: device identities, the aggregator's keys, the device registry.

Private keys are raw 32-byte keys, hex-encoded, in files created with mode
0600 (never logged). Public keys sit beside them as `.pub` (hex).

    device dir:  device_ed25519.key / .pub         signs the device's updates
                 node_auth.key / .pub              Flower SuperNode authentication
                                                   (EC P-384, OpenSSH format, as Flower reads it)
    cloud dir:   aggregator_x25519.key / .pub      devices seal updates to it
                 cloud_ed25519.key / .pub          signs published models
                 registry.json                     device id -> Ed25519 public key
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from edgefed.common.atomic import write_json_atomically

DEVICE_KEY = "device_ed25519"
AGGREGATOR_KEY = "aggregator_x25519"
CLOUD_SIGNING_KEY = "cloud_ed25519"
REGISTRY = "registry.json"
NODE_AUTH_KEY = "node_auth"
STATE_MAC_KEY = "state_mac"  # cloud: authenticates checkpointed versions in the state store


class KeyMaterialError(ValueError):
    """Key material is missing, unreadable, or not a key."""


def _private_bytes(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_hex(key: Ed25519PublicKey | X25519PublicKey) -> str:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    os.chmod(path, 0o600)  # also when the file already existed with wider bits


def _read_hex(path: Path) -> bytes:
    try:
        raw = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        raise KeyMaterialError(f"{path}: key file not found (run `edgefed keys init`)") from None
    except (ValueError, UnicodeDecodeError):
        raise KeyMaterialError(f"{path}: not a hex-encoded key") from None
    if len(raw) != 32:
        raise KeyMaterialError(f"{path}: expected a 32-byte key, got {len(raw)} bytes")
    return raw


def init_keys(role: str, directory: str | Path, overwrite: bool = False) -> list[Path]:
    """Create the key files of a role ('edge' or 'cloud'); returns the files written."""
    directory = Path(directory)
    names = {"edge": [DEVICE_KEY, NODE_AUTH_KEY], "cloud": [AGGREGATOR_KEY, CLOUD_SIGNING_KEY, STATE_MAC_KEY]}.get(role)
    if names is None:
        raise KeyMaterialError(f"role must be edge or cloud, got {role!r}")
    written = []
    for name in names:
        path = directory / f"{name}.key"
        if path.exists() and not overwrite:
            raise KeyMaterialError(f"{path} exists; refusing to replace a key (use --rotate to replace it)")
        if name == NODE_AUTH_KEY:
            _write_node_auth_key(path)
        elif name == STATE_MAC_KEY:
            _write_secret(path, secrets.token_hex(32))
            written.append(path)
            continue
        else:
            key = X25519PrivateKey.generate() if name == AGGREGATOR_KEY else Ed25519PrivateKey.generate()
            _write_secret(path, _private_bytes(key).hex())
            (directory / f"{name}.pub").write_text(public_hex(key.public_key()) + "\n")
        written += [path, directory / f"{name}.pub"]
    return written


def _write_node_auth_key(path: Path) -> None:
    """Flower's SuperNode reads an OpenSSH EC key; the SuperLink registers its OpenSSH public half."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_secret(path, key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()).decode().rstrip("\n"))
    path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH) + b"\n")


def node_auth_paths(directory: str | Path) -> tuple[Path, Path]:
    """(private, public) node-authentication key files of a device, created on demand for older key folders."""
    private = Path(directory) / f"{NODE_AUTH_KEY}.key"
    if not private.exists():
        if not (Path(directory) / f"{DEVICE_KEY}.key").exists():
            raise KeyMaterialError(f"{directory}: no device keys (run `edgefed keys init --role edge --dir {directory}`)")
        _write_node_auth_key(private)
    return private, private.with_suffix(".pub")


def load_state_mac_key(directory: str | Path) -> bytes:
    """The cloud's secret for authenticating checkpointed versions; made on first use in older key folders.

    Created exclusively (O_EXCL), so two cloud processes starting at once agree on one key."""
    path = Path(directory) / f"{STATE_MAC_KEY}.key"
    if not path.exists():
        if not (Path(directory) / f"{AGGREGATOR_KEY}.key").exists():
            raise KeyMaterialError(f"{directory}: no cloud keys (run `edgefed keys init --role cloud --dir {directory}`)")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
    return _read_hex(path)


def load_device_key(directory: str | Path) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_read_hex(Path(directory) / f"{DEVICE_KEY}.key"))


def load_cloud_signing_key(directory: str | Path) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_read_hex(Path(directory) / f"{CLOUD_SIGNING_KEY}.key"))


def load_cloud_public(path: str | Path) -> Ed25519PublicKey:
    """The pinned cloud model-signing key, from its .pub file or a directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{CLOUD_SIGNING_KEY}.pub"
    return Ed25519PublicKey.from_public_bytes(_read_hex(path))


def load_aggregator_key(directory: str | Path) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(_read_hex(Path(directory) / f"{AGGREGATOR_KEY}.key"))


def load_aggregator_public(path: str | Path) -> X25519PublicKey:
    """The aggregator's public key, from its .pub file or a directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{AGGREGATOR_KEY}.pub"
    return X25519PublicKey.from_public_bytes(_read_hex(path))


def load_ed25519_public(path: str | Path) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(_read_hex(Path(path)))


class DeviceRegistry:
    """Device id -> Ed25519 public key, a JSON file owned by the cloud."""

    def __init__(self, path: str | Path | None) -> None:
        """Loads `path` if it exists; with None the registry lives in memory only."""
        self.path = Path(path) if path is not None else None
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._loaded_stamp: tuple[int, int, int] | None = None
        self._refresh()

    def _refresh(self) -> None:
        """Re-read the file if it changed: a running aggregator sees enrolments and revocations at once."""
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:  # deleted: nobody is enrolled any more
            self._keys, self._loaded_stamp = {}, None
            return
        # the inode too: every save is an atomic replace, so a same-size rewrite within one clock tick still shows
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._loaded_stamp:
            return
        try:
            entries = json.loads(self.path.read_text())
            self._keys = {d: Ed25519PublicKey.from_public_bytes(bytes.fromhex(h)) for d, h in entries.items()}
        except (json.JSONDecodeError, ValueError, AttributeError) as err:
            raise KeyMaterialError(f"{self.path}: unreadable device registry ({err})") from None
        self._loaded_stamp = stamp

    def register(self, device_id: str, public_key: Ed25519PublicKey) -> None:
        self._refresh()
        self._keys[device_id] = public_key
        self._save()

    def revoke(self, device_id: str) -> bool:
        self._refresh()
        removed = self._keys.pop(device_id, None) is not None
        self._save()
        return removed

    def get(self, device_id: str) -> Ed25519PublicKey | None:
        self._refresh()
        return self._keys.get(device_id)

    def __contains__(self, device_id: str) -> bool:
        self._refresh()
        return device_id in self._keys

    def __len__(self) -> int:
        self._refresh()
        return len(self._keys)

    def _save(self) -> None:
        if self.path is None:
            return
        payload = {d: public_hex(k) for d, k in sorted(self._keys.items())}
        write_json_atomically(self.path, payload)
        self._loaded_stamp = None  # our own write: re-read it next time like anyone else's
