"""What a device says about itself: the node-config keys an edge agent sets and every reply carries.

The agent writes them into its SuperNode's node config; the ClientApp copies
them into each train reply's metrics; the cloud sizes that device's next work
from them (cloud/grid/work_sizing.py) and keeps them per device in its state.
"""

from __future__ import annotations

from collections.abc import Mapping

DEVICE_CORES = "device-cores"  # cores the device offers for training
DEVICE_MEMORY_MB = "device-memory-mb"  # memory it offers, MB
CAPABILITY_KEYS = (DEVICE_CORES, DEVICE_MEMORY_MB)
# Bits a weight of the frozen base the device trained on (32, 8, 4): in each train reply's metrics.
BASE_BITS = "base-bits"
# Starts the reason of a device's refusal to train at all (its memory holds no plan: edge/training/plan.py).
# The refusal reaches the cloud as the error reply's reason; the async loop stops sending that device work.
TOO_SMALL = "device-too-small"


def capabilities_of(values: Mapping[str, object]) -> dict[str, float]:
    """The capability entries of a node config or reply metrics, as floats (others ignored)."""
    return {k: float(v) for k, v in values.items()  # type: ignore[arg-type]
            if k in CAPABILITY_KEYS and isinstance(v, int | float | str) and _is_number(v)}


def _is_number(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True
