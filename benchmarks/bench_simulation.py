"""Benchmark: the default `edgefed simulate` run against its centralized upper bound.

    python benchmarks/bench_simulation.py --json results/simulation.json

Runs the default simulation (the same defaults as `edgefed simulate`), then
trains the same model centrally on the union of the clients' training splits
with the same procedure and number of sample passes (rounds x local epochs
over every training clip, a fresh optimizer per round as on a client) and
evaluates both on the same central held-out set. Writes

    {"clients", "rounds", "wall_s", "peak_rss_mb", "final_accuracy",
     "chance_accuracy", "video_only_accuracy", "audio_only_accuracy",
     "centralized_accuracy"}

plus a few context fields (centralized_wall_s, heldout_examples, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgefed.commands.data import DEFAULT_CLIENTS, DEFAULT_CLIPS  # noqa: E402
from edgefed.common.config import EdgefedConfig  # noqa: E402
from edgefed.common.data.clip_manifest import read_manifest  # noqa: E402
from edgefed.common.data.features import FeatureSet, load_features  # noqa: E402
from edgefed.common.evaluation import evaluate  # noqa: E402
from edgefed.common.model.lora import build_lora_model  # noqa: E402
from edgefed.common.run_dir import new_run_id  # noqa: E402
from edgefed.common.training import train_local_epochs  # noqa: E402
from edgefed.edge.dataset import build_features  # noqa: E402
from edgefed.simulations.prepare import prepare  # noqa: E402
from edgefed.simulations.runner import run_federation  # noqa: E402
from edgefed.simulations.synthetic import SyntheticSpec  # noqa: E402


class PeakRss:
    """Peak resident memory of this process and all its children (Ray workers), sampled."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def centralized(cfg: EdgefedConfig, data_dir: Path, clients: int) -> tuple[float, float]:
    """Accuracy of the same model trained on the union of client train splits, same sample passes."""
    from edgefed.common.data.layout import DataLayout

    layout = DataLayout(data_dir)
    parts = []
    for pid in range(clients):
        features, _ = build_features(read_manifest(layout.client_train(pid)), cfg, layout.cache)
        if features is not None:
            parts.append(features)
    union = FeatureSet.concat(parts)
    central = load_features(layout.central_features)
    torch.set_num_threads(os.cpu_count() or 1)
    model = build_lora_model(cfg)
    start = time.perf_counter()
    # The same procedure a client runs, on all the data: `rounds` calls of
    # `local_epochs` epochs, each with a fresh optimizer, no averaging.
    for round_ in range(cfg.num_rounds):
        train_local_epochs(model, union, cfg, seed=cfg.seed + round_)
    wall = time.perf_counter() - start
    return evaluate(model, central, cfg.eval_batch_size).accuracy, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="run directories")
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--clips", type=int, default=DEFAULT_CLIPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="run-config key=value")
    args = parser.parse_args()

    run_id = "simulation-" + new_run_id()
    cfg = EdgefedConfig().with_overrides(args.overrides).replace(
        seed=args.seed, out_dir=str(args.out), run_id=run_id, min_clients=args.clients
    )
    start = time.perf_counter()
    with PeakRss() as rss:
        data = prepare(
            args.out / run_id / "data", cfg, args.clients, alpha=1.0,
            synthetic=SyntheticSpec(num_clips=args.clips, seed=args.seed),
            synthetic_dir=args.out / "datasets" / f"synthetic-n{args.clips}-s{args.seed}",
        )
        cfg = cfg.replace(data_dir=str(data.layout.root.resolve()))
        run = run_federation(cfg, args.clients)
    wall_s = time.perf_counter() - start
    summary = run.read_json("summary.json")
    central_acc, central_wall = centralized(cfg, data.layout.root, args.clients)

    result = {
        "clients": args.clients,
        "rounds": cfg.num_rounds,
        "wall_s": round(wall_s, 1),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "final_accuracy": summary["final_accuracy"],
        "chance_accuracy": summary["chance_accuracy"],
        "video_only_accuracy": summary["video_only_accuracy"],
        "audio_only_accuracy": summary["audio_only_accuracy"],
        "centralized_accuracy": central_acc,
        "centralized_wall_s": round(central_wall, 1),
        "heldout_examples": summary["heldout_examples"],
        "mode": summary["mode"],
        "versions": summary["versions"],
        "deployed_model": {k: summary["deployed_model"].get(k) for k in (
            "published", "version", "quantization", "size_mb", "federated_accuracy", "devices", "devices_installed")},
        "clips": data.clips,
        "run_dir": str(run.path),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
