"""Aggregator side of an update: verify, open, decode, sanity-check.

Every refusal is a `RejectedUpdate` with a short reason code (counted in
metrics.jsonl) and a detail for the log; none of them stops a run.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgefed.cloud.aggregation.version_window import VersionWindow
from edgefed.common.config import EdgefedConfig
from edgefed.common.keys import DeviceRegistry, load_aggregator_key
from edgefed.common.wire.codec import Adapter, CodecError, FlatDelta, decode_flat, flat_values
from edgefed.common.wire.envelope import EnvelopeError, UpdateContext, read_context, verify_and_open

log = logging.getLogger(__name__)

DEFAULT_MAX_EXAMPLES = 100_000.0  # run-config max-update-examples


class RejectedUpdate(Exception):
    def __init__(self, reason: str, detail: str, node: str = "?") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.node = reason, detail, node


@dataclass
class OpenedUpdate:
    context: UpdateContext
    delta: FlatDelta | Adapter  # FlatDelta from the opener: read as a mapping, it gives the named tensors
    norm: float
    clipped: bool = False


class UpdateOpener:
    """Turns received bytes into a checked delta, or a RejectedUpdate.

    `window` says which base versions are acceptable and which update ids were
    already taken (cloud/aggregation/version_window.py)."""

    def __init__(
        self,
        run: str,
        aggregator_key: X25519PrivateKey | None,
        registry: DeviceRegistry | None,
        window: VersionWindow,
        max_norm: float,
        clip: bool,
        max_examples: float = DEFAULT_MAX_EXAMPLES,
    ) -> None:
        """`max_examples`: the largest weight a device may claim (the signed example count of one update)."""
        self.run, self.aggregator_key, self.registry, self.window = run, aggregator_key, registry, window
        self.max_norm, self.clip, self.max_examples = max_norm, clip, max_examples

    def open(self, data: bytes, reference: dict[str, torch.Tensor], plain_context: UpdateContext | None = None) -> OpenedUpdate:
        """Sealed bytes (or, in plain mode, codec bytes with their context) -> checked delta."""
        if self.aggregator_key is None:  # plain mode: debugging only
            if plain_context is None:
                raise RejectedUpdate("malformed", "plain update without its context")
            context, payload = plain_context, data
        else:
            context, payload = self._unseal(data)
        if self.window.has_taken(context.update_id, context.base_version):
            raise RejectedUpdate("replayed", f"update {context.update_id} was already received", context.node)
        refusal = self.window.refusal(context.base_version)
        if refusal is not None:
            raise RejectedUpdate(*refusal, context.node)
        examples = context.num_examples
        if not (math.isfinite(examples) and 0 < examples <= self.max_examples):
            raise RejectedUpdate("bad-weight", f"claims {examples} examples (allowed: (0, {self.max_examples:g}])",
                                 context.node)
        try:
            # names, shapes and sizes are checked against the global adapter before anything is decompressed
            delta = decode_flat(payload, expect={n: tuple(t.shape) for n, t in reference.items()})
        except CodecError as err:
            raise RejectedUpdate(err.reason, str(err), context.node) from None
        delta, norm, clipped = check_delta(delta, reference, self.max_norm, self.clip, context.node)
        self.window.take(context.update_id)  # only updates that passed count as taken
        return OpenedUpdate(context, delta, norm, clipped)

    def _unseal(self, data: bytes) -> tuple[UpdateContext, bytes]:
        try:
            claimed = read_context(data)
        except EnvelopeError as err:
            raise RejectedUpdate(err.reason, err.detail) from None
        if claimed.run != self.run:
            raise RejectedUpdate("wrong-run", f"sealed for run {claimed.run!r}, this is {self.run!r}", claimed.node)
        public = self.registry.get(claimed.node) if self.registry is not None else None
        if public is None:
            raise RejectedUpdate("unknown-device", f"device {claimed.node!r} is not registered", claimed.node)
        try:
            return verify_and_open(data, self.aggregator_key, public)
        except EnvelopeError as err:
            raise RejectedUpdate(err.reason, err.detail, claimed.node) from None


def plain_context(meta: Mapping[str, object]) -> UpdateContext | None:
    """Plain (debugging) transport: the context the transport carried in the clear, None if absent."""
    if "plain-node" not in meta:
        return None
    try:
        return UpdateContext("", str(meta["plain-node"]), int(meta["plain-base-version"]),  # type: ignore[arg-type]
                             str(meta["plain-update-id"]), float(meta.get("plain-num-examples", 1.0)))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, OverflowError):
        raise RejectedUpdate("malformed", "unreadable plain context", str(meta.get("plain-node", "?"))) from None


def check_delta(
    delta: FlatDelta | Adapter, reference: dict[str, torch.Tensor], max_norm: float, clip: bool, node: str
) -> tuple[FlatDelta | Adapter, float, bool]:
    """Same tensors and shapes as the global adapter, all finite, L2 norm within bound (or clipped).

    A FlatDelta is checked on the values it carries (a top-k update's zeros add nothing to the norm)."""
    if set(delta) != set(reference):
        missing, extra = sorted(set(reference) - set(delta)), sorted(set(delta) - set(reference))
        raise RejectedUpdate("wrong-tensors", f"missing {missing[:2]}, unexpected {extra[:2]}", node)
    shapes = zip(delta.names, delta.shapes) if isinstance(delta, FlatDelta) else ((n, v.shape) for n, v in delta.items())
    for name, shape in shapes:
        if tuple(shape) != tuple(reference[name].shape):
            raise RejectedUpdate("wrong-shape", f"{name}: {tuple(shape)} != {tuple(reference[name].shape)}", node)
    # one pass over the whole update (numpy's checks are the fast ones here)
    flat = delta.kept if isinstance(delta, FlatDelta) else flat_values(delta).numpy()
    if not np.isfinite(flat).all():
        name = next(n for n, v in delta.items() if not torch.isfinite(v).all())
        raise RejectedUpdate("non-finite", f"{name} holds NaN or Inf", node)
    squares = float(np.dot(flat, flat))
    if not math.isfinite(squares):  # float32 overflowed on values this large: sum them in float64
        squares = float(np.dot(flat.astype(np.float64), flat.astype(np.float64)))
    norm = math.sqrt(squares)
    if max_norm > 0 and norm > max_norm:
        if not clip:
            raise RejectedUpdate("norm-too-large", f"L2 norm {norm:.3g} > bound {max_norm:.3g}", node)
        scale = max_norm / norm
        if isinstance(delta, FlatDelta):
            return delta.scaled(scale), norm, True
        return OrderedDict((n, v * scale) for n, v in delta.items()), norm, True
    return delta, norm, False


def opener_for(cfg: EdgefedConfig, window: VersionWindow) -> UpdateOpener:
    """The gate every update passes: sealed mode needs the aggregator key and the device registry."""
    key, registry = None, None
    if cfg.transport == "sealed":
        cloud_keys = Path(cfg.keys_root) / "cloud"
        key = load_aggregator_key(cloud_keys)
        registry = DeviceRegistry(cloud_keys / "registry.json")
        log.info("sealed transport: %d registered devices", len(registry))
    else:
        log.warning("plain transport: updates are neither encrypted nor authenticated (debugging only)")
    return UpdateOpener(cfg.federation, key, registry, window, cfg.max_update_norm, cfg.clip_update_norm,
                        cfg.max_update_examples)
