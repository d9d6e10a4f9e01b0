"""Benchmark: the cloud's DDP trainer — throughput per rank count, and what a warm start buys.

    python benchmarks/bench_global_trainer.py --json results/global_trainer.json

1. Throughput: `edgefed cloud train` under torchrun with 1 and 2 ranks
   (gloo on CPU; the 2 ranks share this machine's cores, so they will not
   scale here) on the default model, global batch `trainer-batch-size`;
   samples/s over the steps after the first two (warm-up excluded).
   On GPUs: `--ranks 1 8` on an 8-GPU node measures the same fields with NCCL.
2. Warm start: the cloud's own clips (generated with another seed than the
   devices') pretrain the base for `--pretrain-s` seconds' worth of steps;
   then the default federation runs twice on the same data, clients and
   profile with the same wall budget: cold (random base) and warm
   (`base-checkpoint` = the trainer's checkpoint directory, whose encoders
   every device fetches from the model service like any checkpoint base).
   Time to target is the first version whose central accuracy reaches the
   cold run's final accuracy (wall time of the federated run; the
   pretraining's own time is reported separately).

Writes {"samples_per_s": {"1": ..., "2": ...}, "scaling_efficiency_2", "device",
"warm_start_final_accuracy", "cold_start_final_accuracy", "warm_start_time_to_target_s",
"cold_start_time_to_target_s", "target_accuracy", "wall_budget_s", "pretrain_steps", "pretrain_s",
"warm_start_devices_with_base" (devices that installed the warm base from the model service),
"load_avg_1min" (the machine's load at the start and end: other work shares the cores)}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefed.cloud.training.ddp_trainer import BASE_CHECKPOINT  # noqa: E402
from edgefed.commands.data import DEFAULT_CLIENTS, DEFAULT_CLIPS  # noqa: E402
from edgefed.common.config import EdgefedConfig  # noqa: E402
from edgefed.common.run_dir import new_run_id  # noqa: E402
from edgefed.common.wire.base_manifest import base_fingerprint_of_dirs  # noqa: E402
from edgefed.simulations.prepare import prepare  # noqa: E402
from edgefed.simulations.runner import run_federation  # noqa: E402
from edgefed.simulations.synthetic import SyntheticSpec, generate  # noqa: E402

CLOUD_SEED = 100


def torchrun_train(ranks: int, out: Path, source: list[str], settings: list[str], cores: int) -> list[dict]:
    """Run `edgefed cloud train` under torchrun; returns its trainer.jsonl records."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(cores // ranks, 1)), "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "edgefed.cli", "cloud", "train", "--out", str(out), *source,
           *[arg for s in settings for arg in ("--set", s)]]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return [json.loads(line) for line in (out / "trainer.jsonl").read_text().splitlines()]


def samples_per_s(records: list[dict], batch: int) -> float:
    timed = records[2:]  # the first steps pay for allocation and kernel selection
    span = timed[-1]["wall_s"] - records[1]["wall_s"]
    return len(timed) * batch / span


def time_to(records: list[dict], target: float) -> float | None:
    for r in records:
        if r.get("accuracy") is not None and r["accuracy"] >= target:
            return r["wall_s"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-global-trainer"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--throughput-steps", type=int, default=12)
    parser.add_argument("--cloud-clips", type=int, default=DEFAULT_CLIPS)
    parser.add_argument("--pretrain-s", type=float, default=180.0, help="pretraining budget, in steps at 1 rank")
    parser.add_argument("--wall-budget-s", type=float, default=180.0, help="each federated run's wall budget")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    cfg = EdgefedConfig()
    batch = cfg.trainer_batch_size

    # --- the cloud's own data (another seed than the devices'), extracted once --------------
    cloud_manifest = generate(args.out / "datasets" / f"cloud-n{args.cloud_clips}-s{CLOUD_SEED}",
                              SyntheticSpec(num_clips=args.cloud_clips, seed=CLOUD_SEED))
    extract_dir = args.out / "cloud-features"
    features = extract_dir / "features.safetensors"
    if not features.exists():
        torchrun_train(1, extract_dir, ["--manifest", str(cloud_manifest), "--cache", str(args.out / "cache")],
                       ["trainer-steps=1"], args.cores)

    # --- throughput ---------------------------------------------------------------------------
    rates = {}
    for ranks in args.ranks:
        out = args.out / f"throughput-{ranks}-{new_run_id()}"
        records = torchrun_train(ranks, out, ["--features", str(features)],
                                 [f"trainer-steps={args.throughput_steps}", "trainer-checkpoint-every=1000"], args.cores)
        rates[str(ranks)] = round(samples_per_s(records, batch), 2)
        print(f"{ranks} rank(s): {rates[str(ranks)]} samples/s", flush=True)

    # --- warm start: pretrain the base on the cloud's clips ---------------------------------------
    steps = max(int(args.pretrain_s * rates["1"] / batch), 10)
    pretrain_dir = args.out / f"pretrain-{new_run_id()}"
    start = time.perf_counter()
    torchrun_train(1, pretrain_dir, ["--features", str(features)], [f"trainer-steps={steps}"], args.cores)
    pretrain_s = time.perf_counter() - start

    # --- the two federations: same data, clients, profile and wall budget -------------------------
    data = prepare(args.out / "fed-data", cfg, DEFAULT_CLIENTS, alpha=1.0,
                   synthetic=SyntheticSpec(num_clips=DEFAULT_CLIPS, seed=cfg.seed),
                   synthetic_dir=args.out / "datasets" / f"synthetic-n{DEFAULT_CLIPS}-s{cfg.seed}")
    results = {}
    for name, base in (("cold", ""), ("warm", str((pretrain_dir / BASE_CHECKPOINT).resolve()))):
        run_cfg = cfg.replace(out_dir=str(args.out), run_id=f"{name}-{new_run_id()}", data_dir=str(data.layout.root),
                              min_clients=DEFAULT_CLIENTS, max_versions=10_000, wall_budget_s=args.wall_budget_s,
                              base_checkpoint=base, export_every=0)
        run = run_federation(run_cfg, DEFAULT_CLIENTS)
        results[name] = (run.read_json("summary.json"), run.read_metrics())
        print(name, results[name][0]["final_accuracy"], flush=True)
    target = results["cold"][0]["final_accuracy"]
    checkpoint = pretrain_dir / BASE_CHECKPOINT
    fingerprint = base_fingerprint_of_dirs(checkpoint / "video", checkpoint / "audio")
    with_base = sum((data.layout.root / "devices" / f"client-{i}" / "bases" / fingerprint).is_dir()
                    for i in range(DEFAULT_CLIENTS))
    out = {
        "samples_per_s": rates,
        "scaling_efficiency_2": round(rates["2"] / (2 * rates["1"]), 3) if {"1", "2"} <= set(rates) else None,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "warm_start_final_accuracy": results["warm"][0]["final_accuracy"],
        "cold_start_final_accuracy": target,
        "warm_start_time_to_target_s": time_to(results["warm"][1], target),
        "cold_start_time_to_target_s": time_to(results["cold"][1], target),
        "target_accuracy": target,
        "wall_budget_s": args.wall_budget_s,
        "warm_start_initial_accuracy": results["warm"][0]["initial_accuracy"],
        "cold_start_initial_accuracy": results["cold"][0]["initial_accuracy"],
        "versions": {name: r[0]["versions"] for name, r in results.items()},
        "pretrain_steps": steps,
        "pretrain_s": round(pretrain_s, 1),
        "warm_start_devices_with_base": with_base,
        "cores": args.cores,
        "load_avg_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
