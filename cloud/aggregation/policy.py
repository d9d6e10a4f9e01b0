"""Policy of the asynchronous aggregator: how much an update counts, when to aggregate.

Mechanics (messages, the durable buffer, versions) live in cloud/aggregation/fedbuff.py and
cloud/grid/fedbuff_loop.py; this module only decides. A new policy is one small
class with `weight` and `ready`.

FedBuff (Nguyen et al., 2022): each update is discounted by its staleness
(versions published since the client's base) with s(t) = 1 / (1 + t)^a,
a = 0.5 by default, and the server aggregates once `buffer_size` updates are in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

StalenessWeight = Callable[[int], float]


def polynomial(exponent: float = 0.5) -> StalenessWeight:
    """s(t) = (1 + t)^-a: FedBuff's and FedAsync's default discount."""
    return lambda staleness: (1.0 + staleness) ** -exponent


def constant() -> StalenessWeight:
    return lambda staleness: 1.0


def hinge(a: float = 10.0, b: int = 4) -> StalenessWeight:
    """Full weight up to b versions, then 1 / (a (t - b) + 1) (FedAsync's hinge)."""
    return lambda staleness: 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)


def parse_staleness_weight(spec: str) -> StalenessWeight:
    """`poly0.5`, `poly1`, `constant`, `hinge` (10, 4) or `hinge10:4`."""
    try:
        if spec == "constant":
            return constant()
        if spec.startswith("poly"):
            exponent = float(spec[4:] or 0.5)
            if exponent < 0 or not math.isfinite(exponent):
                raise ValueError(spec)
            return polynomial(exponent)
        if spec.startswith("hinge"):
            a, _, b = spec[5:].partition(":")
            return hinge(float(a or 10.0), int(b or 4))
    except ValueError:
        pass
    raise ValueError(f"unknown staleness weight {spec!r}: use polyA (e.g. poly0.5), constant or hingeA:B")


@dataclass
class PendingUpdate:
    """What a policy may look at: an opened, checked update waiting in the buffer."""

    node: str
    base_version: int
    num_examples: float
    received_at: float

    def staleness(self, current_version: int) -> int:
        """Versions published since its base."""
        return max(current_version - self.base_version, 0)


class AggregationPolicy(Protocol):
    def weight(self, update: PendingUpdate, current_version: int) -> float:
        """Contribution of this update to the next version (before normalisation by examples)."""

    def ready(self, buffer: Sequence[PendingUpdate]) -> bool:
        """Whether to aggregate the buffer into a new version now."""


@dataclass
class FedBuffPolicy:
    buffer_size: int
    staleness_weight: StalenessWeight

    def weight(self, update: PendingUpdate, current_version: int) -> float:
        return self.staleness_weight(update.staleness(current_version))

    def ready(self, buffer: Sequence[PendingUpdate]) -> bool:
        return len(buffer) >= self.buffer_size
