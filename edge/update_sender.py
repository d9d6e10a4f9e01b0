"""Device side of an update: delta -> error feedback -> codec -> seal and sign."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from edgefed.common.wire.codec import CodecSpec, decode, encode
from edgefed.common.wire.envelope import UpdateContext, seal
from edgefed.edge.error_feedback import ErrorFeedback


@dataclass
class DeviceCredentials:
    device_id: str
    signing_key: Ed25519PrivateKey
    aggregator_public: X25519PublicKey


def build_update(
    trained: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    spec: CodecSpec,
    feedback: ErrorFeedback,
    generator: torch.Generator | None = None,
) -> bytes:
    """Encode `trained - base` (plus the carried residual); remember what the codec dropped."""
    delta = OrderedDict((name, trained[name].detach().float() - base[name].float()) for name in base)
    intended = feedback.compensate(delta)
    payload = encode(intended, spec, generator)
    if not spec.lossless:
        feedback.update(intended, decode(payload))
    return payload


def seal_update(payload: bytes, credentials: DeviceCredentials, run: str, base_version: int,
                num_examples: float) -> bytes:
    """Seal and sign; `num_examples` (the update's weight in the average) travels inside, signed."""
    context = UpdateContext(run, credentials.device_id, base_version, UpdateContext.new_update_id(), num_examples)
    return seal(payload, context, credentials.aggregator_public, credentials.signing_key)
