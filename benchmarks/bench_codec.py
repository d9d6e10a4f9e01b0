"""Benchmark: update codecs on the wire, and what they cost in accuracy.

    python benchmarks/bench_codec.py --json results/codec.json

For each codec: the default simulation runs with it once per seed (sealed
transport, as in production; each seed is a different generated dataset,
partition and initialisation, the same seeds for every codec), giving the
mean sealed update size actually received and the final accuracy, averaged
over the seeds because one held-out clip is 1.25 points of a single run; and, single-threaded on the same adapter-shaped delta,
the encode throughput and the verify + open + decode throughput (MB/s of
decoded float32 tensor data per core). `none` is the uncompressed run the
others are compared with. Writes

    {"fp32_bytes", "default_codec", "codecs": {SPEC: {"bytes", "ratio_vs_fp32",
     "encode_mb_s", "open_decode_mb_s", "final_accuracy"}}, "uncompressed_final_accuracy"}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgefed.cloud.aggregation.update_opener import UpdateOpener  # noqa: E402
from edgefed.cloud.aggregation.version_window import IssuedVersions  # noqa: E402
from edgefed.commands.data import DEFAULT_CLIENTS, DEFAULT_CLIPS  # noqa: E402
from edgefed.common.config import EdgefedConfig  # noqa: E402
from edgefed.common.keys import DeviceRegistry  # noqa: E402
from edgefed.common.model.lora import build_lora_model, get_adapter_state  # noqa: E402
from edgefed.common.run_dir import new_run_id  # noqa: E402
from edgefed.common.wire.codec import CodecSpec, encode  # noqa: E402
from edgefed.common.wire.envelope import UpdateContext, seal  # noqa: E402
from edgefed.simulations.prepare import prepare  # noqa: E402
from edgefed.simulations.runner import run_federation  # noqa: E402
from edgefed.simulations.synthetic import SyntheticSpec  # noqa: E402

CODECS = ["none", "fp16", "int8", "topk0.05+int8+zstd"]


def throughput(spec: str, reference: OrderedDict, repeat: int = 20) -> tuple[float, float]:
    """(encode MB/s, verify+open+decode MB/s) of decoded float32 data, one thread."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    delta = OrderedDict((n, torch.randn(v.shape, generator=g) * 0.01) for n, v in reference.items())
    mb = sum(v.numel() * 4 for v in delta.values()) / 1e6
    start = time.perf_counter()
    for _ in range(repeat):
        payload = encode(delta, spec)
    encode_s = (time.perf_counter() - start) / repeat

    agg, dev = X25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    registry = DeviceRegistry(None)
    registry.register("bench", dev.public_key())
    window = IssuedVersions()
    window.issue(0)
    opener = UpdateOpener("bench", agg, registry, window, max_norm=0.0, clip=False)
    sealed = [seal(payload, UpdateContext("bench", "bench", 0, UpdateContext.new_update_id(), 1.0), agg.public_key(), dev)
              for _ in range(repeat)]
    start = time.perf_counter()
    for data in sealed:
        opener.open(data, delta)
    open_s = (time.perf_counter() - start) / repeat
    return mb / encode_s, mb / open_s


def simulate(spec: str, seed: int, args: argparse.Namespace) -> tuple[float, float]:
    """(final accuracy, mean sealed update bytes) of the default simulation with this codec."""
    run_id = f"codec-{spec.replace('+', '_')}-s{seed}-{new_run_id()}"
    cfg = EdgefedConfig().replace(seed=seed, out_dir=str(args.out), run_id=run_id,
                                  min_clients=args.clients, update_codec=spec)
    data = prepare(args.out / run_id / "data", cfg, args.clients, alpha=1.0,
                   synthetic=SyntheticSpec(num_clips=args.clips, seed=seed),
                   synthetic_dir=args.out / "datasets" / f"synthetic-n{args.clips}-s{seed}")
    run = run_federation(cfg.replace(data_dir=str(data.layout.root.resolve())), args.clients)
    rounds = run.read_metrics()
    updates = sum(r["clients"] + sum(r["rejected"].values()) for r in rounds)
    mean_bytes = sum(r["bytes_received"] for r in rounds) / max(updates, 1)
    return run.read_json("summary.json")["final_accuracy"], mean_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-codec"))
    parser.add_argument("--codecs", nargs="*", default=CODECS)
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--clips", type=int, default=DEFAULT_CLIPS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one simulation per codec and seed; accuracies are averaged")
    args = parser.parse_args()

    default = EdgefedConfig().update_codec
    codecs = list(dict.fromkeys(["none", *args.codecs, default]))
    reference = get_adapter_state(build_lora_model(EdgefedConfig()))
    fp32_bytes = sum(v.numel() * 4 for v in reference.values())
    results = {}
    for spec in codecs:
        CodecSpec.parse(spec)
        enc, dec = throughput(spec, reference)
        runs = [simulate(spec, seed, args) for seed in args.seeds]
        accuracies = [accuracy for accuracy, _ in runs]
        mean_bytes = sum(size for _, size in runs) / len(runs)
        results[spec] = {"bytes": round(mean_bytes), "ratio_vs_fp32": round(fp32_bytes / mean_bytes, 2),
                         "encode_mb_s": round(enc, 1), "open_decode_mb_s": round(dec, 1),
                         "final_accuracy": round(sum(accuracies) / len(accuracies), 4),
                         "final_accuracy_per_seed": accuracies}
        print(spec, results[spec], flush=True)
    out = {"fp32_bytes": fp32_bytes, "default_codec": default, "seeds": args.seeds, "codecs": results,
           "uncompressed_final_accuracy": results["none"]["final_accuracy"]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
