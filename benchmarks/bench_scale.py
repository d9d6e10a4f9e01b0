"""Benchmark: how edgefed's cost grows with the fleet.

    python benchmarks/bench_scale.py --json results/scale.json [--parts aggregator,redis]

Parts (a subset re-measures those and keeps the other parts' fields of --json):

- aggregator: verify + open + decode + fold + commit throughput of the
  aggregator on a real redis-server (`appendfsync always`, as deployed), for
  `buffer-size` 2, 10 and 100, over the same number of sealed updates of the
  default adapter (default codec) buffered up front; where the time goes, by
  the part of the aggregator's work that spends it
  (`aggregator_seconds_by_phase`).
- redis: 100,000 updates appended, read and folded (100 a version, max-staleness
  4) through the Redis store; `used_memory` after 20,000 and after 100,000.

Writes {"aggregator_updates_per_s": {"2", "10", "100"}, "aggregator_seconds_by_phase",
"aggregator_ratio_100_vs_2", "redis_used_mb_after_20k_updates", "redis_used_mb_after_100k_updates"}
plus context. The issue's other fields ("clients", "wall_s_per_version", "peak_rss_mb",
"prepare_s", "ray_two_node_ok", "bytes_down_per_task", "bytes_down_per_task_fp16_full") come
from parts not built yet and are absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgefed.cloud.state.store import open_state_store  # noqa: E402
from edgefed.simulations.prepare import enrol_devices  # noqa: E402
from tests.aggregation_harness import aggregator_throughput, fold_through_store  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

PARTS = ("aggregator", "redis")
BUFFERS = (2, 10, 100)


def aggregator(updates: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as redis:
        key_root = Path(tmp) / "keys"
        enrol_devices(key_root, 4)
        runs = {}
        for buffer_size in BUFFERS:
            runs[buffer_size] = aggregator_throughput(redis.url, key_root, updates, buffer_size)
            print(f"buffer {buffer_size}: {runs[buffer_size].updates_per_s:.1f} updates/s "
                  f"{runs[buffer_size].seconds_by_phase}", flush=True)
    return {
        "aggregator_updates_per_s": {str(b): round(r.updates_per_s, 1) for b, r in runs.items()},
        "aggregator_ratio_100_vs_2": round(runs[100].updates_per_s / runs[2].updates_per_s, 2),
        "aggregator_seconds_by_phase": {str(b): r.seconds_by_phase for b, r in runs.items()},
        "aggregator_updates": updates,
    }


def redis_memory(updates: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp), fsync="no") as redis:
        store = open_state_store(redis.url, "bench-flat")
        used = fold_through_store(store, updates, 100, keep=5, measure_at=(20_000, updates))
        store.close()
    return {"redis_used_mb_after_20k_updates": round(used[20_000] / 2**20, 3),
            f"redis_used_mb_after_{updates // 1000}k_updates": round(used[updates] / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--aggregator-updates", type=int, default=400, help="updates per buffer size")
    parser.add_argument("--redis-updates", type=int, default=100_000)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts {sorted(parts - set(PARTS))}: choose from {', '.join(PARTS)}")
    out: dict = json.loads(args.json.read_text()) if parts != set(PARTS) and args.json.exists() else {}
    out["load_average_1min_before"] = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    if "aggregator" in parts:
        out.update(aggregator(args.aggregator_updates))
    if "redis" in parts:
        out.update(redis_memory(args.redis_updates))
    out["wall_s"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
