"""Signed requests to the model service: a device proves who it is with its Ed25519 key.

Every call carries four metadata entries:

    x-edgefed-device     the device id, as enrolled (`<keys>/cloud/registry.json`)
    x-edgefed-time       when the device signed, in milliseconds since the Unix epoch
    x-edgefed-nonce      32 hex digits, random per call
    x-edgefed-signature  hex Ed25519 signature, by the device key, of

        b"edgefed-request-v1\\n" + method + "\\n" + device + "\\n" + time + "\\n" + nonce + "\\n" + request

`method` is the gRPC path ("/edgefed.models.v1.ModelService/Download") and
`request` the call's set fields as JSON with sorted keys and no spaces
(`{"file":"model.onnx","version":12}`), so a signature is good for one call
with exactly those arguments. The service checks the signature against the
registered key, that the time is within its freshness window, and that the
nonce was not used before in that window (a replay).

This authenticates the device, not the channel: without TLS anyone on the path
can read what the service sends back.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import Message

from edgefed.common.wire.protos import model_service_pb2 as pb

REQUEST_FORMAT = b"edgefed-request-v1"
DEVICE_HEADER = "x-edgefed-device"
TIME_HEADER = "x-edgefed-time"
NONCE_HEADER = "x-edgefed-nonce"
SIGNATURE_HEADER = "x-edgefed-signature"

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_NONCE = re.compile(r"^[0-9a-f]{32}$")
_SIGNATURE = re.compile(r"^[0-9a-f]{128}$")


class RequestAuthError(ValueError):
    """A call is not a fresh request signed by the device it names; the message says which check failed."""


def model_service_method(name: str) -> str:
    """The gRPC path of a ModelService method (what the signature covers)."""
    service = pb.DESCRIPTOR.services_by_name["ModelService"]
    return f"/{service.full_name}/{service.methods_by_name[name].name}"


def request_fields(request: Message) -> bytes:
    """The canonical JSON of a request's set fields (scalars only: the model service's requests)."""
    fields = {}
    for descriptor, value in request.ListFields():
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise TypeError(f"{descriptor.full_name}: only string and integer fields can be signed")
        fields[descriptor.name] = value
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def signed_bytes(method: str, device_id: str, time_ms: int, nonce: str, request: Message) -> bytes:
    return b"\n".join([REQUEST_FORMAT, method.encode(), device_id.encode(), str(time_ms).encode(), nonce.encode(),
                       request_fields(request)])


@dataclass(frozen=True)
class DeviceSigner:
    """A device's identity for the model service: its enrolled id and its Ed25519 device key."""

    device_id: str
    key: Ed25519PrivateKey

    def metadata(self, method: str, request: Message, now: float | None = None) -> tuple[tuple[str, str], ...]:
        """The metadata that authenticates one call of `method` with `request`."""
        time_ms = int((time.time() if now is None else now) * 1000)
        nonce = secrets.token_hex(16)
        signature = self.key.sign(signed_bytes(method, self.device_id, time_ms, nonce, request))
        return ((DEVICE_HEADER, self.device_id), (TIME_HEADER, str(time_ms)), (NONCE_HEADER, nonce),
                (SIGNATURE_HEADER, signature.hex()))


@dataclass(frozen=True)
class SignedRequest:
    """The authentication metadata of one call, parsed (not yet checked against any key)."""

    device_id: str
    time_ms: int
    nonce: str
    signature: bytes

    @classmethod
    def from_metadata(cls, metadata: object) -> SignedRequest:
        """From gRPC invocation metadata (pairs of key, value); RequestAuthError if an entry is missing or malformed."""
        values: dict[str, str] = {}
        for key, value in metadata or ():
            if key in (DEVICE_HEADER, TIME_HEADER, NONCE_HEADER, SIGNATURE_HEADER):
                if key in values or not isinstance(value, str):
                    raise RequestAuthError(f"metadata {key} given twice or not text")
                values[key] = value
        missing = [k for k in (DEVICE_HEADER, TIME_HEADER, NONCE_HEADER, SIGNATURE_HEADER) if k not in values]
        if missing:
            raise RequestAuthError(f"unsigned request: no {', '.join(missing)} metadata")
        device, stamp, nonce, signature = (values[k] for k in (DEVICE_HEADER, TIME_HEADER, NONCE_HEADER, SIGNATURE_HEADER))
        if not _DEVICE_ID.fullmatch(device):
            raise RequestAuthError("malformed device id")
        if not stamp.isdigit() or len(stamp) > 16:
            raise RequestAuthError("malformed request time")
        if not _NONCE.fullmatch(nonce):
            raise RequestAuthError("malformed nonce")
        if not _SIGNATURE.fullmatch(signature):
            raise RequestAuthError("malformed signature")
        return cls(device, int(stamp), nonce, bytes.fromhex(signature))

    def verify(self, method: str, request: Message, public_key: Ed25519PublicKey, now: float, max_skew_s: float) -> None:
        """Signature by `public_key` over this call, and a time within `max_skew_s` of `now`."""
        skew = self.time_ms / 1000 - now
        if abs(skew) > max_skew_s:
            raise RequestAuthError(f"request time is {skew:+.0f} s from the service's clock (allowed: ±{max_skew_s:.0f} s): "
                                   "check the device's clock")
        try:
            public_key.verify(self.signature, signed_bytes(method, self.device_id, self.time_ms, self.nonce, request))
        except InvalidSignature:
            raise RequestAuthError(f"signature does not verify with device {self.device_id}'s registered key") from None
