"""Sizing each device's work from what it reports about itself.

An edge agent puts the cores it offers for training and its memory in its
node config; the ClientApp returns them with every update (reply metrics
common/wire/capabilities.py). The aggregator keeps the latest report per
node and adjusts that node's next instruction: torch threads to the offered
cores. Memory is the device's own business: it knows the model it builds, so
it plans its base precision and batch size itself (edge/training/plan.py).
Nodes that report nothing get the run config unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgefed.common.config import EdgefedConfig
from edgefed.common.wire.capabilities import DEVICE_CORES

MAX_TRAIN_THREADS = 8  # past this a small LoRA step gains nothing from more threads


def work_for(cfg: EdgefedConfig, capabilities: Mapping[str, float]) -> dict[str, int]:
    """Run-config overrides for one device's next instruction."""
    overrides: dict[str, int] = {}
    cores = capabilities.get(DEVICE_CORES)
    if cores and cores >= 1:
        overrides["client-threads"] = int(min(cores, MAX_TRAIN_THREADS))
    return overrides
