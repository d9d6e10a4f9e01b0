"""Benchmark: asynchronous FedBuff against synchronous FedAvg on slow, uneven devices.

    python benchmarks/bench_async.py --json results/async.json

1. Sync FedAvg and async FedBuff run on the same generated data, partitions,
   clients and device profile (`mobile-skewed` by default: half flagships, a
   quarter mid-range, a quarter low-end devices ~8x slower on thin links).
   Every client's feature cache is filled first, so neither run pays the
   first-round media decoding. The sync run's final central accuracy is the
   target; each run's time to target is the wall time (from the ServerApp's
   start) of the first version whose central accuracy reaches it. The async
   run gets the sync run's wall time as its budget.
2. aggregator_updates_per_s: verify + open + decode + fold + commit throughput
   of the aggregator on a real redis-server, over sealed updates of the real
   adapter made with the default codec, with the default buffer size.
3. recovery_s: the aggregation worker is SIGKILLed while updates keep
   arriving; the time from its restart to its next committed version.

Writes {"profile", "clients", "target_accuracy", "sync_time_to_target_s",
"async_time_to_target_s", "speedup", "sync_final_accuracy",
"async_final_accuracy", "aggregator_updates_per_s", "recovery_s"} plus context.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgefed.cloud.state.store import open_state_store  # noqa: E402
from edgefed.commands.data import DEFAULT_CLIENTS, DEFAULT_CLIPS  # noqa: E402
from edgefed.common.config import EdgefedConfig  # noqa: E402
from edgefed.common.data.clip_manifest import read_manifest  # noqa: E402
from edgefed.common.model.lora import build_lora_model, get_adapter_state  # noqa: E402
from edgefed.common.run_dir import new_run_id  # noqa: E402
from edgefed.edge.dataset import build_features  # noqa: E402
from edgefed.simulations.prepare import enrol_devices, prepare  # noqa: E402
from edgefed.simulations.runner import run_federation  # noqa: E402
from edgefed.simulations.synthetic import SyntheticSpec  # noqa: E402
from tests.aggregation_harness import (  # noqa: E402
    WorkerProcess,
    aggregator_throughput,
    device_credentials,
    random_delta,
    send_update,
)
from tests.servers import RedisServer  # noqa: E402


def time_to(records: list[dict], target: float) -> float | None:
    for r in records:
        if r.get("accuracy") is not None and r["accuracy"] >= target - 1e-9:
            return float(r["wall_s"])
    return None


def federations(args: argparse.Namespace) -> dict:
    base = EdgefedConfig().replace(seed=args.seed, out_dir=str(args.out), min_clients=args.clients,
                                   device_profile=args.profile, num_rounds=args.sync_rounds)
    data = prepare(args.out / f"data-{new_run_id()}", base, args.clients, alpha=1.0,
                   synthetic=SyntheticSpec(num_clips=args.clips, seed=args.seed),
                   synthetic_dir=args.out / "datasets" / f"synthetic-n{args.clips}-s{args.seed}")
    for pid in range(args.clients):  # warm every client's feature cache: both runs start equal
        for manifest in (data.layout.client_train(pid), data.layout.client_heldout(pid)):
            build_features(read_manifest(manifest), base, data.layout.cache)
    base = base.replace(data_dir=str(data.layout.root.resolve()))

    sync_run = run_federation(base.replace(mode="sync", run_id=f"sync-{new_run_id()}"), args.clients)
    sync_summary = sync_run.read_json("summary.json")
    target = sync_summary["final_accuracy"]
    print(f"sync: final {target:.4f} in {sync_summary['wall_s']:.0f} s", flush=True)

    async_run = run_federation(base.replace(mode="async", run_id=f"async-{new_run_id()}", max_versions=100000,
                                            wall_budget_s=float(sync_summary["wall_s"])), args.clients)
    async_summary = async_run.read_json("summary.json")
    sync_t = time_to(sync_run.read_metrics(), target)
    async_t = time_to(async_run.read_metrics(), target)
    print(f"async: final {async_summary['final_accuracy']:.4f}, {async_summary['versions']} versions, "
          f"target reached at {async_t}", flush=True)
    return {
        "target_accuracy": target,
        "sync_time_to_target_s": sync_t,
        "async_time_to_target_s": async_t,
        "speedup": round(sync_t / async_t, 3) if sync_t and async_t else None,
        "sync_final_accuracy": target,
        "async_final_accuracy": async_summary["final_accuracy"],
        "sync_wall_s": sync_summary["wall_s"],
        "async_wall_s": async_summary["wall_s"],
        "async_versions": async_summary["versions"],
        "async_failures": sum(r["failures"] for r in async_run.read_metrics()),
        "sync_run": str(sync_run.path), "async_run": str(async_run.path),
    }


def recovery(redis_url: str, key_root: Path) -> float:
    federation = f"recovery-{new_run_id()}"
    overrides = [f"state-store={redis_url}", f"federation={federation}", f"key-dir={key_root}", "max-versions=100000"]
    cfg = EdgefedConfig().with_overrides(overrides)
    shapes = {n: t.shape for n, t in get_adapter_state(build_lora_model(cfg)).items()}
    store = open_state_store(redis_url, federation)
    devices = device_credentials(key_root, 4)
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            send_update(store, devices[i % 4], random_delta(shapes, seed=i), cfg.update_codec)
            i += 1
            time.sleep(0.1)

    worker = WorkerProcess(overrides)
    deadline = time.time() + 120
    while store.latest_version() is None:  # the worker publishes version 0 when it starts
        if time.time() > deadline:
            raise RuntimeError("the worker never published version 0")
        time.sleep(0.1)
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    if worker.first_version_after_start(timeout=120) is None:
        raise RuntimeError("the worker never aggregated")
    time.sleep(2.0)  # mid-run: updates arriving, some read and not yet committed
    worker.kill()
    restarted = WorkerProcess(overrides)
    seconds = restarted.first_version_after_start(timeout=120)
    stop.set()
    restarted.kill()
    store.close()
    if seconds is None:
        raise RuntimeError("the restarted worker did not publish a version within 120 s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-async"))
    parser.add_argument("--profile", default="mobile-skewed")
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--clips", type=int, default=DEFAULT_CLIPS)
    parser.add_argument("--sync-rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--throughput-updates", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as redis:
        key_root = Path(tmp) / "keys"
        enrol_devices(key_root, 4)
        updates_per_s = aggregator_throughput(redis.url, key_root, args.throughput_updates).updates_per_s
        print(f"aggregator: {updates_per_s:.1f} updates/s", flush=True)
        recovery_s = recovery(redis.url, key_root)
        print(f"recovery: {recovery_s:.2f} s", flush=True)
    out = {"profile": args.profile, "clients": args.clients, **federations(args),
           "aggregator_updates_per_s": round(updates_per_s, 1), "recovery_s": round(recovery_s, 2),
           "sync_rounds": args.sync_rounds, "clips": args.clips, "seed": args.seed}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
