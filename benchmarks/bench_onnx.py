"""Benchmark: the model devices run — PyTorch FP32 against ONNX FP32, INT8 and INT4.

    python benchmarks/bench_onnx.py --json results/onnx.json

One trained model (the adapter of a run's checkpoint with `--run RUN_DIR`;
by default the default LoRA model trained centrally on the default
simulation's training clips for `--epochs`), merged, exported and
quantized as the cloud publishes it. Held-out clips: the 80 central ones
plus `--heldout-clips` unseen clips generated with another seed. Every variant runs in this process on
the same inputs with the same thread count (`--threads`, default 2):
latency is the median over `--repeat` calls at batch 1 and batch 8,
alternating the variants call by call so a noisy neighbour hits them
all alike; accuracy is on the central held-out clips; agreement is the
share of those clips where the variant's argmax equals PyTorch FP32's.
Writes

    {"threads", "heldout_examples", "models": {NAME: {"size_mb", "latency_ms_batch1",
     "latency_ms_batch8", "heldout_accuracy", "argmax_agreement_vs_torch"}},
     "int8_size_ratio", "int8_latency_ratio_batch1", "int8_accuracy_gap"}

for NAME in torch_fp32, onnx_fp32, onnx_int8, onnx_int4. torch_fp32's size is
its parameters at 4 bytes each (the state a device would ship).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgefed.cloud.publishing.onnx_export import example_inputs, export_quantized, file_size, merged_model  # noqa: E402
from edgefed.commands.data import DEFAULT_CLIENTS, DEFAULT_CLIPS  # noqa: E402
from edgefed.common.config import EdgefedConfig  # noqa: E402
from edgefed.common.data.clip_manifest import read_manifest  # noqa: E402
from edgefed.common.data.features import FeatureSet, load_features  # noqa: E402
from edgefed.common.data.layout import DataLayout  # noqa: E402
from edgefed.common.evaluation import evaluate  # noqa: E402
from edgefed.common.model.lora import build_lora_model, get_adapter_state  # noqa: E402
from edgefed.common.onnx_inference import INPUT_NAMES, evaluate_onnx, onnx_logits, open_session  # noqa: E402
from edgefed.common.run_dir import RunDir  # noqa: E402
from edgefed.common.training import train_local_epochs  # noqa: E402
from edgefed.edge.dataset import build_features  # noqa: E402
from edgefed.simulations.prepare import prepare  # noqa: E402
from edgefed.simulations.synthetic import SyntheticSpec, generate  # noqa: E402

HELDOUT_SEED = 1000


def trained_adapter(args: argparse.Namespace) -> tuple[EdgefedConfig, dict, FeatureSet]:
    """(config, adapter, central held-out features): from a run, or trained here."""
    if args.run:
        run = RunDir(args.run)
        cfg = EdgefedConfig.from_run_config(run.read_json("config.json"))
        adapter = run.load_tensors("checkpoint.safetensors")
        return cfg, adapter, load_features(DataLayout(Path(cfg.data_dir)).central_features)
    cfg = EdgefedConfig().replace(local_epochs=args.epochs, client_threads=args.threads)
    data = prepare(args.out / "data", cfg, DEFAULT_CLIENTS, alpha=1.0,
                   synthetic=SyntheticSpec(num_clips=DEFAULT_CLIPS, seed=cfg.seed),
                   synthetic_dir=args.out / "datasets" / f"synthetic-n{DEFAULT_CLIPS}-s{cfg.seed}")
    layout = data.layout
    entries = [e for i in range(DEFAULT_CLIENTS) for e in read_manifest(layout.client_train(i))]
    train, _ = build_features(entries, cfg, layout.cache)
    model = build_lora_model(cfg)
    torch.set_num_threads(args.threads)
    print(f"training centrally on {len(train)} clips for {cfg.local_epochs} epochs ...", flush=True)
    result = train_local_epochs(model, train, cfg, seed=cfg.seed)
    print(f"  loss {result.loss:.4f} in {result.seconds:.0f} s", flush=True)
    heldout = load_features(layout.central_features)
    if args.heldout_clips:
        # More unseen clips than the 80 central ones: one clip of 80 is 1.25 points,
        # coarser than the 1-point accuracy budget this benchmark checks.
        manifest = generate(args.out / "datasets" / f"heldout-n{args.heldout_clips}-s{HELDOUT_SEED}",
                            SyntheticSpec(num_clips=args.heldout_clips, seed=HELDOUT_SEED))
        extra, _ = build_features(read_manifest(manifest), cfg, layout.cache)
        heldout = FeatureSet.concat([heldout, extra])
    return cfg, get_adapter_state(model), heldout


def median_latencies(calls: dict[str, Callable[[], object]], repeat: int, blocks: int = 4) -> dict[str, float]:
    """Median ms per call of each function.

    Each variant runs in blocks of repeat/blocks calls, the variants taking
    turns block by block (in alternating order), so drift on a shared machine
    hits them alike; calls are not interleaved one by one, because a runtime's
    worker threads keep spinning for a while after a call and would steal the
    cores from whichever runs next.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_block = max(repeat // blocks, 1)
    for block in range(blocks):
        order = list(calls) if block % 2 == 0 else list(reversed(calls))
        for name in order:
            call = calls[name]
            for _ in range(3):  # warm-up after the switch
                call()
            for _ in range(per_block):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t) * 1000, 3) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-onnx"))
    parser.add_argument("--run", type=Path, default=None, help="use this run's checkpoint instead of training")
    parser.add_argument("--epochs", type=int, default=4, help="central training epochs (without --run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heldout-clips", type=int, default=400,
                        help="extra unseen clips (another seed) added to the central held-out set")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()

    cfg, adapter, heldout = trained_adapter(args)
    torch.set_num_threads(args.threads)
    model = merged_model(cfg, adapter)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = export_quantized(model, cfg, tmp, ("int8", "int4"))
        print(f"export + quantization: {time.perf_counter() - start:.1f} s", flush=True)
        sessions = {f"onnx_{q}": open_session(str(p), args.threads) for q, p in paths.items()}
        sizes = {f"onnx_{q}": file_size(p) / 1e6 for q, p in paths.items()}
    sizes["torch_fp32"] = sum(p.numel() * 4 for p in model.parameters()) / 1e6

    with torch.inference_mode():
        torch_logits = torch.cat([model(b.frames, b.frame_mask, b.audio, b.audio_mask)
                                  for b in heldout.batches(cfg.eval_batch_size)])
    reference = torch_logits.argmax(dim=1)
    results = {"torch_fp32": {"heldout_accuracy": evaluate(model, heldout, cfg.eval_batch_size).accuracy,
                              "argmax_agreement_vs_torch": 1.0}}
    for name, session in sessions.items():
        logits = onnx_logits(session, heldout, cfg.eval_batch_size)
        results[name] = {"heldout_accuracy": evaluate_onnx(session, heldout, cfg.eval_batch_size).accuracy,
                         "argmax_agreement_vs_torch": float((logits.argmax(dim=1) == reference).float().mean())}

    for batch in (1, 8):
        inputs = example_inputs(cfg, batch, seed=batch)
        feeds = dict(zip(INPUT_NAMES, (t.numpy() for t in inputs)))

        def torch_call(inputs: tuple = inputs) -> object:
            with torch.inference_mode():
                return model(*inputs)

        calls: dict[str, Callable[[], object]] = {"torch_fp32": torch_call}
        for name, session in sessions.items():
            calls[name] = lambda s=session, f=feeds: s.run(None, f)
        for name, ms in median_latencies(calls, args.repeat if batch == 1 else max(args.repeat // 4, 10)).items():
            results[name][f"latency_ms_batch{batch}"] = ms
    order = ["torch_fp32", "onnx_fp32", "onnx_int8", "onnx_int4"]
    models = {name: {"size_mb": round(sizes[name], 3), **{k: (round(v, 4) if isinstance(v, float) else v)
                                                          for k, v in results[name].items()}} for name in order}
    out = {
        "threads": args.threads,
        "heldout_examples": len(heldout),
        "models": models,
        "int8_size_ratio": round(sizes["onnx_int8"] / sizes["onnx_fp32"], 4),
        "int8_latency_ratio_batch1": round(models["onnx_int8"]["latency_ms_batch1"]
                                           / models["torch_fp32"]["latency_ms_batch1"], 4),
        "int8_accuracy_gap": round(models["onnx_fp32"]["heldout_accuracy"] - models["onnx_int8"]["heldout_accuracy"], 4),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
