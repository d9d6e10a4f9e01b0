"""Benchmark: how edgefed's cost grows with the fleet.

    python benchmarks/bench_scale.py --json results/scale.json [--parts aggregator,redis]

Parts (a subset re-measures those and keeps the other parts' fields of --json):

- clients: for 10, 100 and 1000 simulated clients (`--clients`), a short
  async run each in a child process (tiny generated clips, 10 a client,
  alpha 10, `--versions` versions, the same `concurrency` for every size):
  `prepare_s` (generation, partitioning, every clip's features into the
  shared cache, device keys), `wall_s_per_version` (the mean interval between
  versions after the first, from metrics.jsonl; 24 versions by default: the
  first few come from the tasks dispatched together at the start and arrive
  faster than the steady rate, at every fleet size, so a 4-version run
  measured that start more than the fleet) and `peak_rss_mb` (the
  machine's used memory at its peak during the run, above what it used
  before the run started, sampled every 0.25 s).

- ray: a short run of 2 clients on a two-node Ray cluster started on this
  machine (`ray start --head` and `ray start --address`, one CPU each, one
  CPU an actor): `ray_two_node_ok` if it completed with ClientApp actors on
  both nodes.
- aggregator: verify + open + decode + fold + commit throughput of the
  aggregator on a real redis-server (`appendfsync always`, as deployed), for
  `buffer-size` 2, 10 and 100, over the same number of sealed updates of the
  default adapter (default codec) buffered up front, each size
  `--aggregator-repeats` times interleaved, the median run kept; where the
  time goes, by the part of the aggregator's work that spends it
  (`aggregator_seconds_by_phase`).
- redis: 100,000 updates appended, read and folded (100 a version, max-staleness
  4) through the Redis store; `used_memory` after 20,000 and after 100,000.
- downlink: the default simulation (`edgefed simulate`, nothing set but the
  seed) for `--seeds` seeds, with downlink deltas (the default) and with
  `downlink-delta-codec` empty (the whole fp16 adapter with every task, as
  before); `bytes_down_per_task` (what the delta runs sent per training task)
  against `bytes_down_per_task_fp16_full` (what the same tasks cost with the
  whole fp16 adapter each, counted by the same runs), their ratio, and the
  final central accuracy of both kinds of run, per seed and averaged.

Writes {"clients", "wall_s_per_version", "peak_rss_mb", "prepare_s", "ray_two_node_ok", "aggregator_updates_per_s": {"2", "10", "100"}, "aggregator_seconds_by_phase",
"aggregator_ratio_100_vs_2", "redis_used_mb_after_20k_updates", "redis_used_mb_after_100k_updates",
"bytes_down_per_task", "bytes_down_per_task_fp16_full", "downlink_ratio", "downlink_final_accuracy",
"full_downlink_final_accuracy", "downlink_accuracy_gap_points"} plus context.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgefed.cloud.state.store import open_state_store  # noqa: E402
from edgefed.simulations.prepare import enrol_devices  # noqa: E402
from tests.aggregation_harness import aggregator_throughput, fold_through_store  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

PARTS = ("clients", "ray", "aggregator", "redis", "downlink")
CLIPS_PER_CLIENT = 10
BUFFERS = (2, 10, 100)


def aggregator(updates: int, repeats: int) -> dict:
    """Each buffer size `repeats` times, the sizes interleaved (2, 10, 100, 2, ...) so that the machine's
    drift falls on all of them; the median run of each size is its figure."""
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as redis:
        key_root = Path(tmp) / "keys"
        enrol_devices(key_root, 4)
        runs: dict[int, list] = {b: [] for b in BUFFERS}
        for _ in range(repeats):
            for buffer_size in BUFFERS:
                run = aggregator_throughput(redis.url, key_root, updates, buffer_size)
                runs[buffer_size].append(run)
                print(f"buffer {buffer_size}: {run.updates_per_s:.1f} updates/s {run.seconds_by_phase}", flush=True)
    median = {b: sorted(r, key=lambda run: run.updates_per_s)[len(r) // 2] for b, r in runs.items()}
    return {
        "aggregator_updates_per_s": {str(b): round(r.updates_per_s, 1) for b, r in median.items()},
        "aggregator_ratio_100_vs_2": round(median[100].updates_per_s / median[2].updates_per_s, 2),
        "aggregator_seconds_by_phase": {str(b): r.seconds_by_phase for b, r in median.items()},
        "aggregator_updates": updates,
        "aggregator_runs_updates_per_s": {str(b): [round(run.updates_per_s, 1) for run in r] for b, r in runs.items()},
    }


def redis_memory(updates: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp), fsync="no") as redis:
        store = open_state_store(redis.url, "bench-flat")
        used = fold_through_store(store, updates, 100, keep=5, measure_at=(20_000, updates))
        store.close()
    return {"redis_used_mb_after_20k_updates": round(used[20_000] / 2**20, 3),
            f"redis_used_mb_after_{updates // 1000}k_updates": round(used[updates] / 2**20, 3)}


def one_fleet(clients: int, versions: int, concurrency: int, work: Path) -> dict:
    """(child process) prepare and run one simulation; its figures (written to --json by the caller)."""
    from edgefed.common.config import EdgefedConfig
    from edgefed.simulations.prepare import prepare
    from edgefed.simulations.runner import run_federation
    from edgefed.simulations.synthetic import SyntheticSpec

    cfg = EdgefedConfig().replace(out_dir=str(work / "runs"), run_id=f"scale-{clients}", min_clients=clients,
                                  max_versions=versions, concurrency=concurrency, local_epochs=1,
                                  eval_every=versions, deployed_eval_devices=min(clients, 8), seed=0)
    spec = SyntheticSpec(num_clips=CLIPS_PER_CLIENT * clients, width=64, height=48, fps=6, duration_s=1.0, shots=1,
                         seed=0)
    started = time.perf_counter()
    data = prepare(work / "data", cfg, clients, alpha=10.0, synthetic=spec)
    prepare_s = time.perf_counter() - started
    run = run_federation(cfg.replace(data_dir=str(data.layout.root)), clients)
    walls = [float(r["wall_s"]) for r in run.read_metrics()]
    intervals = [round(b - a, 3) for a, b in zip(walls, walls[1:])]
    return {"prepare_s": round(prepare_s, 1), "versions": len(walls),
            "wall_s_per_version": round((walls[-1] - walls[0]) / max(len(walls) - 1, 1), 2),
            "version_intervals_s": intervals,
            "first_version_wall_s": round(walls[0], 1)}


class PeakMemory:
    """The machine's used memory at its highest while the block runs, above what it used when it began."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every_s = every_s
        self._done = threading.Event()
        self.start = self.peak = 0

    def _sample(self) -> None:
        while not self._done.wait(self.every_s):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = psutil.virtual_memory().used
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def peak_above_start(self) -> int:
        return self.peak - self.start


def fleets(sizes: list[int], versions: int, concurrency: int) -> dict:
    out: dict = {"clients": [], "wall_s_per_version": [], "peak_rss_mb": [], "prepare_s": [], "clients_runs": []}
    for clients in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            with PeakMemory() as memory:
                child = subprocess.run([sys.executable, __file__, "--json", str(Path(tmp) / "figures.json"), "--child",
                                        f"{clients},{versions},{concurrency},{tmp}"], capture_output=True, text=True,
                                       check=False)
            if child.returncode != 0:
                raise RuntimeError(f"{clients} clients: the run failed\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}")
            figures = json.loads((Path(tmp) / "figures.json").read_text())
        figures["peak_rss_mb"] = round(memory.peak_above_start / 2**20, 1)
        print(f"{clients} clients: {figures}", flush=True)
        out["clients"].append(clients)
        for key in ("wall_s_per_version", "peak_rss_mb", "prepare_s"):
            out[key].append(figures[key])
        out["clients_runs"].append({"clients": clients, **figures})
    out["concurrency"] = concurrency
    out["versions_per_fleet"] = versions
    out["wall_ratio_largest_vs_smallest"] = round(out["wall_s_per_version"][-1] / out["wall_s_per_version"][0], 2)
    return out


def two_node_ray() -> dict:
    from tests.servers import simulate_on_two_ray_nodes

    with tempfile.TemporaryDirectory() as tmp:
        versions, nodes = simulate_on_two_ray_nodes(Path(tmp))
    return {"ray_two_node_ok": versions == [1, 2] and len(nodes) == 2, "ray_nodes_with_clients": len(nodes)}


def _simulate(out: Path, seed: int, delta: bool) -> dict:
    run_id = f"downlink-{'delta' if delta else 'full'}-{seed}"
    cmd = [sys.executable, "-m", "edgefed.cli", "simulate", "--seed", str(seed), "--out", str(out), "--run-id", run_id]
    if not delta:
        cmd += ["--set", "downlink-delta-codec="]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{run_id} failed\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    from edgefed.common.run_dir import RunDir

    run = RunDir(out / run_id)
    lines, summary = run.read_metrics(), run.read_json("summary.json")
    figures = {"seed": seed, "tasks": sum(r["downlink_deltas"] + r["downlink_fulls"] for r in lines),
               "deltas": sum(r["downlink_deltas"] for r in lines), "bytes_down": sum(r["bytes_sent"] for r in lines),
               "bytes_down_fp16_full": sum(r["bytes_sent_full_adapter"] for r in lines),
               "final_accuracy": summary["final_accuracy"], "wall_s": summary["wall_s"]}
    print(f"{run_id}: {figures}", flush=True)
    return figures


def downlink(seeds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {kind: [_simulate(Path(tmp), seed, kind == "delta") for seed in range(seeds)] for kind in ("delta", "full")}
    delta, full = runs["delta"], runs["full"]
    per_task = sum(r["bytes_down"] for r in delta) / sum(r["tasks"] for r in delta)
    per_task_full = sum(r["bytes_down_fp16_full"] for r in delta) / sum(r["tasks"] for r in delta)
    accuracy = sum(r["final_accuracy"] for r in delta) / seeds
    full_accuracy = sum(r["final_accuracy"] for r in full) / seeds
    return {"bytes_down_per_task": round(per_task), "bytes_down_per_task_fp16_full": round(per_task_full),
            "downlink_ratio": round(per_task / per_task_full, 4),
            "full_runs_bytes_down_per_task": round(sum(r["bytes_down"] for r in full) / sum(r["tasks"] for r in full)),
            "downlink_final_accuracy": round(accuracy, 4), "full_downlink_final_accuracy": round(full_accuracy, 4),
            "downlink_accuracy_gap_points": round(100 * (accuracy - full_accuracy), 2), "downlink_runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--aggregator-updates", type=int, default=400, help="updates per buffer size and run")
    parser.add_argument("--aggregator-repeats", type=int, default=3, help="runs of each buffer size (median kept)")
    parser.add_argument("--redis-updates", type=int, default=100_000)
    parser.add_argument("--clients", default="10,100,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--versions", type=int, default=24, help="versions of each fleet's run")
    parser.add_argument("--concurrency", type=int, default=8, help="devices training at a time, every fleet size")
    parser.add_argument("--seeds", type=int, default=3, help="downlink: seeds of each kind of run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        clients, versions, concurrency, work = args.child.split(",", 3)
        args.json.write_text(json.dumps(one_fleet(int(clients), int(versions), int(concurrency), Path(work))))
        return
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts {sorted(parts - set(PARTS))}: choose from {', '.join(PARTS)}")
    out: dict = json.loads(args.json.read_text()) if parts != set(PARTS) and args.json.exists() else {}
    out["load_average_1min_before"] = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    if "clients" in parts:
        out.update(fleets([int(c) for c in args.clients.split(",")], args.versions, args.concurrency))
    if "ray" in parts:
        out.update(two_node_ray())
    if "aggregator" in parts:
        out.update(aggregator(args.aggregator_updates, args.aggregator_repeats))
    if "redis" in parts:
        out.update(redis_memory(args.redis_updates))
    if "downlink" in parts:
        out.update(downlink(args.seeds))
    out["wall_s"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
