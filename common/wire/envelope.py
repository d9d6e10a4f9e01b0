"""Sealed, signed client updates.

A device seals an encoded update for the aggregator and signs the result:

    ephemeral X25519 ──ECDH── aggregator X25519 public key
        └─ HKDF-SHA256 (info binds both public keys) ─► AES-256-GCM key
    AES-GCM(associated data = the header: run id, node id, base version, update id,
            the examples the update counts as (its weight in the average), ephemeral key)
    Ed25519 signature of the device over everything before it

Wire format, version 2 (version 1 carried no weight: the weight came unsigned beside it):

    b"EFE" u8:version  u16:len header(JSON)  12:nonce  u32:len ciphertext(+16 tag)  64:signature

The aggregator verifies the signature against the device's registered key
before it decrypts anything, then opens the ciphertext; the header is bound
twice (signed, and authenticated by GCM), so no field can be moved to another
update. Every failure is an `EnvelopeError` with a `reason` code that the
aggregator counts.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MAGIC = b"EFE"
VERSION = 2
SIGNATURE_BYTES = 64
NONCE_BYTES = 12
MAX_HEADER = 4096
_INFO = b"edgefed-update-v1"


class EnvelopeError(ValueError):
    """A sealed update was refused. `reason` is a short stable code for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class UpdateContext:
    """What an update claims to be; bound into the envelope."""

    run: str  # the federation's name
    node: str  # device id
    base_version: int  # global version the update was computed against
    update_id: str  # unique per update (replay protection)
    num_examples: float  # what the update weighs in the average (training clips); the aggregator bounds it

    @staticmethod
    def new_update_id() -> str:
        return secrets.token_hex(16)


def _raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _derive_key(shared: bytes, ephemeral_public: bytes, aggregator_public: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_INFO + ephemeral_public + aggregator_public).derive(shared)


def seal(
    payload: bytes, context: UpdateContext, aggregator_public: X25519PublicKey, device_key: Ed25519PrivateKey
) -> bytes:
    """Encrypt `payload` for the aggregator and sign the envelope with the device key."""
    ephemeral = X25519PrivateKey.generate()
    epk = _raw_public(ephemeral.public_key())
    key = _derive_key(ephemeral.exchange(aggregator_public), epk, _raw_public(aggregator_public))
    header = json.dumps(
        {"run": context.run, "node": context.node, "base": context.base_version,
         "update": context.update_id, "examples": context.num_examples, "epk": epk.hex()},
        separators=(",", ":"), sort_keys=True,
    ).encode()
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, payload, header)
    body = b"".join([MAGIC, bytes([VERSION]), struct.pack("<H", len(header)), header, nonce,
                     struct.pack("<I", len(ciphertext)), ciphertext])
    return body + device_key.sign(body)


def read_context(data: bytes) -> UpdateContext:
    """The claimed context of an envelope, without verifying anything (for routing and logs)."""
    header, _, _, _ = _split(data)
    return _context(header)


def verify_and_open(
    data: bytes, aggregator_key: X25519PrivateKey, device_public: Ed25519PublicKey
) -> tuple[UpdateContext, bytes]:
    """Check the device's signature, then decrypt. Raises EnvelopeError."""
    header, nonce, ciphertext, signature = _split(data)
    body = bytes(data[: len(data) - SIGNATURE_BYTES])
    try:
        device_public.verify(signature, body)
    except InvalidSignature:
        raise EnvelopeError("bad-signature", "signature does not verify with the registered device key") from None
    context = _context(header)
    fields = json.loads(header)
    try:
        epk = bytes.fromhex(fields["epk"])
        ephemeral_public = X25519PublicKey.from_public_bytes(epk)
    except (KeyError, ValueError, TypeError):
        raise EnvelopeError("malformed", "bad ephemeral key") from None
    aggregator_public = _raw_public(aggregator_key.public_key())
    try:
        shared = aggregator_key.exchange(ephemeral_public)
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise EnvelopeError("bad-key", "the ephemeral key is a low-order point") from None
    key = _derive_key(shared, epk, aggregator_public)
    try:
        payload = AESGCM(key).decrypt(nonce, ciphertext, header)
    except InvalidTag:
        raise EnvelopeError("decrypt-failed", "not sealed for this aggregator key, or altered") from None
    return context, payload


def _split(data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    data = bytes(data)
    minimum = 3 + 1 + 2 + NONCE_BYTES + 4 + 16 + SIGNATURE_BYTES
    if len(data) < minimum:
        raise EnvelopeError("malformed", f"{len(data)} bytes is shorter than any envelope")
    if data[:3] != MAGIC:
        raise EnvelopeError("malformed", "not a sealed edgefed update (bad magic)")
    if data[3] != VERSION:
        raise EnvelopeError("malformed", f"envelope version {data[3]} (this build reads {VERSION})")
    (head_len,) = struct.unpack("<H", data[4:6])
    if head_len > MAX_HEADER:
        raise EnvelopeError("malformed", "header too long")
    pos = 6
    header = data[pos : pos + head_len]
    pos += head_len
    nonce = data[pos : pos + NONCE_BYTES]
    pos += NONCE_BYTES
    if pos + 4 > len(data):
        raise EnvelopeError("malformed", "truncated envelope")
    (ct_len,) = struct.unpack("<I", data[pos : pos + 4])
    pos += 4
    if pos + ct_len + SIGNATURE_BYTES != len(data):
        raise EnvelopeError("malformed", "length fields do not match the envelope size")
    return header, nonce, data[pos : pos + ct_len], data[pos + ct_len :]


def _context(header: bytes) -> UpdateContext:
    try:
        fields = json.loads(header)
        examples = fields["examples"]
        if isinstance(examples, bool) or not isinstance(examples, int | float):
            raise TypeError("examples is not a number")
        return UpdateContext(str(fields["run"]), str(fields["node"]), int(fields["base"]), str(fields["update"]),
                             float(examples))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, OverflowError):
        raise EnvelopeError("malformed", "unreadable envelope header") from None
