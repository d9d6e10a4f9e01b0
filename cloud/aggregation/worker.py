"""A standalone aggregation worker: folds a federation's buffered updates into versions.

    python -m edgefed.cloud.aggregation.worker --set state-store=redis://127.0.0.1:6379/0 --set federation=NAME ...

The ServerApp's Grid loop (cloud/grid/fedbuff_loop.py) runs the same
`FedBuffAggregator` in process. This worker runs it alone against the state
store, without Flower: whatever has been appended to the federation's buffer
(by a Grid loop, or any ingest) is opened, checked and folded. Because all
its state is in the store it can be killed at any instant and started again;
that is how crash recovery is tested (tests/test_aggregator_recovery.py) and
measured (benchmarks/bench_async.py). One JSON line per event on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from edgefed.cloud.aggregation.fedbuff import FedBuffAggregator
from edgefed.common.config import EdgefedConfig
from edgefed.common.model.lora import build_lora_model, get_adapter_state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="run-config key=value")
    args = parser.parse_args(argv)
    cfg = EdgefedConfig().with_overrides(args.overrides)
    aggregator = FedBuffAggregator.from_config(cfg, get_adapter_state(build_lora_model(cfg)))
    _emit({"event": "resumed", "version": aggregator.resume(), "buffered": aggregator.store.buffer_depth()})
    while aggregator.version < cfg.max_versions:
        for event in aggregator.step(block_ms=200, stop_at=cfg.max_versions):
            _emit({"event": "version", "version": event.version, "updates": len(event.nodes),
                   "nodes": event.nodes, "staleness": event.staleness, "rejected": dict(event.rejected)})
    _emit({"event": "done", "version": aggregator.version})
    aggregator.store.close()
    return 0


def _emit(record: dict) -> None:
    print(json.dumps({**record, "time": time.time()}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
