"""Sizing each device's work from what it reports about itself.

An edge agent puts the cores it offers for training and its memory in its
node config; the ClientApp returns them with every update (reply metrics
common/wire/capabilities.py). The aggregator keeps the latest report per
node and adjusts that node's next instruction: torch threads to the offered
cores, smaller batches on a small-memory device (the activations of a batch
of 8 clips are what a 1 GB device cannot hold). Nodes that report nothing get
the run config unchanged, so simulations are unaffected.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgefed.common.config import EdgefedConfig
from edgefed.common.wire.capabilities import DEVICE_CORES, DEVICE_MEMORY_MB

MAX_TRAIN_THREADS = 8  # past this a small LoRA step gains nothing from more threads
LOW_MEMORY_MB = 2048
LOW_MEMORY_BATCH = 4


def work_for(cfg: EdgefedConfig, capabilities: Mapping[str, float]) -> dict[str, int]:
    """Run-config overrides for one device's next instruction."""
    overrides: dict[str, int] = {}
    cores = capabilities.get(DEVICE_CORES)
    if cores and cores >= 1:
        overrides["client-threads"] = int(min(cores, MAX_TRAIN_THREADS))
    memory = capabilities.get(DEVICE_MEMORY_MB)
    if memory and memory < LOW_MEMORY_MB:
        overrides["batch-size"] = min(cfg.batch_size, LOW_MEMORY_BATCH)
        overrides["eval-batch-size"] = min(cfg.eval_batch_size, 4 * LOW_MEMORY_BATCH)
    return overrides
